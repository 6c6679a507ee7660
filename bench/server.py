"""Start and stop the real server (`python main.py`, uvicorn) for the benchmark, and watch its process."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from scripts.local_server import ROOT, LocalServer, ServerStartError

__all__ = ["ROOT", "BenchServer", "ProcessWatch", "raise_fd_limit"]
READY_TIMEOUT_SECONDS = 300.0

# Settings that keep the service at its defaults except where the benchmark itself would trip a
# per-client limit: all load comes from one address, so the per-client request and message limits
# are raised out of the way (they protect against abuse, they are not part of the cost of a question).
BENCH_ENV = {
    "HOST": "127.0.0.1",
    "ENVIRONMENT": "development",
    "LOG_LEVEL": "WARNING",
    "ENABLE_CONSOLE_LOGS": "false",
    "LOG_DIR": "",
    "RELOAD": "false",
    "WORKERS": "1",
    "HF_HUB_OFFLINE": "1",
    "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000000",
    "WS_MAX_MESSAGES_PER_MINUTE": "100000000",
    "MAX_CONNECTIONS_PER_CLIENT": "100000",  # every load-generator connection comes from 127.0.0.1
    "MAX_SESSIONS_PER_CLIENT": "100000",  # 1,000 WebSockets from one address keep their own sessions
    # The sockets phase holds 10,000 WebSockets at once (4,000 by default, then 503); the file-descriptor
    # limit, which the benchmark raises to its hard limit before it starts the server, is the real cap.
    "MAX_CONNECTIONS": "100000",
    # The interpreter's allocator as the image, the Procfile and `make run` start the server.
    "PYTHONMALLOC": "malloc",
}


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (inherited by the server and clients it starts).

    Returns the soft limit now in force. The service itself never changes its limit: holding 10,000
    sockets is the benchmark's doing, so the benchmark gives its processes the descriptors for them.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


class BenchServer(LocalServer):
    """One server process on 127.0.0.1 and a free port with its own cache directory, killed with the benchmark."""

    def __init__(self, cache_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(
            {**BENCH_ENV, "CACHE_DIR": str(cache_dir), **(extra_env or {})}, log_path, die_with_parent=True
        )
        self.cache_dir = cache_dir

    def start_and_wait(self) -> float:
        """Start the server and block until /health answers 200; return the seconds that took."""
        self.start()
        try:
            return self.wait_ready(READY_TIMEOUT_SECONDS, poll_seconds=0.02)
        except ServerStartError:
            self.stop()
            raise

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's output."""
        return self.log()[-limit:]

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class ProcessWatch:
    """RSS and CPU time of a process and its children (psutil)."""

    def __init__(self, pid: int, include_children: bool = True) -> None:
        self.process = psutil.Process(pid)
        self.include_children = include_children

    def _tree(self) -> list[psutil.Process]:
        if not self.include_children:
            return [self.process]
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for process in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self._tree():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def threads(self) -> int:
        try:
            return int(self.process.num_threads())
        except psutil.NoSuchProcess:
            return 0
