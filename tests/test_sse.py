"""Server-Sent Events end to end: POST /ask-stream, POST /v2/ask-stream and GET /ask-stream on a real server.

Every stream is `metadata`, one `word` per word of the answer, then `complete`; the words joined with single
spaces are exactly the answer POST /ask gives for the same question. Invalid input is a plain 422 JSON error,
never a stream, and a client that hangs up mid-answer is counted and logged, with nothing left open.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.conftest import ServerProcess

EXPECTED_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
METADATA_KEYS = {"type", "session_id", "total_words", "confidence", "sources"}
WORD_KEYS = {"type", "content", "index", "confidence"}
COMPLETE_KEYS = {"type", "final_confidence", "processing_stage", "total_words", "answer_id", "kb_version"}
ERROR_KEYS = {"detail", "type", "code", "reason"}
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
ON_TOPIC = [
    ("What is Aave?", "what-is-aave"),
    ("What is a health factor?", "health-factor"),
    ("What is a flash loan?", "what-are-flash-loans"),
    ("What is the difference between APR and APY?", "apr-vs-apy"),
]
OFF_TOPIC = "best lasagna recipe?"
POLL_SECONDS = 10.0

Event = dict[str, Any]


# --- helpers -------------------------------------------------------------------------------------------------


def stream(client: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, list[Event]]:
    """Open an SSE stream, check it is one, and read every event to the end."""
    with connect_sse(client, method, url, **kwargs) as source:
        response = source.response
        assert response.status_code == 200, response.read().decode()
        events = []
        for sse in source.iter_sse():
            assert sse.event == "message"  # plain `data:` events, so EventSource.onmessage sees them all
            events.append(json.loads(sse.data))
    return response, events


def check_headers(response: httpx.Response) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers.get(name))


def check_events(events: list[Event]) -> tuple[Event, str, Event]:
    """Assert the exact event sequence; return (metadata, rebuilt answer, complete)."""
    assert len(events) >= 3, events
    metadata, words, complete = events[0], events[1:-1], events[-1]
    assert metadata["type"] == "metadata" and set(metadata) == METADATA_KEYS, metadata
    assert all(word["type"] == "word" and set(word) == WORD_KEYS for word in words), words
    assert complete["type"] == "complete" and set(complete) == COMPLETE_KEYS, complete
    assert [word["index"] for word in words] == list(range(len(words)))
    assert all(word["content"] and " " not in word["content"] for word in words)
    assert all(word["confidence"] == metadata["confidence"] for word in words)
    assert metadata["total_words"] == complete["total_words"] == len(words)
    assert complete["final_confidence"] == metadata["confidence"]
    return metadata, " ".join(word["content"] for word in words), complete


def ask(client: httpx.Client, question: str) -> Event:
    response = client.post("/ask", json={"question": question})
    assert response.status_code == 200, response.text
    body: Event = response.json()
    return body


def metric(client: httpx.Client, sample: str) -> float:
    """The value of one sample line of /metrics (`name{labels}`), 0.0 while a labelled child has none."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


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


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(slow_stream_server: ServerProcess) -> ServerProcess:
    """30 ms between words (the session's, tests/conftest.py): an answer takes seconds, long enough to hang up."""
    return slow_stream_server


@pytest.fixture(scope="module")
def answers(server: ServerProcess) -> Iterator[dict[str, Event]]:
    """POST /ask for every question used below, once."""
    with httpx.Client(base_url=server.base_url, timeout=30.0) as http:
        yield {question: ask(http, question) for question, _ in [*ON_TOPIC, (OFF_TOPIC, None)]}


# --- POST /ask-stream ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "top_id"), ON_TOPIC)
def test_post_stream_matches_ask(client: httpx.Client, answers: dict[str, Event], question: str, top_id: str) -> None:
    response, events = stream(client, "POST", "/ask-stream", json={"question": question})
    check_headers(response)
    assert "x-session-id" not in response.headers
    metadata, text, complete = check_events(events)
    expected = answers[question]
    assert text == expected["answer"]
    assert metadata["session_id"] is None
    assert metadata["sources"] == expected["sources"]
    assert metadata["sources"][0]["id"] == top_id
    assert metadata["confidence"] == expected["confidence"]
    assert complete["processing_stage"] == expected["processing_stage"] == "response_complete"
    assert complete["total_words"] == len(expected["answer"].split())


