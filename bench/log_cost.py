"""What the question log costs: unique POST /ask at concurrency 32 with QUESTION_LOG_ENABLED on and off.

Two fresh servers run side by side, one with the log on and one with it off, each with its own empty
cache directory (seeded with the dataset index only), so neither has seen a question before. The
legs alternate on, off, off, on, ... (each round is one leg per server, and every other round starts
with the log off) so that drift on a shared machine falls on both sides alike. A round sends the same
questions, in the same order, to both servers, each question once per server: the answer cache
cannot hide the log's cost, and both sides do the same work. The log writes to the servers' own
SQLite file (the service's default), in batches off the answer path: a leg waits until the log has
written its last row, so that no flush spills into the other server's leg.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import AskWorker, QuestionPool, closed_loop, http_client, measured, run_wrk_once, scrape_metrics
from bench.server import BenchServer, ProcessWatch

CONCURRENCY = 32
WARM_UP_QUESTIONS = 16
GOAL = 0.95  # issue 16: the log costs at most 5 % of unique /ask c32 throughput
SUMMARY = "question_log_cost"
PENDING_METRIC = "question_log_pending"


def leg_names(rounds: int) -> list[tuple[str, bool]]:
    """(phase name, log on) in the order they run: on, off, off, on, on, off, ..."""
    legs: list[tuple[str, bool]] = []
    for number in range(1, rounds + 1):
        order = (True, False) if number % 2 else (False, True)
        legs += [(f"ask_unique_c{CONCURRENCY}_log_{'on' if on else 'off'}_{number}", on) for on in order]
    return legs


def question_rounds(pool: QuestionPool, rounds: int, per_round: int) -> tuple[list[str], list[list[str]]]:
    """Warm-up questions and one list of questions per round, all distinct (both servers get the same ones)."""
    warm_up = pool.take_many(WARM_UP_QUESTIONS)
    return warm_up, [pool.take_many(per_round) for _ in range(rounds)]


async def _log_drained(client: httpx.AsyncClient, limit_seconds: float = 15.0) -> None:
    """Wait until the server's question log has no row left to write (it flushes every 0.5 s)."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        if not (await scrape_metrics(client)).get(PENDING_METRIC, 0.0):
            return
        await asyncio.sleep(0.2)


async def unique_ask_leg(
    server: BenchServer,
    watch: ProcessWatch,
    control: httpx.AsyncClient,
    questions: list[str],
    duration: float,
    http_tool: str,
) -> dict[str, Any]:
    """POST /ask at concurrency 32, each of `questions` at most once, for `duration` seconds (measured)."""
    if http_tool == "wrk":
        bodies = [json.dumps({"question": question}) for question in questions]

        async def body() -> dict[str, Any]:
            return await run_wrk_once(f"{server.base_url}/ask", CONCURRENCY, duration, bodies)

    else:
        remaining: Iterator[str] = iter(questions)

        async def body() -> dict[str, Any]:
            async with http_client(server.base_url, CONCURRENCY) as client:
                worker = partial(AskWorker, client, partial(next, remaining))
                outcome = await closed_loop(worker, CONCURRENCY, duration, len(questions))
            return {"tool": "httpx", **outcome.to_json()}

    before = await scrape_metrics(control)
    phase = await measured(watch, control, body)
    await _log_drained(control)
    after = await scrape_metrics(control)
    # Counted once the log has written everything the leg queued (the answers still in flight at wrk's
    # deadline included), so that the log-on legs show every row the log wrote for them.
    phase["question_log_rows"] = {
        key: int(after.get(metric, 0.0) - before.get(metric, 0.0))
        for key, metric in (("written", "question_log_written_total"), ("dropped", "question_log_dropped_total"))
    }
    return phase


