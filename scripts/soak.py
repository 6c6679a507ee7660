"""A bounded soak: concurrent clients mixing every question transport, then the figures.

    python -m scripts.soak --duration 120 --clients 50                 # starts and stops its own server
    python -m scripts.soak --base-url http://127.0.0.1:8000 [--server-pid PID] --duration 60

Each client loops until the deadline over a weighted mix of: POST /ask, POST /v2/ask (continuing its
session for a few turns), POST /ask-stream, POST /v2/ask-stream, GET /ask-stream (with and without a
session), WebSocket questions (one to three per connection, some cancelled on purpose), and a few
deliberately invalid questions (a 422 or an `error` message is then the expected answer). About
`--abandon-ratio` of the streams are abandoned mid-answer on purpose (the client hangs up).

It counts requests, statuses, streams and errors; every stream that is not abandoned must end with
`complete` (or, for the deliberate cases, `error` / a cancelled `complete`); there must be no 5xx at
all. It samples the server's RSS every second (psutil on the server pid) and reports the growth between
the first and the last 30 s (first and last fifth for runs under 90 s). When it owns the server, the
server runs with a short SESSION_TTL_SECONDS and SESSION_CLEANUP_INTERVAL_SECONDS, and afterwards the
`active_sessions` gauge must come back to 0. After the load it also probes disconnects directly: a few
sessions whose /v2/ask-stream is abandoned mid-answer must still answer the next question in time, and
`--disconnect-burst` streams are hung up in a row (the server log then shows how the server took it).
Loopback only; every loop is bounded in time.

Exit status 0 when every check passes, 1 otherwise; `--output FILE` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from scripts.local_server import LocalServer, ServerStartError

MIB = 1024 * 1024
REQUEST_TIMEOUT = 60.0
STARTUP_TIMEOUT = 600.0
SETTLE_SECONDS = 20.0
TOPICS = [
    "impermanent loss",
    "a flash loan",
    "Aave",
    "a health factor",
    "a liquidity pool",
    "yield farming",
    "a stablecoin",
    "slippage",
    "an automated market maker",
    "staking",
    "a DAO",
    "a governance token",
    "liquid staking",
    "a DEX aggregator",
    "MEV",
    "a rug pull",
    "Uniswap",
    "Compound",
    "collateralization",
    "a bridge",
]
TEMPLATES = ["What is {}?", "Explain {}.", "How does {} work?", "What are the risks of {}?", "Tell me about {}"]
FOLLOW_UPS = ["What are its risks?", "How does it work?", "Can you give an example?", "Why does it matter?"]
OFF_TOPIC = ["best lasagna recipe?", "who won the 1998 world cup?"]
# action -> weight
MIX = {
    "ask": 20,
    "v2_ask": 20,
    "sse_post": 14,
    "sse_v2": 10,
    "sse_get": 14,
    "websocket": 16,
    "invalid": 6,
}
STREAM_KINDS = {"sse_post", "sse_v2", "sse_get", "websocket"}


# --- figures -------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Everything the clients saw."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    streams: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    sessions_continued: int = 0
    sessions_renewed: int = 0
    ws_connections: int = 0
    started: float = field(default_factory=time.monotonic)

    def error(self, reason: str, detail: str) -> None:
        self.errors[reason] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{reason} at {time.monotonic() - self.started:.1f} s: {detail[:300]}")

    def took(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)


@dataclass
class Client:
    """One simulated user: its random source and its conversation."""

    rng: random.Random
    session_id: str | None = None
    turns: int = 0

    def question(self) -> str:
        if self.rng.random() < 0.05:
            return self.rng.choice(OFF_TOPIC)
        return self.rng.choice(TEMPLATES).format(self.rng.choice(TOPICS))

    def session_question(self) -> str:
        if self.session_id is not None and self.turns > 0 and self.rng.random() < 0.5:
            return self.rng.choice(FOLLOW_UPS)
        return self.question()

    def note_session(self, returned: str | None, figures: Figures) -> None:
        if self.session_id is not None:
            if returned == self.session_id:
                figures.sessions_continued += 1
            else:
                figures.sessions_renewed += 1  # expired meanwhile (short TTL): a new session, as documented
        self.session_id, self.turns = returned, self.turns + 1
        if self.turns >= self.rng.randint(2, 5):
            self.session_id, self.turns = None, 0


# --- actions -------------------------------------------------------------------------------------------------


def _check_answer(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("answer"), str)
        and body.get("processing_stage") in {"response_complete", "no_match"}
        and isinstance(body.get("sources"), list)
    )


async def ask(http: httpx.AsyncClient, client: Client, figures: Figures, versioned: bool) -> None:
    kind = "v2_ask" if versioned else "ask"
    payload: dict[str, Any] = {"question": client.session_question() if versioned else client.question()}
    if versioned and client.session_id:
        payload["session_id"] = client.session_id
    started = time.monotonic()
    response = await http.post("/v2/ask" if versioned else "/ask", json=payload)
    figures.requests[kind] += 1
    figures.statuses[response.status_code] += 1
    if response.status_code != 200 or not _check_answer(response.json()):
        figures.error(f"{kind}_status_{response.status_code}", response.text)
        return
    figures.took(kind, time.monotonic() - started)
    if versioned:
        client.note_session(response.json().get("session_id"), figures)


async def invalid(http: httpx.AsyncClient, client: Client, figures: Figures) -> None:
    """A deliberately bad question: the documented answer is a 422 in the error format."""
    path = client.rng.choice(["/ask", "/v2/ask", "/ask-stream"])
    payload = client.rng.choice([{"question": ""}, {"question": "   "}, {"question": 42}, {}])
    response = await http.post(path, json=payload)
    figures.requests["invalid"] += 1
    figures.statuses[response.status_code] += 1
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    if response.status_code != 422 or not isinstance(body, dict) or set(body) != {"detail", "type", "code", "reason"}:
        figures.error(f"invalid_status_{response.status_code}", response.text)


async def sse(http: httpx.AsyncClient, client: Client, figures: Figures, kind: str, abandon_ratio: float) -> None:
    """One SSE answer, read to its end or abandoned on purpose after a few events."""
    abandon_after = client.rng.randint(1, 6) if client.rng.random() < abandon_ratio else None
    if kind == "sse_post":
        request = http.build_request("POST", "/ask-stream", json={"question": client.question()})
    elif kind == "sse_v2":
        payload: dict[str, Any] = {"question": client.session_question()}
        if client.session_id:
            payload["session_id"] = client.session_id
        request = http.build_request("POST", "/v2/ask-stream", json=payload)
    else:
        params = {"question": client.session_question()}
        if client.session_id and client.rng.random() < 0.5:
            params["session_id"] = client.session_id
        request = http.build_request("GET", "/ask-stream", params=params)
    started = time.monotonic()
    response = await http.send(request, stream=True)
    figures.requests[kind] += 1
    figures.statuses[response.status_code] += 1
    try:
        if response.status_code != 200:
            figures.error(f"{kind}_status_{response.status_code}", (await response.aread()).decode(errors="replace"))
            return
        figures.streams["started"] += 1
        events: list[dict[str, Any]] = []
        lines = response.aiter_lines()
        while True:
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                break
            except httpx.HTTPError as error:  # the connection broke mid-stream: say how far it got
                figures.streams["incomplete"] += 1
                figures.error(f"{kind}_{type(error).__name__}_mid_stream", f"after {len(events)} events: {error!r}")
                return
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if abandon_after is not None and len(events) >= abandon_after and events[-1]["type"] == "word":
                figures.streams["abandoned"] += 1
                client.session_id, client.turns = None, 0  # the user left; the probe below re-uses such sessions
                return  # closing the response hangs up mid-answer
        _finish_stream(kind, events, figures)
        figures.took(kind, time.monotonic() - started)
        session_id = response.headers.get("x-session-id")
        if kind != "sse_post" and session_id is not None:
            client.note_session(session_id, figures)
    finally:
        await response.aclose()


def _finish_stream(kind: str, events: list[dict[str, Any]], figures: Figures) -> None:
    """A stream read to its end: `metadata`, `word`..., `complete`, nothing else."""
    last = events[-1]["type"] if events else None
    words = [event for event in events[1:-1] if not event.get("reference")]  # the original frontend's reference lines
    if (
        last == "complete"
        and events[0]["type"] == "metadata"
        and events[-1].get("total_words") == len(words)
        and all(event["type"] == "word" for event in events[1:-1])
    ):
        figures.streams["completed"] += 1
    else:
        figures.streams["incomplete"] += 1
        figures.error(f"{kind}_stream_ended_{last}", json.dumps(events[-2:]) if events else "no events")


async def websocket(ws_url: str, client: Client, figures: Figures, abandon_ratio: float) -> None:
    """One connection, one to three questions; some cancelled, some abandoned, a few invalid on purpose."""
    async with connect(f"{ws_url}/ws/ask", open_timeout=REQUEST_TIMEOUT, close_timeout=5) as ws:
        figures.ws_connections += 1
        status = json.loads(await asyncio.wait_for(ws.recv(), REQUEST_TIMEOUT))
        if status.get("type") != "status":
            figures.error("ws_no_status", json.dumps(status))
            return
        for _ in range(client.rng.randint(1, 3)):
            if not await _ws_question(ws, client, figures, abandon_ratio):
                return


async def _ws_question(ws: ClientConnection, client: Client, figures: Figures, abandon_ratio: float) -> bool:
    """Ask one question; False when the connection was abandoned."""
    roll = client.rng.random()
    deliberate_error = roll < 0.05
    cancel = 0.05 <= roll < 0.10
    abandon = 0.10 <= roll < 0.10 + abandon_ratio
    question = "   " if deliberate_error else client.question()
    started = time.monotonic()
    await ws.send(json.dumps({"type": "question", "data": {"question": question}}))
    figures.requests["websocket"] += 1
    events: list[dict[str, Any]] = []
    cut_after = client.rng.randint(1, 6)
    while not events or events[-1]["type"] not in {"complete", "error"}:
        message = json.loads(await asyncio.wait_for(ws.recv(), REQUEST_TIMEOUT))
        if message["type"] in {"heartbeat", "pong"}:
            continue
        events.append(message)
        if message["type"] == "metadata":
            figures.streams["started"] += 1
        words = sum(event["type"] == "word" for event in events)
        if abandon and words >= cut_after:
            figures.streams["abandoned"] += 1
            await ws.close()
            return False
        if cancel and words == cut_after:
            await ws.send(json.dumps({"type": "cancel"}))
    last = events[-1]
    if deliberate_error:
        if last["type"] == "error" and last.get("reason") == "question_empty" and len(events) == 1:
            figures.streams["deliberate_errors"] += 1
        else:
            figures.error("ws_expected_error", json.dumps(events[-2:]))
        return True
    if cancel and last["type"] == "complete" and last.get("processing_stage") == "cancelled":
        figures.streams["cancelled"] += 1
        return True
    _finish_stream("websocket", events, figures)
    figures.took("websocket", time.monotonic() - started)
    return True


async def run_client(
    index: int, base_url: str, ws_url: str, deadline: float, seed: int, abandon_ratio: float, figures: Figures
) -> None:
    client = Client(random.Random(seed * 1000 + index))
    actions, weights = list(MIX), list(MIX.values())
    # Idle connections are dropped well before uvicorn's 5 s keep-alive timeout, so a request is never sent on
    # a connection the server is closing at that very moment (a client-side race, not a server fault).
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits) as http:
        await asyncio.sleep(client.rng.uniform(0, 0.5))  # do not all start in the same millisecond
        while time.monotonic() < deadline:
            action = client.rng.choices(actions, weights)[0]
            try:
                if action in {"ask", "v2_ask"}:
                    await ask(http, client, figures, versioned=action == "v2_ask")
                elif action == "invalid":
                    await invalid(http, client, figures)
                elif action == "websocket":
                    await websocket(ws_url, client, figures, abandon_ratio)
                else:
                    await sse(http, client, figures, action, abandon_ratio)
            except (httpx.HTTPError, WebSocketException, ConnectionClosed, OSError, TimeoutError) as error:
                figures.error(f"{action}_{type(error).__name__}", str(error) or repr(error))
            except (ValueError, KeyError, TypeError) as error:
                figures.error(f"{action}_malformed_{type(error).__name__}", str(error))
            await asyncio.sleep(client.rng.uniform(0.0, 0.2))


async def abandoned_session_probe(base_url: str, answer_within: float) -> bool:
    """Start a session, abandon a /v2/ask-stream on it mid-answer, ask again: True when answered in time."""
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT) as http:
        first = await http.post("/v2/ask", json={"question": "What is Aave?"})
        session_id = first.json()["session_id"]
        payload = {"question": "What is impermanent loss?", "session_id": session_id}
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT) as hangs_up,
            hangs_up.stream("POST", "/v2/ask-stream", json=payload) as response,
        ):
            events = 0
            async for line in response.aiter_lines():
                events += line.startswith("data:")
                if events >= 3:
                    break
        try:
            again = await http.post(
                "/v2/ask", json={"question": "What are its risks?", "session_id": session_id}, timeout=answer_within
            )
        except httpx.TimeoutException:
            return False
        return again.status_code == 200 and again.json().get("session_id") == session_id


async def disconnect_burst(base_url: str, count: int, seed: int) -> int:
    """Hang up `count` /ask-stream answers one after another, each after 1 to 3 events; returns how many."""
    rng = random.Random(seed)
    done = 0
    for _ in range(count):
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT) as http,
            http.stream("POST", "/ask-stream", json={"question": rng.choice(TEMPLATES).format("staking")}) as response,
        ):
            cut, events = rng.randint(1, 3), 0
            async for line in response.aiter_lines():
                events += line.startswith("data:")
                if events >= cut:
                    done += 1
                    break
    return done


# --- server, RSS and gauges ----------------------------------------------------------------------------------


# Every client shares 127.0.0.1, so the per-client limits are raised out of the way.
SOAK_SERVER_ENV = {
    "ENVIRONMENT": "test",
    "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000000",
    "WS_MAX_MESSAGES_PER_MINUTE": "100000",
    "MAX_CONNECTIONS_PER_CLIENT": "100000",  # every soak client connects from the same address
    "MAX_SESSIONS_PER_CLIENT": "100000",
}


def find_server_pid(base_url: str) -> int | None:
    """The pid listening on the base URL's port (needs the rights to see other processes' sockets)."""
    port = urlsplit(base_url).port
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


async def gauges(http: httpx.AsyncClient) -> dict[str, float]:
    names = {"active_sessions", "websocket_connections", "sse_streams_active"}
    values: dict[str, float] = {}
    for line in (await http.get("/metrics")).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in names:
            values[name] = float(value)
    return values


async def sample(
    process: Any, http: httpx.AsyncClient, started: float, stop: asyncio.Event, rss: list[tuple[float, float]]
) -> float:
    """Every second: the server's RSS (MiB); every other second its gauges. Returns the sessions peak."""
    peak_sessions = 0.0
    tick = 0
    while not stop.is_set():
        if process is not None:
            with contextlib.suppress(psutil.Error):
                rss.append((time.monotonic() - started, process.memory_info().rss / MIB))
        if tick % 2 == 0:
            with contextlib.suppress(httpx.HTTPError):
                peak_sessions = max(peak_sessions, (await gauges(http)).get("active_sessions", 0.0))
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    return peak_sessions


