"""The chat WebSocket (/ws/ask) end to end, with the `websockets` client against real servers.

The protocol: a `status` message on connect, then `metadata`, `word`... and `complete` per question (each
message stamped with `timestamp`), `pong` for `ping`, `error` for bad input without dropping the connection,
`cancel` mid-answer, questions queued in order, heartbeats, and close code 1008 for clients that break limits.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServerProcess

Event = dict[str, Any]

STATUS_KEYS = {"type", "status", "details", "timestamp"}
METADATA_KEYS = {"type", "session_id", "total_words", "confidence", "sources", "timestamp"}
WORD_KEYS = {"type", "content", "index", "confidence", "timestamp"}
CANCELLED_KEYS = {"type", "final_confidence", "processing_stage", "total_words", "timestamp"}
COMPLETE_KEYS = CANCELLED_KEYS | {"answer_id", "kb_version"}  # a cancelled answer has no id to rate
ERROR_KEYS = {"type", "message", "error", "code", "reason", "timestamp"}
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
POLICY_VIOLATION = 1008
OFF_TOPIC = "best lasagna recipe?"
RECV_TIMEOUT = 10.0
POLL_SECONDS = 10.0


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(slow_stream_server: ServerProcess) -> ServerProcess:
    """30 ms between words (the session's, tests/conftest.py), so an answer lasts seconds (cancel, hang-ups)."""
    return slow_stream_server


@pytest.fixture(scope="module")
def limits_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """Small frames, 20 messages a minute, a heartbeat every 0.3 s and an idle limit of 3 heartbeats."""
    return start_server(
        WS_MAX_MESSAGE_BYTES="2048",
        WS_MAX_MESSAGES_PER_MINUTE="20",
        WS_HEARTBEAT_INTERVAL_SECONDS="0.3",
        WS_IDLE_TIMEOUT_INTERVALS="3",
    )


# --- helpers -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def chat(server: ServerProcess) -> AsyncIterator[tuple[ClientConnection, Event]]:
    """A connection to /ws/ask and its `status` message."""
    async with connect(f"{server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        status = await recv(ws)
        assert status["type"] == "status", status
        yield ws, status


async def recv(ws: ClientConnection, timeout: float = RECV_TIMEOUT, skip_heartbeats: bool = True) -> Event:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert isinstance(message, dict), message
        if not (skip_heartbeats and message["type"] == "heartbeat"):
            return message


async def send(ws: ClientConnection, message: Event) -> None:
    await ws.send(json.dumps(message))


async def read_answer(ws: ClientConnection, timeout: float = 15.0) -> list[Event]:
    """Messages up to and including the next `complete` or `error`."""
    events: list[Event] = []

    async def read() -> None:
        while not events or events[-1]["type"] not in {"complete", "error"}:
            events.append(await recv(ws))

    await asyncio.wait_for(read(), timeout)
    return events


async def ask(ws: ClientConnection, question: str) -> list[Event]:
    await send(ws, {"type": "question", "question": question})
    return await read_answer(ws)


def check_answer(events: list[Event]) -> tuple[Event, str, Event]:
    """Assert the exact sequence metadata, word..., complete; return (metadata, rebuilt text, complete)."""
    assert len(events) >= 3, events
    metadata, words, complete = events[0], events[1:-1], events[-1]
    assert metadata["type"] == "metadata" and set(metadata) == METADATA_KEYS, metadata
    assert all(word["type"] == "word" and set(word) == WORD_KEYS for word in words), words
    assert complete["type"] == "complete" and set(complete) == COMPLETE_KEYS, complete
    assert [word["index"] for word in words] == list(range(len(words)))
    assert metadata["total_words"] == complete["total_words"] == len(words)
    assert complete["final_confidence"] == metadata["confidence"]
    stamps = [event["timestamp"] for event in events]
    assert all(isinstance(stamp, float) for stamp in stamps)
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - time.time()) < 60
    return metadata, " ".join(word["content"] for word in words), complete


async def http_answer(server: ServerProcess, question: str) -> Event:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as http:
        response = await http.post("/ask", json={"question": question})
    assert response.status_code == 200, response.text
    body: Event = response.json()
    return body


async def metric(http: httpx.AsyncClient, sample: str) -> float:
    """The value of one sample line of /metrics (`name{labels}`), 0.0 while a labelled child has none."""
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


async def wait_for_metric(http: httpx.AsyncClient, sample: str, expected: float) -> float:
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        value = await metric(http, sample)
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def log_events(server: ServerProcess, event: str) -> list[Event]:
    found = []
    for line in server.log().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None, list[Event]]:
    """Read until the server closes; return its close code and reason and what came before."""
    received: list[Event] = []

    async def drain() -> None:
        try:
            while True:
                received.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            return

    await asyncio.wait_for(drain(), timeout)
    await asyncio.wait_for(ws.wait_closed(), timeout)
    frame = ws.protocol.close_rcvd
    return (frame.code, frame.reason, received) if frame is not None else (None, None, received)


