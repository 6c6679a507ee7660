"""Run the real service (`python main.py`, uvicorn) on 127.0.0.1 and a free port, for tests, soak and benchmark.

One implementation of "start the server, wait for /health, read its log, stop it" shared by
`tests/conftest.py`, `scripts/soak.py` and `bench/server.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import httpx

ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the process that started it dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalServer:
    """One `python main.py` process; its output goes to `log_path`."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        die_with_parent: bool = False,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_DIR": "",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.wrapper = list(wrapper)  # a command that runs the server's, e.g. as another user
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._die_with_parent = die_with_parent and sys.platform == "linux"
        self._log: BinaryIO | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int:
        """The server's process id (it must have been started)."""
        assert self.process is not None, "server not started"
        return self.process.pid

    def start(self) -> None:
        """Start the process (returns at once; see `wait_ready`)."""
        self._log = self.log_path.open("ab")
        self._started_at = time.perf_counter()
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "main.py"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )

    def wait_ready(self, timeout_seconds: float, poll_seconds: float = 0.05) -> float:
        """Block until /health answers 200; return the seconds since `start`. Raises ServerStartError."""
        assert self.process is not None, "server not started"
        deadline = time.monotonic() + timeout_seconds
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(f"server exited with {self.process.returncode}:\n{self.log()[-6000:]}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        self.startup_seconds = time.perf_counter() - self._started_at
                        return self.startup_seconds
                except httpx.HTTPError:
                    pass
                time.sleep(poll_seconds)
        raise ServerStartError(f"server not ready after {timeout_seconds:.0f} s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        """Everything the server has written so far."""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM and wait (coverage data is written on the way out); SIGKILL if it will not go."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
