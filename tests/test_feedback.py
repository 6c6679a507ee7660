"""The question log and feedback on answers, end to end, on SQLite and on PostgreSQL.

Real servers (`python main.py`), each on its own database: a SQLite file, a fresh PostgreSQL database, and a
SQLite server with QUESTION_LOG_ENABLED=false. Questions go in over REST, SSE and the WebSocket; the tests read
the `answers` and `feedback` tables directly and the counters from /metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ServerProcess, database_rows, metric_value, poll_until
from tests.postgres_server import PostgresServer, unique_database_name

Event = dict[str, Any]

ANSWERABLE = "What is a flash loan?"
OFF_TOPIC = "best lasagna recipe?"
SALT_KEY = "session_hash_salt"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ANSWER_ID = re.compile(r"^[0-9a-f]{32}$")
UNKNOWN_ID = "0" * 32
WAIT_SECONDS = 20.0
ANSWER_COLUMNS = {
    "id",
    "created_at",
    "transport",
    "question",
    "resolved_question",
    "top_entry_id",
    "confidence",
    "outcome",
    "latency_ms",
    "session_hash",
    "kb_version",
    "unknown_terms",
}


# --- servers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(
    start_server: Callable[..., ServerProcess], server: ServerProcess, postgres_server: PostgresServer
) -> Iterator[dict[str, ServerProcess]]:
    """`sqlite`, `postgresql` and `log_off` servers, started side by side.

    `server` is requested first so that the session's index exists and these three start warm.
    """
    database = unique_database_name()
    postgres_server.create_database(database)
    configs = {
        "sqlite": {},
        "postgresql": {"DATABASE_URL": postgres_server.url(database)},
        "log_off": {"QUESTION_LOG_ENABLED": "false"},
    }
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = {name: pool.submit(start_server, **env) for name, env in configs.items()}
        started = {name: future.result() for name, future in futures.items()}
    yield started
    started["postgresql"].stop()  # before its database goes
    postgres_server.drop_database(database)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, servers: dict[str, ServerProcess]) -> ServerProcess:
    """The server on each kind of database (the test runs once per kind)."""
    chosen: ServerProcess = servers[request.param]
    return chosen


# --- helpers -------------------------------------------------------------------------------------------------


def url_of(server: ServerProcess) -> str:
    return server.env["DATABASE_URL"]


def rows(server: ServerProcess, sql: str, **params: Any) -> list[dict[str, Any]]:
    return database_rows(url_of(server), sql, **params)


def answer_row(server: ServerProcess, answer_id: str) -> dict[str, Any]:
    """The `answers` row of one answer, waiting for the log's next flush."""
    found: list[dict[str, Any]] = poll_until(
        lambda: rows(server, "SELECT * FROM answers WHERE id = :id", id=answer_id), WAIT_SECONDS
    )
    assert len(found) == 1
    return found[0]


def feedback_rows(server: ServerProcess, answer_id: str) -> list[dict[str, Any]]:
    return rows(server, "SELECT * FROM feedback WHERE answer_id = :id ORDER BY id", id=answer_id)


def answer_count(server: ServerProcess) -> int:
    return int(rows(server, "SELECT count(*) AS n FROM answers")[0]["n"])


def salted(server: ServerProcess, session_id: str) -> str:
    """What the server stores for a session id: SHA-256 of `<salt>:<id>`, the salt read from its database."""
    salt = rows(server, "SELECT value FROM service_values WHERE key = :key", key=SALT_KEY)[0]["value"]
    return hashlib.sha256(f"{salt}:{session_id}".encode()).hexdigest()


def post(server: ServerProcess, path: str, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=payload, timeout=30)


def ask(server: ServerProcess, path: str, question: str, session_id: str | None = None) -> Event:
    payload = {"question": question} if session_id is None else {"question": question, "session_id": session_id}
    response = post(server, path, payload)
    assert response.status_code == 200, response.text
    body: Event = response.json()
    assert ANSWER_ID.match(body["answer_id"]), body
    return body


