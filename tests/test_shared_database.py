"""Two replicas on one PostgreSQL database and one Redis: one question log, one salt, feedback from anywhere.

Replicas A and B (two `python main.py` processes) are started at the same moment, so their start-up
migrations race for the advisory lock; both must come up, with the schema migrated once and one salt.
A conversation started on A continues on B (Redis), both replicas' rows land in the shared `answers` table
with the same session hash, and an answer given by A can be rated through B.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory

from infrastructure.database import alembic_config
from tests.conftest import ServerProcess, database_rows, log_records, metric_value, poll_until
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")

SALT_KEY = "session_hash_salt"
WAIT_SECONDS = 20.0


def ask(server: ServerProcess, question: str, session_id: str | None = None) -> dict[str, Any]:
    """A conversation question (`/v2/ask`, a new session when `session_id` is None)."""
    payload = {"question": question} if session_id is None else {"question": question, "session_id": session_id}
    response = httpx.post(f"{server.base_url}/v2/ask", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ask_stateless(server: ServerProcess, question: str) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def rate(server: ServerProcess, **payload: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v2/feedback", json=payload, timeout=30)


def answers(url: str, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """The `answers` rows with these ids, by id, once every one of them is there (else None)."""
    found = {row["id"]: row for row in database_rows(url, "SELECT id, transport, session_hash FROM answers")}
    return {answer_id: found[answer_id] for answer_id in ids} if set(ids) <= set(found) else None


def test_two_replicas_share_one_database(
    start_server: Callable[..., ServerProcess], server: ServerProcess, postgres_url: str, redis_server: RedisServer
) -> None:
    # `server` first: the session's index exists, so both replicas start warm and at the same moment.
    env = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_server.url}
    with ThreadPoolExecutor(max_workers=2) as pool:
        a, b = (future.result() for future in [pool.submit(start_server, **env) for _ in range(2)])
    try:
        # Both came up on the fresh database: migrated once to the newest revision, one salt, no error logged.
        for replica in (a, b):
            errors = [record for record in log_records(replica) if record.get("level") in ("error", "critical")]
            assert errors == [], errors
            assert "Traceback" not in replica.log()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert database_rows(postgres_url, "SELECT version_num FROM alembic_version") == [{"version_num": head}]
        [salt] = database_rows(postgres_url, "SELECT key, value FROM service_values WHERE key = :key", key=SALT_KEY)

        first = ask(a, "What is Aave?")  # a conversation started on A ...
        session_id = first["session_id"]
        follow_up = ask(b, "what are its risks?", session_id)  # ... continued on B (the session is in Redis)
        assert follow_up["session_id"] == session_id
        on_a, on_b = ask_stateless(a, "What is a flash loan?"), ask_stateless(b, "What is MEV?")
        ids = [first["answer_id"], follow_up["answer_id"], on_a["answer_id"], on_b["answer_id"]]
        assert len(set(ids)) == 4

        # Both replicas' rows are in the one table; the session hashes alike on both (one salt).
        rows = poll_until(lambda: answers(postgres_url, ids), WAIT_SECONDS)
        expected_hash = hashlib.sha256(f"{salt['value']}:{session_id}".encode()).hexdigest()
        assert rows[first["answer_id"]]["session_hash"] == rows[follow_up["answer_id"]]["session_hash"] == expected_hash
        assert rows[on_a["answer_id"]]["session_hash"] is None and rows[on_b["answer_id"]]["session_hash"] is None
        assert {row["transport"] for row in rows.values()} == {"rest"}
        assert metric_value(a, "question_log_written_total") == 2
        assert metric_value(b, "question_log_written_total") == 2

        # A's answer rated through B, then re-rated through A by the same session: one row, replaced.
        response = rate(b, answer_id=first["answer_id"], rating="helpful", session_id=session_id)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "recorded", "answer_id": first["answer_id"], "rating": "helpful"}
        response = rate(a, answer_id=first["answer_id"], rating="wrong", comment="stale", session_id=session_id)
        assert response.status_code == 200, response.text
        stored = database_rows(
            postgres_url,
            "SELECT rater_hash, rating, comment, entry_id FROM feedback WHERE answer_id = :id",
            id=first["answer_id"],
        )
        assert stored == [
            {"rater_hash": expected_hash, "rating": "wrong", "comment": "stale", "entry_id": first["sources"][0]["id"]}
        ]
        # B's answer rated through A, with no session given: the answer's own session is the rater.
        response = rate(a, answer_id=follow_up["answer_id"], rating="wrong")
        assert response.status_code == 200, response.text
        [rater] = database_rows(
            postgres_url, "SELECT rater_hash FROM feedback WHERE answer_id = :id", id=follow_up["answer_id"]
        )
        assert rater == {"rater_hash": expected_hash}
        assert metric_value(a, "answer_feedback_total", rating="wrong") == 2
        assert metric_value(b, "answer_feedback_total", rating="helpful") == 1

        # The insights on either replica read every row (PostgreSQL's per-hour grouping included).
        for replica in (a, b):
            insights = httpx.get(f"{replica.base_url}/admin/insights", params={"days": 1}, timeout=60).json()
            assert insights["totals"]["questions"] == 4 and insights["totals"]["answered"] == 4
            assert sum(row["questions"] for row in insights["answer_rate"]["rows"]) == 4
            disputed = {item["entry_id"]: item["wrong"] for item in insights["disputed_entries"]}
            assert disputed[first["sources"][0]["id"]] == 1
    finally:
        a.stop()  # before `postgres_url` drops the database
        b.stop()
