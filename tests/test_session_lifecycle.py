"""Session lifecycle against real servers: deleted stays deleted, sessions only for questions and capped per
client, one question at a time per session, and a frozen Redis that never stores what it reported as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from services.sessions import _ADD_TURN, PAUSE_AFTER_FAILURE_SECONDS, REDIS_OPERATION_TIMEOUT_SECONDS
from tests.conftest import ServerProcess
from tests.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")


@pytest.fixture(scope="module")
def memory_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(MAX_SESSIONS_PER_CLIENT="3", RATE_LIMIT_REQUESTS_PER_MINUTE="10000")


@pytest.fixture(scope="module")
def redis_backed(start_server: Callable[..., ServerProcess], redis_server: RedisServer) -> ServerProcess:
    return start_server(REDIS_URL=redis_server.url, MAX_SESSIONS_PER_CLIENT="3", RATE_LIMIT_REQUESTS_PER_MINUTE="10000")


def both(request: pytest.FixtureRequest) -> ServerProcess:
    server: ServerProcess = request.getfixturevalue(request.param)
    return server


store = pytest.fixture(params=["memory_server", pytest.param("redis_backed", marks=needs_redis)])(both)


def ask(base_url: str, question: str, session_id: str | None = None, **client: Any) -> httpx.Response:
    payload: dict[str, Any] = {"question": question}
    if session_id is not None:
        payload["session_id"] = session_id
    with httpx.Client(base_url=base_url, timeout=30, **client) as http:
        return http.post("/v2/ask", json=payload)


def turns(base_url: str, session_id: str) -> list[str] | None:
    response = httpx.get(f"{base_url}/v2/sessions/{session_id}", timeout=10)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return [turn["question"] for turn in response.json()["turns"]]


def ws_answer(ws: Any, question: str) -> list[dict[str, Any]]:
    ws.send(json.dumps({"type": "question", "question": question}))
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("complete", "error"):
        message = json.loads(ws.recv(timeout=30))
        if message["type"] != "heartbeat":
            events.append(message)
    return events


def test_a_session_deleted_under_a_websocket_stays_deleted(store: ServerProcess) -> None:
    with connect(f"{store.ws_url}/ws/ask", open_timeout=10) as ws:
        announced = json.loads(ws.recv(timeout=10))["details"]["session_id"]
        assert turns(store.base_url, announced) is None  # announced at connect, created only by a question
        events = ws_answer(ws, "What is Aave?")
        assert events[0]["session_id"] == announced
        assert turns(store.base_url, announced) == ["What is Aave?"]
        assert httpx.delete(f"{store.base_url}/v2/sessions/{announced}", timeout=10).status_code == 204
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "pong"
        assert turns(store.base_url, announced) is None  # the ping did not bring it back
        events = ws_answer(ws, "what are its risks?")
        new_id = events[0]["session_id"]
        assert new_id != announced and turns(store.base_url, new_id) == ["what are its risks?"]
        assert turns(store.base_url, announced) is None


def test_a_delete_racing_questions_never_resurrects_the_session(store: ServerProcess) -> None:
    async def trial() -> None:
        async with httpx.AsyncClient(base_url=store.base_url, timeout=30) as http:
            session_id = (await http.post("/v2/ask", json={"question": "What is Aave?"})).json()["session_id"]
            questions = [
                http.post("/v2/ask", json={"question": f"What is MEV {n}?", "session_id": session_id}) for n in range(6)
            ]
            await asyncio.gather(*questions, http.delete(f"/v2/sessions/{session_id}"))
            assert (await http.get(f"/v2/sessions/{session_id}")).status_code == 404

    for _ in range(8):
        asyncio.run(trial())


def test_connecting_creates_no_session_and_each_client_has_its_own_cap(store: ServerProcess) -> None:
    victim = ask(store.base_url, "What is Aave?").json()["session_id"]
    for _ in range(30):  # connect and leave: nothing is stored
        with connect(f"{store.ws_url}/ws/ask", open_timeout=10) as ws:
            announced = json.loads(ws.recv(timeout=10))["details"]["session_id"]
        assert turns(store.base_url, announced) is None
    # Another client (127.0.0.2) starts ten sessions with a cap of three: only its own oldest ones go.
    flooder = {"transport": httpx.HTTPTransport(local_address="127.0.0.2")}
    started = [ask(store.base_url, "What is a flash loan?", **flooder).json()["session_id"] for _ in range(10)]
    assert [turns(store.base_url, session_id) is not None for session_id in started] == [False] * 7 + [True] * 3
    assert turns(store.base_url, victim) == ["What is Aave?"]
    follow_up = ask(store.base_url, "what are its risks?", victim).json()
    assert follow_up["session_id"] == victim and follow_up["sources"][0]["id"] == "aave-risks"


def test_a_question_waits_for_the_stream_running_on_its_session(slow_stream_server: ServerProcess) -> None:
    server = slow_stream_server  # an answer streams for seconds; a question waits up to 15 s for its session
    opener = ask(server.base_url, "What is a flash loan?").json()
    session_id = opener["session_id"]

    async def race() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            payload = {"question": "What is Aave?", "session_id": session_id}
            async with http.stream("POST", "/v2/ask-stream", json=payload) as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)
                while not first.startswith("data:"):  # the metadata event: the graph runs and holds the session
                    first = await anext(lines)
                follow_up = asyncio.ensure_future(
                    http.post("/v2/ask", json={"question": "what are its risks?", "session_id": session_id})
                )
                rest = [line async for line in lines]
            return [first, *rest], await follow_up

    lines, follow_up = asyncio.run(race())
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert events[-1]["type"] == "complete"
    assert follow_up.status_code == 200 and follow_up.json()["sources"][0]["id"] == "aave-risks"
    assert turns(server.base_url, session_id) == ["What is a flash loan?", "What is Aave?", "what are its risks?"]


def test_a_question_that_waits_too_long_is_refused_with_409(busy_session_server: ServerProcess) -> None:
    server = busy_session_server  # an answer streams for seconds; a question waits 0.2 s for its session
    session_id = ask(server.base_url, "What is a flash loan?").json()["session_id"]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        payload = {"question": "What is Aave?", "session_id": session_id}
        with http.stream("POST", "/v2/ask-stream", json=payload) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data:"):  # the metadata event: the graph runs and holds the session
                pass
            busy = http.post("/v2/ask", json={"question": "what are its risks?", "session_id": session_id})
            assert busy.status_code == 409, busy.text
            body = busy.json()
            assert body["type"] == "conflict" and "session_busy" in json.dumps(body)
            assert busy.headers["retry-after"] == "1" and "x-ratelimit-limit" in busy.headers
            assert busy.headers["x-request-id"]
            list(lines)
    assert turns(server.base_url, session_id) == ["What is a flash loan?", "What is Aave?"]


@needs_redis
def test_a_frozen_redis_answers_fast_and_stores_nothing_it_reported_as_failed(
    redis_backed: ServerProcess, redis_server: RedisServer
) -> None:
    # The module's Redis-backed server (the tests above are done with it) and its Redis, frozen for 8 s.
    redis, server = redis_server, redis_backed
    try:
        session_id = ask(server.base_url, "What is Aave?").json()["session_id"]

        async def load(seconds: float) -> list[tuple[str, int, float]]:
            outcomes: list[tuple[str, int, float]] = []
            deadline = time.monotonic() + seconds

            async def worker(number: int) -> None:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                    count = 0
                    while time.monotonic() < deadline:
                        question = f"What is a flash loan, variant {number}-{count}?"
                        count += 1
                        started = time.monotonic()
                        response = await http.post("/v2/ask", json={"question": question, "session_id": session_id})
                        outcomes.append((question, response.status_code, time.monotonic() - started))

            await asyncio.gather(*(worker(number) for number in range(16)))
            return outcomes

        async def freeze_during_load() -> list[tuple[str, int, float]]:
            running = asyncio.ensure_future(load(10.0))
            await asyncio.sleep(0.5)
            redis.freeze()
            await asyncio.sleep(8.0)
            redis.thaw()
            return await running

        outcomes = asyncio.run(freeze_during_load())
        failed = {question for question, status, _ in outcomes if status == 503}
        assert failed, "the freeze did not reach any request"
        assert {status for _, status, _ in outcomes} <= {200, 503}
        # Bounded: no request waited out the 8 s freeze (each Redis call gives up after about a second).
        assert max(seconds for _, _, seconds in outcomes) < 6.0
        time.sleep(1.5)  # let the thawed server run whatever it had queued
        stored = set(turns(server.base_url, session_id) or [])
        assert not failed & stored, f"turns stored although the client got 503: {sorted(failed & stored)[:3]}"
    finally:
        redis.thaw()  # never left frozen for the next test (a no-op when it was thawed above)


class SlowWriteProxy:
    """A TCP proxy in front of Redis. While `slow` is set, each call of one Lua script (found by its SHA1 in
    the bytes going to Redis) reaches Redis `hold` seconds late, and the reply to it comes back `reply_delay`
    seconds late: a write that Redis applies late in its caller's wait, whose reply arrives after the caller
    has given up. Everything else passes through untouched."""

    def __init__(self, upstream_port: int, script: str, hold: float, reply_delay: float) -> None:
        self._upstream_port = upstream_port
        self._sha = hashlib.sha1(script.encode()).hexdigest().encode()
        self._hold = hold
        self._reply_delay = reply_delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = [self._listener]
        self.port: int = self._listener.getsockname()[1]
        self.slow = threading.Event()
        self.held = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            self._sockets += [client, upstream]
            reply_late = threading.Event()  # this connection's next reply answers a held call
            threading.Thread(target=self._pump, args=(client, upstream, reply_late, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, reply_late, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, reply_late: threading.Event, to_redis: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if to_redis and self.slow.is_set() and self._sha in data:
                    self.held += 1
                    time.sleep(self._hold)
                    reply_late.set()
                elif not to_redis and reply_late.is_set():
                    reply_late.clear()
                    time.sleep(self._reply_delay)
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@needs_redis
def test_a_turn_applied_just_before_its_caller_gives_up_is_refused_not_stored(
    start_server: Callable[..., ServerProcess], redis_server: RedisServer
) -> None:
    """Item 12 at its edge: a turn that reaches Redis 0.85 s into the caller's 1 s wait, its reply 0.4 s behind.
    It was stored (the write's deadline was the moment the caller gave up) and reported as a 503; now the write's
    deadline leaves its reply time to come back, so Redis refuses it and the 503 is true."""
    hold = REDIS_OPERATION_TIMEOUT_SECONDS * 0.85  # past the write's deadline, before the caller gives up
    proxy = SlowWriteProxy(redis_server.port, _ADD_TURN, hold=hold, reply_delay=0.4)
    try:
        server = start_server(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", RATE_LIMIT_REQUESTS_PER_MINUTE="10000")
        session_id = ask(server.base_url, "What is Aave?").json()["session_id"]  # the script is now loaded in Redis
        proxy.slow.set()
        for attempt in range(2):
            if attempt:
                time.sleep(PAUSE_AFTER_FAILURE_SECONDS + 0.2)  # the store answers at once for a moment after a failure
            refused = ask(server.base_url, f"what are its risks ({attempt})?", session_id)
            assert refused.status_code == 503, refused.text
            assert refused.json()["reason"] == "session_store_unavailable"
        assert proxy.held == 2  # both turns went to Redis, late
        with redis_server.client() as redis:
            stored = [json.loads(raw)["question"] for raw in redis.lrange(f"defi:session:{session_id}:turns", 0, -1)]
        assert stored == ["What is Aave?"], f"turns stored although the client got 503: {stored}"
    finally:
        proxy.close()
