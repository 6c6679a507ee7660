"""A real `redis-server` on a free port, owned by the test that starts it (never the one on 6379)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """`redis-server --port N --save '' --appendonly no`: nothing on disk, stoppable and restartable on N."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._log = (workdir / "redis.log").open("a")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start the server on its port and wait until it answers PING."""
        assert REDIS_SERVER is not None, "redis-server is not installed (make system-deps)"
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, cwd=self._workdir, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def answers(self) -> bool:
        """Whether the server answers PING right now."""
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        """A blocking client for the test's own checks."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung host)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen server carries on with what it had queued."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as if the host died: nothing is saved, nothing is said to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Kill the server and close its log."""
        self.kill()
        self._log.close()
