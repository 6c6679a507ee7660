"""The benchmark's smoke run: it runs end to end and reports a figure for every phase (never a speed).

It reuses the dataset index the session's test server has built (`--index-from`, read only), so the
smoke run starts warm instead of embedding the whole dataset again.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent

PHASES = [
    "baseline_a_health_c32",
    "baseline_b_embedder_single",
    "baseline_c_embedder_batch32",
    "ask_unique_c1",
    "ask_unique_c8",
    "ask_unique_c32",
    "ask_repeated_c32",
    "sse_c1",
    "sse_c32",
    "ws_c1",
    "ws_c32",
    "ws_connections",
    "sockets_idle",
    "sockets_ask",
    "sockets_sse",
    "soak",
    "startup_cold",
    "startup_warm",
    "rss_idle",
    "rss_under_load",
    "rss_after_load",
    "question_log_on",
    "question_log_off",
    "question_log_ratio",
]
WRK_ONLY_PHASES = ["ask_unique_c1_httpx", "ask_unique_c32_httpx"]
# Smaller than --smoke's own sizes, so the run does less, never less of it: every phase still runs and reports
# (a closed-loop phase sends at least one request per worker however short it is; wrk runs at least 1 s).
SMOKE_SIZES = {
    "--duration": "0.5",
    "--baseline-duration": "0.3",
    "--sockets": "20",
    "--socket-asks": "5",
    "--sse-streams": "5",
    "--socket-processes": "1",
    "--socket-hold": "0.5",
    "--soak-seconds": "4",
    "--after-load-seconds": "0.5",
}


@pytest.mark.slow
def test_benchmark_smoke_run_reports_every_phase(tmp_path: Path, server: ServerProcess, shared_cache_dir: Path) -> None:
    # `server` is requested for its side effect: the shared cache dir then holds the dataset index.
    output = tmp_path / "smoke.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            *(item for option in SMOKE_SIZES.items() for item in option),
            "--index-from",
            str(shared_cache_dir),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(output.read_text())
    figures = results["figures"]
    skipped = set(results["skipped"])
    assert skipped <= {"startup_cold"}, skipped
    # With wrk, unique /ask is measured with wrk and again with httpx (the client of the stream phases).
    expected = PHASES + (WRK_ONLY_PHASES if results["settings"]["http_tool_plain_http"] == "wrk" else [])
    missing = [
        phase
        for phase in expected
        if phase not in skipped and not (isinstance(figures.get(phase), int | float) and math.isfinite(figures[phase]))
    ]
    assert not missing, f"no figure for {missing}: {figures}"
    assert {target["target"] for target in results["targets"]}, "no target ratios reported"
    # The question-log comparison ran its alternating legs, and only the log-on server wrote rows.
    log_cost = results["phases"]["question_log_cost"]
    assert len(log_cost["legs"]) == 4, log_cost
    assert log_cost["rows_written_on"] > 0, log_cost
    assert log_cost["rows_written_off"] == 0, log_cost
    # After the load, the run reports what the server still holds by design: the sessions its WebSocket and
    # SSE phases opened (alive until their TTL) and the entries of each bounded cache.
    held = results["phases"]["rss_after_load"]["still_held"]
    assert held["sessions"] > 0, held
    assert {"cache_memory", "cache_answer"} <= set(held), held
