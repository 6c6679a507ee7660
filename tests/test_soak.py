"""The soak in its short form: `python -m scripts.soak` as a subprocess, with its own server.

20 clients for 15 s mixing /ask, /v2/ask (sessions), the three SSE streams and WebSocket questions, 10 %
of the streams abandoned mid-answer, a few deliberately invalid questions; then the script's disconnect
probes (abandoned session streams, a burst of 40 hang-ups). Then: zero 5xx, no client-side
error, every stream that was not abandoned ended with `complete` (or its deliberate `error`), no stream or
WebSocket left open, server RSS growth under 50 MB, and the sessions expire back to 0 (the script's
server runs with SESSION_TTL_SECONDS=5 and a 1 s clean-up interval). The long form (120 s, 50 clients)
is `python -m scripts.soak` without arguments.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ServerProcess

DURATION_SECONDS = 15
CLIENTS = 20
MAX_RSS_GROWTH_MB = 50.0


@pytest.fixture(scope="module")
def soak(server: ServerProcess, shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the short soak once; its JSON figures plus the printed table and exit status.

    `server` is requested so that the session's index exists: the soak's server starts from a copy.
    """
    work = tmp_path_factory.mktemp("soak")
    shutil.copytree(shared_cache_dir / "index", work / "cache" / "index")
    output = work / "soak.json"
    command = [
        sys.executable,
        "-m",
        "scripts.soak",
        "--duration",
        str(DURATION_SECONDS),
        "--clients",
        str(CLIENTS),
        "--session-ttl",
        "5",
        "--cleanup-interval",
        "1",
        "--cache-dir",
        str(work / "cache"),
        "--keep-log",
        str(work / "server.log"),
        "--seed",
        "7",
        "--output",
        str(output),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if not output.exists():  # not an AssertionError: the strict xfail below must not swallow it
        pytest.fail(f"the soak wrote no figures:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(output.read_text())
    result["exit_code"] = completed.returncode
    result["table"] = completed.stdout
    result["log_path"] = str(work / "server.log")
    return result


# The script's checks; the ones a known service bug fails are asserted by the strict xfails at the end.
KNOWN_FAILING_CHECKS = {"gauges_back_to_zero", "abandoned_sessions_usable"}


def test_soak_runs_and_reports(soak: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + soak["table"])
    assert soak["requests_total"] > CLIENTS * 5, soak["requests"]
    assert set(soak["requests"]) >= {"ask", "v2_ask", "sse_post", "sse_v2", "sse_get", "websocket"}
    failed = {name for name, ok in soak["checks"].items() if not ok}
    assert failed <= KNOWN_FAILING_CHECKS, soak["checks"]
    assert soak["exit_code"] == (1 if failed else 0)


def test_no_5xx_and_no_client_errors(soak: dict[str, Any]) -> None:
    assert soak["server_errors_5xx"] == 0, soak["statuses"]
    assert soak["errors_total"] == 0, soak["error_samples"]


def test_every_stream_not_abandoned_completes(soak: dict[str, Any]) -> None:
    streams = soak["streams"]
    assert streams["incomplete"] == 0, soak["error_samples"]
    assert streams["completed"] > 0 and streams["abandoned"] > 0, streams
    assert streams["deliberate_errors"] > 0, streams
    assert soak["gauges_after_load"].get("websocket_connections") == 0.0, soak["gauges_after_load"]


def test_rss_growth_is_bounded(soak: dict[str, Any]) -> None:
    rss = soak["rss"]
    assert rss["available"], rss
    assert rss["growth_mb"] < MAX_RSS_GROWTH_MB, rss


def test_sessions_expire_back_to_zero(soak: dict[str, Any]) -> None:
    sessions = soak["sessions"]
    assert sessions["peak_active"] > 0, sessions
    assert sessions["expiry"]["checked"] and sessions["expiry"]["back_to_zero"], sessions


def test_abandoned_session_streams_release_the_session(soak: dict[str, Any]) -> None:
    probes = soak["sessions"]["abandoned_stream_probes"]
    assert probes["tried"] > 0
    assert probes["answered"] == probes["tried"], probes
    assert soak["gauges_after_load"].get("sse_streams_active") == 0.0, soak["gauges_after_load"]


def test_abandoned_streams_leave_no_error_in_the_server_log(soak: dict[str, Any]) -> None:
    # The race hits a quarter to a half of the hang-ups; the soak's burst of 40 makes it certain.
    assert soak["streams"]["abandoned"] + soak["disconnect_burst"] >= 40
    assert soak["server_log"]["unhandled_errors"] == 0, soak["server_log"]
