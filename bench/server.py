"""Start and stop the real server (`python main.py`, uvicorn) for the benchmark, and watch its process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import httpx
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
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
}


def _die_with_parent() -> None:
    """In the child before exec (Linux): killed when the benchmark process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a disposable server
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchServer:
    """One server process on 127.0.0.1 and a free port, with its own cache directory."""

    def __init__(self, cache_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log: BinaryIO | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> float:
        """Start the server and block until /health answers 200; return the seconds that took."""
        self.port = free_port()
        env = {
            **os.environ,
            **BENCH_ENV,
            "PORT": str(self.port),
            "CACHE_DIR": str(self.cache_dir),
            **self.extra_env,
        }
        self._log = self.log_path.open("ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "main.py"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return self.startup_seconds
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it will not go."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's output."""
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

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