# --- connect, questions, ping --------------------------------------------------------------------------------


async def test_status_message_on_connect(server: ServerProcess) -> None:
    async with chat(server) as (_, status):
        assert set(status) == STATUS_KEYS
        assert status["status"] == "connected"
        details = status["details"]
        assert set(details) == {"session_id", "capabilities", "protocol_version"}
        assert details["capabilities"] == ["streaming", "cancellation"]
        assert details["protocol_version"] == "1.0"
        assert SESSION_ID.match(details["session_id"])
        assert isinstance(status["timestamp"], float)
    async with chat(server) as (_, other):
        assert other["details"]["session_id"] != details["session_id"]


@pytest.mark.parametrize("form", ["flat", "data"])
async def test_question_forms(server: ServerProcess, form: str) -> None:
    question = "What is a health factor?"
    message = (
        {"type": "question", "question": question}
        if form == "flat"
        else {"type": "question", "data": {"question": question}}
    )
    expected = await http_answer(server, question)
    async with chat(server) as (ws, status):
        await send(ws, message)
        events = await read_answer(ws)
    # The original frontend's form (`data`) also gets reference lines before `complete`, for its panel.
    references = [event for event in events if event.get("reference")]
    metadata, text, complete = check_answer([event for event in events if not event.get("reference")])
    cited = [source["question"] for source in expected["sources"] if source["score"] >= 0.4][:3]
    if form == "data":
        assert events[-1 - len(references) : -1] == references and cited
        assert [event["content"] for event in references] == [f"\n\n📚 **Reference**: {item}" for item in cited]
        words = len(events) - 2 - len(references)  # all but metadata, complete and the reference lines
        assert [event["index"] for event in references] == list(range(words, words + len(references)))
        assert all(set(event) == WORD_KEYS | {"reference"} for event in references)
    else:
        assert references == []
    assert text == expected["answer"]
    assert "health factor" in text.lower()
    assert metadata["session_id"] == status["details"]["session_id"]
    assert metadata["sources"] == expected["sources"]
    assert metadata["sources"][0]["id"] == "health-factor"
    assert complete["processing_stage"] == "response_complete"


async def test_no_match_streams_the_same_way(server: ServerProcess) -> None:
    expected = await http_answer(server, OFF_TOPIC)
    async with chat(server) as (ws, _):
        metadata, text, complete = check_answer(await ask(ws, OFF_TOPIC))
    assert complete["processing_stage"] == expected["processing_stage"] == "no_match"
    assert text == expected["answer"]
    assert metadata["sources"] == []


async def test_ping_pong(server: ServerProcess) -> None:
    async with chat(server) as (ws, _):
        for _ in range(2):
            await send(ws, {"type": "ping"})
            pong = await recv(ws)
            assert set(pong) == {"type", "timestamp"} and pong["type"] == "pong"


async def test_heartbeat_response_is_silently_accepted(server: ServerProcess) -> None:
    async with chat(server) as (ws, _):
        await send(ws, {"type": "heartbeat_response"})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_follow_up_context_on_same_connection(server: ServerProcess) -> None:
    async with chat(server) as (ws, status):
        session_id = status["details"]["session_id"]
        first, _, _ = check_answer(await ask(ws, "What is Aave?"))
        assert first["sources"][0]["id"] == "what-is-aave"
        follow_up, text, _ = check_answer(await ask(ws, "what are its risks?"))
        assert follow_up["sources"][0]["id"] == "aave-risks"
        assert first["session_id"] == follow_up["session_id"] == session_id
        assert "Aave" in text
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as http:
        turns = (await http.get(f"/v2/sessions/{session_id}")).json()["turns"]
    assert [turn["question"] for turn in turns] == ["What is Aave?", "what are its risks?"]
    assert turns[1]["answer"] == text


