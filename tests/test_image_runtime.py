"""The image's runtime constraints on a real server: a non-root user, a read-only root filesystem, one writable
cache directory and a scratch directory for temporary files (Dockerfile; deploy/kubernetes sets the same
securityContext and volumes).

No Docker engine runs here, so the constraints are made with the kernel's own tools: a private mount namespace
in which `/` (the project included) is read-only except the cache and scratch directories, and uid 10001 with
only the capability to read files (its Python lives under root's home).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.local_server import ROOT, LocalServer
from tests.conftest import STARTUP_TIMEOUT_SECONDS, ServerProcess, poll_until
from tests.test_deployment_files import dockerfile_instructions, image_env

USER_ID = 10001


def image_user() -> int:
    """The numeric user the Dockerfile runs as."""
    (user,) = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "USER"][-1:]
    uid, _, gid = user.partition(":")
    assert uid == gid
    return int(uid)


def read_only_wrapper(writable: list[Path]) -> list[str]:
    """A command prefix: a private mount namespace with `/` read-only but `writable`, run as the image's user."""
    binds = " && ".join(f"mount --bind {path} {path}" for path in writable)
    drop = (
        f"setpriv --reuid={USER_ID} --regid={USER_ID} --clear-groups"
        " --inh-caps=+dac_read_search --ambient-caps=+dac_read_search"
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{binds} && mount -o remount,bind,ro / && exec {drop} "$@"',
        "sh",
    ]


def namespaces_available() -> bool:
    """Whether this process may make a mount namespace and change user (root, as in CI)."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def read_only_server(
    tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path, server: ServerProcess
) -> Iterator[LocalServer]:
    """The image's settings, run read-only as its user, starting warm from the index `server` built."""
    if not namespaces_available():
        pytest.fail("needs root (or CAP_SYS_ADMIN) for a mount namespace; CI runs as root")
    directory = tmp_path_factory.mktemp("read-only")
    cache, scratch = directory / "cache", directory / "scratch"
    shutil.copytree(shared_cache_dir / "index", cache / "index")  # a warm start, as from a kept volume
    scratch.mkdir()
    for path in (cache, scratch, *cache.rglob("*")):
        shutil.chown(path, USER_ID, USER_ID)
    env = {**image_env(), "HOST": "127.0.0.1", "CACHE_DIR": str(cache), "TMPDIR": str(scratch)}
    server = LocalServer(env, directory / "server.log", wrapper=read_only_wrapper([cache, scratch]))
    server.start()
    try:
        server.wait_ready(STARTUP_TIMEOUT_SECONDS)
        yield server
    finally:
        server.stop()


def test_the_image_runs_as_a_non_root_user_who_owns_only_the_cache() -> None:
    assert image_user() == USER_ID != 0
    runs = " ".join(arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN")
    assert "chown -R 10001:10001 /app/cache" in runs
    assert runs.count("chown") == 1  # the code and the packages stay root's: read-only to the service
    copies = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "COPY"]
    assert not any("--chown" in arguments for arguments in copies)


def test_answers_as_non_root_with_a_read_only_project_and_a_writable_cache(read_only_server: LocalServer) -> None:
    status = Path(f"/proc/{read_only_server.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(USER_ID)}
    with httpx.Client(base_url=read_only_server.base_url, timeout=30) as client:
        answer = client.post("/ask", json={"question": "What is a flash loan?"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["sources"][0]["id"] == "what-are-flash-loans"
        follow = client.post("/v2/ask", json={"question": "What is Aave?"})
        assert follow.status_code == 200
        health = client.get("/health-status")
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
    cache = Path(read_only_server.env["CACHE_DIR"])
    database = cache / "defi.db"
    assert database.stat().st_uid == USER_ID  # the question log's SQLite file, made by the service's user

    def logged() -> int:
        with sqlite3.connect(database) as connection:
            (count,) = connection.execute("SELECT count(*) FROM answers").fetchone()
        return int(count)

    poll_until(lambda: logged() >= 2, 30)
    assert not any(path.stat().st_uid == USER_ID for path in ROOT.iterdir())  # nothing written in the project
    log = read_only_server.log()
    assert "Read-only file system" not in log and "Permission denied" not in log, log[-4000:]