def rss_figures(samples: list[tuple[float, float]], duration: float) -> dict[str, Any]:
    if not samples:
        return {"available": False}
    window = 30.0 if duration >= 90 else duration / 5
    first = [value for at, value in samples if at <= window] or [samples[0][1]]
    last = [value for at, value in samples if at >= duration - window] or [samples[-1][1]]
    return {
        "available": True,
        "window_s": round(window, 1),
        "start_mb": round(samples[0][1], 1),
        "first_window_mb": round(statistics.mean(first), 1),
        "last_window_mb": round(statistics.mean(last), 1),
        "growth_mb": round(statistics.mean(last) - statistics.mean(first), 1),
        "peak_mb": round(max(value for _, value in samples), 1),
        "samples": len(samples),
    }


async def settle(http: httpx.AsyncClient) -> dict[str, float]:
    """Wait (bounded) until no stream or WebSocket is open any more."""
    deadline = time.monotonic() + SETTLE_SECONDS
    values = await gauges(http)
    while time.monotonic() < deadline and (values.get("websocket_connections") or values.get("sse_streams_active")):
        await asyncio.sleep(0.25)
        values = await gauges(http)
    return values


async def wait_for_expiry(http: httpx.AsyncClient, limit_seconds: float) -> tuple[bool, float, float]:
    """Poll `active_sessions` until 0; (reached, seconds waited, last value)."""
    started = time.monotonic()
    value = (await gauges(http)).get("active_sessions", 0.0)
    while value > 0 and time.monotonic() - started < limit_seconds:
        await asyncio.sleep(0.5)
        value = (await gauges(http)).get("active_sessions", 0.0)
    return value == 0, round(time.monotonic() - started, 1), value


