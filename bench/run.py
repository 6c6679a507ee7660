"""The benchmark: `python -m bench.run` (or `make bench`); `--smoke` for a short CI run.

Measures, in one run and against the real server (uvicorn via `python main.py` on 127.0.0.1):
baselines A (GET /health), B and C (the embedder alone, in this process, one at a time and in
batches of 32); POST /ask with unique and with repeated questions (with wrk when installed, and the
unique ones also with httpx, the client of the stream phases); SSE and WebSocket time to first
word and to complete; many concurrent WebSocket connections; 10,000 idle WebSockets held open, 1,000
of them asking at once, then 1,000 SSE streams at once (`bench.sockets`); a soak mixing /ask, SSE and
WebSocket (`bench.soak`); cold and warm start-up; server RSS, idle, under load and a minute after the
load; and unique POST /ask at c32 with the question log on and off (two more servers, `bench.log_cost`).
Prints a Markdown table and the ratios against the targets of issues 9, 16 and 19 (met / not met, never
asserted), and writes everything as JSON (default bench/results/latest.json).
`--only streams|sockets|soak|log-cost` runs one part alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

from bench import loadgen, log_cost, soak, sockets
from bench.loadgen import (
    AskWorker,
    HealthWorker,
    QuestionPool,
    SSEWorker,
    WebSocketWorker,
    closed_loop,
    http_client,
    machine_cpu_seconds,
    many_websockets,
    measured,
    run_wrk,
    run_wrk_once,
    scrape_metrics,
    wrk_path,
)
from bench.server import ROOT, BenchServer, ProcessWatch, raise_fd_limit

BENCH_DIR = Path(__file__).resolve().parent
QUESTIONS_FILE = BENCH_DIR / "questions.txt"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"
# The dataset's embedding matrix from the last run (git-ignored), so --smoke and bench.profile can
# start warm; never the question embeddings, which would turn "unique" questions into disk-cache hits.
INDEX_STORE = BENCH_DIR / "results" / "index-cache"
MB = 2**20

# Every phase the JSON reports, with the one headline figure `figures` gives for it.
PHASES: dict[str, str] = {
    "baseline_a_health_c32": "requests/s",
    "baseline_b_embedder_single": "questions/s",
    "baseline_c_embedder_batch32": "questions/s",
    "ask_unique_c1": "answers/s",
    "ask_unique_c8": "answers/s",
    "ask_unique_c32": "answers/s",
    "ask_unique_c1_httpx": "answers/s",
    "ask_unique_c32_httpx": "answers/s",
    "ask_repeated_c32": "answers/s",
    "sse_c1": "first word p50 ms",
    "sse_c32": "first word p50 ms",
    "ws_c1": "first word p50 ms",
    "ws_c32": "first word p50 ms",
    "ws_connections": "errors",
    "sockets_idle": "server KB per idle WebSocket",
    "sockets_ask": "errors",
    "sockets_sse": "errors",
    "soak": "RSS at the end ÷ after the first minute",
    "startup_cold": "seconds",
    "startup_warm": "seconds",
    "rss_idle": "MB",
    "rss_under_load": "MB",
    "rss_after_load": "MB",
    "question_log_on": "answers/s",
    "question_log_off": "answers/s",
    "question_log_ratio": "on ÷ off",
}
# The parts `--only` runs alone; a full run runs them all (and the plain-HTTP phases, baselines and start-ups).
PARTS = ("streams", "sockets", "soak", "log-cost")
# The figures of the question-log comparison, read from its summary (`log_cost.SUMMARY`).
LOG_COST_FIGURES = {
    "question_log_on": "log_on_per_s",
    "question_log_off": "log_off_per_s",
    "question_log_ratio": "ratio",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="seconds per load phase (default 10; smoke 1.5)")
    parser.add_argument("--baseline-duration", type=float, help="seconds per embedder baseline (default 8)")
    parser.add_argument("--ws-connections", type=int, help="concurrent WebSocket connections (default 1000)")
    parser.add_argument("--max-requests", type=int, help="request budget per load phase (default 3000)")
    parser.add_argument("--smoke", action="store_true", help="tiny phases for CI: about 60-80 s, no cold start")
    parser.add_argument("--skip-cold-start", action="store_true", help="do not measure the cold start-up")
    parser.add_argument(
        "--only",
        choices=PARTS,
        help="run only this part: streams = /ask (httpx), SSE and WebSocket at c1 and c32; sockets = idle "
        "WebSockets held open, some asking at once, then concurrent SSE streams; soak = /ask, SSE and WebSocket "
        "mixed for --soak-seconds; log-cost = unique /ask c32 with the question log on and off",
    )
    parser.add_argument(
        "--sockets", type=int, help="sockets: idle WebSockets held open at once (default 10000; 0 skips them)"
    )
    parser.add_argument("--socket-asks", type=int, help="sockets: held WebSockets that ask at once (default 1000)")
    parser.add_argument("--sse-streams", type=int, help="sockets: concurrent SSE streams (default 1000)")
    parser.add_argument("--socket-processes", type=int, help="sockets: client processes holding them (default 4)")
    parser.add_argument(
        "--socket-hold", type=float, help="sockets: seconds the WebSockets stay open and idle (default 40)"
    )
    parser.add_argument("--soak-seconds", type=float, help="length of the soak (default 600; 0 skips it)")
    parser.add_argument("--soak-concurrency", type=int, help="soak: workers per transport (default 4)")
    parser.add_argument(
        "--after-load-seconds",
        type=float,
        help="idle seconds after the last load phase before the server's RSS is read (default 60)",
    )
    parser.add_argument(
        "--log-rounds",
        type=int,
        default=2,
        help="question-log comparison: rounds of one log-on and one log-off leg, in alternating order (default 2)",
    )
    parser.add_argument(
        "--index-from",
        type=Path,
        metavar="CACHE_DIR",
        help="with --skip-cold-start/--smoke: start from the dataset index in this cache dir (read only)",
    )
    parser.add_argument(
        "--http-tool",
        choices=["auto", "wrk", "httpx"],
        default="auto",
        help="load generator for the plain-HTTP phases (baseline A, unique and repeated /ask); "
        "auto = wrk when installed",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, to measure a setting (repeatable; recorded in the JSON)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    parser.add_argument("--questions", type=Path, default=QUESTIONS_FILE, help="the unique-question file")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only print the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.duration = args.duration if args.duration is not None else (1.5 if smoke else 10.0)
    args.baseline_duration = args.baseline_duration if args.baseline_duration is not None else (1.0 if smoke else 8.0)
    args.ws_connections = args.ws_connections if args.ws_connections is not None else (20 if smoke else 1000)
    args.max_requests = args.max_requests if args.max_requests is not None else (300 if smoke else 3000)
    defaults = {  # name: (full run, smoke)
        "sockets": (10_000, 100),
        "socket_asks": (1000, 20),
        "sse_streams": (1000, 20),
        "socket_processes": (4, 2),
        "socket_hold": (40.0, 1.0),
        "soak_seconds": (600.0, 6.0),
        "soak_concurrency": (4, 2),
        "after_load_seconds": (60.0, 2.0),
    }
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if smoke else full)
        elif getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.socket_processes < 1 or args.soak_concurrency < 1:
        parser.error("--socket-processes and --soak-concurrency must be at least 1")
    if 0 < args.sockets < args.socket_asks:
        parser.error("--socket-asks cannot exceed --sockets")
    args.skip_cold_start = args.skip_cold_start or smoke
    if args.log_rounds < 1:
        parser.error("--log-rounds must be at least 1")
    try:
        args.server_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--server-env takes NAME=VALUE")
    if args.http_tool == "auto":
        args.http_tool = "wrk" if wrk_path() else "httpx"
    elif args.http_tool == "wrk" and not wrk_path():
        parser.error("--http-tool wrk: wrk is not installed (apt-get install wrk)")
    return args


# ------------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------- embedder alone


def embedder_baselines(questions: list[str], duration: float) -> dict[str, dict[str, Any]]:
    """Baselines B and C: the service's provider class, in this process, with nothing else running."""
    sys.path.insert(0, str(ROOT))
    from services.embedding_providers import LocalMiniLMProvider

    provider = LocalMiniLMProvider()
    for start in range(0, 96, 32):  # warm-up: first runs allocate and tune
        provider.encode(questions[start : start + 32])
    results = {
        "baseline_b_embedder_single": _embed_for(provider, questions, 1, duration),
        "baseline_c_embedder_batch32": _embed_for(provider, questions, 32, duration),
    }
    del provider  # release the session and its thread pool before the server starts
    gc.collect()
    return results


