"""The soak: POST /ask, SSE and WebSocket questions mixed at moderate concurrency, the server's RSS over time.

Three closed loops run side by side for `--soak-seconds` (600), `--soak-concurrency` (4) workers each:
`/ask` and `/ask-stream` over kept-alive httpx connections, `/ws/ask` on connections that each ask
`QUESTIONS_PER_CONNECTION` questions and are then replaced by a new one (sessions and sockets come
and go, as with real users). The server's RSS is recorded every few seconds; the figures compared are
the median RSS over a short window after the first minute and over the last window of the soak.

Questions come from the run's pool: fresh ones while they last, then the file again from its start
(each then last sent thousands of questions earlier, far outside the 1,000-entry caches; the phase
reports how many were reused and the embedding-cache hits the server counted).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx

from bench.loadgen import (
    AskWorker,
    QuestionPool,
    SSEWorker,
    WebSocketWorker,
    closed_loop,
    http_client,
    measured,
)
from bench.server import BenchServer, ProcessWatch

QUESTIONS_PER_CONNECTION = 20  # SESSION_MAX_TURNS: a WebSocket session's turns are capped there anyway
FIRST_MINUTE_SECONDS = 60.0
WINDOW_SECONDS = 10.0
GOAL = 0.10  # issue 19: RSS at the end within 10 % of RSS after the first minute


def windows(seconds: float) -> tuple[float, float]:
    """When the reference window starts (after the first minute, or half a short soak) and how long windows are."""
    return min(FIRST_MINUTE_SECONDS, seconds / 2), min(WINDOW_SECONDS, seconds / 4)


def _median_between(series: list[list[float]], start: float, end: float) -> float | None:
    values = [mb for seconds, mb in series if start <= seconds <= end]
    return round(statistics.median(values), 1) if values else None


async def measure(
    server: BenchServer,
    watch: ProcessWatch,
    control: httpx.AsyncClient,
    pool: QuestionPool,
    seconds: float,
    concurrency: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the soak against a running server; the `soak` phase."""
    log(f"soak: /ask, SSE and WebSocket, {concurrency} workers each, {seconds:g} s")
    fresh_before, used_before = pool.fresh, pool.used
    cap = int(seconds * 1000)  # a request budget no 2-core server reaches: the soak ends by time
    transports = ("ask", "sse", "ws")

    async def body() -> dict[str, Any]:
        async with http_client(server.base_url, concurrency) as ask, http_client(server.base_url, concurrency) as sse:
            workers = (
                partial(AskWorker, ask, pool.take),
                partial(SSEWorker, sse, pool.take),
                partial(WebSocketWorker, f"{server.ws_url}/ws/ask", pool.take, QUESTIONS_PER_CONNECTION),
            )
            outcomes = await asyncio.gather(*(closed_loop(make, concurrency, seconds, cap) for make in workers))
        parts = {name: outcome.to_json() for name, outcome in zip(transports, outcomes, strict=True)}
        elapsed = max(outcome.elapsed for outcome in outcomes)
        completed = sum(part["completed"] for part in parts.values())
        return {
            "tool": "httpx + websockets",
            "concurrency": concurrency * len(transports),
            "elapsed_s": round(elapsed, 3),
            "completed": completed,
            "errors": sum(part["errors"] for part in parts.values()),
            "throughput_per_s": round(completed / elapsed, 2) if elapsed > 0 else 0.0,
            "transports": parts,
        }

    start, window = windows(seconds)
    phase = await measured(watch, control, body, rss_series_every=min(5.0, max(window / 2, 0.5)))
    series = phase["resources"]["server_rss_series_mb"]
    end = series[-1][0] if series else 0.0
    first = _median_between(series, start, start + window)
    last = _median_between(series, end - window, end)
    used = pool.used - used_before
    phase.update(
        {
            "seconds": seconds,
            "rss_first_minute_mb": first,
            "rss_first_minute_window_s": [round(start, 1), round(start + window, 1)],
            "rss_end_mb": last,
            "rss_end_window_s": [round(end - window, 1), round(end, 1)],
            "rss_end_over_first_minute": round(last / first, 3) if first and last else None,
            "questions": used,
            "questions_reused": max(0, used - fresh_before),
        }
    )
    log(f"soak: {phase['completed']} answers, {phase['errors']} errors; RSS {first} -> {last} MB")
    return phase
