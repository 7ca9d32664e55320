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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from ..engine.errors import ConfigError

__all__ = ["CacheSettings", "ResponseCache"]

HEADER = "X-IPCServe-Cache"


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


class ResponseCache:
    """One model's cached answers (body bytes and content type) in a flask-caching Cache."""

    def __init__(self, app: Any, model: str, settings: CacheSettings, key_salt: bytes) -> None:
        try:
            from flask_caching import Cache
        except ImportError:  # pragma: no cover - a dependency of ipcserve
            raise ConfigError("the response cache needs flask-caching (pip install "
                              "flask-caching)") from None
        config = {k: v for k, v in app.config.items() if k.startswith("CACHE_")}
        config.setdefault("CACHE_TYPE", "SimpleCache")
        config.update(CACHE_DEFAULT_TIMEOUT=max(1, math.ceil(settings.ttl)),
                      CACHE_THRESHOLD=settings.size,
                      CACHE_KEY_PREFIX=f"{config.get('CACHE_KEY_PREFIX', '')}ipcserve/{model}/")
        self._cache = Cache()
        try:
            self._cache.init_app(app, config=config)
        except Exception as exc:  # e.g. RedisCache without the redis package
            raise ConfigError(f"the response cache of model {model!r}: CACHE_TYPE "
                              f"{config['CACHE_TYPE']!r}: {exc}") from None
        self.backend = str(config["CACHE_TYPE"])
        self._salt = key_salt

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

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The stored (body, content type), or None."""
        try:
            hit = self._cache.get(key)
        except Exception:  # a backend that is down is a miss, never an error
            return None
        if isinstance(hit, tuple) and len(hit) == 2:
            return hit
        return None

    def set(self, key: str, body: bytes, content_type: str) -> None:
        try:
            self._cache.set(key, (body, content_type))
        except Exception:  # a backend that is down costs the entry, never the answer
            pass

    def clear(self) -> None:
        """Forget every entry of this model (after a reload)."""
        try:
            self._cache.clear()
        except Exception:
            pass


def key_salt(api_key: bytes | None) -> bytes:
    """A fingerprint of the server's API key mixed into every cache key: servers that share
    a cache backend with different keys never see each other's entries."""
    return b"" if api_key is None else hashlib.sha256(b"ipcserve-cache\0" + api_key).digest()
