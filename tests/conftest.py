"""Fixtures that start the real server (uvicorn via `python main.py`) on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_openai import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 420.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A real server process; its JSON log goes to a file the tests can read."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "ENVIRONMENT": "test",
            "LOG_DIR": "",
            "HF_HUB_OFFLINE": "1",
            # The shared test servers take thousands of questions from one address; rate-limit tests set their own.
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000",
            **env,
        }
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py"], cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self) -> None:
        """Block until /health answers, or fail with the server's log."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_SECONDS}s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server has logged so far."""
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        """SIGTERM, then wait (coverage data is written on the way out)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the session: the dataset is embedded once, later servers start warm."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: `start_server(**env)` starts a configured server, stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        settings = {"CACHE_DIR": str(shared_cache_dir), **env}
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(settings, log_path)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The default server, shared by most tests."""
    return start_server()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    """An httpx client bound to the default server."""
    with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        yield http


# --- an OpenAI-compatible API on loopback (tests/fake_openai.py) ---------------------------------------------


@dataclass(frozen=True)
class OpenAIStack:
    """A server using the fake API for embeddings and generative answers, and what start-up cost there."""

    server: ServerProcess
    fake: FakeOpenAIServer
    startup_stats: dict[str, Any]
    cache_dir: Path


def openai_env(fake: FakeOpenAIServer, cache_dir: Path) -> dict[str, str]:
    """Settings for a server on the fake API: remote embeddings, generative answers, short timeouts."""
    return {
        "EMBEDDING_PROVIDER": "openai",
        "ANSWER_MODE": "generative",
        "OPENAI_API_KEY": fake.state.api_key,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_TIMEOUT_SECONDS": "2",
        "OPENAI_MAX_RETRIES": "2",
        "CACHE_DIR": str(cache_dir),
    }


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """The fake OpenAI-compatible API, served from a thread of the test process."""
    fake = FakeOpenAIServer().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def openai_stack(
    start_server: Callable[..., ServerProcess], fake_openai: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> OpenAIStack:
    """One server on the fake API for the session (its own cache directory, so its index is its own)."""
    cache_dir = tmp_path_factory.mktemp("openai-cache")
    fake_openai.reset()
    server = start_server(**openai_env(fake_openai, cache_dir))
    return OpenAIStack(server, fake_openai, fake_openai.stats(), cache_dir)
