"""The embedding service: the SHA256-keyed caches in front of a provider, and micro-batching.

Model work never runs on the event loop (the provider runs it on its threads, or awaits a remote API).
Concurrent questions queue up while a batch is being computed and are then embedded together in one
model call; up to `workers` batches run at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import structlog

from infrastructure.metrics import EMBEDDING_BATCH_SIZE, EMBEDDING_DURATION
from services.embedding_cache import DiskCache, MemoryCache, SharedCache, cache_key
from services.embedding_providers import EmbeddingError, EmbeddingProvider

logger = structlog.get_logger(__name__)


@dataclass
class _Pending:
    text: str
    key: str
    future: asyncio.Future[np.ndarray]


class EmbeddingService:
    """Embeds texts through the memory and disk caches and a micro-batching worker."""

    def __init__(
        self,
        provider: EmbeddingProvider,
        memory_cache: MemoryCache | None,
        disk_cache: DiskCache | None,
        max_batch_size: int = 32,
        batch_window_ms: float = 2.0,
        shared_cache: SharedCache | None = None,
        workers: int = 1,
    ) -> None:
        self.provider = provider
        self.memory_cache = memory_cache
        self.disk_cache = disk_cache
        self.shared_cache = shared_cache
        self._max_batch_size = max_batch_size
        self._batch_window = batch_window_ms / 1000.0
        # Up to `workers` batches are embedded at once (the local provider has as many threads).
        self._workers = max(1, workers)
        self._free_workers: asyncio.Semaphore | None = None
        self._busy_workers = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._io_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embedding-cache")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}
        self.model_calls = 0
        self.dimension: int | None = None  # known from the first model call (the corpus, at start-up)
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @property
    def model_id(self) -> str:
        """The id of the model producing the vectors (part of every cache key)."""
        return self.provider.model_id

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is for the provider's tokenizer (exact for the local model, else an estimate)."""
        return self.provider.count_tokens(text)

    @property
    def running(self) -> bool:
        """Whether the batching worker is alive (questions can be embedded)."""
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the batching worker on the running loop."""
        self._queue = asyncio.Queue()
        self._free_workers = asyncio.Semaphore(self._workers)
        self._worker = asyncio.create_task(self._run_batches(), name="embedding-batcher")

    async def close(self) -> None:
        """Stop the worker and release threads."""
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        for task in list(self._batches):
            task.cancel()
        self._io_executor.shutdown(wait=False, cancel_futures=True)
        await self.provider.aclose()

    async def embed_query(self, text: str) -> np.ndarray:
        """Embed one question, using the caches; concurrent identical questions share one computation."""
        key = cache_key(self.model_id, text)
        if self.memory_cache is not None and (vector := self.memory_cache.get(key)) is not None:
            return vector
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compute(text, key))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # A waiter that is cancelled (client gone) leaves the shared computation running for the others.
        return await asyncio.shield(task)

    def usable(self, vector: np.ndarray | None, layer: str) -> np.ndarray | None:
        """`vector` when it can be one of this model's vectors (shape, dtype, finite, unit length), else None.

        Every vector read from a cache passes here, so a malformed entry (another writer, a bug, a wrong
        model) is a miss, logged once per read, and never reaches the ranking or another cache.
        """
        if vector is None:
            return None
        problem = None
        if vector.ndim != 1 or vector.dtype != np.float32:
            problem = f"shape {vector.shape} dtype {vector.dtype}"
        elif self.dimension is not None and vector.shape[0] != self.dimension:
            problem = f"{vector.shape[0]} dimensions, expected {self.dimension}"
        elif not np.isfinite(vector).all() or abs(float(np.dot(vector, vector)) - 1.0) > 1e-3:
            problem = "not a finite unit vector"
        if problem is not None:
            logger.warning("embedding_cache_entry_rejected", layer=layer, reason=problem)
            return None
        return vector

    async def _compute(self, text: str, key: str) -> np.ndarray:
        # Order after the memory LRU: shared tier (Redis), local disk, then the model.
        shared = await self.shared_cache.get(key) if self.shared_cache is not None else None
        vector = self.usable(shared, "shared")
        if vector is None:
            vector = self.usable(await self._lookup_disk(key), "disk")
            if vector is None:
                vector = await self._embed_batched(text, key)  # the batcher writes it to disk
            if self.shared_cache is not None:
                await self.shared_cache.put(key, vector)
        if self.memory_cache is not None:
            self.memory_cache.put(key, vector)
        return vector

    async def _lookup_disk(self, key: str) -> np.ndarray | None:
        if self.disk_cache is None:
            return None
        if not self.disk_cache.known(key):  # no thread round trip for a question never seen
            self.disk_cache.count_miss()
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_executor, self.disk_cache.get, key)

    async def _embed_batched(self, text: str, key: str) -> np.ndarray:
        if self._queue is None:
            raise EmbeddingError("embedding service is not started")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(text, key, future))
        return await future

    async def _run_batches(self) -> None:
        """Collect queued questions into batches and hand each to a free worker.

        A batch is collected only once a worker is free, so while every worker is busy the queue grows
        and the next batch is larger: concurrency turns into batch size instead of waiting calls. When other
        workers are idle too, a batch takes only its fair share of the queue and leaves the rest to them, so
        one worker never computes a long batch while another core waits.
        """
        assert self._queue is not None and self._free_workers is not None
        while True:
            await self._free_workers.acquire()
            try:
                batch = [await self._queue.get()]
                self._drain_into(batch)
                if len(batch) < self._max_batch_size and self._batch_window > 0:
                    await asyncio.sleep(self._batch_window)
                    self._drain_into(batch)
            except BaseException:
                self._free_workers.release()
                raise
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                self._free_workers.release()
                continue
            self._busy_workers += 1
            task = asyncio.create_task(self._embed_batch(batch), name="embedding-batch")
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        assert self._free_workers is not None
        self._busy_workers -= 1
        self._free_workers.release()

    async def _embed_batch(self, batch: list[_Pending]) -> None:
        """Embed one batch and settle its futures; errors go to the waiting questions."""
        loop = asyncio.get_running_loop()
        try:
            vectors = await self._call_model([item.text for item in batch])
        except Exception as error:
            self.last_error = str(error)
            self.last_error_at = time.time()
            logger.error("embedding_failed", error=str(error), batch_size=len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(EmbeddingError(str(error)))
            return
        self.last_error = None
        self.last_error_at = None
        for item, vector in zip(batch, vectors, strict=True):
            if not item.future.done():
                item.future.set_result(vector)
        if self.disk_cache is not None:
            written = [(item.key, vector) for item, vector in zip(batch, vectors, strict=True)]
            loop.run_in_executor(self._io_executor, self.disk_cache.put_many, written)

    def _drain_into(self, batch: list[_Pending]) -> None:
        """Move queued questions into `batch`, up to its fair share: the waiting questions split over idle workers."""
        assert self._queue is not None
        idle_workers = self._workers - self._busy_workers  # this batch's worker included
        share = -(-(len(batch) + self._queue.qsize()) // idle_workers)  # ceiling division
        while len(batch) < min(self._max_batch_size, share) and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _call_model(self, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = await self.provider.embed(texts)
        if self.dimension is None:
            self.dimension = int(vectors.shape[1])
        EMBEDDING_DURATION.labels(provider=self.provider.name).observe(time.perf_counter() - started)
        EMBEDDING_BATCH_SIZE.observe(len(texts))
        self.model_calls += 1
        return vectors

    async def embed_corpus(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many texts (the knowledge base) in length-sorted batches, bypassing the caches.

        Similar lengths share a batch so little padding is computed; batches use every worker at once.
        """
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        chunks = corpus_chunks(
            order, [len(text) for text in texts], self.provider.corpus_batch_size, self.provider.corpus_batch_chars
        )
        limit = asyncio.Semaphore(self._workers)

        async def run(indices: list[int]) -> np.ndarray:
            async with limit:
                return await self._call_model([texts[index] for index in indices])

        results = await asyncio.gather(*(run(indices) for indices in chunks))
        if not results:
            return np.zeros((0, 0), dtype=np.float32)
        corpus = np.zeros((len(texts), results[0].shape[1]), dtype=np.float32)
        for indices, vectors in zip(chunks, results, strict=True):
            corpus[indices] = vectors
        return corpus


def corpus_chunks(order: list[int], lengths: list[int], size: int, max_chars: int | None) -> list[list[int]]:
    """Split `order` (indices sorted by length) into batches of at most `size` texts whose padded length
    (count x longest) stays within `max_chars`; a single text longer than that is a batch of its own."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:  # ascending length: the text being added is the batch's longest
        padded = (len(current) + 1) * lengths[index]
        if current and (len(current) == size or (max_chars is not None and padded > max_chars)):
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks
