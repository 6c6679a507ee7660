"""Faults: the embedding cache directory read-only or full, a dataset that fails validation, the embedder failing.

The cache faults are real: tests run as root, where `chmod 0o555` stops nothing, so the `embeddings`
directory becomes a read-only tmpfs (EROFS) or a 64 KiB tmpfs filled to the last byte (ENOSPC), mounted
in a fixture that always unmounts. Without mount rights the read-only case falls back to `embeddings`
being a regular file (every write fails with ENOTDIR) and the full case is skipped. Either way the
server must keep answering (the disk cache is an optimisation), log the cause once per failure as a
warning, keep sessions, and never hang or log a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, OpenAIStack, ServerProcess

QUESTIONS = [
    "What is impermanent loss?",
    "How does a health factor work on Aave?",
    "What is a flash loan?",
    "What is the difference between APR and APY?",
]
FOLLOW_UP = "What are its risks?"
LOG_WAIT_SECONDS = 15.0


# --- mounting ------------------------------------------------------------------------------------------------


def _run(*command: str) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in CI here)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="mount-probe-"))
    try:
        if not _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)):
            return False
        _run("umount", str(probe)) or _run("umount", "-l", str(probe))
        return True
    finally:
        probe.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[None]:
    """Mount a tmpfs on `path` for the block; always unmounted afterwards (lazily if still busy)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        if not _run("umount", str(path)):
            _run("umount", "-l", str(path))


def fill(directory: Path) -> None:
    """Write a filler file until the filesystem has no byte left."""
    with (directory / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise


def write_fails(directory: Path) -> int | None:
    """The errno a cache-style write into `directory` fails with, or None when it succeeds."""
    try:
        subdir = directory / "ab"
        subdir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=subdir, suffix=".probe")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(b"\0" * 2048)
        finally:
            Path(name).unlink(missing_ok=True)
    except OSError as error:
        return error.errno
    return None


# --- servers -------------------------------------------------------------------------------------------------


def warm_cache_dir(root: Path, shared_cache_dir: Path) -> Path:
    """A fresh CACHE_DIR holding a copy of the session's index, so the server starts without re-embedding."""
    cache_dir = root / "cache"
    shutil.copytree(shared_cache_dir / "index", cache_dir / "index")
    return cache_dir


def start(cache_dir: Path, log_path: Path) -> ServerProcess:
    # Memory cache off: every question reaches the disk cache, and so the fault.
    server = ServerProcess(
        {"CACHE_DIR": str(cache_dir), "AGENT_CACHE_ENABLED": "false", "EMBEDDING_MEMORY_CACHE_ENABLED": "false"},
        log_path,
    )
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def mount_allowed() -> bool:
    return can_mount()


@pytest.fixture(scope="module")
def faulty_servers(
    tmp_path_factory: pytest.TempPathFactory, shared_cache_dir: Path, server: ServerProcess, mount_allowed: bool
) -> Iterator[dict[str, Any]]:
    """`read_only` and (when mounting is allowed) `full`: a server each, started side by side.

    `server` is requested first so that the session's index exists to be copied.
    """
    with contextlib.ExitStack() as stack:
        setups: dict[str, dict[str, Any]] = {}
        for name in ("read_only", "full"):
            root = tmp_path_factory.mktemp(f"faults-{name}")
            cache_dir = warm_cache_dir(root, shared_cache_dir)
            embeddings = cache_dir / "embeddings"
            if name == "read_only":
                if os.geteuid() != 0:
                    embeddings.mkdir()
                    embeddings.chmod(0o555)
                    stack.callback(embeddings.chmod, 0o755)
                    how = "chmod 0o555"
                elif mount_allowed:
                    stack.enter_context(tmpfs(embeddings, "ro,size=1m"))
                    how = "read-only tmpfs"
                else:
                    embeddings.write_bytes(b"not a directory")
                    how = "regular file in place of the directory"
            else:
                if not mount_allowed:
                    continue
                stack.enter_context(tmpfs(embeddings, "size=64k,nr_inodes=4096"))
                fill(embeddings)
                how = "full 64 KiB tmpfs"
            setups[name] = {"cache_dir": cache_dir, "embeddings": embeddings, "how": how, "root": root}
            setups[name]["errno"] = write_fails(embeddings)
        with ThreadPoolExecutor(max_workers=len(setups)) as pool:
            futures = {name: pool.submit(start, s["cache_dir"], s["root"] / "server.log") for name, s in setups.items()}
        failures = []
        for name, future in futures.items():
            if (error := future.exception()) is not None:
                failures.append(error)
                continue
            server_process = future.result()
            stack.callback(server_process.stop)  # stopped before the mounts above are undone
            setups[name]["server"] = server_process
        if failures:
            raise failures[0]
        yield setups


