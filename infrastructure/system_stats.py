"""Process and host figures for `/system-metrics` (psutil), and the event-loop lag monitor."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from infrastructure.metrics import EVENT_LOOP_LAG


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
