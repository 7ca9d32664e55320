"""API keys per team, with the models each may use and its quotas (the ``keys_file``).

A keys file is TOML, one table per key, named after the team (the name is what the metrics,
the status page and the access log show; the key itself is never shown or stored)::

    [keys.search-team]
    sha256 = "5e88489..."        # the key's SHA-256, in hex: printf %s "$KEY" | sha256sum
    models = ["minilm"]          # the models it may use (default: every model)
    requests_per_minute = 600    # its request quota (default: none)
    tokens_per_minute = 20000    # its quota of generated and prompt tokens (OpenAI routes)

    [keys.web]
    key_env = "WEB_KEY"          # or: the key in this environment variable, hashed at start

Each quota is a token bucket refilled at its rate that holds one second's worth (at least
one request): a key within its rate is never refused, a key over it gets 429
``RateLimitedError`` with ``Retry-After`` (the seconds until the bucket has room), and other
keys are not affected. Tokens are counted when an answer is done (a long answer may take
its key below zero: its next requests wait until the bucket is back above zero).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.config import read_toml
from ..engine.errors import ConfigError, ForbiddenError, RateLimitedError

__all__ = ["Bucket", "Key", "Keys", "load_keys"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = ("sha256", "key_env", "models", "requests_per_minute", "tokens_per_minute")


class Bucket:
    """A token bucket: ``rate`` per second, holding ``capacity``; thread-safe."""

    def __init__(self, per_minute: float, clock: Any = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)  # one second's worth
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` if the bucket holds it: 0.0; else the seconds until it will."""
        with self.lock:
            self._refill()
            if self.level >= amount:
                self.level -= amount
                return 0.0
            return (amount - self.level) / self.rate

    def wait(self) -> float:
        """Seconds until the bucket is above zero again (0.0 if it is)."""
        with self.lock:
            self._refill()
            return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate

    def spend(self, amount: float) -> None:
        """Take ``amount`` after the fact, going below zero if need be."""
        with self.lock:
            self._refill()
            self.level -= amount


@dataclass
class Key:
    """One team's key: its name, the digest it is checked by, what it may do."""

    name: str
    digest: bytes
    models: frozenset[str] | None = None
    requests: Bucket | None = None
    tokens: Bucket | None = None
    counts: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "limited": 0, "tokens": 0})
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _count(self, what: str, amount: int = 1) -> None:
        with self.lock:  # from many server threads at once
            self.counts[what] += amount

    def admit(self) -> None:
        """Count one request against the quotas.

        Raises:
            RateLimitedError: the key is over its request or token quota.
        """
        wait = self.tokens.wait() if self.tokens is not None else 0.0
        what = "tokens"
        if not wait and self.requests is not None:
            wait, what = self.requests.take(), "requests"
        if wait:
            self._count("limited")
            raise RateLimitedError(f"the key {self.name!r} is over its quota of {what} per "
                                   f"minute; retry in {math.ceil(wait)} s",
                                   retry_after=wait)
        self._count("requests")

    def allow(self, model: str) -> None:
        """Raises ForbiddenError if this key may not use ``model``."""
        if self.models is not None and model not in self.models:
            raise ForbiddenError(f"the key {self.name!r} may not use model {model!r}")

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` of an answer against the token quota."""
        self._count("tokens", tokens)
        if self.tokens is not None and tokens > 0:
            self.tokens.spend(tokens)


class Keys:
    """The keys of a server, found by the digest of what a request sends."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    def find(self, sent: bytes) -> Key | None:
        """The key whose digest matches ``sent`` (compared in constant time), or None."""
        digest = hashlib.sha256(sent).digest()
        found = None
        for key in self.keys:  # every one compared: the time does not say which matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def usage(self) -> dict[str, dict[str, int]]:
        """Requests, refusals over quota and tokens, per key name."""
        usage = {}
        for key in self.keys:
            with key.lock:
                usage[key.name] = dict(key.counts)
        return usage


def _rate(table: Mapping[str, Any], name: str, where: str) -> Bucket | None:
    value = table.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {name} must be a number > 0, got {value!r}")
    return Bucket(float(value))


def load_keys(path: str, environ: Mapping[str, str] | None = None) -> Keys:
    """Read a keys file (see the module docstring).

    Raises:
        ConfigError: the file is missing or not TOML, a table has an unknown field, a
            missing or malformed digest, an unset ``key_env``, a bad quota; or two tables
            hold the same key.
    """
    environ = os.environ if environ is None else environ
    document = read_toml(path, f"keys file {path}", "it")
    tables = document.get("keys")
    if set(document) - {"keys"} or not isinstance(tables, dict) or not tables:
        raise ConfigError(f"keys file {path}: expected [keys.NAME] tables and nothing else")
    keys, digests = [], set()
    for name, table in tables.items():
        where = f"keys file {path}: [keys.{name}]"
        if not _NAME.match(name) or not isinstance(table, dict):
            raise ConfigError(f"{where}: a key's name is 1 to 64 letters, digits, '_', '.' "
                              "or '-', and its table holds its fields")
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(_FIELDS)}")
        if ("sha256" in table) == ("key_env" in table):
            raise ConfigError(f"{where}: give exactly one of sha256 (the key's digest) and "
                              "key_env (a variable holding the key)")
        if "sha256" in table:
            text = table["sha256"]
            if not isinstance(text, str) or not _HEX.match(text.lower()):
                raise ConfigError(f"{where}: sha256 must be 64 hex digits (printf %s \"$KEY\" "
                                  "| sha256sum)")
            digest = bytes.fromhex(text)
        else:
            variable = table["key_env"]
            if not isinstance(variable, str) or not environ.get(variable):
                raise ConfigError(f"{where}: key_env names {variable!r}, which is not set")
            digest = hashlib.sha256(environ[variable].encode("utf-8")).digest()
        if digest in digests:
            raise ConfigError(f"{where}: the same key as another table")
        digests.add(digest)
        models = table.get("models")
        if models is not None and (not isinstance(models, list)
                                   or not all(isinstance(m, str) for m in models)):
            raise ConfigError(f"{where}: models must be a list of model names")
        keys.append(Key(name, digest, None if models is None else frozenset(models),
                        _rate(table, "requests_per_minute", where),
                        _rate(table, "tokens_per_minute", where)))
    return Keys(keys)
