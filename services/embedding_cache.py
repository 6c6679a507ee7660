"""Embedding cache layers: an in-memory LRU, an optional shared tier in Redis, checksummed files on disk.

Keys are SHA256 hex digests of (model id + normalized text). A disk entry is a small binary file:

    magic "DQE1" | created (float64, unix seconds) | dimension (uint32) | sha256(vector) | float32 vector

No pickle is involved. A truncated, altered or expired file is treated as a miss and removed, so the
caller recomputes and rewrites it; the cache never raises into a request.

The shared tier stores `defi:emb:<key>` -> the raw little-endian float32 vector, with a TTL of
CACHE_EXPIRY_DAYS. A Redis error is a miss (and the tier is skipped for a moment), never a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from cachetools import LRUCache
from redis.asyncio import Redis

from infrastructure.metrics import EMBEDDING_CACHE_REQUESTS, SHARED_STORAGE_ERRORS
from infrastructure.redis_client import RedisFailure
from services.text import normalize_text

logger = structlog.get_logger(__name__)

_MAGIC = b"DQE1"
_HEADER = struct.Struct("<4sdI32s")
CacheLayer = Literal["memory", "disk", "shared"]


def cache_key(model_id: str, text: str) -> str:
    """SHA256 key of the model id and the normalised text; never raises, whatever the `str`.

    Validation refuses questions that are not valid Unicode, but a key must not be the place that fails:
    `surrogatepass` encodes lone surrogates too (valid text gets exactly the bytes plain UTF-8 gives).
    """
    material = f"{model_id}\n{normalize_text(text)}"
    return hashlib.sha256(material.encode("utf-8", errors="surrogatepass")).hexdigest()


class MemoryCache:
    """A bounded least-recently-used map from cache key to vector (thread-safe)."""

    def __init__(self, max_size: int) -> None:
        self._items: LRUCache[str, np.ndarray] = LRUCache(max_size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        """Return the vector for `key`, or None."""
        with self._lock:
            vector = self._items.get(key)  # a hit makes the entry the most recently used
            if vector is not None:
                self.hits += 1
            else:
                self.misses += 1
        EMBEDDING_CACHE_REQUESTS.labels(layer="memory", result="hit" if vector is not None else "miss").inc()
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        """Store `vector`, evicting the least recently used entry when full."""
        with self._lock:
            self._items[key] = vector

    def __len__(self) -> int:
        return len(self._items)


class SharedCache:
    """Vectors in Redis, shared by every worker and replica (async; errors count as misses)."""

    PREFIX = "defi:emb:"
    PAUSE_AFTER_ERROR_SECONDS = 2.0
    TIMEOUT_SECONDS = 1.0  # a slower answer is a miss: a question never waits on a frozen Redis for long

    def __init__(self, client: Redis, expiry_days: int) -> None:
        self._redis = client
        self._ttl_seconds = expiry_days * 86_400
        self._paused_until = 0.0
        self.healthy = True
        self.last_error: str | None = None
        self.hits = 0
        self.misses = 0

    async def get(self, key: str) -> np.ndarray | None:
        """The shared vector for `key`, or None (absent, malformed, or Redis unavailable)."""
        vector: np.ndarray | None = None
        if time.monotonic() >= self._paused_until:
            try:
                blob = await asyncio.wait_for(self._redis.get(self.PREFIX + key), self.TIMEOUT_SECONDS)
            except RedisFailure as error:  # TimeoutError included
                self._failed(error)
            else:
                self._succeeded()
                if isinstance(blob, bytes) and blob and len(blob) % 4 == 0:
                    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if vector is not None:
            self.hits += 1
        else:
            self.misses += 1
        EMBEDDING_CACHE_REQUESTS.labels(layer="shared", result="hit" if vector is not None else "miss").inc()
        return vector

    async def put(self, key: str, vector: np.ndarray) -> None:
        """Share `vector` for CACHE_EXPIRY_DAYS (best effort)."""
        if time.monotonic() < self._paused_until:
            return
        payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        try:
            await asyncio.wait_for(
                self._redis.set(self.PREFIX + key, payload, ex=self._ttl_seconds), self.TIMEOUT_SECONDS
            )
        except RedisFailure as error:
            self._failed(error)
        else:
            self._succeeded()

    def _failed(self, error: BaseException) -> None:
        SHARED_STORAGE_ERRORS.labels(component="embedding_cache").inc()
        self._paused_until = time.monotonic() + self.PAUSE_AFTER_ERROR_SECONDS
        if self.healthy:
            logger.warning("embedding_shared_cache_error", error=f"{type(error).__name__}: {error}"[:300])
        self.healthy = False
        self.last_error = f"{type(error).__name__}: {error}"[:200]

    def _succeeded(self) -> None:
        if not self.healthy:
            logger.info("embedding_shared_cache_recovered")
        self.healthy = True
        self.last_error = None


class DiskCache:
    """Checksummed vectors on disk with expiry and a least-recently-used size cap."""

    def __init__(self, directory: Path, max_entries: int, expiry_days: int) -> None:
        self._directory = directory
        self._max_entries = max_entries
        self._max_age_seconds = expiry_days * 86_400.0
        self._lock = threading.Lock()
        self._index: OrderedDict[str, None] = OrderedDict()
        self._made_dirs: set[Path] = set()
        self.healthy = True
        self.last_error: str | None = None
        self.hits = 0
        self.misses = 0
        self._load_index()

    @property
    def directory(self) -> Path:
        """Where the entries live."""
        return self._directory

    def _path(self, key: str) -> Path:
        return self._directory / key[:2] / f"{key}.bin"

    def _load_index(self) -> None:
        """Rebuild the LRU order from file modification times (touched on every hit)."""
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            files = sorted(self._directory.glob("*/*.bin"), key=lambda path: path.stat().st_mtime)
        except OSError as error:
            self._mark_unhealthy("index", error)
            return
        for path in files:
            self._index[path.stem] = None
        self._evict_over_cap()

    def _mark_unhealthy(self, action: str, error: OSError) -> None:
        self.healthy = False
        self.last_error = f"{action}: {error.strerror or error}"
        logger.warning("embedding_disk_cache_error", action=action, error=self.last_error)

    def known(self, key: str) -> bool:
        """Whether `key` is in this process's index (files found at start-up or written since).

        A cheap check on the event loop before a thread reads the file. A file another process wrote after
        this one started is not known, and so costs one recomputation here; Redis is the shared tier.
        """
        return key in self._index

    def count_miss(self) -> None:
        """Count a miss decided without reading a file (see `known`)."""
        with self._lock:
            self.misses += 1
        EMBEDDING_CACHE_REQUESTS.labels(layer="disk", result="miss").inc()

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """`put` each (key, vector): one thread job for a whole model batch."""
        for key, vector in items:
            self.put(key, vector)

    def get(self, key: str) -> np.ndarray | None:
        """Return the stored vector, or None when absent, expired or damaged (damaged files are removed)."""
        vector = self._read(key)
        with self._lock:
            if vector is not None:
                self.hits += 1
            else:
                self.misses += 1
        EMBEDDING_CACHE_REQUESTS.labels(layer="disk", result="hit" if vector is not None else "miss").inc()
        return vector

    def _read(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._mark_unhealthy("read", error)
            return None
        vector, problem = _decode(blob, self._max_age_seconds)
        if vector is None:
            logger.warning("embedding_cache_entry_discarded", key=key[:12], reason=problem)
            self._remove(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        with self._lock:
            self._index[key] = None
            self._index.move_to_end(key)
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        """Write `vector` atomically (temp file + rename) and enforce the size cap."""
        path = self._path(key)
        temp_name: str | None = None
        try:
            if path.parent not in self._made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made_dirs.add(path.parent)
            # Unique per process and thread, so writers never share a temp file (cheaper than mkstemp's names).
            temp_name = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            handle = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(handle, "wb") as file:
                file.write(_encode(vector))
            Path(temp_name).replace(path)
        except OSError as error:
            self._made_dirs.discard(path.parent)  # recreate it next time (it may have been removed)
            if temp_name is not None:
                with contextlib.suppress(OSError):
                    Path(temp_name).unlink()
            self._mark_unhealthy("write", error)
            return
        self.healthy = True
        self.last_error = None
        with self._lock:
            self._index[key] = None
            self._index.move_to_end(key)
        self._evict_over_cap()

    def _evict_over_cap(self) -> None:
        while True:
            with self._lock:
                if len(self._index) <= self._max_entries:
                    return
                oldest, _ = self._index.popitem(last=False)
            self._remove(oldest)

    def _remove(self, key: str) -> None:
        with self._lock:
            self._index.pop(key, None)
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as error:
            self._mark_unhealthy("remove", error)

    def __len__(self) -> int:
        return len(self._index)


def _encode(vector: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    header = _HEADER.pack(_MAGIC, time.time(), vector.shape[0], hashlib.sha256(payload).digest())
    return header + payload


def _decode(blob: bytes, max_age_seconds: float) -> tuple[np.ndarray | None, str]:
    if len(blob) < _HEADER.size:
        return None, "truncated header"
    magic, created, dimension, digest = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size :]
    if magic != _MAGIC:
        return None, "bad magic"
    if len(payload) != dimension * 4:
        return None, "truncated vector"
    if hashlib.sha256(payload).digest() != digest:
        return None, "checksum mismatch"
    if time.time() - created > max_age_seconds:
        return None, "expired"
    return np.frombuffer(payload, dtype="<f4").astype(np.float32), "ok"