async def test_follow_up_needs_the_same_connection(server: ServerProcess) -> None:
    async with chat(server) as (ws, _):
        check_answer(await ask(ws, "What is Aave?"))
    async with chat(server) as (ws, _):
        metadata, _, _ = check_answer(await ask(ws, "what are its risks?"))
    assert not metadata["sources"] or metadata["sources"][0]["id"] != "aave-risks"


# --- bad input: an error message, and the connection goes on -------------------------------------------------

BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "invalid_json"),
    ("", "invalid_json"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"question": "What is Aave?"}', "unknown_type"),
    ("[1, 2]", "unknown_type"),
    ('"ping"', "unknown_type"),
    ('{"type": "question"}', "question_not_string"),
    ('{"type": "question", "data": {}}', "question_not_string"),
    ('{"type": "question", "question": 42}', "question_not_string"),
    ('{"type": "question", "question": "   "}', "question_empty"),
    (json.dumps({"type": "question", "question": "x" * 1001}), "question_too_long"),
    (json.dumps({"type": "question", "question": "a\x00b"}), "question_invalid_characters"),
    (b"\x00\x01binary", "binary_not_supported"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES, ids=[code for _, code in BAD_FRAMES])
async def test_bad_message_gets_error_and_connection_survives(
    server: ServerProcess, frame: str | bytes, code: str
) -> None:
    async with chat(server) as (ws, _):
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error" and set(error) == ERROR_KEYS, error
        assert error["reason"] == code
        statuses = {"binary_not_supported": 415, "invalid_json": 400, "unknown_type": 400}
        assert error["code"] == statuses.get(code, 422)
        assert error["message"] == error["error"] and error["message"]
        if code == "question_too_long":
            assert "limit is 1000" in error["message"]
        _, _, complete = check_answer(await ask(ws, "What is Aave?"))
        assert complete["processing_stage"] == "response_complete"


@pytest.mark.parametrize("kind", [["question"], {"a": 1}])
async def test_unhashable_type_gets_error(limits_server: ServerProcess, kind: object) -> None:
    async with chat(limits_server) as (ws, _):
        await send(ws, {"type": kind})
        error = await recv(ws, timeout=3)
        assert error["type"] == "error" and error["reason"] == "unknown_type" and error["code"] == 400
        await send(ws, {"type": "ping"})
        assert (await recv(ws, timeout=3))["type"] == "pong"


# --- queue and cancel ----------------------------------------------------------------------------------------


async def test_queued_questions_are_answered_in_order(server: ServerProcess) -> None:
    questions = [
        ("What is Aave?", "what-is-aave"),
        ("What is a health factor?", "health-factor"),
        ("What is a flash loan?", "what-are-flash-loans"),
    ]
    expected = [await http_answer(server, question) for question, _ in questions]
    async with chat(server) as (ws, _):
        for question, _ in questions:  # all three before reading anything
            await send(ws, {"type": "question", "question": question})
        answers = [await read_answer(ws) for _ in questions]
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"  # nothing else was pending
    for (_, top_id), events, reference in zip(questions, answers, expected, strict=True):
        metadata, text, complete = check_answer(events)
        assert metadata["sources"][0]["id"] == top_id
        assert text == reference["answer"]
        assert complete["processing_stage"] == "response_complete"


async def test_cancel_mid_stream(slow_server: ServerProcess) -> None:
    cancelled = 'streams_cancelled_total{transport="websocket"}'
    async with httpx.AsyncClient(base_url=slow_server.base_url, timeout=30.0) as http:
        before = await metric(http, cancelled)
        logged_before = len(log_events(slow_server, "stream_cancelled"))
        async with chat(slow_server) as (ws, _):
            await send(ws, {"type": "question", "question": "What is Aave?"})
            metadata = await recv(ws)
            assert metadata["type"] == "metadata" and metadata["total_words"] > 20
            words = [await recv(ws) for _ in range(3)]
            assert [word["index"] for word in words] == [0, 1, 2]
            await send(ws, {"type": "cancel"})
            rest = await read_answer(ws, timeout=5)
            words += rest[:-1]
            complete = rest[-1]
            assert all(word["type"] == "word" for word in words)
            assert [word["index"] for word in words] == list(range(len(words)))
            assert set(complete) == CANCELLED_KEYS
            assert complete["processing_stage"] == "cancelled"
            assert complete["total_words"] == len(words) < metadata["total_words"]
            assert complete["final_confidence"] == metadata["confidence"]

            # The connection answers the next question in full, and a cancel with nothing to stop is ignored.
            _, text, complete = check_answer(await ask(ws, OFF_TOPIC))
            assert complete["processing_stage"] == "no_match"
            assert text.startswith("I don't have a reliable answer")
            await send(ws, {"type": "cancel"})
            await send(ws, {"type": "ping"})
            assert (await recv(ws))["type"] == "pong"
        assert await wait_for_metric(http, cancelled, before + 1) == before + 1
    records = log_events(slow_server, "stream_cancelled")[logged_before:]
    assert [(record["transport"], record["reason"]) for record in records] == [("websocket", "client_cancelled")]


