"""Process and host figures for `/system-metrics` (psutil), and the event-loop lag monitor."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from infrastructure.metrics import EVENT_LOOP_LAG


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


def release_freed_memory() -> bool:
    """Hand memory freed during start-up back to the OS (glibc's malloc_trim); False where unavailable.

    Loading the index allocates and frees tens of MB that glibc would otherwise keep mapped: measured here,
    a warm start idles at ~358 MB RSS with the trim instead of ~404 MB.
    """
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    malloc_trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
    if malloc_trim is None:  # not glibc (e.g. musl)
        return False
    malloc_trim(0)
    return True


class EventLoopLagMonitor:
    """Sleeps `interval` seconds in a loop and records how much later than asked the loop woke it up.

    A loop blocked by synchronous work (a slow call on the loop instead of a thread) shows up here as lag.
    """

    def __init__(self, interval_seconds: float = 0.5, keep: int = 120) -> None:
        self.interval_seconds = interval_seconds
        self._recent: deque[float] = deque(maxlen=keep)

    async def run(self) -> None:
        """Measure until cancelled (a background task of the lifespan)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval_seconds)
            self.record(max(0.0, loop.time() - started - self.interval_seconds))

    def record(self, lag_seconds: float) -> None:
        """Keep one measurement and publish it as the `event_loop_lag_seconds` gauge."""
        self._recent.append(lag_seconds)
        EVENT_LOOP_LAG.set(lag_seconds)

    def summary(self) -> dict[str, float | int | None]:
        """The latest, average and worst lag over the kept measurements, in milliseconds."""
        recent = list(self._recent)
        if not recent:
            return {"current_ms": None, "avg_ms": None, "max_ms": None, "samples": 0}
        return {
            "current_ms": round(recent[-1] * 1000.0, 3),
            "avg_ms": round(sum(recent) / len(recent) * 1000.0, 3),
            "max_ms": round(max(recent) * 1000.0, 3),
            "samples": len(recent),
        }


class SystemSampler:
    """Reads CPU, memory, file descriptors and threads of the host and of this process."""

    def __init__(self, disk_path: Path | None = None) -> None:
        self._process = psutil.Process()
        self._disk_path = disk_path
        self.started_at = time.time()
        # cpu_percent(None) compares with the previous call; the first call only sets the baseline.
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def snapshot(self) -> dict[str, Any]:
        """One reading; CPU percentages cover the time since the previous reading."""
        process = self._process
        with process.oneshot():
            memory_info = process.memory_info()
            cpu_times = process.cpu_times()
            created = process.create_time()
            figures: dict[str, Any] = {
                "pid": process.pid,
                "cpu_percent": process.cpu_percent(None),
                "cpu_user_seconds": round(cpu_times.user, 3),
                "cpu_system_seconds": round(cpu_times.system, 3),
                "rss_bytes": memory_info.rss,
                "vms_bytes": memory_info.vms,
                "memory_percent": round(process.memory_percent(), 3),
                "open_fds": process.num_fds() if hasattr(process, "num_fds") else None,
                "threads": process.num_threads(),
                "started_at": created,
            }
        virtual = psutil.virtual_memory()
        now = time.time()
        snapshot: dict[str, Any] = {
            "timestamp": now,
            "uptime_seconds": round(now - created, 3),
            "cpu": {
                "percent": psutil.cpu_percent(None),
                "count": psutil.cpu_count() or 1,
                "load_average": [round(value, 3) for value in os.getloadavg()],
            },
            "memory": {
                "total_bytes": virtual.total,
                "available_bytes": virtual.available,
                "used_bytes": virtual.used,
                "percent": virtual.percent,
            },
            "process": figures,
        }
        if self._disk_path is not None:
            snapshot["disk"] = self._disk(self._disk_path)
        return snapshot

    @staticmethod
    def _disk(path: Path) -> dict[str, Any]:
        """Free space where the cache lives (the nearest existing parent of `path`)."""
        existing = next((candidate for candidate in (path, *path.parents) if candidate.exists()), Path("/"))
        usage = psutil.disk_usage(str(existing))
        return {"path": str(existing), "total_bytes": usage.total, "free_bytes": usage.free, "percent": usage.percent}
