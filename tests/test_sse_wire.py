"""The SSE streams' exact bytes on a real server: what a client that reads the raw body sees.

tests/test_sse.py checks the events through an SSE parser; here the raw body is pinned: nothing but
`data: <json>` blocks, each JSON object exactly as `json.dumps` writes it (keys in the documented order,
", " and ": " separators, non-ASCII escaped), each block ended by one blank line, and the same headers in
the same order. How the body is cut into HTTP chunks is not pinned: clients cannot see it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

KEY_ORDER = {
    "metadata": ["type", "session_id", "total_words", "confidence", "sources"],
    "word": ["type", "content", "index", "confidence"],
    "complete": ["type", "final_confidence", "processing_stage", "total_words", "answer_id", "kb_version"],
    "error": ["type", "message", "error", "code", "reason"],
}
# The response's own headers, in order, before the middlewares' (which other tests pin).
STREAM_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
]

Event = dict[str, Any]


def raw_stream(http: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, bytes]:
    with http.stream(method, url, **kwargs) as response:
        assert response.status_code == 200, response.read()
        return response, b"".join(response.iter_raw())


def events_of(body: bytes) -> list[Event]:
    """Split the raw body into events, asserting each block is exactly `data: <json.dumps(event)>\\n\\n`."""
    assert body.endswith(b"\n\n"), body[-80:]
    events = []
    for block in body[:-2].split(b"\n\n"):
        assert block.startswith(b"data: "), block
        event = json.loads(block[len(b"data: ") :])
        assert block == b"data: " + json.dumps(event).encode("ascii"), block
        assert list(event) == KEY_ORDER[event["type"]], event
        events.append(event)
    return events


def own_headers(response: httpx.Response) -> list[tuple[str, str]]:
    raw = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in response.headers.raw]
    assert "content-length" not in dict(raw)
    assert dict(raw).get("transfer-encoding") == "chunked"
    start = [name for name, _ in raw].index("content-type")
    return raw[start : start + len(STREAM_HEADERS)]


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("POST", "/ask-stream", {"json": {"question": "What is Aave?"}}),
        ("POST", "/ask-stream", {"json": {"question": "best lasagna recipe?"}}),
        ("GET", "/ask-stream", {"params": {"question": "What is a flash loan?"}}),
        ("POST", "/v2/ask-stream", {"json": {"question": "What is a health factor?"}}),
    ],
)
def test_stream_body_is_exactly_data_blocks(client: httpx.Client, method: str, url: str, kwargs: Any) -> None:
    response, body = raw_stream(client, method, url, **kwargs)
    assert own_headers(response) == STREAM_HEADERS
    events = events_of(body)
    assert events[0]["type"] == "metadata" and events[-1]["type"] == "complete"
    assert {event["type"] for event in events[1:-1]} == {"word"}
    if url == "/v2/ask-stream":
        assert response.headers["x-session-id"] == events[0]["session_id"]
        names = [name.decode().lower() for name, _ in response.headers.raw]
        assert names.index("x-session-id") == names.index("x-accel-buffering") + 1  # right after the stream's own


def test_error_event_bytes(busy_session_server: ServerProcess) -> None:
    """A stream that cannot start (its session busy) ends with one exact `error` event."""
    server = busy_session_server  # slow streams, a 0.2 s wait for a busy session (tests/conftest.py)
    with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        session_id = http.post("/v2/ask", json={"question": "What is Aave?"}).json()["session_id"]
        payload = {"question": "What is a flash loan?", "session_id": session_id}
        started = threading.Event()
        results: list[bytes] = []

        def hold() -> None:
            with (
                httpx.Client(base_url=server.base_url, timeout=30.0) as other,
                other.stream("POST", "/v2/ask-stream", json=payload) as response,
            ):
                chunks = response.iter_raw()
                results.append(next(chunks))
                started.set()
                results.extend(chunks)

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(30)
        _, body = raw_stream(http, "POST", "/v2/ask-stream", json=payload)
        holder.join(30)
    events = events_of(body)
    assert [event["type"] for event in events] == ["error"]
    assert events[0]["reason"] == "session_busy" and events[0]["code"] == 409
    held = events_of(b"".join(results))
    assert held[0]["type"] == "metadata" and held[-1]["type"] == "complete"
