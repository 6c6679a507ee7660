"""Closed-loop load generators (httpx and websockets asyncio clients, optionally wrk), bounded in time.

Every phase runs `concurrency` workers; each sends a request, waits for the whole answer, and sends
the next, until the phase's deadline or its request budget. Throughput is completed answers divided
by the time from the first request to the last answer. With wrk it is the answers completed in
wrk's run divided by wrk's run time: requests still in flight at the deadline are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from string import Template
from typing import Any

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect

from bench.server import ProcessWatch

REQUEST_TIMEOUT_SECONDS = 60.0


class QuestionPool:
    """Hands out questions in file order, never the same one twice until the file is used up."""

    def __init__(self, questions: list[str]) -> None:
        if not questions:
            raise ValueError("the question pool is empty")
        self._questions = questions
        self._next = 0
        self.wraps = 0

    def take(self) -> str:
        if self._next == len(self._questions):
            self._next = 0
            self.wraps += 1
        question = self._questions[self._next]
        self._next += 1
        return question

    def take_many(self, count: int) -> list[str]:
        return [self.take() for _ in range(count)]

    @property
    def fresh(self) -> int:
        """How many questions were never handed out (0 once the file has wrapped)."""
        return len(self._questions) - self._next if self.wraps == 0 else 0

    def upcoming(self, count: int) -> list[str]:
        """Up to `count` of the next fresh questions, not taken: `skip` the ones a phase used."""
        return self._questions[self._next : self._next + min(count, self.fresh)]

    def skip(self, count: int) -> None:
        """Mark the next `count` fresh questions as used."""
        if not 0 <= count <= self.fresh:
            raise ValueError(f"cannot skip {count} questions, {self.fresh} fresh")
        self._next += count

    @property
    def used(self) -> int:
        return self.wraps * len(self._questions) + self._next

    def __len__(self) -> int:
        return len(self._questions)


def summarize(values: list[float]) -> dict[str, float | None]:
    """Milliseconds: p50, p95, p99, mean, max (None when there is nothing to summarise)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    array = np.asarray(values, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "mean": round(float(array.mean()), 2),
        "max": round(float(array.max()), 2),
    }


@dataclass
class PhaseOutcome:
    """What a closed-loop phase measured (timings in seconds)."""

    concurrency: int
    elapsed: float = 0.0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def record(self, sample: dict[str, float]) -> None:
        self.ok += 1
        for name, value in sample.items():
            self.timings.setdefault(name, []).append(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed, 3),
            "completed": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common(5)),
            "throughput_per_s": round(self.ok / self.elapsed, 2) if self.elapsed > 0 else 0.0,
            "latency_ms": {name: summarize(values) for name, values in self.timings.items()},
        }