def stream(server: ServerProcess, path: str, question: str) -> tuple[Event, Event, str | None]:
    """One SSE answer: (metadata, complete, the X-Session-ID header)."""
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as client,
        connect_sse(client, "POST", path, json={"question": question}) as source,
    ):
        assert source.response.status_code == 200
        events = [json.loads(sse.data) for sse in source.iter_sse()]
        session = source.response.headers.get("x-session-id")
    metadata, complete = events[0], events[-1]
    assert metadata["type"] == "metadata" and complete["type"] == "complete", events
    assert ANSWER_ID.match(complete["answer_id"]), complete
    return metadata, complete, session


def recv(ws: ClientConnection) -> Event:
    while True:
        message: Event = json.loads(ws.recv(timeout=15))
        if message["type"] != "heartbeat":
            return message


def ws_ask(ws: ClientConnection, question: str) -> tuple[Event, Event]:
    """One WebSocket answer: (metadata, complete)."""
    ws.send(json.dumps({"type": "question", "question": question}))
    events = [recv(ws)]
    while events[-1]["type"] not in {"complete", "error"}:
        events.append(recv(ws))
    metadata, complete = events[0], events[-1]
    assert metadata["type"] == "metadata" and complete["type"] == "complete", events
    return metadata, complete


def ws_session(ws: ClientConnection) -> str:
    status = recv(ws)
    assert status["type"] == "status", status
    session_id: str = status["details"]["session_id"]
    return session_id


def feedback(server: ServerProcess, **payload: Any) -> httpx.Response:
    return post(server, "/v2/feedback", payload)


def assert_error(response: httpx.Response, code: int, error_type: str, reason: str) -> None:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"detail", "type", "code", "reason"}, body
    assert (body["type"], body["code"], body["reason"]) == (error_type, code, reason), body
    assert isinstance(body["detail"], str) and body["detail"]


# --- the question log ----------------------------------------------------------------------------------------


def test_every_transport_logs_one_row_per_question(backend: ServerProcess) -> None:
    before = answer_count(backend)
    rest = ask(backend, "/ask", ANSWERABLE)
    rest_session = ask(backend, "/v2/ask", ANSWERABLE)
    off_topic = ask(backend, "/ask", OFF_TOPIC)
    sse_meta, sse, _ = stream(backend, "/ask-stream", ANSWERABLE)
    sse_session_meta, sse_session, sse_session_id = stream(backend, "/v2/ask-stream", ANSWERABLE)
    with connect(f"{backend.ws_url}/ws/ask", open_timeout=10) as ws:
        ws_session_id = ws_session(ws)
        ws_meta, ws_complete = ws_ask(ws, ANSWERABLE)
    assert off_topic["processing_stage"] == "no_match" and off_topic["sources"] == []
    assert rest_session["session_id"] and sse_session_id

    # (answer_id, transport, outcome, top entry, session id or None, kb_version) per question asked
    expected = [
        (rest["answer_id"], "rest", "answered", rest["sources"][0]["id"], None, rest["kb_version"]),
        (
            rest_session["answer_id"],
            "rest",
            "answered",
            rest_session["sources"][0]["id"],
            rest_session["session_id"],
            rest_session["kb_version"],
        ),
        (off_topic["answer_id"], "rest", "no_match", None, None, off_topic["kb_version"]),
        (sse["answer_id"], "sse", "answered", sse_meta["sources"][0]["id"], None, sse["kb_version"]),
        (
            sse_session["answer_id"],
            "sse",
            "answered",
            sse_session_meta["sources"][0]["id"],
            sse_session_id,
            sse_session["kb_version"],
        ),
        (
            ws_complete["answer_id"],
            "websocket",
            "answered",
            ws_meta["sources"][0]["id"],
            ws_session_id,
            ws_complete["kb_version"],
        ),
    ]
    assert len({answer_id for answer_id, *_ in expected}) == len(expected)
    poll_until(lambda: answer_count(backend) == before + len(expected), WAIT_SECONDS)
    for answer_id, transport, outcome, top_entry, session_id, kb_version in expected:
        row = answer_row(backend, answer_id)
        assert set(row) == ANSWER_COLUMNS
        assert (row["transport"], row["outcome"], row["top_entry_id"]) == (transport, outcome, top_entry), row
        assert row["kb_version"] == kb_version and isinstance(kb_version, int)
        if session_id is None:
            assert row["session_hash"] is None, row
        else:
            assert HEX64.match(row["session_hash"]), row
            assert row["session_hash"] == salted(backend, session_id)
            assert session_id not in json.dumps(row, default=str)  # only the hash, never the id itself
        assert row["question"] in (ANSWERABLE, OFF_TOPIC)
        assert "127.0.0.1" not in json.dumps(row, default=str)  # the client address is never stored
    assert answer_count(backend) == before + len(expected)