def _embed_for(provider: Any, questions: list[str], batch: int, duration: float) -> dict[str, Any]:
    """Embed `batch` questions per model call, back to back, for `duration` seconds."""
    me = ProcessWatch(os.getpid(), include_children=False)
    own_cpu, machine_cpu = me.cpu_seconds(), machine_cpu_seconds()[0]
    done = 0
    calls = 0
    started = time.perf_counter()
    deadline = started + duration
    position = 0
    while time.perf_counter() < deadline:
        texts = [questions[(position + offset) % len(questions)] for offset in range(batch)]
        position += batch
        provider.encode(texts)
        done += batch
        calls += 1
    elapsed = time.perf_counter() - started
    own = me.cpu_seconds() - own_cpu
    other = max(0.0, machine_cpu_seconds()[0] - machine_cpu - own)
    return {
        "batch_size": batch,
        "elapsed_s": round(elapsed, 3),
        "questions": done,
        "model_calls": calls,
        "questions_per_s": round(done / elapsed, 2),
        "ms_per_call": round(1000 * elapsed / calls, 2),
        "resources": {"own_cpu_cores": round(own / elapsed, 2), "other_cpu_cores": round(other / elapsed, 2)},
    }


# ------------------------------------------------------------------------------------ index matrix


def _index_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*") if path.is_file() and path.suffix != ".tmp")


def seed_index(cache_dir: Path, source: Path | None = None) -> bool:
    """Copy stored dataset index files into `cache_dir`/index; the server uses one only if it matches.

    `source` is another cache directory (its `index/` is read, never written), else the last run's store.
    """
    origin = source / "index" if source is not None else INDEX_STORE
    files = _index_files(origin) if origin.is_dir() else []
    if not files:
        return False
    (cache_dir / "index").mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, cache_dir / "index" / path.name)
    return True


def store_index(cache_dir: Path) -> None:
    """Keep the index files the server has just built or used for the next run (replacing older ones)."""
    built = _index_files(cache_dir / "index") if (cache_dir / "index").is_dir() else []
    if not built:
        return
    INDEX_STORE.mkdir(parents=True, exist_ok=True)
    names = {path.name for path in built}
    for old in _index_files(INDEX_STORE):
        if old.name not in names:
            old.unlink(missing_ok=True)
    for path in built:
        target = INDEX_STORE / path.name
        if not target.exists():
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            shutil.copy2(path, partial)
            partial.replace(target)  # atomic: a concurrent run never reads half a file


# ----------------------------------------------------------------------------------------- the run