class Worker:
    """One closed-loop client: `request()` returns named timings in seconds, or raises."""

    async def request(self) -> dict[str, float]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def closed_loop(
    make_worker: Callable[[], Worker], concurrency: int, duration: float, max_requests: int
) -> PhaseOutcome:
    """Run `concurrency` workers until `duration` seconds have passed or `max_requests` were sent."""
    outcome = PhaseOutcome(concurrency)
    started = time.perf_counter()
    deadline = started + duration
    issued = 0

    async def run_worker() -> None:
        nonlocal issued
        worker = make_worker()
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                try:
                    sample = await asyncio.wait_for(worker.request(), REQUEST_TIMEOUT_SECONDS)
                except Exception as error:  # every failure is counted, none stops the phase
                    outcome.errors[describe_error(error)] += 1
                else:
                    outcome.record(sample)
        finally:
            await worker.close()

    await asyncio.gather(*(run_worker() for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - started
    return outcome


def describe_error(error: BaseException) -> str:
    """The error's type and the first line of its message (shortened), for counting errors by kind."""
    text = str(error).splitlines()[0][:80] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class StatusError(RuntimeError):
    """The server answered with an unexpected status or payload."""


# ---------------------------------------------------------------------------------------------- HTTP


def http_client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False)


class HealthWorker(Worker):
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(self) -> dict[str, float]:
        started = time.perf_counter()
        response = await self.client.get("/health")
        if response.status_code != 200:
            raise StatusError(f"HTTP {response.status_code}")
        return {"latency": time.perf_counter() - started}


class QuestionWorker(Worker):
    """A worker asking over HTTP, each time the next question from `next_question`."""

    def __init__(self, client: httpx.AsyncClient, next_question: Callable[[], str]) -> None:
        self.client = client
        self.next_question = next_question


class AskWorker(QuestionWorker):
    """POST /ask with the next question from `next_question`."""

    async def request(self) -> dict[str, float]:
        question = self.next_question()
        started = time.perf_counter()
        response = await self.client.post("/ask", json={"question": question})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise StatusError(f"HTTP {response.status_code}")
        if b'"answer"' not in response.content:
            raise StatusError("no answer in the body")
        return {"latency": elapsed}


class AnswerTimer:
    """Times one streamed answer from its start: to the first `word` event and to `complete`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_word: float | None = None

    def timings(self, event: dict[str, Any], error_detail: str) -> dict[str, float] | None:
        """The timings once `event` is `complete` (None before); an `error` event raises StatusError."""
        kind = event.get("type")
        if kind == "word" and self.first_word is None:
            self.first_word = time.perf_counter() - self.started
        elif kind == "complete":
            total = time.perf_counter() - self.started
            return {"first_word": self.first_word if self.first_word is not None else total, "complete": total}
        elif kind == "error":
            raise StatusError(f"error {error_detail}: {event.get(error_detail)}")
        return None


class SSEWorker(QuestionWorker):
    """POST /ask-stream, read `data:` lines: time to the first `word` event and to `complete`.

    The stream is read to its end, as a browser's EventSource does: leaving at `complete` would make the
    client drop the connection (the body not read to its end), and every answer would then pay for a
    new connection, which `/ask`'s keep-alive connections do not.
    """

    async def request(self) -> dict[str, float]:
        question = self.next_question()
        timer = AnswerTimer()
        timings: dict[str, float] | None = None
        async with self.client.stream("POST", "/ask-stream", json={"question": question}) as response:
            if response.status_code != 200:
                raise StatusError(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if timings is None and line.startswith("data:"):
                    timings = timer.timings(json.loads(line[5:]), "message")
        if timings is None:
            raise StatusError("stream ended without a complete event")
        return timings


# ----------------------------------------------------------------------------------------- WebSocket


async def ws_connect(url: str) -> ClientConnection:
    """Open /ws/ask and read the `status: connected` greeting."""
    connection = await connect(
        url,
        open_timeout=REQUEST_TIMEOUT_SECONDS,
        ping_interval=None,
        max_size=2**22,
        compression=None,
        proxy=None,
    )
    greeting = json.loads(await connection.recv())
    if greeting.get("type") != "status":
        await connection.close()
        raise StatusError(f"unexpected greeting {greeting.get('type')}")
    return connection


async def ws_ask(connection: ClientConnection, question: str) -> dict[str, float]:
    """Send one question on an open connection; time to the first `word` and to `complete`."""
    timer = AnswerTimer()
    await connection.send(json.dumps({"type": "question", "data": {"question": question}}))
    while True:
        if timings := timer.timings(json.loads(await connection.recv()), "code"):
            return timings


class WebSocketWorker(Worker):
    """One chat connection kept open, asking questions one after another (reconnects after a failure).

    With `questions_per_connection`, the worker closes its connection after that many questions and
    opens a new one for the next (connection churn, as in the soak).
    """

    def __init__(self, url: str, next_question: Callable[[], str], questions_per_connection: int | None = None) -> None:
        self.url = url
        self.next_question = next_question
        self.questions_per_connection = questions_per_connection
        self.connection: ClientConnection | None = None
        self.asked = 0  # on the current connection

    async def request(self) -> dict[str, float]:
        if self.connection is not None and self.asked == self.questions_per_connection:
            await self.close()
        if self.connection is None:
            self.connection = await ws_connect(self.url)
            self.asked = 0
        self.asked += 1
        try:
            return await ws_ask(self.connection, self.next_question())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.connection is not None:
            connection, self.connection = self.connection, None
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone anyway
                await asyncio.wait_for(connection.close(), 5)


async def await_bounded(
    tasks: list[asyncio.Task[None]], limit_seconds: float, errors: Counter[str], reason: str
) -> None:
    """Wait for `tasks` at most `limit_seconds`; cancel the rest and count them in `errors` as "timeout: <reason>"."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit_seconds)
    for task in pending:
        task.cancel()
    if pending:
        errors[f"timeout: {reason}"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)


async def many_websockets(url: str, questions: list[str], limit_seconds: float) -> dict[str, Any]:
    """Open len(questions) connections at once; when all are open, each asks its question, then closes."""
    count = len(questions)
    errors: Counter[str] = Counter()
    connect_times: list[float] = []
    first_words: list[float] = []
    completes: list[float] = []
    opened = 0
    peak_open = 0
    all_connected = asyncio.Event()
    settled = 0
    started = time.perf_counter()

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == count:
            all_connected.set()

    async def one(question: str) -> None:
        nonlocal opened, peak_open
        connection: ClientConnection | None = None
        is_settled = False
        try:
            begin = time.perf_counter()
            connection = await ws_connect(url)
            connect_times.append(time.perf_counter() - begin)
            opened += 1
            peak_open = max(peak_open, opened)
            settle()
            is_settled = True
            await all_connected.wait()
            sample = await ws_ask(connection, question)
            first_words.append(sample["first_word"])
            completes.append(sample["complete"])
        except Exception as error:
            errors[describe_error(error)] += 1
        finally:
            if not is_settled:
                settle()
            if connection is not None:
                try:
                    await asyncio.wait_for(connection.close(), 10)
                except Exception as error:
                    errors[f"close: {describe_error(error)}"] += 1
                opened -= 1

    tasks = [asyncio.create_task(one(question)) for question in questions]
    await await_bounded(tasks, limit_seconds, errors, "no answer within the phase limit")
    elapsed = time.perf_counter() - started
    return {
        "connections": count,
        "peak_open_connections": peak_open,
        "answered": len(completes),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "total_s": round(elapsed, 3),
        "latency_ms": {
            "connect": summarize(connect_times),
            "first_word": summarize(first_words),
            "complete": summarize(completes),
        },
    }


async def many_streams(base_url: str, questions: list[str], limit_seconds: float) -> dict[str, Any]:
    """POST /ask-stream once per question, all at once (one connection each), each read to `complete`."""
    errors: Counter[str] = Counter()
    timings: dict[str, list[float]] = {"first_word": [], "complete": []}
    started = time.perf_counter()
    async with http_client(base_url, len(questions)) as client:
        worker = SSEWorker(client, partial(next, iter(questions)))

        async def one() -> None:
            try:
                sample = await worker.request()
            except Exception as error:
                errors[describe_error(error)] += 1
            else:
                for name, value in sample.items():
                    timings[name].append(value)

        tasks = [asyncio.create_task(one()) for _ in questions]
        await await_bounded(tasks, limit_seconds, errors, "no answer within the phase limit")
    elapsed = time.perf_counter() - started
    return {
        "streams": len(questions),
        "answered": len(timings["complete"]),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "total_s": round(elapsed, 3),
        "throughput_per_s": round(len(timings["complete"]) / elapsed, 2),
        "latency_ms": {name: summarize(values) for name, values in timings.items()},
    }


# ------------------------------------------------------------------------------------- wrk (optional)

# Lua for wrk, filled in with string.Template ($method, $bodies). Every script shares _WRK_DONE: wrk
# calls `setup` (main Lua state) once per thread and `done` once at the end; the thread's own
# globals are read back with thread:get, and os.clock() is wrk's CPU time (all its threads).
_WRK_DONE = """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
local function thread_sum(name)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + (thread:get(name) or 0)
  end
  return total
end
function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
               + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    "WRK_JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, \\"status_errors\\": %d, "
    .. "\\"socket_errors\\": %d, \\"p50_us\\": %d, \\"p95_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %d, "
    .. "\\"max_us\\": %d, \\"cpu_us\\": %d, \\"sent\\": %d, \\"answered\\": %d, \\"failed\\": %d, "
    .. "\\"exhausted\\": %d}\\n",
    summary.requests, summary.duration, errors, summary.errors.status, errors - summary.errors.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max,
    os.clock() * 1e6, thread_sum("sent"), thread_sum("answered"), thread_sum("failed"), thread_sum("exhausted")))
end
"""

# GET the URL, or POST `bodies` over and over (for a cached answer, say).
_WRK_CYCLE = """
wrk.method = "$method"
wrk.headers["Content-Type"] = "application/json"
local bodies = $bodies
local next_body = 0
if #bodies > 0 then
  request = function()
    next_body = next_body % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[next_body])
  end
end
"""

# POST each body at most once, in order. wrk calls delay() before every request of the run: it
# clears the connection to send the next body, or, once every body is out, parks it (a delay of an
# hour: it sends nothing more). When the last answer is in, the thread stops and prints
# WRK_EXHAUSTED so that the caller ends wrk at once (its main thread would sleep to the deadline).
# wrk also calls request() once before the run, without delay(), only to check the request's
# syntax: that call gets a GET /health, so that nothing could ever be sent twice.
_WRK_ONCE = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = $bodies
local cleared = 0  -- connections cleared by delay() to send a body, not sent yet
sent = 0           -- bodies sent
answered = 0       -- 200 responses carrying an answer
failed = 0         -- any other response
exhausted = 0      -- 1 once every body was sent
local function stop_when_drained()
  if exhausted == 1 and cleared == 0 and answered + failed == sent then
    wrk.thread:stop()
    io.write("WRK_EXHAUSTED\\n")
    io.flush()
  end
end
delay = function()
  if sent + cleared < #bodies then
    cleared = cleared + 1
    return 0
  end
  exhausted = 1
  stop_when_drained()
  return 3600000
end
request = function()
  if cleared == 0 then
    return wrk.format("GET", "/health")
  end
  cleared = cleared - 1
  sent = sent + 1
  return wrk.format(nil, nil, nil, bodies[sent])
end
response = function(status, headers, body)
  if status == 200 and string.find(body, '"answer"', 1, true) then
    answered = answered + 1
  else
    failed = failed + 1
  end
  stop_when_drained()
end
"""

_EXHAUSTED_MARKER = "WRK_EXHAUSTED"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _lua_list(texts: list[str]) -> str:
    return "{" + ", ".join(_lua_string(text) for text in texts) + "}"


async def _read_wrk_output(process: asyncio.subprocess.Process) -> tuple[str, str]:
    """wrk's stdout and stderr; interrupt wrk (SIGINT: it reports and exits) once its script is exhausted."""
    assert process.stdout is not None and process.stderr is not None
    stdout = process.stdout
    lines: list[str] = []

    async def read_stdout() -> None:
        async for raw in stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if line.startswith(_EXHAUSTED_MARKER):
                with contextlib.suppress(ProcessLookupError):  # it may have just ended at its deadline
                    process.send_signal(signal.SIGINT)

    _, stderr = await asyncio.gather(read_stdout(), process.stderr.read())
    await process.wait()
    return "".join(lines), stderr.decode(errors="replace")


async def _run_wrk_script(url: str, concurrency: int, duration: float, script: str) -> dict[str, Any]:
    """Run wrk (1 thread, `concurrency` connections) with a Lua script; the WRK_JSON figures it printed."""
    executable = wrk_path()
    if executable is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script_file:
        script_file.write(script + _WRK_DONE)
    seconds = max(1, round(duration))
    process = await asyncio.create_subprocess_exec(
        executable,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        script_file.name,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(_read_wrk_output(process), seconds + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.unlink(script_file.name)
    match = re.search(r"^WRK_JSON (\{.*\})$", stdout, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stdout[-500:]} {stderr[-500:]}")
    figures: dict[str, Any] = json.loads(match.group(1))
    return figures


def _wrk_phase(figures: dict[str, Any], concurrency: int, completed: int, errors: int) -> dict[str, Any]:
    """wrk's figures in the shape of `PhaseOutcome.to_json()`, plus "tool": "wrk"."""
    elapsed = figures["duration_us"] / 1e6

    def ms(key: str) -> float:
        return round(figures[key] / 1000.0, 2)

    return {
        "tool": "wrk",
        "wrk_cpu_s": round(figures["cpu_us"] / 1e6, 3),
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "completed": completed,
        "errors": errors,
        "error_kinds": {"wrk socket/status errors": errors} if errors else {},
        "throughput_per_s": round(completed / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": {
            "latency": {
                "p50": ms("p50_us"),
                "p95": ms("p95_us"),
                "p99": ms("p99_us"),
                "mean": ms("mean_us"),
                "max": ms("max_us"),
            }
        },
    }


async def run_wrk(url: str, concurrency: int, duration: float, bodies: list[str] | None = None) -> dict[str, Any]:
    """One wrk run for `duration` seconds: GET, or POST cycling through `bodies`."""
    script = Template(_WRK_CYCLE).substitute(method="POST" if bodies else "GET", bodies=_lua_list(bodies or []))
    figures = await _run_wrk_script(url, concurrency, duration, script)
    return _wrk_phase(figures, concurrency, figures["requests"] - figures["status_errors"], figures["errors"])


async def run_wrk_once(url: str, concurrency: int, duration: float, bodies: list[str]) -> dict[str, Any]:
    """One wrk run POSTing each of `bodies` at most once, in order, for `duration` or until all are answered.

    Adds `bodies` (offered), `bodies_sent` and `exhausted` (every body was sent; the run then ended
    with the last answer) to the phase figures; `completed` counts 200 responses carrying an answer.
    At the deadline, as in every wrk run, answers still in flight are not counted. The elapsed time
    is wrk's own run time.
    """
    if not bodies:
        raise ValueError("run_wrk_once needs at least one body")
    script = Template(_WRK_ONCE).substitute(bodies=_lua_list(bodies))
    figures = await _run_wrk_script(url, concurrency, duration, script)
    errors = figures["socket_errors"] + figures["failed"]
    return {
        **_wrk_phase(figures, concurrency, figures["answered"], errors),
        "bodies": len(bodies),
        "bodies_sent": figures["sent"],
        "exhausted": bool(figures["exhausted"]),
    }


# ------------------------------------------------------------------------------- resources, metrics


class ResourceSampler:
    """Samples the server's RSS every `interval` seconds while a phase runs; CPU time of both sides."""

    def __init__(self, server: ProcessWatch, interval: float = 0.1) -> None:
        self.server = server
        self.client = ProcessWatch(os.getpid(), include_children=False)  # the server is our child
        self.interval = interval
        self.peak_rss = 0
        self.samples: list[tuple[float, int]] = []  # (seconds since the phase began, RSS bytes)
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._server_cpu = 0.0
        self._client_cpu = 0.0

    async def __aenter__(self) -> ResourceSampler:
        self._started = time.perf_counter()
        self._server_cpu = self.server.cpu_seconds()
        self._client_cpu = self.client.cpu_seconds()
        self._machine = machine_cpu_seconds()
        self._task = asyncio.create_task(self._run())
        return self

    def _sample(self) -> None:
        rss = self.server.rss_bytes()
        self.samples.append((time.perf_counter() - self._started, rss))
        self.peak_rss = max(self.peak_rss, rss)

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sample()
        self.elapsed = time.perf_counter() - self._started
        self.server_cpu = self.server.cpu_seconds() - self._server_cpu
        self.client_cpu = self.client.cpu_seconds() - self._client_cpu
        machine = machine_cpu_seconds()
        self.machine_busy = machine[0] - self._machine[0]
        self.steal = machine[1] - self._machine[1]

    def series_mb(self, every: float) -> list[list[float]]:
        """[seconds, RSS MB] at most one sample per `every` seconds, the last sample included."""
        series: list[list[float]] = []
        last = len(self.samples) - 1
        for index, (seconds, rss) in enumerate(self.samples):
            if not series or seconds - series[-1][0] >= every or index == last:
                series.append([round(seconds, 1), round(rss / 2**20, 1)])
        return series

    def to_json(self) -> dict[str, Any]:
        elapsed = max(self.elapsed, 1e-9)
        return {
            "server_rss_peak_mb": round(self.peak_rss / 2**20, 1),
            "server_rss_end_mb": round(self.samples[-1][1] / 2**20, 1),
            "server_cpu_cores": round(self.server_cpu / elapsed, 2),
            "client_cpu_cores": round(self.client_cpu / elapsed, 2),
            # Everything else on the machine (other processes): the benchmark shares the 2 cores with them.
            "other_cpu_cores": round(max(0.0, self.machine_busy - self.server_cpu - self.client_cpu) / elapsed, 2),
            "steal_cores": round(self.steal / elapsed, 2),
        }


def machine_cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine (all processes), and time stolen by the hypervisor."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return busy, getattr(times, "steal", 0.0)


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


async def scrape_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's /metrics as {"name{labels}": value}."""
    response = await client.get("/metrics")
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def _requests_done(values: dict[str, float]) -> float:
    return sum(
        value
        for key, value in values.items()
        if key.startswith(("http_requests_total{", "agent_queries_total{")) and 'route="/metrics"' not in key
    )


async def settled_metrics(client: httpx.AsyncClient, limit_seconds: float = 30.0) -> dict[str, float]:
    """/metrics once the server has finished what it was still working on.

    wrk stops at its deadline with requests in flight; the server still answers them, and they
    belong to this phase, not to the next one.
    """
    deadline = time.monotonic() + limit_seconds
    values = await scrape_metrics(client)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        latest = await scrape_metrics(client)
        if _requests_done(latest) == _requests_done(values):
            return latest
        values = latest
    return values


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server itself reports for a phase: cache look-ups, model calls and batch sizes."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def find(prefix: str) -> float:
        return sum(after[key] - before.get(key, 0.0) for key in after if key.startswith(prefix))

    calls = delta("embedding_batch_size_count")
    texts = delta("embedding_batch_size_sum")
    return {
        "cache_memory_hits": int(delta('embedding_cache_requests_total{layer="memory",result="hit"}')),
        "cache_memory_misses": int(delta('embedding_cache_requests_total{layer="memory",result="miss"}')),
        "cache_disk_hits": int(delta('embedding_cache_requests_total{layer="disk",result="hit"}')),
        "model_calls": int(calls),
        "texts_embedded": int(texts),
        "mean_batch_size": round(texts / calls, 2) if calls else None,
        "model_busy_s": round(find("embedding_seconds_sum"), 3),
        "agent_s": round(delta("agent_processing_seconds_sum"), 3),
        "question_log_rows_written": int(delta("question_log_written_total")),
        "question_log_rows_dropped": int(delta("question_log_dropped_total")),
    }


async def measured(
    server: ProcessWatch,
    client: httpx.AsyncClient,
    body: Callable[[], Awaitable[dict[str, Any]]],
    rss_series_every: float | None = None,
) -> dict[str, Any]:
    """Run `body` with resources sampled and the server's own metrics diffed around it.

    With `rss_series_every`, the resources also hold the server's RSS over the phase
    (`server_rss_series_mb`, one [seconds, MB] pair per that many seconds).
    """
    before = await scrape_metrics(client)
    async with ResourceSampler(server) as sampler:
        result = await body()
    # wrk, a child process, is not watched by the sampler: its CPU time is its own report.
    sampler.client_cpu += result.get("wrk_cpu_s", 0.0)
    after = await settled_metrics(client)
    resources = sampler.to_json()
    if rss_series_every is not None:
        resources["server_rss_series_mb"] = sampler.series_mb(rss_series_every)
    return {**result, "resources": resources, "server_metrics": metric_delta(before, after)}
