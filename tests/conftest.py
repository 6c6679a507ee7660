"""Fixtures that start the real server (uvicorn via `python main.py`) on 127.0.0.1 and a free port."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.local_server import ROOT, LocalServer, free_port
from tests.fake_openai import FakeOpenAIServer

STARTUP_TIMEOUT_SECONDS = 420.0
# The shared test servers take thousands of questions from one address; rate-limit tests set their own.
TEST_ENV = {"ENVIRONMENT": "test", "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000"}

__all__ = ["ROOT", "free_port"]


def log_records(server: LocalServer) -> list[dict[str, Any]]:
    """The server's JSON log lines, parsed (other lines skipped)."""
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def poll_until(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Call `check` until it returns something truthy and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class ServerProcess(LocalServer):
    """A real server process in the test configuration, started at once; its JSON log is a file tests read."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__({**TEST_ENV, **env}, log_path)
        self.start()

    def wait_ready(self, timeout_seconds: float = STARTUP_TIMEOUT_SECONDS, poll_seconds: float = 0.1) -> float:
        """Block until /health answers, or fail with the server's log."""
        return super().wait_ready(timeout_seconds, poll_seconds)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the session: the dataset is embedded once, later servers start warm."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Starts configured servers for the session-wide fixtures; anything still running stops with the session."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        directory = tmp_path_factory.mktemp("server")
        # Each server its own SQLite database (the question log) unless the test names one to share.
        settings = {"CACHE_DIR": str(shared_cache_dir), "DATABASE_URL": f"sqlite:///{directory}/defi.db", **env}
        log_path = directory / "server.log"
        server = ServerProcess(settings, log_path)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def start_server(server_factory: Callable[..., ServerProcess]) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: `start_server(**env)` starts a configured server, stopped when the test module ends.

    Servers hold ~400 MB each: kept for the whole session, the suite's fifty would not fit in memory.
    """
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = server_factory(**env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """The default server, shared by most tests."""
    return server_factory()


@pytest.fixture(scope="session")
def slow_stream_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """30 ms between words, so an answer streams for seconds (hang up, cancel or ask again in the middle).

    One for the session: the modules that need it read only what their own requests did.
    """
    return server_factory(STREAM_WORD_DELAY_MS="30")


@pytest.fixture(scope="session")
def busy_session_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """20 ms between words, and a question waits at most 0.2 s for the stream holding its session: then 409.

    One for the session, like `slow_stream_server`.
    """
    return server_factory(STREAM_WORD_DELAY_MS="20", SESSION_WAIT_SECONDS="0.2")


@pytest.fixture(scope="session")
def two_worker_server(server_factory: Callable[..., ServerProcess]) -> tuple[ServerProcess, set[int]]:
    """WORKERS=2, once both workers answer; with their pids.

    One for the session: each test reads figures of its own route, or of each worker, never a global count.
    """
    server = server_factory(WORKERS="2")
    pids: set[int] = set()

    def both_ready() -> bool:  # the port answers once one worker is up; wait for the other as well
        pids.add(httpx.get(f"{server.base_url}/performance-stats", timeout=10).json()["worker_pid"])
        return len(pids) == 2

    poll_until(both_ready, timeout=180, interval=0.05)
    return server, pids


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
    server_factory: Callable[..., ServerProcess],
    fake_openai: FakeOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> OpenAIStack:
    """One server on the fake API for the session (its own cache directory, so its index is its own)."""
    cache_dir = tmp_path_factory.mktemp("openai-cache")
    fake_openai.reset()
    server = server_factory(**openai_env(fake_openai, cache_dir))
    return OpenAIStack(server, fake_openai, fake_openai.stats(), cache_dir)


# --- PostgreSQL (tests/postgres_server.py): 127.0.0.1:5432 when it answers, else a cluster of our own ---------

from tests.postgres_server import PostgresCluster, PostgresServer, session_server, unique_database_name  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: the machine's on 5432, or one private cluster started for the session."""
    with session_server() as server:
        yield server


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A `postgresql+asyncpg://` URL to a fresh, uniquely named database, force-dropped after the test."""
    name = unique_database_name()
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture()
def postgres_cluster(request: pytest.FixtureRequest) -> PostgresCluster:
    """A started private `PostgresCluster` the test may `stop()` and `start()`; removed after the test, pass or fail."""
    cluster = PostgresCluster()
    request.addfinalizer(cluster.cleanup)
    cluster.start()
    return cluster


# --- reading a server's database and metrics (the question log and feedback tests) ----------------------------

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from config import normalize_database_url  # noqa: E402
from tests.postgres_server import run_blocking  # noqa: E402


async def _database_rows(url: str, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            return [dict(row._mapping) for row in await connection.execute(text(sql), params)]
    finally:
        await engine.dispose()


def database_rows(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of one SQL query on a server's database (any `DATABASE_URL` form), through SQLAlchemy's async engine."""
    return run_blocking(_database_rows(url, sql, params))


def metric_value(server: ServerProcess, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    body = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --- Redis (tests/redis_server.py): a redis-server of the module's own, on a free port ----------------------

from tests.redis_server import REDIS_SERVER, RedisServer  # noqa: E402


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for this test module (tests may freeze and thaw it); never left frozen."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.thaw()
    server.stop()