# --- feedback over REST --------------------------------------------------------------------------------------


def test_feedback_is_stored_and_a_second_rating_replaces_the_first(backend: ServerProcess) -> None:
    answer = ask(backend, "/v2/ask", ANSWERABLE)
    answer_id, session_id, entry_id = answer["answer_id"], answer["session_id"], answer["sources"][0]["id"]
    wrong_before = metric_value(backend, "answer_feedback_total", rating="wrong")
    helpful_before = metric_value(backend, "answer_feedback_total", rating="helpful")

    # Rated at once: the answer may still be in the log's queue, and is written for the rating.
    first = feedback(backend, answer_id=answer_id, rating="helpful", session_id=session_id)
    assert first.status_code == 200, first.text
    assert first.json() == {"status": "recorded", "answer_id": answer_id, "rating": "helpful"}
    [row] = feedback_rows(backend, answer_id)
    assert (row["rating"], row["entry_id"], row["comment"]) == ("helpful", entry_id, None)
    assert row["rater_hash"] == salted(backend, session_id) == answer_row(backend, answer_id)["session_hash"]

    second = feedback(backend, answer_id=answer_id, rating="wrong", comment="The fee changed", session_id=session_id)
    assert second.status_code == 200, second.text
    assert second.json() == {"status": "recorded", "answer_id": answer_id, "rating": "wrong"}
    [replaced] = feedback_rows(backend, answer_id)
    assert (replaced["id"], replaced["rater_hash"]) == (row["id"], row["rater_hash"])
    assert (replaced["rating"], replaced["comment"], replaced["entry_id"]) == ("wrong", "The fee changed", entry_id)

    # The answer's own session is the rater when none is given: the same rater again, so still one row.
    third = feedback(backend, answer_id=answer_id, rating="wrong")
    assert third.status_code == 200, third.text
    assert [r["rating"] for r in feedback_rows(backend, answer_id)] == ["wrong"]

    other_session = ask(backend, "/v2/ask", "What is Aave?")["session_id"]
    other = feedback(backend, answer_id=answer_id, rating="helpful", session_id=other_session)
    assert other.status_code == 200, other.text
    both = feedback_rows(backend, answer_id)
    assert [(r["rating"], r["rater_hash"]) for r in both] == [
        ("wrong", salted(backend, session_id)),
        ("helpful", salted(backend, other_session)),
    ]
    assert metric_value(backend, "answer_feedback_total", rating="wrong") == wrong_before + 2
    assert metric_value(backend, "answer_feedback_total", rating="helpful") == helpful_before + 2


def test_feedback_on_a_stateless_answer(backend: ServerProcess) -> None:
    answer = ask(backend, "/ask", OFF_TOPIC)
    answer_id = answer["answer_id"]
    assert feedback(backend, answer_id=answer_id, rating="wrong", comment="ask me about pasta").status_code == 200
    assert feedback(backend, answer_id=answer_id, rating="helpful").status_code == 200
    [row] = feedback_rows(backend, answer_id)
    # No session on either side: one anonymous rater (''), and the no-match answer has no entry.
    assert (row["rater_hash"], row["rating"], row["comment"], row["entry_id"]) == ("", "helpful", None, None)


# --- feedback over the WebSocket -----------------------------------------------------------------------------