# --- the run -------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, base_url: str, pid: int | None, expiry_limit: float | None) -> dict[str, Any]:
    ws_url = "ws" + base_url.removeprefix("http")
    figures = Figures()
    process = psutil.Process(pid) if pid is not None else None
    rss: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT) as http:
        started = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(process, http, started, stop, rss))
        deadline = started + args.duration
        clients = [
            run_client(index, base_url, ws_url, deadline, args.seed, args.abandon_ratio, figures)
            for index in range(args.clients)
        ]
        await asyncio.wait_for(asyncio.gather(*clients), args.duration + REQUEST_TIMEOUT * 2)
        load_seconds = time.monotonic() - started
        stop.set()
        peak_sessions = await sampler
        after = await settle(http)
        sessions_after_load = after.get("active_sessions", 0.0)
        probes = await asyncio.gather(
            *(abandoned_session_probe(base_url, args.probe_timeout) for _ in range(args.probes))
        )
        burst = await disconnect_burst(base_url, args.disconnect_burst, args.seed)
        expiry: dict[str, Any] = {"checked": False}
        if expiry_limit is not None:
            reached, waited, value = await wait_for_expiry(http, expiry_limit)
            expiry = {"checked": True, "back_to_zero": reached, "seconds": waited, "final": value}
    latency = {
        kind: {
            "n": len(values),
            "p50_ms": round(statistics.median(values) * 1000, 1),
            "p95_ms": round(sorted(values)[min(len(values) - 1, int(len(values) * 0.95))] * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }
        for kind, values in sorted(figures.latencies.items())
    }
    server_errors = sum(count for status, count in figures.statuses.items() if status >= 500)
    streams = {
        key: figures.streams[key]
        for key in ("started", "completed", "abandoned", "cancelled", "deliberate_errors", "incomplete")
    }
    rss_report = rss_figures(rss, load_seconds)
    checks = {
        "zero_5xx": server_errors == 0,
        "no_client_errors": not figures.errors,
        "streams_complete": streams["incomplete"] == 0,
        "gauges_back_to_zero": not after.get("websocket_connections") and not after.get("sse_streams_active"),
        "rss_growth_ok": (not rss_report["available"]) or rss_report["growth_mb"] < args.max_rss_growth_mb,
        "sessions_expired": (not expiry["checked"]) or bool(expiry["back_to_zero"]),
        "abandoned_sessions_usable": all(probes),
    }
    return {
        "config": {
            "duration_s": args.duration,
            "clients": args.clients,
            "abandon_ratio": args.abandon_ratio,
            "seed": args.seed,
            "base_url": base_url,
            "server_pid": pid,
            "mix": MIX,
        },
        "load_seconds": round(load_seconds, 1),
        "requests": dict(sorted(figures.requests.items())),
        "requests_total": sum(figures.requests.values()),
        "requests_per_second": round(sum(figures.requests.values()) / max(load_seconds, 1e-9), 1),
        "statuses": {str(status): count for status, count in sorted(figures.statuses.items())},
        "server_errors_5xx": server_errors,
        "errors": dict(figures.errors),
        "errors_total": sum(figures.errors.values()),
        "error_samples": figures.error_samples,
        "streams": streams,
        "websocket_connections_opened": figures.ws_connections,
        "sessions": {
            "continued": figures.sessions_continued,
            "renewed_after_expiry": figures.sessions_renewed,
            "peak_active": peak_sessions,
            "active_after_load": sessions_after_load,
            "expiry": expiry,
            "abandoned_stream_probes": {"tried": len(probes), "answered": sum(probes)},
        },
        "disconnect_burst": burst,
        "gauges_after_load": after,
        "latency": latency,
        "rss": rss_report,
        "checks": checks,
        "passed": all(checks.values()),
    }


def print_table(result: dict[str, Any]) -> None:
    rss = result["rss"]
    streams = result["streams"]
    sessions = result["sessions"]
    rows = [
        ("duration / clients", f"{result['load_seconds']} s / {result['config']['clients']}"),
        ("requests", f"{result['requests_total']} ({result['requests_per_second']}/s) {result['requests']}"),
        ("statuses", str(result["statuses"])),
        ("5xx", str(result["server_errors_5xx"])),
        ("client-side errors", f"{result['errors_total']} {result['errors'] or ''}"),
        (
            "streams",
            f"{streams['started']} started, {streams['completed']} complete, {streams['abandoned']} abandoned, "
            f"{streams['cancelled']} cancelled, {streams['deliberate_errors']} deliberate errors, "
            f"{streams['incomplete']} incomplete",
        ),
        ("websocket connections", str(result["websocket_connections_opened"])),
        (
            "sessions",
            f"{sessions['continued']} continued, {sessions['renewed_after_expiry']} renewed, peak "
            f"{sessions['peak_active']:.0f}, after load {sessions['active_after_load']:.0f}, expiry "
            f"{sessions['expiry']}, abandoned-stream probes answered "
            f"{sessions['abandoned_stream_probes']['answered']}/{sessions['abandoned_stream_probes']['tried']}",
        ),
        ("gauges after load", str(result["gauges_after_load"])),
    ]
    if rss["available"]:
        rows.append(
            (
                "server RSS",
                f"start {rss['start_mb']} MB, first {rss['window_s']} s {rss['first_window_mb']} MB, "
                f"last {rss['window_s']} s {rss['last_window_mb']} MB, growth {rss['growth_mb']} MB, "
                f"peak {rss['peak_mb']} MB",
            )
        )
    for kind, figures in result["latency"].items():
        rows.append((f"latency {kind}", f"p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, n {figures['n']}"))
    rows.append(("post-load disconnect burst", f"{result['disconnect_burst']} streams hung up in a row"))
    if "server_log" in result:
        rows.append(("server log", str(result["server_log"])))
    rows.append(("checks", " ".join(f"{name}={'ok' if ok else 'FAIL'}" for name, ok in result["checks"].items())))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for sample_line in result["error_samples"][:10]:
        print(f"  error: {sample_line}")
    print("PASSED" if result["passed"] else "FAILED")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--base-url", help="an already running server; default: start one")
    parser.add_argument("--server-pid", type=int, help="its pid, for RSS (default: found from the port)")
    parser.add_argument("--abandon-ratio", type=float, default=0.1, help="streams abandoned mid-answer (0.1)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="RSS growth limit (default 50)")
    parser.add_argument("--session-ttl", type=float, default=20.0, help="SESSION_TTL_SECONDS of an own server")
    parser.add_argument("--cleanup-interval", type=float, default=1.0, help="its SESSION_CLEANUP_INTERVAL_SECONDS")
    parser.add_argument(
        "--expiry-timeout", type=float, help="with --base-url: wait this long for active_sessions to reach 0"
    )
    parser.add_argument("--probes", type=int, default=3, help="abandoned-session probes after the load (3)")
    parser.add_argument("--probe-timeout", type=float, default=5.0, help="seconds a probe's answer may take (5)")
    parser.add_argument(
        "--disconnect-burst", type=int, default=40, help="after the load, hang up this many streams in a row (40)"
    )
    parser.add_argument("--cache-dir", help="CACHE_DIR of an own server (default: the project's)")
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT)
    parser.add_argument("--keep-log", help="copy an own server's log here")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.clients < 1 or args.clients > 1000:
        parser.error("--duration must be in (0, 3600] and --clients in [1, 1000]")
    if args.base_url and urlsplit(args.base_url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        parser.error("--base-url must be a loopback address")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own: LocalServer | None = None
    log_dir: Path | None = None
    if args.base_url:
        base_url = args.base_url.rstrip("/")
        pid = args.server_pid or find_server_pid(base_url)
        expiry_limit = args.expiry_timeout
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
        env = {
            "SESSION_TTL_SECONDS": str(int(args.session_ttl)),
            "SESSION_CLEANUP_INTERVAL_SECONDS": str(args.cleanup_interval),
        }
        if args.cache_dir:
            env["CACHE_DIR"] = args.cache_dir
        own = LocalServer({**SOAK_SERVER_ENV, **env}, log_dir / "server.log", die_with_parent=True)
        print(f"starting a server on {own.base_url} (log {own.log_path}) ...", flush=True)
        own.start()
        try:
            own.wait_ready(args.startup_timeout)
        except ServerStartError as error:
            own.stop()
            raise SystemExit(str(error)) from None
        base_url, pid = own.base_url, own.pid
        expiry_limit = args.session_ttl + args.cleanup_interval + 15.0
    try:
        print(f"soak: {args.clients} clients for {args.duration:.0f} s against {base_url} (server pid {pid})")
        result = asyncio.run(soak(args, base_url, pid, expiry_limit))
    finally:
        if own is not None:
            own.stop()
    if own is not None:
        log = own.log()
        result["server_log"] = {
            "tracebacks": log.count("Traceback"),
            "error_lines": sum('"level": "error"' in line for line in log.splitlines()),
            "unhandled_errors": log.count('"event": "unhandled_error"'),
            "streams_cancelled": log.count('"event": "stream_cancelled"'),
        }
        if args.keep_log:
            shutil.copy(own.log_path, args.keep_log)
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)
    print_table(result)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
