"""Process-wide tuning applied once at start-up: BLAS threads, the frozen start-up heap, trimmed malloc arenas."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]


def limit_blas_threads() -> None:
    """Run numpy's BLAS on one thread: retrieval's small products wait on a thread pool otherwise.

    Measured in process on 2 cores: a cached answer took 10.4 ms with OpenBLAS's default threads and
    4.3 ms with one (docs/performance.md). ONNX Runtime has its own threads and is not affected.
    """
    threadpool_limits(limits=1, user_api="blas")


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after start-up out of the cyclic GC's reach (`gc.freeze`).

    The index, the TF-IDF vocabulary and the model wrappers are hundreds of thousands of long-lived objects;
    without this, every full collection under load walks all of them and stalls the event loop: measured
    here under 2,400 cached answers a second, a full collection took 122 ms before the freeze and 15 ms after.
    """
    gc.collect()
    gc.freeze()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(library), "malloc_trim", None)
    return trim  # None where the C library is not glibc (e.g. musl)


def release_freed_memory() -> bool:
    """Hand memory the process freed back to the OS (glibc's malloc_trim); False where unavailable (blocking).

    Loading the index allocates and frees tens of MB that glibc would otherwise keep mapped: measured here,
    a warm start idles at ~358 MB RSS with the trim instead of ~404 MB.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def release_freed_memory_every(interval_seconds: float) -> None:
    """Trim freed memory every `interval_seconds`, off the event loop (MEMORY_TRIM_INTERVAL_SECONDS).

    After a burst (thousands of sockets opened and closed, streams answered) glibc keeps the freed memory
    mapped: measured after 3,000 WebSockets and 2,000 streams, RSS stayed ~220 MB over idle without a trim.
    """
    while True:
        await asyncio.sleep(interval_seconds)
        await asyncio.to_thread(release_freed_memory)
