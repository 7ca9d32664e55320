"""The response cache: a model's answers to identical requests, kept by flask-caching.

Opt-in per model (``add_model(..., cache=CacheSettings(ttl=300, size=1024))``, or
``cache = true`` in a config file). One flask-caching ``Cache`` per model, so each has its
own size bound, lifetime and key prefix, and a reload forgets one model's entries only. The
backend is flask-caching's own choice: ``app.config["CACHE_TYPE"]`` and the other standard
``CACHE_*`` keys (``RedisCache`` + ``CACHE_REDIS_URL`` to share it between web processes or
hosts); without them an in-process ``SimpleCache``.

A key is the model's name and generation, a fingerprint of the server's API key, and a hash
of the canonical request: a JSON body with its keys sorted (so ``{"a":1,"b":2}`` and
``{"b": 2, "a": 1}`` are one entry), any other body as its bytes with its content type.
Only complete 200 answers are stored; errors and streams never are.

A cache is an optimisation, never a dependency: a backend that fails or hangs costs a request
at most ``IPCSERVE_CACHE_TIMEOUT`` (the Redis client's socket timeouts, no retry), then the
model answers. Its errors are counted in ``ipcserve_cache_errors_total{model,op}``, shown in
the model list (``cache.errors``) and on the status page, and logged (rate-limited).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from typing import Any

from ..engine.errors import ConfigError
from .metrics import Metrics

__all__ = ["CacheSettings", "Lookup", "ResponseCache"]

logger = logging.getLogger(__name__)

HEADER = "X-IPCServe-Cache"
#: Seconds between two log lines about one model's failing cache backend, at least.
LOG_EVERY = 10.0


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """A model's cache.

    Attributes:
        ttl: seconds an answer is kept.
        size: most answers kept (in-process backends; Redis and memcached bound memory
            their own way).
    """

    ttl: float = 300.0
    size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float)) \
                or not math.isfinite(self.ttl) or self.ttl <= 0:
            raise ConfigError(f"cache_ttl must be a number of seconds > 0, got {self.ttl!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"cache_size must be an integer >= 1, got {self.size!r}")


@dataclasses.dataclass(frozen=True)
class Lookup:
    """What the cache said about one request.

    Attributes:
        hit: the stored ``(body, content type)``, or None.
        key: where to store the answer; None when it must not be stored (a body the cache
            cannot key, or a backend that just failed: trying it again would cost the request
            a second timeout).
    """

    hit: tuple[bytes, str] | None
    key: str | None


class ResponseCache:
    """One model's cached answers (body bytes and content type) in a flask-caching Cache.

    A backend error never fails a request: the model answers it. Each one is counted
    (``ipcserve_cache_errors_total{model,op}`` and :attr:`errors`) and logged, one line per
    :data:`LOG_EVERY` seconds at most, each carrying how many errors it stands for. A failed
    ``get`` is neither a hit nor a miss. A backend on the network (Redis) gets ``timeout``
    seconds per operation and no retry, so a dead or hung server costs a request at most
    that.

    Args:
        app: the Flask app (its ``CACHE_*`` keys choose the backend).
        model: the model's name (key prefix, metrics label, log lines).
        settings: lifetime and size.
        key_salt: from :func:`key_salt`.
        metrics: where hits, misses and errors are counted (None: nowhere).
        timeout: seconds per backend operation (Redis' socket timeouts).

    Raises:
        ConfigError: the backend cannot be made (an unknown ``CACHE_TYPE``, a missing client
            package), or ``timeout`` is not a number of seconds > 0.
    """

    def __init__(self, app: Any, model: str, settings: CacheSettings, key_salt: bytes, *,
                 metrics: Metrics | None = None, timeout: float = 0.25) -> None:
        try:
            from flask_caching import Cache
        except ImportError:  # pragma: no cover - a dependency of ipcserve
            raise ConfigError("the response cache needs flask-caching (pip install "
                              "flask-caching)") from None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"IPCSERVE_CACHE_TIMEOUT must be a number of seconds > 0, got "
                              f"{timeout!r}")
        config = {k: v for k, v in app.config.items() if k.startswith("CACHE_")}
        config.setdefault("CACHE_TYPE", "SimpleCache")
        config.update(CACHE_DEFAULT_TIMEOUT=max(1, math.ceil(settings.ttl)),
                      CACHE_THRESHOLD=settings.size,
                      CACHE_KEY_PREFIX=f"{config.get('CACHE_KEY_PREFIX', '')}ipcserve/{model}/")
        if _is_redis(config["CACHE_TYPE"]):
            config["CACHE_OPTIONS"] = {**_redis_options(timeout),
                                       **(config.get("CACHE_OPTIONS") or {})}
        self._cache = Cache()
        try:
            self._cache.init_app(app, config=config)
        except Exception as exc:  # e.g. RedisCache without the redis package
            raise ConfigError(f"the response cache of model {model!r}: CACHE_TYPE "
                              f"{config['CACHE_TYPE']!r}: {exc}") from None
        self.model = model
        self.backend = str(config["CACHE_TYPE"])
        self._salt = key_salt
        self._metrics = metrics
        self._lock = threading.Lock()  # handler threads share the counts below
        #: Failed backend operations so far, by operation.
        self.errors = {"get": 0, "set": 0, "clear": 0}
        #: ``{"op", "error", "time"}`` of the last failure (``time``: Unix seconds), or None.
        self.last_error: dict[str, Any] | None = None
        #: True while the backend's last operation failed.
        self.failing = False
        self._unreported = 0  # errors not yet in a log line
        self._reported_at = -math.inf  # time.monotonic() of the last line about errors
        self._recovered_at = -math.inf  # ... and of the last "works again" line

    def key(self, generation: int, mimetype: str, body: bytes) -> str | None:
        """The entry's key, or None when the request cannot be cached (a JSON body that
        does not parse: it is answered with its error, never stored)."""
        if mimetype == "application/json" or mimetype.endswith("+json"):
            try:
                canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False, allow_nan=False).encode()
            except (ValueError, RecursionError):
                return None
            digest = hashlib.sha256(b"json\0" + canonical)
        else:
            digest = hashlib.sha256(mimetype.encode() + b"\0" + body)
        digest.update(self._salt)
        return f"g{generation}/{digest.hexdigest()}"

    def lookup(self, generation: int, mimetype: str, body: bytes) -> Lookup:
        """Look the request up, and count it: a hit, a miss, or (the backend failed)
        neither."""
        key = self.key(generation, mimetype, body)
        if key is None:
            self._count(hit=False)
            return Lookup(None, None)
        try:
            hit = self._cache.get(key)
        except Exception as exc:  # the backend is down: the model answers
            self._failed("get", exc)
            return Lookup(None, None)
        self._worked()
        if not (isinstance(hit, tuple) and len(hit) == 2):
            hit = None
        self._count(hit=hit is not None)
        return Lookup(hit, key)

    def set(self, key: str, body: bytes, content_type: str) -> None:
        """Store an answer; a backend error costs the entry, never the answer."""
        try:
            self._cache.set(key, (body, content_type))
        except Exception as exc:
            self._failed("set", exc)
            return
        self._worked()

    def clear(self) -> None:
        """Forget every entry of this model (after a reload)."""
        try:
            self._cache.clear()
        except Exception as exc:
            self._failed("clear", exc)
            return
        self._worked()

    def describe(self) -> dict[str, Any]:
        """The backend's health for the model list: ``{"errors": {op: count},
        "last_error": {"op", "error", "time"} or None, "failing": bool}``."""
        with self._lock:
            return {"errors": dict(self.errors), "last_error": self.last_error,
                    "failing": self.failing}

    def flush_log(self) -> None:
        """Log the errors not reported yet (at shutdown: the rate limit holds some back)."""
        with self._lock:
            count, self._unreported = self._unreported, 0
            last = self.last_error
        if count and last is not None:
            logger.warning("model %s: the response cache (%s) failed %d more time(s) since the "
                           "last report, last in %s: %s", self.model, self.backend, count,
                           last["op"], last["error"])

    def _count(self, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache_result(self.model, hit)

    def _failed(self, op: str, exc: Exception) -> None:
        if self._metrics is not None:
            self._metrics.cache_error(self.model, op)
        error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        with self._lock:
            self.errors[op] += 1
            self.last_error = {"op": op, "error": error, "time": time.time()}
            self.failing = True
            self._unreported += 1
            if now - self._reported_at < LOG_EVERY:
                return  # a dead backend fails every request: one line per LOG_EVERY at most
            count, self._unreported, self._reported_at = self._unreported, 0, now
        logger.warning("model %s: the response cache (%s) failed %d time(s) since the last "
                       "report, last in %s: %s; the model answers meanwhile", self.model,
                       self.backend, count, op, error)

    def _worked(self) -> None:
        if not self.failing:  # the common case: one attribute read, no lock
            return
        now = time.monotonic()
        with self._lock:
            if not self.failing:
                return
            self.failing = False
            if now - self._recovered_at < LOG_EVERY:
                return  # a flapping backend: its errors wait for the next line
            count, self._unreported, self._recovered_at = self._unreported, 0, now
        logger.warning("model %s: the response cache (%s) works again (%d error(s) since the "
                       "last report)", self.model, self.backend, count)


def _is_redis(cache_type: Any) -> bool:
    """Whether ``CACHE_TYPE`` names a Redis backend (the network clients that take socket
    timeouts): flask-caching's ``RedisCache``, ``RedisSentinelCache``, ``RedisClusterCache``
    by name or import path, or a subclass."""
    try:
        from flask_caching.backends.rediscache import RedisCache
        from werkzeug.utils import import_string

        name = str(cache_type)
        found = import_string(name if "." in name else f"flask_caching.backends.{name}")
    except Exception:  # let flask-caching report a CACHE_TYPE it cannot import
        return False
    return isinstance(found, type) and issubclass(found, RedisCache)


def _redis_options(timeout: float) -> dict[str, Any]:
    """redis-py client options that bound one operation to about ``timeout`` seconds."""
    try:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:  # flask-caching then says "no redis module found"
        return {}
    # redis-py 6+ retries a failed command up to 10 times with backoff by default: seconds
    # per request against a dead server. The next request is the retry.
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0)}


def key_salt(api_key: bytes | None) -> bytes:
    """A fingerprint of the server's API key mixed into every cache key: servers that share
    a cache backend with different keys never see each other's entries."""
    return b"" if api_key is None else hashlib.sha256(b"ipcserve-cache\0" + api_key).digest()