class Runner:
    def __init__(self, args: argparse.Namespace, pool: QuestionPool, server: BenchServer) -> None:
        self.args = args
        self.pool = pool
        self.server = server
        self.watch = ProcessWatch(server.pid)
        self.phases: dict[str, Any] = {}
        self.skipped: list[str] = []

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    async def loop_phase(
        self, name: str, concurrency: int, make_worker: Callable[[], loadgen.Worker], client: httpx.AsyncClient
    ) -> None:
        self.log(f"{name}: concurrency {concurrency}, {self.args.duration:g} s")

        async def body() -> dict[str, Any]:
            outcome = await closed_loop(make_worker, concurrency, self.args.duration, self.args.max_requests)
            return {"tool": "httpx" if "ws" not in name else "websockets", **outcome.to_json()}

        self.phases[name] = await measured(self.watch, client, body)

    async def unique_wrk_phase(self, concurrency: int, phases_left: int, control: httpx.AsyncClient) -> None:
        """POST /ask with wrk, each question at most once.

        The phase gets at most `--max-requests` fresh questions, and at most an equal share of the
        fresh ones left among the `phases_left` wrk phases still to run (this one included); it
        takes from the pool only those wrk sent, the others stay for the next phases.
        """
        name = f"ask_unique_c{concurrency}"
        budget = min(self.args.max_requests, self.pool.fresh // phases_left)
        questions = self.pool.upcoming(budget)
        if not questions:
            self.log(f"{name}: skipped, no fresh question left")
            self.skipped.append(name)
            return
        self.log(f"{name}: wrk, concurrency {concurrency}, {self.args.duration:g} s, {len(questions)} questions max")
        bodies = [json.dumps({"question": question}) for question in questions]

        async def body() -> dict[str, Any]:
            return await run_wrk_once(f"{self.server.base_url}/ask", concurrency, self.args.duration, bodies)

        phase = await measured(self.watch, control, body)
        self.pool.skip(phase["bodies_sent"])
        self.phases[name] = phase

    async def run(self) -> None:
        """The load phases of the run (all of them, or those of `--only`), then the server's RSS after the load."""
        only = self.args.only
        async with http_client(self.server.base_url, 64) as control:
            await self.warm_up()
            if only is None:
                await self.plain_phases(control)
            if only in (None, "streams"):
                await self.stream_phases(control)
            if only is None:
                await self.many_websockets_phase(control)
            if only in (None, "sockets"):
                await self.sockets_phases(control)
            if only in (None, "soak"):
                await self.soak_phase(control)
            await self.after_load(control)

    async def warm_up(self) -> None:
        """Connection pools, the first LangGraph runs, numpy and onnxruntime allocations; then the idle RSS."""
        warm = http_client(self.server.base_url, 8)
        async with warm:
            await asyncio.gather(*(warm.get("/health") for _ in range(16)))
            await asyncio.gather(*(warm.post("/ask", json={"question": q}) for q in self.pool.take_many(16)))
        await asyncio.sleep(1.0)
        self.phases["rss_idle"] = {
            "rss_mb": round(self.watch.rss_bytes() / MB, 1),
            "threads": self.watch.threads(),
            "note": "after start-up and a 16-question warm-up, before any load phase",
        }

    async def plain_phases(self, control: httpx.AsyncClient) -> None:
        """Baseline A, unique /ask at c1, c8 and c32, repeated /ask at c32 (wrk when installed, else httpx)."""
        args = self.args
        base = self.server.base_url
        self.log(f"baseline_a_health_c32: {args.http_tool}, {args.duration:g} s")
        if args.http_tool == "wrk":

            async def health_wrk() -> dict[str, Any]:
                return await run_wrk(f"{base}/health", 32, args.duration)

            self.phases["baseline_a_health_c32"] = await measured(self.watch, control, health_wrk)
        else:
            async with http_client(base, 32) as client:
                await self.loop_phase("baseline_a_health_c32", 32, partial(HealthWorker, client), control)

        # Unique questions: never sent before in this run, so never cached.
        if args.http_tool == "wrk":
            for position, concurrency in enumerate((1, 8, 32)):
                await self.unique_wrk_phase(concurrency, 3 - position, control)
        else:
            for concurrency in (1, 8, 32):
                async with http_client(base, concurrency) as client:
                    worker = partial(AskWorker, client, self.pool.take)
                    await self.loop_phase(f"ask_unique_c{concurrency}", concurrency, worker, control)

        # Repeated questions: 32 questions answered once, then asked over and over (cache hits).
        repeated = self.pool.take_many(32)
        for question in repeated:
            await control.post("/ask", json={"question": question})
        if args.http_tool == "wrk":
            self.log(f"ask_repeated_c32: wrk, {args.duration:g} s")
            bodies = [json.dumps({"question": question}) for question in repeated]

            async def repeated_wrk() -> dict[str, Any]:
                return await run_wrk(f"{base}/ask", 32, args.duration, bodies)

            self.phases["ask_repeated_c32"] = await measured(self.watch, control, repeated_wrk)
        else:
            cycle = itertools.cycle(repeated)
            async with http_client(base, 32) as client:
                await self.loop_phase("ask_repeated_c32", 32, partial(AskWorker, client, partial(next, cycle)), control)

    async def stream_phases(self, control: httpx.AsyncClient) -> None:
        """Unique /ask through httpx (the reference), SSE over httpx, the chat protocol over websockets: c1, c32."""
        base = self.server.base_url
        # The stream targets compare Python clients with /ask measured by a Python client too (the same
        # client overhead on both sides): a phase of its own unless the plain phases already used httpx.
        if self.args.http_tool == "wrk" or self.args.only is not None:
            for concurrency in (1, 32):
                async with http_client(base, concurrency) as client:
                    worker = partial(AskWorker, client, self.pool.take)
                    await self.loop_phase(f"ask_unique_c{concurrency}_httpx", concurrency, worker, control)
        for concurrency in (1, 32):
            async with http_client(base, concurrency) as client:
                worker = partial(SSEWorker, client, self.pool.take)
                await self.loop_phase(f"sse_c{concurrency}", concurrency, worker, control)
        ws_url = f"{self.server.ws_url}/ws/ask"
        for concurrency in (1, 32):
            await self.loop_phase(
                f"ws_c{concurrency}", concurrency, partial(WebSocketWorker, ws_url, self.pool.take), control
            )

    async def many_websockets_phase(self, control: httpx.AsyncClient) -> None:
        """`--ws-connections` WebSockets opened at once, one unique question each."""
        count = self.args.ws_connections
        self.log(f"ws_connections: {count} connections, one question each")
        questions = self.pool.take_many(count)
        limit = max(120.0, 10 * self.args.duration)

        async def many() -> dict[str, Any]:
            return {
                "tool": "websockets",
                **await many_websockets(f"{self.server.ws_url}/ws/ask", questions, limit),
            }

        self.phases["ws_connections"] = await measured(self.watch, control, many)

    async def sockets_phases(self, control: httpx.AsyncClient) -> None:
        """Idle WebSockets held open, some asking at once, then concurrent SSE streams (`bench.sockets`)."""
        args = self.args
        if args.sockets == 0:
            self.log("sockets: skipped (--sockets 0)")
            self.skipped += ["sockets_idle", "sockets_ask", "sockets_sse"]
            return
        sizes = sockets.SocketSettings(
            args.sockets,
            args.socket_asks,
            args.sse_streams,
            args.socket_processes,
            args.socket_hold,
            settle_seconds=0.5 if args.smoke else 2.0,
        )
        self.phases.update(await sockets.measure(self.server, self.watch, control, self.pool, sizes, self.log))

    async def soak_phase(self, control: httpx.AsyncClient) -> None:
        """/ask, SSE and WebSocket mixed for `--soak-seconds`, the server's RSS over time (`bench.soak`)."""
        args = self.args
        if args.soak_seconds == 0:
            self.log("soak: skipped (--soak-seconds 0)")
            self.skipped.append("soak")
            return
        self.phases["soak"] = await soak.measure(
            self.server, self.watch, control, self.pool, args.soak_seconds, args.soak_concurrency, self.log
        )

    async def after_load(self, control: httpx.AsyncClient) -> None:
        """The server's RSS `--after-load-seconds` after the last load phase (sampled every 5 s meanwhile), and
        what the server still holds by design then: live sessions (until SESSION_TTL_SECONDS) and cache entries."""
        seconds = self.args.after_load_seconds
        self.log(f"rss_after_load: the server idles {seconds:g} s after the last load phase")
        started = time.perf_counter()
        series: list[list[float]] = []
        while (elapsed := time.perf_counter() - started) < seconds:
            series.append([round(elapsed, 1), round(self.watch.rss_bytes() / MB, 1)])
            await asyncio.sleep(min(5.0, seconds - elapsed))
        rss = round(self.watch.rss_bytes() / MB, 1)
        idle = self.phases["rss_idle"]["rss_mb"]
        self.phases["rss_after_load"] = {
            "rss_mb": rss,
            "seconds_after_load": round(time.perf_counter() - started, 1),
            "rss_idle_mb": idle,
            "above_idle_mb": round(rss - idle, 1),
            "series_mb": [*series, [round(time.perf_counter() - started, 1), rss]],
            "still_held": await still_held(control),
        }
        self.log(f"rss_after_load: {rss} MB ({rss - idle:+.1f} MB against idle)")


async def still_held(control: httpx.AsyncClient) -> dict[str, int]:
    """Live sessions and cache entries per layer, from the server's /metrics."""
    metrics = await scrape_metrics(control)
    held = {"sessions": int(metrics.get("active_sessions", 0))}
    for name, value in metrics.items():
        if name.startswith("cache_entries{") and (layer := re.search(r'layer="([^"]+)"', name)):
            held[f"cache_{layer.group(1)}"] = int(value)
    return held


def _new_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


# ------------------------------------------------------------------------------- figures and targets


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline_figures(phases: dict[str, Any]) -> dict[str, float | None]:
    figures: dict[str, float | None] = {}
    for name in PHASES:
        phase = phases.get(name)
        if name in LOG_COST_FIGURES:
            figures[name] = _get(phases, log_cost.SUMMARY, LOG_COST_FIGURES[name])
        elif phase is None:
            figures[name] = None
        elif name.startswith("baseline_b") or name.startswith("baseline_c"):
            figures[name] = phase["questions_per_s"]
        elif name in ("ws_connections", "sockets_ask", "sockets_sse"):
            figures[name] = phase["errors"]
        elif name.startswith(("sse_", "ws_c")):
            figures[name] = _get(phase, "latency_ms", "first_word", "p50")
        elif name.startswith("startup"):
            figures[name] = phase["seconds"]
        elif name in ("rss_idle", "rss_after_load"):
            figures[name] = phase["rss_mb"]
        elif name == "sockets_idle":
            figures[name] = phase["kb_per_connection"]
        elif name == "soak":
            figures[name] = phase["rss_end_over_first_minute"]
        elif name == "rss_under_load":
            figures[name] = phase["peak_rss_mb"]
        else:
            figures[name] = phase["throughput_per_s"]
    return figures


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if numerator is None or denominator is None or not denominator:
        return None
    return round(float(numerator) / float(denominator), 3)


def stream_reference(phases: dict[str, Any], concurrency: int) -> str:
    """The unique /ask phase the stream phases are compared with: the httpx one when there is one.

    The stream phases use Python clients; with wrk measuring the main /ask phases, the separate
    httpx /ask phase keeps the client overhead the same on both sides of the ratio.
    """
    same_client = f"ask_unique_c{concurrency}_httpx"
    return same_client if same_client in phases else f"ask_unique_c{concurrency}"


# Which part of the run measures a phase, for the reason a target was not measured; unlisted phases belong
# to the full run only. The server's RSS after the load is read after every part that loads the server.
PHASE_PARTS = {
    "ask_unique_c1_httpx": "streams",
    "ask_unique_c32_httpx": "streams",
    "sse_c1": "streams",
    "sse_c32": "streams",
    "ws_c1": "streams",
    "ws_c32": "streams",
    "sockets_idle": "sockets",
    "sockets_ask": "sockets",
    "sockets_sse": "sockets",
    "soak": "soak",
    log_cost.SUMMARY: "log-cost",
    "rss_idle": "any",
    "rss_after_load": "any",
}


def _not_measured(needed: tuple[str, ...], phases: dict[str, Any], only: str | None, skipped: list[str]) -> str:
    """Why a target has no figure: the part that measures it did not run, a phase was skipped, or no figure."""
    for name in needed:
        if name in phases:
            continue
        part = PHASE_PARTS.get(name, "full run")
        if only is not None and part != only and (part != "any" or only == "log-cost"):
            return f"not part of --only {only}"
        if name in skipped:
            return f"{name} skipped in this run"
        return f"no {name} figure in this run"
    return "no figure (see the phases in the JSON)"


def evaluate_targets(
    phases: dict[str, Any], only: str | None = None, skipped: list[str] | None = None
) -> list[dict[str, Any]]:
    """The targets of issues 9, 16 and 19: met, not met, or not measured (with the reason)."""

    def throughput(name: str) -> Any:
        return _get(phases, name, "throughput_per_s")

    def latency(name: str, kind: str, percentile: str) -> Any:
        return _get(phases, name, "latency_ms", kind, percentile)

    def cpu_per_answer(name: str) -> Any:
        return _get(phases, name, "resources", "server_cpu_ms_per_answer")

    # (target, measured, goal as text, bound, comparison, the phases it needs)
    rows: list[tuple[str, float | None, str, float, str, tuple[str, ...]]] = [
        (
            "unique /ask c32 ÷ baseline C (embedder alone, batches of 32)",
            _ratio(throughput("ask_unique_c32"), _get(phases, "baseline_c_embedder_batch32", "questions_per_s")),
            "≥ 0.7",
            0.7,
            ">=",
            ("ask_unique_c32", "baseline_c_embedder_batch32"),
        ),
        (
            "unique /ask c32 ÷ baseline B (embedder alone, one at a time)",
            _ratio(throughput("ask_unique_c32"), _get(phases, "baseline_b_embedder_single", "questions_per_s")),
            "> 1 (well above)",
            1.0,
            ">",
            ("ask_unique_c32", "baseline_b_embedder_single"),
        ),
        (
            "unique /ask throughput c32 ÷ c1",
            _ratio(throughput("ask_unique_c32"), throughput("ask_unique_c1")),
            "> 1",
            1.0,
            ">",
            ("ask_unique_c32", "ask_unique_c1"),
        ),
        (
            "repeated /ask c32 ÷ baseline A (/health c32)",
            _ratio(throughput("ask_repeated_c32"), throughput("baseline_a_health_c32")),
            "≥ 0.5",
            0.5,
            ">=",
            ("ask_repeated_c32", "baseline_a_health_c32"),
        ),
        (
            "unique /ask c32: p99 ÷ p50",
            _ratio(latency("ask_unique_c32", "latency", "p99"), latency("ask_unique_c32", "latency", "p50")),
            "≤ 3",
            3.0,
            "<=",
            ("ask_unique_c32",),
        ),
        (
            "repeated /ask c32: p99 ÷ p50",
            _ratio(latency("ask_repeated_c32", "latency", "p99"), latency("ask_repeated_c32", "latency", "p50")),
            "≤ 3",
            3.0,
            "<=",
            ("ask_repeated_c32",),
        ),
    ]
    for transport, label in (("sse", "SSE"), ("ws", "WebSocket")):
        reference = stream_reference(phases, 32)
        client = _get(phases, reference, "tool") or "httpx"
        rows.append(
            (
                f"{label} c32: server CPU per answer ÷ /ask's (unique, c32, {client})",
                _ratio(cpu_per_answer(f"{transport}_c32"), cpu_per_answer(reference)),
                "≤ 1.5",
                1.5,
                "<=",
                (f"{transport}_c32", reference),
            )
        )
        for concurrency in (1, 32):
            reference = stream_reference(phases, concurrency)
            client = _get(phases, reference, "tool") or "httpx"
            rows.append(
                (
                    f"{label} c{concurrency}: first word p50 ÷ /ask p50 (unique, c{concurrency}, {client})",
                    _ratio(
                        latency(f"{transport}_c{concurrency}", "first_word", "p50"),
                        latency(reference, "latency", "p50"),
                    ),
                    "≤ 1.3",
                    1.3,
                    "<=",
                    (f"{transport}_c{concurrency}", reference),
                )
            )
    after_load = _get(phases, "rss_after_load", "seconds_after_load")
    soak_seconds = _get(phases, "soak", "seconds")
    held = _get(phases, "sockets_idle", "opened")
    asks = _get(phases, "sockets_ask", "asked")
    streams = _get(phases, "sockets_sse", "streams")
    connections = _get(phases, "ws_connections", "connections")
    rows += [
        (
            f"server RSS {_fmt(after_load, 0) if after_load is not None else 60} s after the last load phase "
            "− idle RSS (MB)",
            _get(phases, "rss_after_load", "above_idle_mb"),
            "≤ 100 MB",
            100.0,
            "<=",
            ("rss_after_load", "rss_idle"),
        ),
        (
            f"soak ({_fmt(soak_seconds, 0) if soak_seconds is not None else '–'} s, /ask + SSE + WebSocket): "
            "RSS at the end ÷ after the first minute",
            _get(phases, "soak", "rss_end_over_first_minute"),
            f"within ±{soak.GOAL:.0%} of 1",
            soak.GOAL,
            "within",
            ("soak",),
        ),
        (
            f"server RSS per idle WebSocket, {_fmt(held) if held is not None else '10,000'} held open (KB)",
            _get(phases, "sockets_idle", "kb_per_connection"),
            "≤ 40 KB",
            40.0,
            "<=",
            ("sockets_idle",),
        ),
        (
            f"errors, {_fmt(asks) if asks is not None else '1,000'} held WebSockets asking at once",
            _get(phases, "sockets_ask", "errors"),
            "= 0",
            0.0,
            "==",
            ("sockets_ask",),
        ),
        (
            f"errors, {_fmt(streams) if streams is not None else '1,000'} concurrent SSE streams",
            _get(phases, "sockets_sse", "errors"),
            "= 0",
            0.0,
            "==",
            ("sockets_sse",),
        ),
        (
            f"WebSocket errors, {connections if connections is not None else 1000} concurrent connections",
            _get(phases, "ws_connections", "errors"),
            "= 0",
            0.0,
            "==",
            ("ws_connections",),
        ),
        ("warm start-up to ready (s)", _get(phases, "startup_warm", "seconds"), "≤ 3 s", 3.0, "<=", ("startup_warm",)),
        ("idle server RSS (MB)", _get(phases, "rss_idle", "rss_mb"), "≤ 400 MB", 400.0, "<=", ("rss_idle",)),
        (
            "unique /ask c32, question log on ÷ off (same run, alternating legs)",
            _get(phases, log_cost.SUMMARY, "ratio"),
            f"≥ {log_cost.GOAL}",
            log_cost.GOAL,
            ">=",
            (log_cost.SUMMARY,),
        ),
    ]
    compare: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda value, bound: value >= bound,
        ">": lambda value, bound: value > bound,
        "<=": lambda value, bound: value <= bound,
        "==": lambda value, bound: value == bound,
        "within": lambda value, bound: abs(value - 1.0) <= bound,
    }
    targets = []
    for name, value, text, bound, operator, needed in rows:
        target: dict[str, Any] = {"target": name, "measured": value, "goal": text, "met": None}
        if value is None:
            target["reason"] = _not_measured(needed, phases, only, skipped or [])
        else:
            target["met"] = bool(compare[operator](value, bound))
        targets.append(target)
    return targets