def wait_for_log(server: ServerProcess, needle: str) -> str:
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while needle not in (log := server.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return log


def exercise(server: ServerProcess) -> dict[str, Any]:
    """Every kind of question once; all must be answered; a session must keep its turns."""
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for question in QUESTIONS:
            response = http.post("/ask", json={"question": question})
            assert response.status_code == 200, response.text
            assert response.json()["processing_stage"] == "response_complete", response.json()
        first = http.post("/v2/ask", json={"question": "What is Aave?"})
        assert first.status_code == 200, first.text
        session_id = first.json()["session_id"]
        second = http.post("/v2/ask", json={"question": FOLLOW_UP, "session_id": session_id})
        assert second.status_code == 200 and second.json()["session_id"] == session_id, second.text
        turns = http.get(f"/v2/sessions/{session_id}").json()["turns"]
        assert [turn["question"] for turn in turns] == ["What is Aave?", FOLLOW_UP]
        with http.stream("POST", "/ask-stream", json={"question": "What is a liquidity pool?"}) as stream:
            assert stream.status_code == 200
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert events[-1]["type"] == "complete", events[-1]
        health = http.get("/health")
        assert health.status_code == 200
        return health.json()


# --- (a) read-only, (b) full ---------------------------------------------------------------------------------


def test_read_only_cache_directory_still_answers(faulty_servers: dict[str, Any]) -> None:
    setup = faulty_servers["read_only"]
    assert setup["errno"] in {errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EEXIST}, setup  # writes really fail
    server: ServerProcess = setup["server"]
    health = exercise(server)
    log = wait_for_log(server, '"embedding_disk_cache_error"')
    print(f"\nread-only cache ({setup['how']}): health {health}")
    assert '"embedding_disk_cache_error"' in log
    assert "Traceback" not in log
    if setup["how"] == "read-only tmpfs":
        assert "Read-only file system" in log
        assert not list(setup["embeddings"].rglob("*")), "nothing can have been written"


def test_full_cache_directory_still_answers(faulty_servers: dict[str, Any], mount_allowed: bool) -> None:
    if "full" not in faulty_servers:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN), and no other real way to ENOSPC")
    setup = faulty_servers["full"]
    assert setup["errno"] == errno.ENOSPC, setup
    server: ServerProcess = setup["server"]
    health = exercise(server)
    log = wait_for_log(server, "No space left on device")
    print(f"\nfull cache ({setup['how']}): health {health}")
    assert "No space left on device" in log
    assert '"embedding_disk_cache_error"' in log
    assert "Traceback" not in log
    assert not list(setup["embeddings"].rglob("*.bin")), "no entry fits on a full disk"


def test_full_cache_directory_keeps_no_temp_files(faulty_servers: dict[str, Any]) -> None:
    if "full" not in faulty_servers:
        pytest.skip("cannot mount a tmpfs here")
    setup = faulty_servers["full"]
    with httpx.Client(base_url=setup["server"].base_url, timeout=30) as http:
        assert http.post("/ask", json={"question": "What is yield farming?"}).status_code == 200
    wait_for_log(setup["server"], "No space left on device")
    time.sleep(0.5)  # the cache write runs after the answer, on the cache thread
    leftovers = list(setup["embeddings"].rglob("*.tmp"))
    assert not leftovers, leftovers[:5]


# --- (c) a dataset that fails validation ---------------------------------------------------------------------

GOOD_ENTRY = {
    "id": "a",
    "category": "c",
    "question": "What is a?",
    "alternatives": ["x a", "y a"],
    "answer": "A is a thing. It exists.",
}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            json.dumps([GOOD_ENTRY, {**GOOD_ENTRY, "question": "What is a again?"}]),
            "a: id: duplicate id 'a'",
        ),
        (json.dumps({"entries": [GOOD_ENTRY]})[:-7], "dataset: json: not valid JSON"),
        (json.dumps({"entries": []}), "dataset: entries: must be a non-empty list of entries"),
    ],
    ids=["duplicate-ids", "invalid-json", "no-entries"],
)
def test_invalid_dataset_exits_with_one_clear_line(tmp_path: Path, content: str, expected: str) -> None:
    dataset = tmp_path / "dataset.json"
    dataset.write_text(content)
    env = {**os.environ, "PORT": "1", "LOG_DIR": "", "DATASET_PATH": str(dataset), "CACHE_DIR": str(tmp_path / "c")}
    result = subprocess.run(
        [sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Start-up failed: dataset"), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# --- (d) the embedder failing --------------------------------------------------------------------------------


def test_embedder_failure_gives_503_and_stream_error(openai_stack: OpenAIStack) -> None:
    """The server on the fake OpenAI API (tests/fake_openai.py), its embeddings endpoint failing with 500s."""
    fake = openai_stack.fake
    fake.reset()
    marker = uuid.uuid4().hex[:8]  # questions no cache layer has seen
    with httpx.Client(base_url=openai_stack.server.base_url, timeout=60) as http:
        first = http.post("/v2/ask", json={"question": "What is Aave?"})
        assert first.status_code == 200, first.text
        session_id = first.json()["session_id"]
        fake.fault("embeddings", "500")
        try:
            started = time.monotonic()
            response = http.post("/ask", json={"question": f"What is a flash loan on chain {marker}?"})
            assert response.status_code == 503, response.text
            assert response.json()["reason"] == "agent_unavailable" and response.json()["code"] == 503
            assert set(response.json()) == {"detail", "type", "code", "reason"}
            assert time.monotonic() - started < 15, "failed after the retries, no hang"
            in_session = http.post(
                "/v2/ask", json={"question": f"what are its risks {marker}?", "session_id": session_id}
            )
            assert in_session.status_code == 503, in_session.text
            with http.stream("POST", "/ask-stream", json={"question": f"What is MEV {marker}?"}) as stream:
                assert stream.status_code == 200
                events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
            assert [event["type"] for event in events] == ["error"], events
            assert events[0]["reason"] == "embedding_unavailable" and events[0]["code"] == 503
            health = http.get("/health-status").json()
            assert health["components"]["embeddings"] == "degraded", health["component_details"]["embeddings"]
            assert health["status"] == "degraded"
        finally:
            fake.reset()
        turns = http.get(f"/v2/sessions/{session_id}").json()["turns"]
        assert [turn["question"] for turn in turns] == ["What is Aave?"], (
            "the session survived, the failed turn not added"
        )
        recovered = http.post("/v2/ask", json={"question": f"what are its risks {marker}?", "session_id": session_id})
        assert recovered.status_code == 200, recovered.text
        assert http.get("/health-status").json()["components"]["embeddings"] == "healthy"