async def measure(
    servers: dict[bool, BenchServer],
    warm_up: list[str],
    rounds: list[list[str]],
    duration: float,
    http_tool: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the legs against the log-on (`servers[True]`) and log-off (`servers[False]`) servers."""
    watches = {on: ProcessWatch(server.pid) for on, server in servers.items()}
    controls = {on: http_client(server.base_url, 8) for on, server in servers.items()}
    phases: dict[str, Any] = {}
    try:
        for control in controls.values():
            await asyncio.gather(*(control.get("/health") for _ in range(16)))
            await asyncio.gather(*(control.post("/ask", json={"question": question}) for question in warm_up))
        await asyncio.sleep(1.0)
        for name, on in leg_names(len(rounds)):
            questions = rounds[int(name.rsplit("_", 1)[1]) - 1]
            log(f"{name}: {http_tool}, concurrency {CONCURRENCY}, {duration:g} s, {len(questions)} questions max")
            leg = await unique_ask_leg(servers[on], watches[on], controls[on], questions, duration, http_tool)
            phases[name] = {**leg, "question_log": "on" if on else "off"}
    finally:
        for control in controls.values():
            await control.aclose()
    return phases


def summarize(phases: dict[str, Any]) -> dict[str, Any] | None:
    """Both settings over all their legs (answers ÷ seconds), the ratio on ÷ off, and each round's ratio."""
    legs = {name: phase for name, phase in phases.items() if "question_log" in phase and "throughput_per_s" in phase}
    if not legs:
        return None
    totals: dict[str, dict[str, float]] = {}
    rounds: dict[str, dict[str, float]] = {}
    for name, phase in legs.items():
        setting = phase["question_log"]
        total = totals.setdefault(
            setting, {"completed": 0.0, "elapsed": 0.0, "cpu": 0.0, "written": 0.0, "dropped": 0.0}
        )
        total["completed"] += phase.get("completed", 0)
        total["elapsed"] += phase.get("elapsed_s", 0.0)
        cores = phase.get("resources", {}).get("server_cpu_cores", 0.0)
        total["cpu"] += cores * phase.get("elapsed_s", 0.0)
        total["written"] += phase.get("question_log_rows", {}).get("written", 0)
        total["dropped"] += phase.get("question_log_rows", {}).get("dropped", 0)
        rounds.setdefault(name.rsplit("_", 1)[1], {})[setting] = phase["throughput_per_s"]

    def rate(setting: str) -> float | None:
        total = totals.get(setting)
        return round(total["completed"] / total["elapsed"], 2) if total and total["elapsed"] else None

    def cpu_ms(setting: str) -> float | None:
        total = totals.get(setting)
        return round(1000 * total["cpu"] / total["completed"], 2) if total and total["completed"] else None

    on, off = rate("on"), rate("off")
    return {
        "log_on_per_s": on,
        "log_off_per_s": off,
        "ratio": round(on / off, 3) if on and off else None,
        "round_ratios": [
            round(pair["on"] / pair["off"], 3)
            for _, pair in sorted(rounds.items())
            if pair.get("on") and pair.get("off")
        ],
        "cpu_ms_per_answer_on": cpu_ms("on"),
        "cpu_ms_per_answer_off": cpu_ms("off"),
        "rows_written_on": int(totals.get("on", {}).get("written", 0)),
        "rows_written_off": int(totals.get("off", {}).get("written", 0)),
        "rows_dropped_on": int(totals.get("on", {}).get("dropped", 0)),
        # The machine's other load during each leg: when it moves, so do the legs (a noisy ratio).
        "other_cpu_cores": [leg.get("resources", {}).get("other_cpu_cores") for leg in legs.values()],
        "legs": list(legs),
        "goal": GOAL,
    }


def seed_and_start(
    work: Path,
    extra_env: dict[str, str],
    seed: Callable[[Path], bool],
    copy_index: Callable[[Path, Path], bool],
    log: Callable[[str], None],
) -> dict[bool, BenchServer]:
    """Start the log-on and log-off servers, each on its own cache dir holding only the dataset index.

    `seed(cache_dir)` copies a stored index there (False when there is none: the first server then
    builds it, and `copy_index(target, source)` gives the second one the same).
    """
    servers: dict[bool, BenchServer] = {}
    directories = {on: work / f"log-{'on' if on else 'off'}" for on in (True, False)}
    for directory in directories.values():
        directory.mkdir(parents=True, exist_ok=True)
    seeded = all(seed(directory) for directory in directories.values())
    try:
        for on, directory in directories.items():
            if not seeded and not on:
                copy_index(directory, directories[True])
            env = {**extra_env, "QUESTION_LOG_ENABLED": "true" if on else "false"}
            servers[on] = BenchServer(directory, work / f"server-log-{'on' if on else 'off'}.log", env)
            seconds = servers[on].start_and_wait()
            log(f"question log {'on' if on else 'off'}: server ready in {seconds:.2f} s")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def table_rows(phases: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, phase name) of every leg, in the order they ran."""
    rows = []
    for name, phase in phases.items():
        if "question_log" in phase and "throughput_per_s" in phase:
            number = name.rsplit("_", 1)[1]
            rows.append(
                (f"POST /ask unique, c{CONCURRENCY}, question log {phase['question_log']} (round {number})", name)
            )
    return rows


def summary_lines(summary: dict[str, Any] | None) -> list[str]:
    """Lines of the "other measurement" table."""
    if not summary:
        return []
    rounds = ", ".join(f"{ratio:.3f}" for ratio in summary["round_ratios"]) or "–"
    legs = len(summary["legs"]) // 2

    def fmt(value: Any, digits: int = 1) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    return [
        f"| question log: unique /ask c{CONCURRENCY}, log on / log off ({legs} legs each, answers/s) "
        f"| {fmt(summary['log_on_per_s'])} / {fmt(summary['log_off_per_s'])} |",
        f"| … ratio on ÷ off (per round: {rounds}) | "
        f"{'–' if summary['ratio'] is None else format(summary['ratio'], '.3f')} |",
        f"| … server CPU ms per answer, log on / off | {fmt(summary['cpu_ms_per_answer_on'], 2)} / "
        f"{fmt(summary['cpu_ms_per_answer_off'], 2)} |",
        f"| … other processes' CPU during each leg (cores; when it moves, the ratio is noise) "
        f"| {', '.join(fmt(value, 2) for value in summary.get('other_cpu_cores', []))} |",
        f"| … rows written by the log, log on / off (dropped, log on) "
        f"| {summary['rows_written_on']:,} / {summary['rows_written_off']:,} ({summary['rows_dropped_on']:,}) |",
    ]