# ------------------------------------------------------------------------------------------- table


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_table(results: dict[str, Any]) -> str:
    phases = results["phases"]
    lines = [
        "| phase | tool | conc. | throughput /s | p50 ms | p95 ms | p99 ms | errors | server CPU (cores) "
        "| CPU ms / answer | other CPU (cores) | mean batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, name: str, kind: str = "latency") -> None:
        phase = phases.get(name)
        if phase is None:
            return
        latency = _get(phase, "latency_ms", kind) or {}
        metrics = phase.get("server_metrics", {})
        if phase.get("exhausted"):
            label += " (ran out of questions)"
        lines.append(
            f"| {label} | {phase.get('tool', '')} | {phase.get('concurrency', '')} "
            f"| {_fmt(phase.get('throughput_per_s'))} | {_fmt(latency.get('p50'))} | {_fmt(latency.get('p95'))} "
            f"| {_fmt(latency.get('p99'))} | {_fmt(phase.get('errors'))} "
            f"| {_fmt(_get(phase, 'resources', 'server_cpu_cores'), 2)} "
            f"| {_fmt(_get(phase, 'resources', 'server_cpu_ms_per_answer'))} "
            f"| {_fmt(_get(phase, 'resources', 'other_cpu_cores'), 2)} "
            f"| {_fmt(metrics.get('mean_batch_size'))} |"
        )

    row("A: GET /health", "baseline_a_health_c32")
    for name, label in (
        ("baseline_b_embedder_single", "B: embedder alone, 1 at a time"),
        ("baseline_c_embedder_batch32", "C: embedder alone, batches of 32"),
    ):
        phase = phases.get(name)
        if phase:
            lines.append(
                f"| {label} | in-process | – | {_fmt(phase['questions_per_s'])} | {_fmt(phase['ms_per_call'])} "
                f"(per call) | – | – | – | {_fmt(_get(phase, 'resources', 'own_cpu_cores'), 2)} | – "
                f"| {_fmt(_get(phase, 'resources', 'other_cpu_cores'), 2)} | {phase['batch_size']} |"
            )
    for concurrency in (1, 8, 32):
        row(f"POST /ask unique, c{concurrency}", f"ask_unique_c{concurrency}")
    for concurrency in (1, 32):
        row(f"POST /ask unique, c{concurrency}, httpx (for the stream ratios)", f"ask_unique_c{concurrency}_httpx")
    for label, name in log_cost.table_rows(phases):
        row(label, name)
    row("POST /ask repeated (cache hits), c32", "ask_repeated_c32")
    for transport, label in (("sse", "SSE /ask-stream"), ("ws", "WebSocket /ws/ask")):
        for concurrency in (1, 32):
            row(f"{label} c{concurrency}: first word", f"{transport}_c{concurrency}", "first_word")
            row(f"{label} c{concurrency}: complete", f"{transport}_c{concurrency}", "complete")
    for name, label in (
        ("sockets_ask", "WebSockets held open, asking at once"),
        ("sockets_sse", "SSE streams at once"),
    ):
        row(f"{label}: first word", name, "first_word")
        row(f"{label}: complete", name, "complete")
    table = "\n".join(lines)

    many = phases.get("ws_connections")
    extra = ["", "| other measurement | value |", "|---|---|"]
    if many:
        extra += [
            f"| {many['connections']} concurrent WebSockets, one question each: errors | {many['errors']} |",
            f"| … answered / peak open connections | {many['answered']} / {many['peak_open_connections']} |",
            f"| … total time (connect all, ask, all answered) | {_fmt(many['total_s'], 2)} s |",
            f"| … connect p50 / p99 | {_fmt(_get(many, 'latency_ms', 'connect', 'p50'))} / "
            f"{_fmt(_get(many, 'latency_ms', 'connect', 'p99'))} ms |",
            f"| … first word p50 / p99 | {_fmt(_get(many, 'latency_ms', 'first_word', 'p50'))} / "
            f"{_fmt(_get(many, 'latency_ms', 'first_word', 'p99'))} ms |",
            f"| … complete p50 / p99 | {_fmt(_get(many, 'latency_ms', 'complete', 'p50'))} / "
            f"{_fmt(_get(many, 'latency_ms', 'complete', 'p99'))} ms |",
            f"| … peak server RSS | {_fmt(_get(many, 'resources', 'server_rss_peak_mb'))} MB |",
        ]
    cold = phases.get("startup_cold")
    warm = phases.get("startup_warm")
    if cold or warm:
        cold_text = f"{cold['seconds']:.2f} s" if cold else "skipped"
        extra.append(f"| start-up to ready, cold (empty cache dir) | {cold_text} |")
    if warm:
        runs = ", ".join(f"{value:.2f}" for value in warm["runs"])
        extra.append(f"| start-up to ready, warm (same cache dir, restart) | {warm['seconds']:.2f} s (runs: {runs}) |")
    if "rss_idle" in phases:
        extra.append(f"| server RSS idle (after start-up) | {_fmt(phases['rss_idle']['rss_mb'])} MB |")
    if "rss_under_load" in phases:
        load = phases["rss_under_load"]
        extra.append(f"| server RSS under load (peak, phase {load['phase']}) | {_fmt(load['peak_rss_mb'])} MB |")
    if "rss_after_load" in phases:
        after = phases["rss_after_load"]
        extra.append(
            f"| server RSS {_fmt(after['seconds_after_load'], 0)} s after the last load phase | "
            f"{_fmt(after['rss_mb'])} MB ({after['above_idle_mb']:+,.1f} MB against idle) |"
        )
        if held := after.get("still_held"):
            extra.append(
                "| … what the server still holds then (sessions live until their TTL; caches are bounded) | "
                + ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in held.items())
                + " |"
            )
    extra += _sockets_lines(phases) + _soak_lines(phases.get("soak"))
    extra += log_cost.summary_lines(phases.get(log_cost.SUMMARY))
    return table + "\n" + "\n".join(extra)


