"""The sockets phases: many idle WebSockets held open with heartbeats, a burst of questions, a burst of SSE.

1. `--sockets` (10,000) `/ws/ask` connections are opened by `--socket-processes` client processes and
   held open, idle, for `--socket-hold` seconds. Each client answers the server's `heartbeat` with
   `heartbeat_response`, as the original React frontend does (docs/api.md: after 90 s of silence the
   server closes an idle socket); the `websockets` library answers uvicorn's protocol pings (every 20 s)
   by itself. The server's RSS before opening and at the end of the hold gives its memory per idle
   connection.
2. `--socket-asks` (1,000) of the held connections each ask one unique question at once and wait
   for `complete`: errors and latencies, while the other connections stay open.
3. The WebSockets are closed, then `--sse-streams` (1,000) clients each POST /ask-stream at once (one
   connection each, unique questions) and read their stream to the end: errors and latencies.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.loadgen import (
    AnswerTimer,
    QuestionPool,
    StatusError,
    await_bounded,
    describe_error,
    many_streams,
    measured,
    summarize,
    ws_connect,
)
from bench.server import BenchServer, ProcessWatch, raise_fd_limit

HEARTBEAT_RESPONSE = json.dumps({"type": "heartbeat_response"})
OPENING_PER_PROCESS = 64  # handshakes in flight per client process (uvicorn's listen backlog is 2,048)
COMMAND_LIMIT_SECONDS = 600.0  # a client process that has not answered a command by then is given up
MB = 2**20


@dataclass
class HeldSocket:
    """One open `/ws/ask` connection: a reader task answers heartbeats and times the answer asked for."""

    connection: ClientConnection
    heartbeats: int = 0
    timer: AnswerTimer | None = None
    answer: asyncio.Future[dict[str, float]] | None = None
    closed_by: str | None = None  # why the connection ended, when the server or the network ended it
    reader: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def is_open(self) -> bool:
        return self.reader is not None and not self.reader.done()

    async def read(self) -> None:
        """Read every message until the connection closes: heartbeats are answered, answers timed."""
        try:
            async for message in self.connection:
                event = json.loads(message)
                if event.get("type") == "heartbeat":
                    self.heartbeats += 1
                    await self.connection.send(HEARTBEAT_RESPONSE)
                elif self.timer is not None and self.answer is not None and not self.answer.done():
                    try:
                        timings = self.timer.timings(event, "code")
                    except StatusError as error:
                        self.answer.set_exception(error)
                    else:
                        if timings is not None:
                            self.answer.set_result(timings)
            self.closed_by = f"closed {self.connection.close_code} {self.connection.close_reason}".strip()
        except ConnectionClosed as error:
            self.closed_by = describe_error(error)
        finally:
            if self.answer is not None and not self.answer.done():
                self.answer.set_exception(StatusError(f"connection ended before complete: {self.closed_by}"))

    async def ask(self, question: str) -> dict[str, float]:
        """Send one question; its timings once `complete` arrives (the reader resolves them)."""
        self.answer = asyncio.get_running_loop().create_future()
        self.timer = AnswerTimer()
        await self.connection.send(json.dumps({"type": "question", "data": {"question": question}}))
        return await self.answer


class SocketHolder:
    """One client process's share of the connections (runs inside that process)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sockets: list[HeldSocket] = []

    async def open(self, count: int, limit_seconds: float) -> dict[str, Any]:
        """Open `count` connections, `OPENING_PER_PROCESS` handshakes at a time; connect times and errors."""
        gate = asyncio.Semaphore(OPENING_PER_PROCESS)
        connect_times: list[float] = []
        errors: Counter[str] = Counter()

        async def one() -> None:
            async with gate:
                begin = time.perf_counter()
                try:
                    connection = await ws_connect(self.url)
                except Exception as error:
                    errors[describe_error(error)] += 1
                    return
                connect_times.append(time.perf_counter() - begin)
            held = HeldSocket(connection)
            held.reader = asyncio.create_task(held.read())
            self.sockets.append(held)

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await await_bounded(tasks, limit_seconds, errors, "not open within the phase limit")
        return {"opened": len(self.sockets), "errors": dict(errors), "connect_s": connect_times}

    def status(self) -> dict[str, Any]:
        """How many connections are still open, the heartbeats each answered, and why others ended."""
        ended = Counter(held.closed_by or "ended" for held in self.sockets if not held.is_open)
        return {
            "open": sum(held.is_open for held in self.sockets),
            "heartbeats": [held.heartbeats for held in self.sockets],
            "ended": dict(ended),
        }

    async def ask(self, questions: list[str], limit_seconds: float) -> dict[str, Any]:
        """The first len(questions) open connections each ask one question, all at once."""
        asking = [held for held in self.sockets if held.is_open][: len(questions)]
        errors: Counter[str] = Counter()
        if len(asking) < len(questions):
            errors["no open connection left to ask on"] += len(questions) - len(asking)
        timings: dict[str, list[float]] = {"first_word": [], "complete": []}

        async def one(held: HeldSocket, question: str) -> None:
            try:
                sample = await held.ask(question)
            except Exception as error:
                errors[describe_error(error)] += 1
            else:
                for name, value in sample.items():
                    timings[name].append(value)

        tasks = [asyncio.create_task(one(held, question)) for held, question in zip(asking, questions, strict=False)]
        await await_bounded(tasks, limit_seconds, errors, "no answer within the phase limit")
        return {"asked": len(questions), "errors": dict(errors), **timings}

    async def close(self) -> dict[str, Any]:
        """Close every connection (a closing handshake each, `OPENING_PER_PROCESS` at a time)."""
        gate = asyncio.Semaphore(OPENING_PER_PROCESS)
        errors: Counter[str] = Counter()

        async def one(held: HeldSocket) -> None:
            async with gate:
                try:
                    await asyncio.wait_for(held.connection.close(), 10)
                except Exception as error:
                    errors[f"close: {describe_error(error)}"] += 1
            if held.reader is not None:
                await asyncio.gather(held.reader, return_exceptions=True)

        await asyncio.gather(*(one(held) for held in self.sockets))
        return {"closed": len(self.sockets), "errors": dict(errors)}


