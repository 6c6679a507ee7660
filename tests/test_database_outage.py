"""The database going away and coming back, and the retention purge, with real servers and real databases.

- A server on a private PostgreSQL cluster (`postgres_cluster`) that the test stops: questions keep being
  answered, the question log queues up to QUESTION_LOG_QUEUE_SIZE rows and counts the rest as dropped,
  `/health-status` says why, feedback answers 503, and when the cluster is back the queue is written by
  itself, without a restart.
- A database holding rows older than QUESTION_LOG_RETENTION_DAYS: the next server to start deletes them
  and their feedback, and keeps the recent ones (SQLite and PostgreSQL).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from config import normalize_database_url
from infrastructure.tables import AnswerRow, FeedbackRow
from tests.conftest import ServerProcess, database_rows, metric_value, poll_until
from tests.postgres_server import PostgresCluster, run_blocking

QUEUE_SIZE = 100
BEFORE_OUTAGE = 5
DURING_OUTAGE = 160
QUESTIONS = ["What is a flash loan?", "What is Aave?", "What is impermanent loss?", "What is MEV?"]
WAITING = re.compile(r"(\d+) rows waiting, (\d+) dropped")
WAIT_SECONDS = 60.0


def ask(server: ServerProcess, question: str) -> str:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
    assert response.status_code == 200, response.text
    answer_id: str = response.json()["answer_id"]
    return answer_id


def health(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/health-status", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def queue_report(server: ServerProcess) -> dict[str, Any] | None:
    """The health report once it shows the question log's queue (it has failed to write), else None."""
    body = health(server)
    detail = str(body["component_details"].get("database", {}).get("detail", ""))
    return body if WAITING.search(detail) else None


def answer_count(url: str) -> int:
    return int(database_rows(url, "SELECT count(*) AS n FROM answers")[0]["n"])


# --- the database goes away and comes back ---------------------------------------------------------------


def test_database_outage_keeps_answering_and_recovers(
    start_server: Callable[..., ServerProcess], server: ServerProcess, postgres_cluster: PostgresCluster
) -> None:
    # `server` first: the session's index exists, so this server starts warm.
    postgres_cluster.create_database("outage")
    url = postgres_cluster.url("outage")
    app = start_server(DATABASE_URL=url, QUESTION_LOG_QUEUE_SIZE=str(QUEUE_SIZE))
    pid = app.pid
    try:
        before = [ask(app, QUESTIONS[i % len(QUESTIONS)]) for i in range(BEFORE_OUTAGE)]
        poll_until(lambda: answer_count(url) == BEFORE_OUTAGE, WAIT_SECONDS)
        poll_until(lambda: metric_value(app, "question_log_pending") == 0, WAIT_SECONDS)
        assert health(app)["components"]["database"] == "healthy"

        postgres_cluster.stop()
        during = [ask(app, QUESTIONS[i % len(QUESTIONS)]) for i in range(DURING_OUTAGE)]
        assert len(set(before + during)) == BEFORE_OUTAGE + DURING_OUTAGE

        # The log has tried to write and failed: the report names the failure and the counts.
        report = poll_until(lambda: queue_report(app), WAIT_SECONDS)
        assert report["status"] == "degraded"
        assert report["components"]["database"] == "degraded"
        database = report["component_details"]["database"]
        assert database["status"] == "degraded" and database["dialect"] == "postgresql"
        assert "question log cannot write" in database["detail"], database
        counts = WAITING.search(database["detail"])
        assert counts is not None
        waiting, dropped = int(counts[1]), int(counts[2])
        assert (waiting, dropped) == (QUEUE_SIZE, DURING_OUTAGE - QUEUE_SIZE)
        assert metric_value(app, "question_log_dropped_total") == dropped
        assert metric_value(app, "question_log_pending") == QUEUE_SIZE

        # Feedback needs the database: 503, for an answer whose row was dropped (the queue is full).
        unrated = ask(app, QUESTIONS[0])
        refused = httpx.post(f"{app.base_url}/v2/feedback", json={"answer_id": unrated, "rating": "wrong"}, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json() == {
            "detail": "Feedback cannot be stored right now; retry shortly",
            "type": "service_unavailable",
            "code": 503,
            "reason": "database_unavailable",
        }
        dropped += 1
        assert metric_value(app, "question_log_dropped_total") == dropped
        asked = BEFORE_OUTAGE + DURING_OUTAGE + 1

        postgres_cluster.start()
        poll_until(lambda: health(app)["components"]["database"] == "healthy", WAIT_SECONDS)
        poll_until(lambda: metric_value(app, "question_log_pending") == 0, WAIT_SECONDS)
        kept = answer_count(url)
        assert kept == BEFORE_OUTAGE + QUEUE_SIZE
        assert kept + dropped == asked
        assert metric_value(app, "question_log_dropped_total") == dropped
        stored = {row["id"] for row in database_rows(url, "SELECT id FROM answers")}
        assert stored == set(before + during[:QUEUE_SIZE])  # the first rows queued are the ones kept
        assert health(app)["status"] == "healthy"

        # Feedback works again, on an answer asked after the recovery.
        fresh = ask(app, QUESTIONS[1])
        accepted = httpx.post(f"{app.base_url}/v2/feedback", json={"answer_id": fresh, "rating": "helpful"}, timeout=30)
        assert accepted.status_code == 200, accepted.text
        assert app.process is not None and app.process.poll() is None and app.pid == pid  # never restarted
    finally:
        app.stop()  # before the fixture removes the cluster


# --- retention ----------------------------------------------------------------------------------------------


async def _insert(url: str, answers: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(AnswerRow), answers)
            await connection.execute(insert(FeedbackRow), feedback)
    finally:
        await engine.dispose()


def dated_answer(created_at: datetime) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "created_at": created_at,
        "transport": "rest",
        "question": "What is a flash loan?",
        "resolved_question": None,
        "top_entry_id": "what-are-flash-loans",
        "confidence": 0.9,
        "outcome": "answered",
        "latency_ms": 1.0,
        "session_hash": None,
        "kb_version": 1,
        "unknown_terms": None,
    }