def _p50_p99(phase: dict[str, Any], kind: str) -> str:
    latency = _get(phase, "latency_ms", kind) or {}
    return f"{_fmt(latency.get('p50'))} / {_fmt(latency.get('p99'))} ms"


def _sockets_lines(phases: dict[str, Any]) -> list[str]:
    """The sockets phases as rows of the "other measurement" table."""
    lines = []
    idle = phases.get("sockets_idle")
    if idle:
        beats = idle["heartbeats_answered"]
        lines += [
            f"| {_fmt(idle['connections'])} WebSockets held open ({idle['client_processes']} client processes): "
            f"opened / failed | {_fmt(idle['opened'])} / {_fmt(idle['open_errors'])} |",
            f"| … time to open all; connect p50 / p99 | {_fmt(idle['open_s'], 2)} s; {_p50_p99(idle, 'connect')} |",
            f"| … still open after {_fmt(idle['hold_s'], 0)} s idle; heartbeats answered per connection "
            f"(min / median / max) | {_fmt(idle['open_after_hold'])}; {beats['min']} / {beats['median']} "
            f"/ {beats['max']} |",
            f"| … server RSS before / all open and idle / after closing them | {_fmt(idle['server_rss_before_mb'])} "
            f"/ {_fmt(idle['server_rss_idle_mb'])} / {_fmt(idle.get('server_rss_after_close_mb'))} MB |",
            f"| … server RSS per idle connection | {_fmt(idle['kb_per_connection'])} KB |",
        ]
    ask = phases.get("sockets_ask")
    if ask:
        lines += [
            f"| {_fmt(ask['asked'])} of them ask at once: answered / errors | {_fmt(ask['answered'])} "
            f"/ {_fmt(ask['errors'])} |",
            f"| … first word p50 / p99; complete p50 / p99 | {_p50_p99(ask, 'first_word')}; "
            f"{_p50_p99(ask, 'complete')} |",
            f"| … total time; still open afterwards | {_fmt(ask['total_s'], 2)} s; {_fmt(ask['open_after_asking'])} |",
        ]
    sse = phases.get("sockets_sse")
    if sse:
        lines += [
            f"| {_fmt(sse['streams'])} SSE streams at once: answered / errors | {_fmt(sse['answered'])} "
            f"/ {_fmt(sse['errors'])} |",
            f"| … first word p50 / p99; complete p50 / p99 | {_p50_p99(sse, 'first_word')}; "
            f"{_p50_p99(sse, 'complete')} |",
            f"| … total time; peak server RSS | {_fmt(sse['total_s'], 2)} s; "
            f"{_fmt(_get(sse, 'resources', 'server_rss_peak_mb'))} MB |",
        ]
    return lines


