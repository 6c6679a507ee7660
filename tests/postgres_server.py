"""PostgreSQL for the tests: the machine's server on 127.0.0.1:5432 when it answers, else a throw-away cluster.

`PostgresServer` is any server the tests may create databases on (role `postgres`, trust auth on loopback).
`PostgresCluster` is one the test owns: `initdb` into a temporary directory, the postmaster on a free port bound
to 127.0.0.1, stoppable (fast shutdown) and restartable on the same port and data directory.

Set `DEFI_TEST_PG_PRIVATE=1` to treat 5432 as absent: the session then starts its own cluster, as on a machine
without a running PostgreSQL (that is how the fallback path is exercised).

We run as root and `initdb`/`postgres` refuse root, so as root the cluster runs as the `postgres` system user
(Debian's package creates it; `nobody` otherwise) in a directory under the system temp dir that it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from scripts.local_server import _die_with_parent, free_port

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 5432
ROLE = "postgres"  # a superuser on the machine's server (trust auth) and the superuser initdb creates here
PRIVATE_ENV = "DEFI_TEST_PG_PRIVATE"

T = TypeVar("T")


def postgres_bindir() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` that has `initdb` (Debian's layout), or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda path: int(Path(path).parent.parent.name))
    return Path(newest).parent


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to completion on a fresh loop in a worker thread: works inside async tests too."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def unique_database_name() -> str:
    """A database name no other test (or concurrent test run) uses."""
    return f"defi_test_{uuid.uuid4().hex[:16]}"


def _quote(identifier: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


class PostgresServer:
    """A server reachable over TCP as a role that may create databases."""

    def __init__(self, host: str, port: int, user: str = ROLE) -> None:
        self.host = host
        self.port = port
        self.user = user

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL for `database` through asyncpg."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"

    async def _execute(self, sql: str, database: str = "postgres") -> None:
        connection = await asyncpg.connect(host=self.host, port=self.port, user=self.user, database=database, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def _fetch_column(self, sql: str, database: str = "postgres") -> list[Any]:
        connection = await asyncpg.connect(host=self.host, port=self.port, user=self.user, database=database, timeout=5)
        try:
            return [row[0] for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    def answers(self) -> bool:
        """Whether the server accepts a connection and a query right now."""
        try:
            return run_blocking(self._fetch_column("SELECT 1")) == [1]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` (owned by our role)."""
        run_blocking(self._execute(f"CREATE DATABASE {_quote(name)}"))

    def drop_database(self, name: str) -> None:
        """DROP DATABASE `name` even while clients are connected to it (a no-op when it is gone)."""
        run_blocking(self._execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)"))

    def databases(self) -> set[str]:
        """The names of the databases on the server."""
        return set(run_blocking(self._fetch_column("SELECT datname FROM pg_database")))


class _Resources:
    """What a cluster owns, kept apart from it so a weakref finalizer can release it without the cluster."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT, what `pg_ctl stop -m fast` sends); SIGQUIT then SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if process.poll() is not None:
                break
            process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        process.wait()

    def release(self) -> None:
        """Stop the postmaster and delete the data directory."""
        try:
            self.stop(timeout=10.0)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class PostgresCluster(PostgresServer):
    """A private cluster (trust auth, fsync off, small buffers) on a free port; `cleanup()` leaves nothing behind.

    The postmaster is the test process's own child (not daemonised by `pg_ctl start`), started with a
    parent-death signal: even a test run that is killed outright takes the server down with it.
    """

    def __init__(self, base_dir: Path | None = None) -> None:
        super().__init__(SHARED_HOST, free_port(), ROLE)
        bindir = postgres_bindir()
        assert bindir is not None, "PostgreSQL server binaries are missing (make system-deps)"
        self._bindir = bindir
        self._run_as = self._system_user()
        root = Path(tempfile.mkdtemp(prefix="defi-pg-", dir=base_dir))
        self._resources = _Resources(root)
        self._finalizer = weakref.finalize(self, self._resources.release)
        self.data_dir = root / "data"
        self.log_path = root / "postgres.log"
        if self._run_as is not None:
            os.chown(root, self._run_as.pw_uid, self._run_as.pw_gid)
        self._initdb()

    @staticmethod
    def _system_user() -> pwd.struct_passwd | None:
        """The unprivileged user to run as when we are root (PostgreSQL refuses root), else None."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")

    def _user_args(self) -> dict[str, Any]:
        """Popen keyword arguments that drop root privileges for the child, when we have them."""
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        command = [
            str(self._bindir / "initdb"),
            *("-D", str(self.data_dir), "-U", ROLE, "--auth=trust", "--encoding=UTF8"),
            *("--no-locale", "--no-sync", "--no-instructions"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False, **self._user_args())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stdout}{result.stderr}")
        settings = {
            "listen_addresses": f"'{SHARED_HOST}'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "'16MB'",
            "max_connections": "50",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive (it may still be starting up or shutting down)."""
        process = self._resources.process
        return process is not None and process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster on the cluster's port and data directory; wait until it answers a query."""
        assert self._finalizer.alive, "the cluster was cleaned up"
        assert not self.running, "the cluster is already running"
        self._resources.stop()  # reaps a postmaster that exited on its own
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(self._bindir / "postgres"), "-D", str(self.data_dir)],
                cwd=self._resources.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                **self._user_args(),
            )
        self._resources.process = process
        deadline = time.monotonic() + timeout
        while not self.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                self._resources.stop()
                raise RuntimeError(f"postgres on port {self.port} did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown: connections are cut, the data stays; `start()` brings it back on the same port."""
        self._resources.stop()

    def cleanup(self) -> None:
        """Stop the server and delete its directory (idempotent; also runs at garbage collection or exit)."""
        self._finalizer()

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def shared_server() -> PostgresServer | None:
    """The machine's server on 127.0.0.1:5432 as role `postgres`, unless it is absent or `DEFI_TEST_PG_PRIVATE=1`."""
    if os.environ.get(PRIVATE_ENV, "") not in ("", "0"):
        return None
    server = PostgresServer(SHARED_HOST, SHARED_PORT, ROLE)
    return server if server.answers() else None


@contextlib.contextmanager
def session_server() -> Iterator[PostgresServer]:
    """The shared server when it answers, else a private cluster started now and removed on exit."""
    server = shared_server()
    if server is not None:
        yield server
        return
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
