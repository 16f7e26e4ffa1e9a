"""Score cache: one score per (model + settings, stage, query, document) pair.

RAG traffic repeats a query over overlapping document sets, so the engine caches pair scores, not
whole responses: a request whose pairs were partly seen runs only the new ones. A key is the
SHA-256 of a *namespace* (model fingerprint, device and the settings that change scores, see
`namespace`), the query and the document, so a model change can never serve a stale score.

Two backends behind `ScoreCache`: `MemoryScoreCache` (in-process LRU, bounded by bytes, with a TTL)
and `RedisScoreCache` (shared by replicas). Redis trouble never fails a request: lookups answer
"miss", writes are dropped, a warning is logged once per outage and `errors` counts them; the
connection is retried after `retry_after_s`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

# Bytes one memory entry costs beyond its key: the float, the tuple, the OrderedDict node.
_ENTRY_OVERHEAD_BYTES = 200


def namespace(stage: str, model: str, device: str, **settings: object) -> str:
    """The part of every key that names the scorer: stage, model identity, device and settings."""
    parts = [f"stage={stage}", f"model={model}", f"device={device}"]
    parts += [f"{name}={settings[name]}" for name in sorted(settings)]
    return "|".join(parts)


def pair_keys(space: str, query: str, documents: Sequence[str]) -> list[str]:
    """Cache keys of (query, document) pairs under one namespace (hex SHA-256)."""
    head = hashlib.sha256()
    for part in (space, query):
        data = part.encode("utf-8")
        head.update(len(data).to_bytes(8, "little"))
        head.update(data)
    keys = []
    for doc in documents:
        digest = head.copy()
        digest.update(doc.encode("utf-8"))
        keys.append(digest.hexdigest())
    return keys


class ScoreCache(Protocol):
    """What the engine needs from a cache backend. Both methods are thread-safe and never raise
    for backend trouble (a broken backend answers misses)."""

    kind: str  # "memory" | "redis"

    def get_many(self, keys: Sequence[str]) -> list[float | None]:
        """The cached score of each key, None where missing or expired."""
        ...

    def set_many(self, items: Mapping[str, float]) -> None:
        """Store scores."""
        ...

    def stats(self) -> dict[str, Any]:
        """Numbers for metrics and /health: entries, bytes, errors, available."""
        ...


class MemoryScoreCache:
    """In-process LRU bounded by `max_bytes`; entries older than `ttl_s` (if > 0) are misses."""

    kind = "memory"

    def __init__(
        self, max_bytes: int, ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: (score, time)
        self._bytes = 0

    @staticmethod
    def _cost(key: str) -> int:
        return len(key) + _ENTRY_OVERHEAD_BYTES

    def get_many(self, keys: Sequence[str]) -> list[float | None]:
        now = self._clock()
        found: list[float | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    found.append(None)
                elif self.ttl_s > 0 and now - entry[1] > self.ttl_s:
                    del self._entries[key]
                    self._bytes -= self._cost(key)
                    found.append(None)
                else:
                    self._entries.move_to_end(key)
                    found.append(entry[0])
        return found

    def set_many(self, items: Mapping[str, float]) -> None:
        now = self._clock()
        with self._lock:
            for key, score in items.items():
                if key in self._entries:
                    self._entries.move_to_end(key)
                else:
                    self._bytes += self._cost(key)
                self._entries[key] = (score, now)
            while self._bytes > self.max_bytes and self._entries:
                old, _ = self._entries.popitem(last=False)
                self._bytes -= self._cost(old)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "errors": 0,
                "available": True,
            }


def redact_url(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisScoreCache:
    """Scores in Redis (`MGET` / pipelined `SET ... EX`), shared by every replica.

    Scores are stored as `repr(float)`, which reads back as the identical float.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 0.0,
        timeout_s: float = 0.5,
        retry_after_s: float = 5.0,
        prefix: str = "reranker:score:",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a dead Redis costs one timeout, not several
        )
        self.url = redact_url(url)
        self.ttl_s = ttl_s
        self._prefix = prefix
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.available = True
        self.errors = 0

    def _usable(self) -> bool:
        with self._lock:
            return self.available or self._clock() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = self._clock() + self._retry_after_s
            was_available, self.available = self.available, False
        if was_available:
            logger.warning(
                "score cache: Redis at %s is unreachable (%s: %s); serving without a cache, "
                "retrying every %g s",
                self.url,
                type(exc).__name__,
                exc,
                self._retry_after_s,
            )

    def _worked(self) -> None:
        with self._lock:
            was_available, self.available = self.available, True
        if not was_available:
            logger.warning("score cache: Redis at %s is reachable again", self.url)

    def get_many(self, keys: Sequence[str]) -> list[float | None]:
        if not keys or not self._usable():
            return [None] * len(keys)
        try:
            values = self._client.mget([self._prefix + k for k in keys])
        except self._redis_errors as exc:
            self._failed(exc)
            return [None] * len(keys)
        self._worked()
        return [_as_score(v) for v in values]

    def set_many(self, items: Mapping[str, float]) -> None:
        if not items or not self._usable():
            return
        expire = max(1, round(self.ttl_s)) if self.ttl_s > 0 else None
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, score in items.items():
                pipe.set(self._prefix + key, repr(score), ex=expire)
            pipe.execute()
        except self._redis_errors as exc:
            self._failed(exc)
            return
        self._worked()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"errors": self.errors, "available": self.available}

    def close(self) -> None:
        self._client.close()


def _as_score(value: object) -> float | None:
    """A stored score, or None (a miss) for anything that is not one."""
    if value is None:
        return None
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return score if 0.0 <= score <= 1.0 else None