def _soak_lines(phase: dict[str, Any] | None) -> list[str]:
    """The soak as rows of the "other measurement" table."""
    if not phase:
        return []
    lines = [
        f"| soak, {_fmt(phase['seconds'], 0)} s, {phase['concurrency']} workers (/ask, SSE, WebSocket): "
        f"answers /s, errors | {_fmt(phase['throughput_per_s'])}, {_fmt(phase['errors'])} |",
    ]
    for name, label in (("ask", "POST /ask"), ("sse", "SSE"), ("ws", "WebSocket")):
        part = phase["transports"][name]
        kind = "latency" if name == "ask" else "complete"
        lines.append(
            f"| … {label}: answers /s, errors; p50 / p99 to the whole answer | {_fmt(part['throughput_per_s'])}, "
            f"{_fmt(part['errors'])}; {_p50_p99(part, kind)} |"
        )
    first, last = phase["rss_first_minute_window_s"], phase["rss_end_window_s"]
    lines += [
        f"| … server RSS after the first minute ({_fmt(first[0], 0)}–{_fmt(first[1], 0)} s, median) / at the end "
        f"({_fmt(last[0], 0)}–{_fmt(last[1], 0)} s) | {_fmt(phase['rss_first_minute_mb'])} "
        f"/ {_fmt(phase['rss_end_mb'])} MB |",
        f"| … questions sent again (the file used up); embedding-cache hits | {_fmt(phase['questions_reused'])}; "
        f"{_fmt(_get(phase, 'server_metrics', 'cache_memory_hits'))} in memory, "
        f"{_fmt(_get(phase, 'server_metrics', 'cache_disk_hits'))} on disk |",
    ]
    return lines


