"""The PostgreSQL fixtures do what they promise: fresh databases that go away, a private cluster that restarts."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.postgres_server import PRIVATE_ENV, SHARED_PORT, PostgresCluster, PostgresServer

# Databases the `postgres_url` tests below were given, checked for removal by the test after them.
SEEN_DATABASES: list[str] = []


async def current_database(url: str) -> str:
    """SELECT current_database() through SQLAlchemy's async engine."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return str((await connection.execute(text("SELECT current_database()"))).scalar_one())
    finally:
        await engine.dispose()


def test_private_switch_gives_the_session_its_own_cluster(postgres_server: PostgresServer) -> None:
    if os.environ.get(PRIVATE_ENV, "") in ("", "0"):
        pytest.skip(f"{PRIVATE_ENV} is not set")
    assert isinstance(postgres_server, PostgresCluster)
    assert postgres_server.port != SHARED_PORT
    assert postgres_server.answers()


@pytest.mark.parametrize("attempt", [1, 2])
async def test_postgres_url_is_a_fresh_database(postgres_url: str, attempt: int) -> None:
    name = make_url(postgres_url).database
    assert postgres_url.startswith("postgresql+asyncpg://")
    assert await current_database(postgres_url) == name
    assert name not in SEEN_DATABASES
    SEEN_DATABASES.append(str(name))


def test_postgres_url_databases_are_dropped(postgres_server: PostgresServer) -> None:
    if len(SEEN_DATABASES) < 2:
        pytest.skip("runs after both test_postgres_url_is_a_fresh_database cases")
    assert len(set(SEEN_DATABASES)) == 2
    assert not set(SEEN_DATABASES) & postgres_server.databases()


async def test_cluster_stop_refuses_and_restart_keeps_data(postgres_cluster: PostgresCluster) -> None:
    postgres_cluster.create_database("kept")
    url = postgres_cluster.url("kept")
    port = postgres_cluster.port
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
            await connection.execute(text("INSERT INTO notes VALUES (1, 'survives a restart')"))

        postgres_cluster.stop()
        assert not postgres_cluster.answers()
        await engine.dispose()  # pooled connections died with the server
        with pytest.raises((DBAPIError, OSError)):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))

        postgres_cluster.start()
        assert postgres_cluster.port == port
        assert postgres_cluster.url("kept") == url
        await engine.dispose()
        async with engine.connect() as connection:
            body = (await connection.execute(text("SELECT body FROM notes WHERE id = 1"))).scalar_one()
        assert body == "survives a restart"
    finally:
        await engine.dispose()


def test_cluster_cleanup_leaves_nothing_behind(postgres_cluster: PostgresCluster) -> None:
    root = postgres_cluster.data_dir.parent
    pid_file = postgres_cluster.data_dir / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0])
    postgres_cluster.cleanup()
    assert not postgres_cluster.running
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