async def _serve(pipe: Connection, url: str) -> None:
    """Carry out the benchmark's commands (open, status, ask, close) until `close` or the pipe ends."""
    holder = SocketHolder(url)
    loop = asyncio.get_running_loop()
    while True:
        try:
            command, arguments = await loop.run_in_executor(None, pipe.recv)
        except EOFError:  # the benchmark is gone
            await holder.close()
            return
        if command == "open":
            reply = await holder.open(**arguments)
        elif command == "status":
            reply = holder.status()
        elif command == "ask":
            reply = await holder.ask(**arguments)
        else:
            pipe.send(await holder.close())
            return
        pipe.send(reply)


def _client_main(pipe: Connection, url: str) -> None:
    """Entry point of a client process."""
    raise_fd_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(pipe, url))
    else:
        uvloop.run(_serve(pipe, url))


class SocketClients:
    """The client processes holding the connections, driven from the benchmark's event loop."""

    def __init__(self, url: str, processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the benchmark's state
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_client_main, args=(theirs, url), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    async def call(self, command: str, arguments: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Send `command` to every client process at once (its own arguments each); their replies in order."""
        loop = asyncio.get_running_loop()
        for index, pipe in enumerate(self.pipes):
            pipe.send((command, arguments[index] if arguments else {}))

        async def reply(pipe: Connection) -> dict[str, Any]:
            if not await loop.run_in_executor(None, pipe.poll, COMMAND_LIMIT_SECONDS):
                raise TimeoutError(f"a socket client did not answer {command!r}")
            answer: dict[str, Any] = pipe.recv()
            return answer

        return list(await asyncio.gather(*(reply(pipe) for pipe in self.pipes)))

    def memory_mb(self) -> float:
        """RSS of all client processes together."""
        return round(sum(ProcessWatch(process.pid or 0).rss_bytes() for process in self.processes) / MB, 1)

    def stop(self) -> None:
        """End the client processes (after `close` they have ended by themselves)."""
        for pipe in self.pipes:
            pipe.close()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def _shares(count: int, parts: int) -> list[slice]:
    """`count` items cut into `parts` consecutive, nearly equal slices."""
    bounds = [count * part // parts for part in range(parts + 1)]
    return [slice(bounds[part], bounds[part + 1]) for part in range(parts)]


async def _steady_rss(watch: ProcessWatch, seconds: float = 2.0, samples: int = 5) -> float:
    """The server's RSS in MB: the median of a few samples over `seconds`."""
    values = []
    for _ in range(samples):
        values.append(watch.rss_bytes())
        await asyncio.sleep(seconds / samples)
    return round(statistics.median(values) / MB, 1)


def _merge_errors(replies: list[dict[str, Any]]) -> Counter[str]:
    errors: Counter[str] = Counter()
    for reply in replies:
        errors.update(reply["errors"])
    return errors


@dataclass
class SocketSettings:
    """The sizes of the sockets phases (see the module docstring)."""

    sockets: int
    asks: int
    sse_streams: int
    processes: int
    hold_seconds: float
    settle_seconds: float = 2.0  # each RSS reading is the median of 5 samples over this long


async def measure(
    server: BenchServer,
    watch: ProcessWatch,
    control: httpx.AsyncClient,
    pool: QuestionPool,
    settings: SocketSettings,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """The three sockets phases against a running server: `sockets_idle`, `sockets_ask`, `sockets_sse`."""
    processes = max(1, min(settings.processes, settings.sockets))
    fd_limit = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    log(
        f"sockets_idle: {settings.sockets} WebSockets from {processes} client processes, "
        f"held {settings.hold_seconds:g} s (server's file limit {fd_limit})"
    )
    clients = SocketClients(f"{server.ws_url}/ws/ask", processes)
    try:
        idle = await _hold_idle(clients, watch, control, settings)
        idle.update({"client_processes": processes, "client_rss_mb": clients.memory_mb(), "server_fd_limit": fd_limit})
        log(
            f"sockets_idle: {idle['opened']} open, {idle['open_after_hold']} still open after the hold; server RSS "
            f"{idle['server_rss_before_mb']} -> {idle['server_rss_idle_mb']} MB ({idle['kb_per_connection']} KB each)"
        )
        questions = pool.take_many(settings.asks)
        log(f"sockets_ask: {len(questions)} of the open WebSockets ask at once")
        asked = await _ask_at_once(clients, watch, control, questions)
        idle["close_errors"] = sum(_merge_errors(await clients.call("close")).values())
    finally:
        clients.stop()
    idle["server_rss_after_close_mb"] = await _steady_rss(watch, settings.settle_seconds)

    streams = pool.take_many(settings.sse_streams)
    log(f"sockets_sse: {len(streams)} SSE streams at once")

    async def sse() -> dict[str, Any]:
        return {"tool": "httpx", "concurrency": len(streams), **await many_streams(server.base_url, streams, 300.0)}

    return {"sockets_idle": idle, "sockets_ask": asked, "sockets_sse": await measured(watch, control, sse)}


async def _hold_idle(
    clients: SocketClients, watch: ProcessWatch, control: httpx.AsyncClient, settings: SocketSettings
) -> dict[str, Any]:
    """Open the connections, hold them idle, and read the server's RSS before and at the end of the hold."""
    processes = len(clients.processes)
    rss_before = await _steady_rss(watch, settings.settle_seconds)
    limit = max(120.0, settings.sockets / 20)
    figures: dict[str, Any] = {}

    async def open_and_hold() -> dict[str, Any]:
        started = time.perf_counter()
        shares = _shares(settings.sockets, processes)
        opened = await clients.call(
            "open", [{"count": share.stop - share.start, "limit_seconds": limit} for share in shares]
        )
        figures["open_s"] = round(time.perf_counter() - started, 3)
        figures["opened"] = sum(reply["opened"] for reply in opened)
        figures["errors"] = _merge_errors(opened)
        figures["connect"] = summarize([value for reply in opened for value in reply["connect_s"]])
        await asyncio.sleep(settings.hold_seconds)
        figures["rss_idle_mb"] = await _steady_rss(watch, settings.settle_seconds)
        return {"tool": "websockets"}

    held = await measured(watch, control, open_and_hold)
    statuses = await clients.call("status")
    heartbeats = [count for reply in statuses for count in reply["heartbeats"]]
    ended: Counter[str] = Counter()
    for status in statuses:
        ended.update(status["ended"])
    opened, rss_idle = figures["opened"], figures["rss_idle_mb"]
    return {
        **held,
        "connections": settings.sockets,
        "opened": opened,
        "open_errors": sum(figures["errors"].values()),
        "open_error_kinds": dict(figures["errors"].most_common(5)),
        "open_s": figures["open_s"],
        "latency_ms": {"connect": figures["connect"]},
        "hold_s": settings.hold_seconds,
        "open_after_hold": sum(reply["open"] for reply in statuses),
        "ended_during_hold": dict(ended.most_common(5)),
        "heartbeats_answered": {
            "min": min(heartbeats, default=0),
            "median": statistics.median(heartbeats) if heartbeats else 0,
            "max": max(heartbeats, default=0),
        },
        "server_rss_before_mb": rss_before,
        "server_rss_idle_mb": rss_idle,
        "kb_per_connection": round((rss_idle - rss_before) * 1024 / opened, 1) if opened else None,
    }


async def _ask_at_once(
    clients: SocketClients, watch: ProcessWatch, control: httpx.AsyncClient, questions: list[str]
) -> dict[str, Any]:
    """`questions` asked at once on as many of the held connections, each waiting for `complete`."""

    async def ask() -> dict[str, Any]:
        started = time.perf_counter()
        shares = _shares(len(questions), len(clients.processes))
        replies = await clients.call(
            "ask", [{"questions": questions[share], "limit_seconds": 300.0} for share in shares]
        )
        elapsed = time.perf_counter() - started
        errors = _merge_errors(replies)
        completes = [value for reply in replies for value in reply["complete"]]
        return {
            "tool": "websockets",
            "concurrency": len(questions),
            "asked": len(questions),
            "answered": len(completes),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(5)),
            "total_s": round(elapsed, 3),
            "throughput_per_s": round(len(completes) / elapsed, 2),
            "latency_ms": {
                "first_word": summarize([value for reply in replies for value in reply["first_word"]]),
                "complete": summarize(completes),
            },
        }

    phase = await measured(watch, control, ask)
    phase["open_after_asking"] = sum(reply["open"] for reply in await clients.call("status"))
    return phase