def test_websocket_feedback_message(backend: ServerProcess) -> None:
    wrong_before = metric_value(backend, "answer_feedback_total", rating="wrong")
    with connect(f"{backend.ws_url}/ws/ask", open_timeout=10) as ws:
        session_id = ws_session(ws)
        metadata, complete = ws_ask(ws, ANSWERABLE)
        answer_id = complete["answer_id"]
        ws.send(json.dumps({"type": "feedback", "answer_id": answer_id, "rating": "wrong", "comment": "outdated"}))
        recorded = recv(ws)
        assert {key: recorded[key] for key in ("type", "answer_id", "rating")} == {
            "type": "feedback_recorded",
            "answer_id": answer_id,
            "rating": "wrong",
        }, recorded

        ws.send(json.dumps({"type": "feedback", "answer_id": answer_id, "rating": "meh"}))
        bad_rating = recv(ws)
        ws.send(json.dumps({"type": "feedback", "answer_id": UNKNOWN_ID, "rating": "wrong"}))
        unknown = recv(ws)
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws)["type"] == "pong"  # errors leave the connection open
    assert (bad_rating["type"], bad_rating["code"], bad_rating["reason"]) == ("error", 422, "rating_invalid")
    assert (unknown["type"], unknown["code"], unknown["reason"]) == ("error", 404, "answer_not_found")

    [row] = feedback_rows(backend, answer_id)
    assert (row["rating"], row["comment"], row["entry_id"]) == ("wrong", "outdated", metadata["sources"][0]["id"])
    assert row["rater_hash"] == salted(backend, session_id) == answer_row(backend, answer_id)["session_hash"]
    assert metric_value(backend, "answer_feedback_total", rating="wrong") == wrong_before + 1


# --- bad input -----------------------------------------------------------------------------------------------


def test_bad_feedback_is_refused_in_the_error_format(backend: ServerProcess) -> None:
    answer_id = ask(backend, "/ask", ANSWERABLE)["answer_id"]
    wrong_before = metric_value(backend, "answer_feedback_total", rating="wrong")

    assert_error(feedback(backend, answer_id=UNKNOWN_ID, rating="wrong"), 404, "not_found", "answer_not_found")
    assert_error(feedback(backend, answer_id=answer_id, rating="meh"), 422, "validation_error", "rating_invalid")
    assert_error(
        feedback(backend, answer_id=answer_id, rating="wrong", comment="x" * 1001),
        422,
        "validation_error",
        "comment_too_long",
    )
    assert_error(feedback(backend, answer_id="../etc", rating="wrong"), 422, "validation_error", "answer_id_invalid")
    assert_error(feedback(backend, rating="wrong"), 422, "validation_error", "missing_field")

    assert feedback_rows(backend, answer_id) == []
    assert rows(backend, "SELECT id FROM feedback WHERE answer_id = :id", id=UNKNOWN_ID) == []
    assert metric_value(backend, "answer_feedback_total", rating="wrong") == wrong_before
    # A comment of exactly 1,000 characters is accepted.
    assert feedback(backend, answer_id=answer_id, rating="wrong", comment="x" * 1000).status_code == 200
    assert feedback_rows(backend, answer_id)[0]["comment"] == "x" * 1000


# --- the question log turned off -----------------------------------------------------------------------------


def test_feedback_refused_when_the_question_log_is_off(servers: dict[str, ServerProcess]) -> None:
    server = servers["log_off"]
    answer = ask(server, "/v2/ask", ANSWERABLE)  # answers still carry an id
    response = feedback(server, answer_id=answer["answer_id"], rating="wrong", session_id=answer["session_id"])
    assert_error(response, 409, "conflict", "feedback_disabled")
    with connect(f"{server.ws_url}/ws/ask", open_timeout=10) as ws:
        ws_session(ws)
        _, complete = ws_ask(ws, ANSWERABLE)
        ws.send(json.dumps({"type": "feedback", "answer_id": complete["answer_id"], "rating": "helpful"}))
        refused = recv(ws)
    assert (refused["type"], refused["code"], refused["reason"]) == ("error", 409, "feedback_disabled")

    # Nothing was queued or written; the schema exists (the database is still opened) and holds no rows.
    assert metric_value(server, "question_log_pending") == 0
    assert metric_value(server, "question_log_written_total") == 0
    assert answer_count(server) == 0
    assert rows(server, "SELECT count(*) AS n FROM feedback")[0]["n"] == 0
    assert metric_value(server, "answer_feedback_total", rating="wrong") == 0
