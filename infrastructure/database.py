"""The database: one async SQLAlchemy engine, its schema migrations (Alembic) and a bounded health check.

SQLite in a file is the default (`DATABASE_URL` unset: `<CACHE_DIR>/defi.db`); PostgreSQL (`postgresql+asyncpg://`)
when several workers or replicas share the data. Migrations run at start-up, one process at a time (a file
lock for SQLite, an advisory lock for PostgreSQL), so any number of processes may start together.
"""

from __future__ import annotations

import asyncio
import fcntl
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import event, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from config import normalize_database_url
from infrastructure.tables import ServiceValueRow

logger = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_ID = 0x0DEF1_0A  # PostgreSQL advisory lock held while one process migrates
CONNECT_TIMEOUT_SECONDS = 5.0
STATEMENT_TIMEOUT_SECONDS = 10.0


class DatabaseError(RuntimeError):
    """The database cannot be used as configured (bad URL, migration failed)."""


def describe_url(url: str) -> str:
    """The URL without its password, for logs and the health report."""
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """An async engine and its sessions; `dialect` is `sqlite` or `postgresql`."""

    def __init__(self, url: str) -> None:
        self.url = normalize_database_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        options: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.sqlite_path: Path | None = Path(database) if database and database != ":memory:" else None
            options["connect_args"] = {"timeout": STATEMENT_TIMEOUT_SECONDS}
        else:
            self.sqlite_path = None
            options.update(pool_size=5, max_overflow=10, pool_timeout=CONNECT_TIMEOUT_SECONDS, pool_recycle=1800)
            options["connect_args"] = {"timeout": CONNECT_TIMEOUT_SECONDS, "command_timeout": STATEMENT_TIMEOUT_SECONDS}
        self.engine: AsyncEngine = create_async_engine(self.url, **options)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed on success and rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    def insert(self, table: Any) -> Any:
        """An INSERT that supports `on_conflict_do_update` / `on_conflict_do_nothing` on this dialect."""
        return postgresql_insert(table) if self.dialect == "postgresql" else sqlite_insert(table)

    async def ping(self) -> None:
        """One round trip (`SELECT 1`); raises when the database does not answer."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[AsyncConnection]:
        """A connection held while no other process holds one from `exclusive` (start-up work done once).

        A file lock beside a SQLite database, a session-level advisory lock on PostgreSQL.
        """
        lock = None
        if self.sqlite_path is not None:
            lock_path = self.sqlite_path.with_name(self.sqlite_path.name + ".lock")
            lock = await asyncio.to_thread(_acquire_file_lock, lock_path)
        try:
            async with self.engine.connect() as connection:
                if self.dialect == "postgresql":
                    await connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
                    await connection.commit()
                try:
                    yield connection
                finally:
                    if self.dialect == "postgresql":
                        await connection.rollback()
                        await connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                        await connection.commit()
        finally:
            if lock is not None:
                lock.close()  # closing the file releases the lock

    async def migrate(self) -> None:
        """Bring the schema to the newest migration, one process at a time."""
        async with self.exclusive() as connection:
            await connection.run_sync(_run_alembic_upgrade)
            await connection.commit()

    async def shared_value(self, key: str, make: str) -> str:
        """The service-wide value under `key`, created as `make` by the first process that asks."""
        async with self.session() as session:
            await session.execute(
                self.insert(ServiceValueRow).values(key=key, value=make).on_conflict_do_nothing(index_elements=["key"])
            )
        async with self.session() as session:
            value = await session.scalar(select(ServiceValueRow.value).where(ServiceValueRow.key == key))
        assert value is not None
        return value

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def new_salt() -> str:
    """A random salt for hashing identifiers."""
    return secrets.token_hex(16)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for our migrations (no alembic.ini needed); `connection` is used when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _run_alembic_upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _acquire_file_lock(path: Path) -> Any:
    handle = path.open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets several workers read while one writes; foreign keys make feedback follow its answer."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(STATEMENT_TIMEOUT_SECONDS * 1000)}")
    cursor.close()