def test_question_is_stripped(client: httpx.Client, answers: dict[str, Event]) -> None:
    _, events = stream(client, "POST", "/ask-stream", json={"question": "  \n What is Aave?\t "})
    _, text, _ = check_events(events)
    assert text == answers["What is Aave?"]["answer"]


def test_no_match_streams_the_same_way(client: httpx.Client, answers: dict[str, Event]) -> None:
    response, events = stream(client, "POST", "/ask-stream", json={"question": OFF_TOPIC})
    check_headers(response)
    metadata, text, complete = check_events(events)
    expected = answers[OFF_TOPIC]
    assert expected["processing_stage"] == complete["processing_stage"] == "no_match"
    assert text == expected["answer"]
    assert text.startswith("I don't have a reliable answer to that.")
    assert metadata["sources"] == expected["sources"] == []
    assert metadata["confidence"] == expected["confidence"] == complete["final_confidence"]


# --- POST /v2/ask-stream -------------------------------------------------------------------------------------


def test_v2_stream_session_and_follow_up(client: httpx.Client, answers: dict[str, Event]) -> None:
    response, events = stream(client, "POST", "/v2/ask-stream", json={"question": "What is Aave?"})
    check_headers(response)
    metadata, text, _ = check_events(events)
    session_id = response.headers["x-session-id"]
    assert SESSION_ID.match(session_id)
    assert metadata["session_id"] == session_id
    assert metadata["sources"][0]["id"] == "what-is-aave"
    assert text == answers["What is Aave?"]["answer"]

    payload = {"question": "what are its risks?", "session_id": session_id}
    response, events = stream(client, "POST", "/v2/ask-stream", json=payload)
    check_headers(response)
    metadata, follow_up, complete = check_events(events)
    assert response.headers["x-session-id"] == metadata["session_id"] == session_id
    assert metadata["sources"][0]["id"] == "aave-risks"
    assert complete["processing_stage"] == "response_complete"
    assert "Aave" in follow_up

    # The stream recorded both turns, with exactly the answers it streamed.
    turns = client.get(f"/v2/sessions/{session_id}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["What is Aave?", "what are its risks?"]
    assert [turn["answer"] for turn in turns] == [text, follow_up]
    assert turns[1]["sources"] == metadata["sources"]


def test_v2_stream_unknown_session_starts_a_new_one(client: httpx.Client) -> None:
    payload = {"question": "What is a health factor?", "session_id": "no-such-session-42"}
    response, events = stream(client, "POST", "/v2/ask-stream", json=payload)
    metadata, _, _ = check_events(events)
    assert response.headers["x-session-id"] == metadata["session_id"] != "no-such-session-42"
    assert SESSION_ID.match(metadata["session_id"])


# --- GET /ask-stream (EventSource) ---------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "top_id"), ON_TOPIC[:2])
def test_get_stream_matches_ask(client: httpx.Client, answers: dict[str, Event], question: str, top_id: str) -> None:
    response, events = stream(client, "GET", "/ask-stream", params={"question": question})
    check_headers(response)
    assert "x-session-id" not in response.headers
    metadata, text, complete = check_events(events)
    assert text == answers[question]["answer"]
    assert metadata["session_id"] is None
    assert metadata["sources"][0]["id"] == top_id
    assert complete["processing_stage"] == "response_complete"


def test_get_stream_no_match(client: httpx.Client, answers: dict[str, Event]) -> None:
    _, events = stream(client, "GET", "/ask-stream", params={"question": OFF_TOPIC})
    _, text, complete = check_events(events)
    assert complete["processing_stage"] == "no_match"
    assert text == answers[OFF_TOPIC]["answer"]


def test_get_stream_continues_a_session(client: httpx.Client) -> None:
    response, events = stream(client, "POST", "/v2/ask-stream", json={"question": "What is Aave?"})
    session_id = response.headers["x-session-id"]
    check_events(events)
    params = {"question": "what are its risks?", "session_id": session_id}
    response, events = stream(client, "GET", "/ask-stream", params=params)
    check_headers(response)
    metadata, _, _ = check_events(events)
    assert response.headers["x-session-id"] == metadata["session_id"] == session_id
    assert metadata["sources"][0]["id"] == "aave-risks"
    assert len(client.get(f"/v2/sessions/{session_id}").json()["turns"]) == 2


# --- validation: a plain 422 before any stream ---------------------------------------------------------------

TOO_LONG = "x" * 1001
BAD_BODIES = [
    ({"question": ""}, "question_empty"),
    ({"question": "  \n\t "}, "question_empty"),
    ({"question": TOO_LONG}, "question_too_long"),
    ({"question": 42}, "question_not_string"),
    ({"question": None}, "question_not_string"),
    ({"question": ["What is Aave?"]}, "question_not_string"),
    ({}, "missing_field"),
]
BAD_QUERIES = [
    ({"question": ""}, "question_empty"),
    ({"question": "   "}, "question_empty"),
    ({"question": TOO_LONG}, "question_too_long"),
    ({}, "missing_field"),
    ({"question": "What is Aave?", "session_id": "../../etc/passwd"}, "invalid_request"),
    ({"question": "What is Aave?", "session_id": "s" * 129}, "invalid_request"),
]


def check_422(client: httpx.Client, method: str, url: str, code: str, **kwargs: Any) -> Event:
    with connect_sse(client, method, url, **kwargs) as source:
        response = source.response
        body = response.read()
    assert response.status_code == 422, body
    assert response.headers["content-type"] == "application/json"
    assert b"data:" not in body
    error: Event = json.loads(body)
    assert set(error) == ERROR_KEYS
    assert error["type"] == "validation_error"
    assert error["code"] == 422 and error["reason"] == code
    return error


@pytest.mark.parametrize("path", ["/ask-stream", "/v2/ask-stream"])
@pytest.mark.parametrize(("payload", "code"), BAD_BODIES)
def test_post_validation_errors(client: httpx.Client, path: str, payload: Event, code: str) -> None:
    error = check_422(client, "POST", path, code, json=payload)
    if code == "question_too_long":
        assert "limit is 1000" in error["detail"]


@pytest.mark.parametrize("session_id", ["../../etc/passwd", "has space", "", 42])
def test_v2_bad_session_id(client: httpx.Client, session_id: object) -> None:
    payload = {"question": "What is Aave?", "session_id": session_id}
    error = check_422(
        client, "POST", "/v2/ask-stream", "invalid_type" if session_id == 42 else "invalid_request", json=payload
    )
    assert "session_id" in error["detail"]


@pytest.mark.parametrize(("params", "code"), BAD_QUERIES)
def test_get_validation_errors(client: httpx.Client, params: dict[str, str], code: str) -> None:
    check_422(client, "GET", "/ask-stream", code, params=params)


def test_no_stream_left_open_after_errors(client: httpx.Client) -> None:
    check_422(client, "POST", "/ask-stream", "question_empty", json={"question": ""})
    deadline = time.monotonic() + POLL_SECONDS  # streams of earlier tests may take a moment to wind down
    while (active := metric(client, "sse_streams_active")) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active == 0.0


# --- client disconnect ---------------------------------------------------------------------------------------


def test_client_disconnect_mid_stream(slow_server: ServerProcess) -> None:
    cancelled = 'streams_cancelled_total{transport="sse"}'
    with httpx.Client(base_url=slow_server.base_url, timeout=30.0) as http:
        before = metric(http, cancelled)
        logged_before = len(log_events(slow_server, "stream_cancelled"))
        with connect_sse(http, "POST", "/ask-stream", json={"question": "What is Aave?"}) as source:
            events = source.iter_sse()
            metadata = json.loads(next(events).data)
            assert metadata["type"] == "metadata" and metadata["total_words"] > 10
            words = [json.loads(next(events).data) for _ in range(2)]
            assert [word["index"] for word in words] == [0, 1]
            assert metric(http, "sse_streams_active") == 1.0
        # Leaving the block closes the half-read response, and with it the connection.

        deadline = time.monotonic() + POLL_SECONDS
        while True:
            counted, active = metric(http, cancelled), metric(http, "sse_streams_active")
            if (counted == before + 1 and active == 0.0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert counted == before + 1, f"cancelled {before} -> {counted}"
        assert active == 0.0
        time.sleep(0.2)  # nothing else is counted afterwards
        assert metric(http, cancelled) == before + 1
        assert http.get("/health").status_code == 200

    records = log_events(slow_server, "stream_cancelled")[logged_before:]
    assert [(record["transport"], record["reason"]) for record in records] == [("sse", "client_disconnected")]
    assert "Traceback" not in slow_server.log()
