"""WebSocket fuzz against a real server: random, malformed, oversized and flooding clients, all at once.

While the fuzzing connections run, a well-behaved client keeps asking real questions over its own
connection, and every one of them must get a complete answer. Connections that only send junk stay open
and keep answering `ping`; connections that break a limit are closed with the documented code (1008 for
WS_MAX_MESSAGE_BYTES and WS_MAX_MESSAGES_PER_MINUTE, 1009 from the protocol layer past 1 MiB, 1007 for
text that is not UTF-8). Afterwards the open-connection gauge is back to 0 and the log has no traceback.
Everything is seeded and bounded (about 20 s of fuzzing).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServerProcess

SEED = 60_613
MAX_MESSAGE_BYTES = 4096
MAX_MESSAGES_PER_MINUTE = 400
FRAMES_PER_FUZZER = 300  # below MAX_MESSAGES_PER_MINUTE: these connections must stay open
FUZZERS_PER_KIND = 3
FLOOD_FRAMES = MAX_MESSAGES_PER_MINUTE + 100
FUZZ_SECONDS_LIMIT = 25.0
# The well-behaved asker paces itself so that even with instant (cached) answers it stays far under
# MAX_MESSAGES_PER_MINUTE: at most 60 / ASKER_PAUSE_SECONDS = 240 questions a minute.
ASKER_PAUSE_SECONDS = 0.25
POLICY_VIOLATION, MESSAGE_TOO_BIG, INVALID_DATA = 1008, 1009, 1007
ONE_MIB = 1024 * 1024
SERVER_TYPES = {"status", "metadata", "word", "complete", "error", "pong", "heartbeat"}
QUESTIONS = [
    "What is impermanent loss?",
    "What is Aave?",
    "How does a health factor work on Aave?",
    "What is a flash loan?",
    "What is the difference between APR and APY?",
    "What is a liquidity pool?",
    "best lasagna recipe?",
]

Event = dict[str, Any]


@pytest.fixture(scope="module")
def fuzz_server(start_server: Callable[..., ServerProcess], server: ServerProcess) -> ServerProcess:
    """Small frame limit, a message budget the fuzzers stay under and the flooder does not."""
    return start_server(
        WS_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        WS_MAX_MESSAGES_PER_MINUTE=str(MAX_MESSAGES_PER_MINUTE),
        WS_MAX_QUEUED_QUESTIONS="5",
    )


# --- generators (seeded) -------------------------------------------------------------------------------------

_ALPHABETS = [
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # control characters, NUL included
    (0xA0, 0x24F),  # Latin
    (0x400, 0x4FF),  # Cyrillic
    (0x4E00, 0x4FFF),  # CJK
    (0x1F300, 0x1F64F),  # emoji
    (0xE000, 0xF8FF),  # private use
    (0xFFF0, 0xFFFF),  # specials, non-characters
]


def random_text(rng: random.Random, max_chars: int = 300) -> str:
    """Random Unicode (never lone surrogates, which cannot be sent as UTF-8), sometimes JSON-looking."""
    chars = []
    for _ in range(rng.randint(0, max_chars)):
        low, high = rng.choice(_ALPHABETS)
        chars.append(chr(rng.randint(low, high)))
    text = "".join(chars)
    if rng.random() < 0.3:
        text = rng.choice(['{"type": "', "[", '{"', "{", '"', "\\u"]) + text
    return text


def malformed_json(rng: random.Random) -> str:
    """Text that is not a JSON document."""
    valid = json.dumps({"type": "question", "data": {"question": rng.choice(QUESTIONS)}})
    choices = [
        lambda: valid[: rng.randint(1, len(valid) - 1)],  # truncated
        lambda: valid + rng.choice(["}", "]", ",", "x", " {}"]),  # trailing garbage
        lambda: valid.replace('"', "'"),  # single quotes
        lambda: valid.replace(":", "", 1),
        lambda: '{"type": "question",}',
        lambda: "{type: question}",
        lambda: '{"type": "ping"' + " " * rng.randint(0, 50),
        lambda: "",
        lambda: " \t\n ",
        lambda: '{"a": "\\x00"}',
        lambda: '{"a": "\\ud800"',
        lambda: "[" * rng.randint(1, 40),
        lambda: '{"type": "ping"}\x00',
        lambda: "\ufeff" + valid,  # byte-order mark
        lambda: "nul",
        lambda: "01",
    ]
    return rng.choice(choices)()


def nested(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([None, 1, "x", True, 1.5])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"type": "question", "data": value}
    return value


def wrong_shape(rng: random.Random) -> str:
    """Valid JSON of the wrong shape: arrays, scalars, wrong types, unicode, NUL, nesting (moderate depth)."""
    question = rng.choice(QUESTIONS)
    choices: list[Any] = [
        [],
        [1, 2, 3],
        [{"type": "question", "question": question}],
        42,
        -1e308,
        1e999,  # json.dumps writes Infinity
        "question",
        None,
        True,
        {},
        {"type": None},
        {"type": 42},
        {"type": ["question"]},
        {"type": {"type": "question"}},
        {"type": "QUESTION", "question": question},
        {"type": "question\u0000", "question": question},
        {"type": "question"},
        {"type": "question", "data": []},
        {"type": "question", "data": "question"},
        {"type": "question", "data": {"question": 42}},
        {"type": "question", "data": {"question": None}},
        {"type": "question", "data": {"question": [question]}},
        {"type": "question", "data": {"question": {"question": question}}},
        {"type": "question", "question": ""},
        {"type": "question", "question": "   \n\t"},
        {"type": "question", "question": "what\u0000is aave"},
        {"type": "question", "question": "x" * 1500},
        {"type": "question", "question": "¿Qué es Aave? 🚀 " + "\u202e\u200b"},
        {"type": "question", "question": "\U0001f4b8" * 50},
        {"type": "question", "session_id": "../../etc/passwd", "question": 1},
        {"type": "cancel"},
        {"type": "cancel", "id": [1]},
        {"type": "ping", "extra": {"deep": [1, 2, {"x": None}]}},
        {"type": "heartbeat_response"},
        {"type": "status", "status": "connected"},
        {"type": "complete"},
        {"__proto__": {"type": "question"}, "constructor": 1},
        {"x" * 1000: "y"},
        nested(rng, rng.randint(2, 60)),
    ]
    return json.dumps(rng.choice(choices))


def duplicate_keys() -> str:
    return '{"type": "ping", "type": "nonsense"}'


# --- clients -------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    frames_sent: int = 0
    received: dict[str, int] = field(default_factory=dict)
    bad_messages: list[str] = field(default_factory=list)

    def count(self, kind: str) -> None:
        self.received[kind] = self.received.get(kind, 0) + 1


class Reader:
    """Drains one connection in the background: every server message is checked and counted."""

    def __init__(self, ws: ClientConnection, tally: Tally) -> None:
        self.pongs: asyncio.Queue[None] = asyncio.Queue()
        self.received: dict[str, int] = {}
        self.last_message_at = time.monotonic()
        self.task = asyncio.create_task(read_all(ws, tally, self))

    async def quiet(self, seconds: float = 1.0, limit: float = 20.0) -> None:
        """Wait until nothing has arrived for `seconds` (queued answers finished), at most `limit`."""
        deadline = time.monotonic() + limit
        while time.monotonic() - self.last_message_at < seconds and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


async def read_all(ws: ClientConnection, tally: Tally, reader: Reader) -> None:
    """Drain every server message until the connection closes, checking that each is well formed."""
    try:
        async for raw in ws:
            reader.last_message_at = time.monotonic()
            try:
                message = json.loads(raw)
            except (TypeError, ValueError):
                tally.bad_messages.append(repr(raw)[:200])
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind not in SERVER_TYPES or not isinstance(message.get("timestamp"), float):
                tally.bad_messages.append(repr(raw)[:200])
                continue
            tally.count(kind)
            reader.received[kind] = reader.received.get(kind, 0) + 1
            if kind == "pong":
                reader.pongs.put_nowait(None)
    except ConnectionClosed:
        return


async def fuzz_connection(
    server: ServerProcess, make_frame: Callable[[], str | bytes], tally: Tally, frames: int
) -> dict[str, Any]:
    """Send `frames` junk frames, then prove the connection still answers `ping`."""
    async with connect(f"{server.ws_url}/ws/ask", open_timeout=10, close_timeout=2, max_size=None) as ws:
        reader = Reader(ws, tally)
        for index in range(frames):
            await ws.send(make_frame())
            tally.frames_sent += 1
            if index % 25 == 0:
                await asyncio.sleep(0)  # let the reader keep up
        await ws.send(json.dumps({"type": "ping"}))
        tally.frames_sent += 1
        await asyncio.wait_for(reader.pongs.get(), 20)
        still_open = ws.close_code is None
        # Hang up only once the answers to the (few) valid questions among the junk are over: a hang-up
        # mid-answer is the soak's business, and has a known race of its own (see tests/test_soak.py).
        await reader.quiet()
        await ws.close()
        await reader.task
        return {"still_open": still_open, "errors": reader.received.get("error", 0), "replies": reader.received}


async def closing_connection(server: ServerProcess, payloads: Iterator[str | bytes], tally: Tally) -> tuple[Any, ...]:
    """Send until the server closes; return the close code and reason it sent."""
    async with connect(
        f"{server.ws_url}/ws/ask", open_timeout=10, close_timeout=2, max_size=None, write_limit=2**24
    ) as ws:
        reader = Reader(ws, tally)
        try:
            for payload in payloads:
                await ws.send(payload)
                tally.frames_sent += 1
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader.task, 15)
        await asyncio.wait_for(ws.wait_closed(), 15)
        frame = ws.protocol.close_rcvd
        return (frame.code, frame.reason) if frame is not None else (None, None)


async def invalid_utf8_connection(server: ServerProcess, tally: Tally) -> tuple[Any, ...]:
    """A text frame whose bytes are not UTF-8 (websockets sends bytes as text when told to)."""
    async with connect(f"{server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        reader = Reader(ws, tally)
        try:
            await ws.send(b'{"type": "ping", "x": "\xff\xfe\xc3"}', text=True)
            tally.frames_sent += 1
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader.task, 15)
        frame = ws.protocol.close_rcvd
        return (frame.code, frame.reason) if frame is not None else (None, None)


async def asker(server: ServerProcess, stop: asyncio.Event, answers: list[Event], failures: list[str]) -> None:
    """A well-behaved user: one question at a time, each must be answered completely."""
    rng = random.Random(SEED + 1)
    async with connect(f"{server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        status = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert status["type"] == "status"
        while not stop.is_set() or len(answers) < 3:
            question = rng.choice(QUESTIONS)
            await ws.send(json.dumps({"type": "question", "data": {"question": question}}))
            events: list[Event] = []
            while not events or events[-1]["type"] not in {"complete", "error"}:
                message = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if message["type"] != "heartbeat":
                    events.append(message)
            metadata, complete = events[0], events[-1]
            words = [event for event in events[1:-1] if not event.get("reference")]  # the frontend's reference lines
            if (
                complete["type"] != "complete"
                or metadata["type"] != "metadata"
                or complete["processing_stage"] not in {"response_complete", "no_match"}
                or complete["total_words"] != len(words)
                or not all(word["type"] == "word" for word in words)
            ):
                failures.append(f"{question!r}: {events[0]!r} ... {events[-1]!r}")
            answers.append(complete)
            await asyncio.sleep(ASKER_PAUSE_SECONDS)


async def gauge(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        for line in (await http.get("/metrics")).text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name:
                return float(value)
    return 0.0


async def wait_for_gauge(server: ServerProcess, name: str, expected: float, seconds: float = 10.0) -> float:
    deadline = time.monotonic() + seconds
    while (value := await gauge(server, name)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return value


# --- the test ------------------------------------------------------------------------------------------------


async def test_fuzzed_server_keeps_answering(fuzz_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    started = time.monotonic()
    stop = asyncio.Event()
    answers: list[Event] = []
    failures: list[str] = []
    asking = asyncio.create_task(asker(fuzz_server, stop, answers, failures))

    makers: dict[str, Callable[[random.Random], str | bytes]] = {
        "random_text": random_text,
        "random_binary": lambda r: r.randbytes(r.randint(0, 2000)),
        "malformed_json": malformed_json,
        "wrong_shapes": lambda r: wrong_shape(r) if r.random() < 0.97 else duplicate_keys(),
    }
    # Each junk connection has its own seeded source, so what it sends does not depend on scheduling.
    junk = {
        f"{name}#{copy}": partial(make, random.Random(f"{SEED}-{name}-{copy}"))
        for name, make in makers.items()
        for copy in range(FUZZERS_PER_KIND)
    }
    too_big_text = "x" * (MAX_MESSAGE_BYTES + 1)
    closers = {
        "text_over_limit": (iter([json.dumps({"type": "ping"}), too_big_text]), {POLICY_VIOLATION}),
        "binary_over_limit": (iter([rng.randbytes(MAX_MESSAGE_BYTES + 1)]), {POLICY_VIOLATION}),
        "text_over_1mib": (iter(["y" * (ONE_MIB + 10)]), {MESSAGE_TOO_BIG}),
        "binary_over_1mib": (iter([rng.randbytes(2 * ONE_MIB)]), {MESSAGE_TOO_BIG}),
        "flood": (iter([json.dumps({"type": "ping"})] * FLOOD_FRAMES), {POLICY_VIOLATION}),
    }
    fuzzing = asyncio.gather(
        *(fuzz_connection(fuzz_server, make, tally, FRAMES_PER_FUZZER) for make in junk.values()),
        *(closing_connection(fuzz_server, payloads, tally) for payloads, _ in closers.values()),
    )
    try:
        results = await asyncio.wait_for(fuzzing, FUZZ_SECONDS_LIMIT)
    finally:
        stop.set()
    await asyncio.wait_for(asking, 30)
    elapsed = time.monotonic() - started

    fuzz_results = dict(zip(junk, results[: len(junk)], strict=True))
    close_results = dict(zip(closers, results[len(junk) :], strict=True))
    with capsys.disabled():
        print(
            f"\nws fuzz: {tally.frames_sent} frames sent over {len(junk) + len(closers)} fuzzing connections in "
            f"{elapsed:.1f} s; replies {tally.received}; closes {close_results}; "
            f"{len(answers)} real questions answered meanwhile"
        )

    assert not tally.bad_messages, tally.bad_messages[:5]
    for name, result in fuzz_results.items():
        assert result["still_open"], name
    # Every random, binary or malformed frame gets exactly one `error` reply (and the connection lives on).
    for name, result in fuzz_results.items():
        if name.startswith(("random_binary", "malformed_json")):
            assert result["errors"] == FRAMES_PER_FUZZER, (name, result)
        elif name.startswith("random_text"):  # a random string could, in theory, be a valid `ping`
            assert result["errors"] >= FRAMES_PER_FUZZER * 0.99, (name, result)
    for name, (_, expected) in closers.items():
        assert close_results[name][0] in expected, (name, close_results[name])
    assert close_results["flood"][1] == "too many messages"
    assert close_results["text_over_limit"][1] == "message too large"
    assert not failures, failures[:5]
    assert len(answers) >= 3

    assert await wait_for_gauge(fuzz_server, "websocket_connections", 0.0) == 0.0
    log = fuzz_server.log()
    assert "Traceback" not in log
    assert '"level": "error"' not in log


async def test_deeply_nested_json_gets_an_error_not_a_dropped_connection(fuzz_server: ServerProcess) -> None:
    depth = (MAX_MESSAGE_BYTES - 2) // 2  # fits the frame limit, deeper than Python's recursion limit
    async with connect(f"{fuzz_server.ws_url}/ws/ask", open_timeout=10, close_timeout=2) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "status"
        await ws.send("[" * depth + "]" * depth)
        try:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except ConnectionClosed:
            reply = {"closed": ws.close_code}
        assert reply.get("type") == "error" and reply.get("reason") == "invalid_json", reply
        assert reply.get("code") == 400, reply
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "pong"


# --- text frames that are not UTF-8 (after the test above, which checks the log) ----------------------------


async def test_invalid_utf8_text_frame_is_closed_with_1007(fuzz_server: ServerProcess) -> None:
    tally = Tally()
    code, _ = await invalid_utf8_connection(fuzz_server, tally)
    assert code == INVALID_DATA
    assert not tally.bad_messages
    async with httpx.AsyncClient(base_url=fuzz_server.base_url, timeout=10) as http:
        assert (await http.post("/ask", json={"question": "What is Aave?"})).status_code == 200
    assert await wait_for_gauge(fuzz_server, "websocket_connections", 0.0) == 0.0


async def test_invalid_utf8_text_frame_leaves_no_traceback(fuzz_server: ServerProcess) -> None:
    before = fuzz_server.log().count("Traceback")
    await invalid_utf8_connection(fuzz_server, Tally())
    await wait_for_gauge(fuzz_server, "websocket_connections", 0.0)
    assert fuzz_server.log().count("Traceback") == before
