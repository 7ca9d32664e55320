"""``Config``: validation, ``from_env`` / ``from_mapping`` and ``replace``. Pure logic, no processes."""

from __future__ import annotations

import dataclasses

import pytest

from ipcserve import Config, ConfigError


# -- validation --------------------------------------------------------------------------
def test_config_validates_with_messages_naming_field_and_bound() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be an integer >= 1, got 0"):
        Config(max_batch_size=0)
    with pytest.raises(ConfigError, match="timeout must be a number > 0"):
        Config(timeout=-1)
    with pytest.raises(ConfigError, match="start_method must be one of"):
        Config(start_method="thread")
    with pytest.raises(ConfigError, match="unknown setting"):
        Config().replace(max_batch=3)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Config(hang_timeout=0.1, heartbeat_interval=0.5)


@pytest.mark.parametrize("field", ["timeout", "start_timeout", "hang_timeout", "heartbeat_interval",
                                   "poll_interval", "restart_backoff", "max_restart_backoff"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "1"])
def test_durations_must_be_finite_and_positive(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must be a number > 0, got "):
        Config(**{field: value})


@pytest.mark.parametrize("field", ["max_batch_wait", "shutdown_grace"])
def test_waits_may_be_zero_but_not_negative(field: str) -> None:
    assert getattr(Config(**{field: 0}), field) == 0
    with pytest.raises(ConfigError, match=rf"^{field} must be a number >= 0, got -1"):
        Config(**{field: -1})


@pytest.mark.parametrize("field", ["max_inflight", "max_batch_size", "workers", "circuit_breaker_threshold"])
@pytest.mark.parametrize("value", [0, 1.5, True, "2"])
def test_counts_are_integers_of_at_least_one(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must be an integer >= 1, got "):
        Config(**{field: value})


def test_shm_threshold_and_devices() -> None:
    assert Config(shm_threshold=0).shm_threshold == 0
    with pytest.raises(ConfigError, match="shm_threshold must be an integer >= 0"):
        Config(shm_threshold=-1)
    assert Config(devices=["cuda:0", "cuda:1"]).devices == ("cuda:0", "cuda:1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="devices must be a sequence of device names"):
        Config(devices="cuda:0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="devices"):
        Config(devices=("cuda:0", ""))


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        Config(workers=0)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().timeout = 1.0  # type: ignore[misc]


# -- from_env / from_mapping -------------------------------------------------------------
def test_config_from_env_converts_and_overrides() -> None:
    env = {"IPCSERVE_MAX_BATCH_SIZE": "8", "IPCSERVE_TIMEOUT": "2.5", "OTHER": "x"}
    config = Config.from_env(environ=env, workers=2)
    assert (config.max_batch_size, config.timeout, config.workers) == (8, 2.5, 2)
    with pytest.raises(ConfigError, match="IPCSERVE_WORKERS must be int"):
        Config.from_env(environ={"IPCSERVE_WORKERS": "two"})


def test_devices_from_the_environment() -> None:
    config = Config.from_env(environ={"IPCSERVE_DEVICES": "cuda:0, cuda:1", "IPCSERVE_WORKERS": "2"})
    assert config.devices == ("cuda:0", "cuda:1") and config.workers == 2
    with pytest.raises(ValueError, match="devices"):
        Config(devices="cuda:0")  # type: ignore[arg-type]


def test_from_env_validates_the_converted_values() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be an integer >= 1, got 0"):
        Config.from_env(environ={"IPCSERVE_MAX_BATCH_SIZE": "0"})


def test_overrides_win_over_the_environment() -> None:
    config = Config.from_env(environ={"IPCSERVE_TIMEOUT": "2.5"}, timeout=7.0)
    assert config.timeout == 7.0


def test_from_mapping_uses_the_prefix_and_keeps_non_strings() -> None:
    config = Config.from_mapping({"APP_TIMEOUT": 3, "TIMEOUT": "9"}, prefix="APP_")
    assert config.timeout == 3
    assert Config.from_mapping({}) == Config()


# -- replace -------------------------------------------------------------------------------
def test_replace_returns_a_changed_copy_and_keeps_the_original() -> None:
    original = Config()
    changed = original.replace(max_batch_size=8, timeout=2.0)
    assert (changed.max_batch_size, changed.timeout) == (8, 2.0)
    assert (original.max_batch_size, original.timeout) == (32, 30.0)
    assert changed.replace() == changed


def test_replace_validates_again() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be an integer >= 1, got 0"):
        Config().replace(max_batch_size=0)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Config().replace(hang_timeout=0.1)


def test_replace_names_every_unknown_setting() -> None:
    with pytest.raises(ConfigError, match="unknown setting\\(s\\): max_batch, timout"):
        Config().replace(timout=1, max_batch=3)