# --- limits: close 1008 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", ["x" * 4096, b"x" * 4096], ids=["text", "binary"])
async def test_oversized_frame_closes_1008(limits_server: ServerProcess, frame: str | bytes) -> None:
    async with chat(limits_server) as (ws, _):
        await ws.send(frame)
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (POLICY_VIOLATION, "message too large")
    assert [event["type"] for event in received if event["type"] != "heartbeat"] == []


async def test_frame_at_the_limit_is_accepted(limits_server: ServerProcess) -> None:
    async with chat(limits_server) as (ws, _):
        message = json.dumps({"type": "ping", "padding": ""})
        await ws.send(message[:-2] + "p" * (2048 - len(message)) + '"}')
        assert (await recv(ws))["type"] == "pong"


async def test_message_flood_closes_1008(limits_server: ServerProcess) -> None:
    async with chat(limits_server) as (ws, _):
        try:
            for _ in range(30):
                await send(ws, {"type": "ping"})
        except ConnectionClosed:
            pass  # the server may close before the last pings are out
        code, reason, received = await closed_with(ws)
    assert (code, reason) == (POLICY_VIOLATION, "too many messages")
    assert [event["type"] for event in received if event["type"] != "heartbeat"] == ["pong"] * 20


# --- heartbeat and idle close --------------------------------------------------------------------------------


async def test_heartbeat_then_idle_close(limits_server: ServerProcess) -> None:
    started = time.monotonic()
    async with chat(limits_server) as (ws, _):
        heartbeat = await recv(ws, timeout=2, skip_heartbeats=False)
        assert set(heartbeat) == {"type", "timestamp"} and heartbeat["type"] == "heartbeat"
        assert isinstance(heartbeat["timestamp"], float)
        code, reason, received = await closed_with(ws, timeout=5)  # never answer
    elapsed = time.monotonic() - started
    assert (code, reason) == (1000, "idle timeout")
    assert {event["type"] for event in received} <= {"heartbeat"}
    assert elapsed >= 0.9, elapsed  # not before the idle limit (closed_with bounds the wait)
    assert log_events(limits_server, "websocket_idle_closed")


async def test_heartbeat_responses_keep_the_connection_open(limits_server: ServerProcess) -> None:
    async with chat(limits_server) as (ws, _):
        deadline = time.monotonic() + 1.5  # well past the 0.9 s idle limit
        beats = 0
        while time.monotonic() < deadline:
            message = await recv(ws, timeout=2, skip_heartbeats=False)
            assert message["type"] == "heartbeat"
            beats += 1
            await send(ws, {"type": "heartbeat_response"})
        assert beats >= 3
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


# --- clients that vanish mid-answer --------------------------------------------------------------------------


async def test_disconnect_mid_answer(slow_server: ServerProcess) -> None:
    cancelled = 'streams_cancelled_total{transport="websocket"}'
    async with httpx.AsyncClient(base_url=slow_server.base_url, timeout=30.0) as http:
        before = await metric(http, cancelled)
        assert await wait_for_metric(http, "websocket_connections", 0.0) == 0.0  # earlier tests' are gone
        async with AsyncExitStack() as stack:
            sockets = [(await stack.enter_async_context(chat(slow_server)))[0] for _ in range(5)]
            for ws in sockets:
                await send(ws, {"type": "question", "question": "What is Aave?"})
            for ws in sockets:
                assert (await recv(ws))["type"] == "metadata"
                assert (await recv(ws))["type"] == "word"
            assert await metric(http, "websocket_connections") == 5.0
            for ws in sockets:  # hang up without a closing handshake
                ws.transport.abort()
            for ws in sockets:
                await asyncio.wait_for(ws.wait_closed(), 5)

        assert await wait_for_metric(http, "websocket_connections", 0.0) == 0.0
        assert await wait_for_metric(http, cancelled, before + 5) == before + 5

    async with chat(slow_server) as (ws, _):  # still serving
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"
    assert "Traceback" not in slow_server.log()