def dated_feedback(answer_id: str, created_at: datetime) -> dict[str, Any]:
    return {
        "answer_id": answer_id,
        "rater_hash": "",
        "rating": "wrong",
        "comment": None,
        "entry_id": "what-are-flash-loans",
        "created_at": created_at,
        "updated_at": created_at,
    }


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_retention_purge_at_start_up_removes_old_rows_and_their_feedback(
    start_server: Callable[..., ServerProcess],
    server: ServerProcess,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
) -> None:
    if kind == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('retention')}/defi.db"
    first = start_server(DATABASE_URL=url, QUESTION_LOG_RETENTION_DAYS="30")  # creates the schema and the salt
    recent = ask(first, QUESTIONS[0])
    assert (
        httpx.post(f"{first.base_url}/v2/feedback", json={"answer_id": recent, "rating": "helpful"}).status_code == 200
    )
    first.stop()

    now = datetime.now(UTC)
    old = [dated_answer(now - timedelta(days=40)) for _ in range(3)]
    kept = [dated_answer(now - timedelta(days=20))]
    run_blocking(_insert(url, old + kept, [dated_feedback(row["id"], row["created_at"]) for row in old + kept]))
    assert answer_count(url) == 5

    second = start_server(DATABASE_URL=url, QUESTION_LOG_RETENTION_DAYS="30")
    try:
        poll_until(lambda: answer_count(url) == 2, WAIT_SECONDS)
        assert {row["id"] for row in database_rows(url, "SELECT id FROM answers")} == {recent, kept[0]["id"]}
        rated = {row["answer_id"] for row in database_rows(url, "SELECT answer_id FROM feedback")}
        assert rated == {recent, kept[0]["id"]}  # the old answers' feedback went with them
        # The purged ids are now unknown to feedback.
        gone = httpx.post(f"{second.base_url}/v2/feedback", json={"answer_id": old[0]["id"], "rating": "wrong"})
        assert gone.status_code == 404 and gone.json()["reason"] == "answer_not_found", gone.text
    finally:
        second.stop()