def render_targets(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | result |", "|---|---:|---|---|"]
    for target in targets:
        result = {True: "met", False: "**not met**", None: "not measured"}[target["met"]]
        if target.get("reason"):
            result += f": {target['reason']}"
        value = target["measured"]
        digits = 2 if isinstance(value, float) and abs(value) < 10 else 1
        lines.append(f"| {target['target']} | {_fmt(value, digits)} | {target['goal']} | {result} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the `finally` blocks: stop the server, remove the temp dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        earlier = json.loads(args.render.read_text(encoding="utf-8"))
        print(render_table(earlier) + "\n\n" + render_targets(earlier["targets"]))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    fd_limit = raise_fd_limit()  # the server and the socket clients inherit it
    started = time.perf_counter()
    questions = [line.strip() for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = QuestionPool(questions)
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "settings": {
            "smoke": args.smoke,
            "duration_s": args.duration,
            "baseline_duration_s": args.baseline_duration,
            "ws_connections": args.ws_connections,
            "max_requests_per_phase": args.max_requests,
            "http_tool_plain_http": args.http_tool,
            "server_env": {**loadgen_env(), **args.server_env},
            "only": args.only,
            "log_rounds": args.log_rounds,
            "sockets": args.sockets,
            "socket_asks": args.socket_asks,
            "sse_streams": args.sse_streams,
            "socket_processes": args.socket_processes,
            "socket_hold_s": args.socket_hold,
            "soak_seconds": args.soak_seconds,
            "soak_concurrency_per_transport": args.soak_concurrency,
            "after_load_seconds": args.after_load_seconds,
            "open_file_limit": fd_limit,
        },
        "phases": {},
        "skipped": [],
    }
    phases: dict[str, Any] = results["phases"]

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.only is None:
        log(f"baselines B and C: the embedder alone in-process, {args.baseline_duration:g} s each")
        phases.update(embedder_baselines(questions, args.baseline_duration))

    work = Path(tempfile.mkdtemp(prefix="defi-bench-"))
    cache_dir = work / "cache"
    cache_dir.mkdir()
    log_path = work / "server.log"
    server: BenchServer | None = None
    try:
        if args.only in ("streams", "sockets", "soak"):
            seeded = seed_index(cache_dir, args.index_from) or seed_index(cache_dir)
            server = BenchServer(cache_dir, log_path, args.server_env)
            first = server.start_and_wait()
            log(f"start-up ({'index seeded' if seeded else 'cold'}): {first:.2f} s")
            store_index(cache_dir)
            runner = Runner(args, pool, server)
            _new_loop_runner()(runner.run())
            phases.update(runner.phases)
            results["skipped"] += runner.skipped
        elif args.only is None:
            if args.skip_cold_start:
                results["skipped"].append("startup_cold")
                seeded = seed_index(cache_dir, args.index_from) or seed_index(cache_dir)
                server = BenchServer(cache_dir, log_path, args.server_env)
                first = server.start_and_wait()
                log(f"first start-up ({'index seeded' if seeded else 'cold'}): {first:.2f} s")
            else:
                server = BenchServer(cache_dir, log_path, args.server_env)
                cold = server.start_and_wait()
                phases["startup_cold"] = {"seconds": round(cold, 3), "note": "empty cache dir: embeds the dataset"}
                log(f"cold start-up: {cold:.2f} s")
            store_index(cache_dir)
            server.stop()
            warm_runs = []
            for attempt in range(1 if args.smoke else 2):
                if attempt:
                    server.stop()
                server = BenchServer(cache_dir, log_path, args.server_env)
                warm_runs.append(server.start_and_wait())
                log(f"warm start-up: {warm_runs[-1]:.2f} s")
            phases["startup_warm"] = {"seconds": round(max(warm_runs), 3), "runs": [round(v, 3) for v in warm_runs]}

            runner = Runner(args, pool, server)
            _new_loop_runner()(runner.run())
            phases.update(runner.phases)
            results["skipped"] += runner.skipped
            server.stop()  # the question-log comparison below has the machine to itself
        if args.only in (None, "log-cost"):
            index_source = cache_dir if args.only is None else args.index_from
            phases.update(run_log_cost(args, work, questions, index_source, log))
    finally:
        if server is not None:
            server.stop()
        results["server_log_tail"] = server.log_tail(2000) if server is not None else ""
        shutil.rmtree(work, ignore_errors=True)

    load_phases = [name for name, phase in phases.items() if "server_rss_peak_mb" in phase.get("resources", {})]
    if load_phases:
        peak_name = max(load_phases, key=lambda name: phases[name]["resources"]["server_rss_peak_mb"])
        phases["rss_under_load"] = {
            "peak_rss_mb": phases[peak_name]["resources"]["server_rss_peak_mb"],
            "phase": peak_name,
            "per_phase_peak_mb": {name: phases[name]["resources"]["server_rss_peak_mb"] for name in load_phases},
        }
    results["questions"] = {
        "file": str(args.questions.relative_to(ROOT)) if args.questions.is_relative_to(ROOT) else str(args.questions),
        "pool_size": len(pool),
        "used": pool.used,
        "wraps": pool.wraps,
    }
    for phase in phases.values():
        resources = phase.get("resources", {})
        throughput = phase.get("throughput_per_s")
        if "server_cpu_cores" in resources and throughput:
            resources["server_cpu_ms_per_answer"] = round(1000 * resources["server_cpu_cores"] / throughput, 2)
    unique = [name for name in phases if name.startswith(("ask_unique_", "sse_", "ws_c", "sockets_ask", "sockets_sse"))]

    def cache_hits(names: list[str]) -> int:
        return sum(
            (_get(phases[name], "server_metrics", "cache_memory_hits") or 0)
            + (_get(phases[name], "server_metrics", "cache_disk_hits") or 0)
            for name in names
        )

    results["checks"] = {
        "unique_question_phases": unique,
        "cache_hits_in_unique_phases": cache_hits(unique),
        # The soak may send questions again once the file is used up (each long out of the caches).
        "soak_questions_reused": _get(phases, "soak", "questions_reused"),
        "cache_hits_in_soak": cache_hits(["soak"]) if "soak" in phases else None,
        "wrk_phases_out_of_questions": [name for name in unique if phases[name].get("exhausted")],
    }
    summary = log_cost.summarize(phases)
    if summary is not None:
        phases[log_cost.SUMMARY] = summary
    results["figures"] = headline_figures(phases)
    results["figure_units"] = PHASES
    results["targets"] = evaluate_targets(phases, args.only, results["skipped"])
    results["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    results["total_seconds"] = round(time.perf_counter() - started, 1)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table, targets = render_table(results), render_targets(results["targets"])
    args.output.with_suffix(".md").write_text(table + "\n\n" + targets + "\n", encoding="utf-8")
    print()
    print(table)
    print()
    print(targets)
    print()
    ran_out = ", ".join(results["checks"]["wrk_phases_out_of_questions"]) or "none"
    soak_note = ""
    if "soak" in phases:
        checks = results["checks"]
        soak_note = f"soak: {checks['soak_questions_reused']} questions reused, {checks['cache_hits_in_soak']} hits; "
    print(
        f"unique-question phases: {results['checks']['cache_hits_in_unique_phases']} embedding-cache hits "
        f"(server's /metrics); {soak_note}{pool.used} questions used of {len(pool)} (wrapped {pool.wraps}×); "
        f"wrk phases that ran out of questions: {ran_out}; "
        f"total {results['total_seconds']} s; JSON: {args.output}"
    )
    return 0


def run_log_cost(
    args: argparse.Namespace, work: Path, questions: list[str], index_source: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Unique /ask c32 on two fresh servers, question log on and off (`bench.log_cost`), in alternating legs.

    The servers have their own empty caches, so they get their own questions: the file's first ones
    again, the same ones to both (`--max-requests` per round).
    """
    warm_up, rounds = log_cost.question_rounds(QuestionPool(questions), args.log_rounds, args.max_requests)

    def seed(directory: Path) -> bool:
        return (index_source is not None and seed_index(directory, index_source)) or seed_index(directory)

    servers = log_cost.seed_and_start(work / "log-cost", args.server_env, seed, seed_index, log)
    try:
        store_index(servers[True].cache_dir)
        measure = log_cost.measure(servers, warm_up, rounds, args.duration, args.http_tool, log)
        phases: dict[str, Any] = _new_loop_runner()(measure)
    finally:
        for server in servers.values():
            server.stop()
    return phases


def loadgen_env() -> dict[str, str]:
    from bench.server import BENCH_ENV

    return dict(BENCH_ENV)


if __name__ == "__main__":
    raise SystemExit(main())
