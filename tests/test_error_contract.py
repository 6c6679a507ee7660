"""Every error documented in docs/api.md, walked: each row of the error table is produced against a real
server (or named with the test that produces it where that needs a broken dependency), and every body is
`{"detail", "type", "code", "reason"}` with `code` the HTTP status as an integer.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess

ADMIN_TOKEN = "walk-" + "e" * 28
# Rows whose condition needs a failing dependency: the test that produces each, by file and name.
ELSEWHERE = {
    "agent_unavailable": ("tests/test_faults.py", "test_embedder_failure_gives_503_and_stream_error"),
    "session_store_unavailable": ("tests/test_redis_scaleout.py", "test_redis_outage_and_recovery_without_restart"),
    "internal_error": ("tests/test_readiness_and_errors.py", "test_unexpected_error_is_500_with_request_id"),
    "connection_limit": ("tests/test_connection_limits.py", "test_busy_server_still_answers_health_and_sheds"),
    "feedback_disabled": ("tests/test_feedback.py", "test_feedback_refused_when_the_question_log_is_off"),
    "database_unavailable": ("tests/test_database_outage.py", "test_database_outage_keeps_answering_and_recovers"),
    "forbidden": ("tests/test_error_contract.py", "test_knowledge_base_changes_need_an_admin_token"),
}


def documented_errors() -> list[tuple[int, str, str]]:
    """(status, type, reason) for every row of docs/api.md's error table (a row may list several reasons)."""
    rows: list[tuple[int, str, str]] = []
    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| Status (`code`) |") :]
    for line in table.splitlines()[2:]:
        if not line.startswith("| "):
            break
        status, kind, reasons = (cell.strip() for cell in line.split("|")[1:4])
        rows.extend((int(status), kind.strip("`"), reason) for reason in re.findall(r"`([a-z_]+)`", reasons))
    return rows


def raw_request(port: int, data: bytes, *, pause: float = 0.0) -> tuple[int, dict[str, object]]:
    """Send raw bytes, return the status and the JSON body of the answer (the server closes afterwards)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            for piece in [data[i : i + 1] for i in range(len(data))] if pause else [data] if data else []:
                sock.sendall(piece)
                time.sleep(pause)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def strict(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """Tokens, small limits and a short session wait, so every row can be produced quickly."""
    return start_server(
        ADMIN_TOKEN=ADMIN_TOKEN,
        ALLOWED_HOSTS="localhost,127.0.0.1",
        RATE_LIMIT_REQUESTS_PER_MINUTE="40",
        MAX_CONNECTIONS_PER_CLIENT="3",
        MAX_REQUEST_HEADER_BYTES="4096",
        REQUEST_HEADER_TIMEOUT_SECONDS="1",
        SESSION_WAIT_SECONDS="0.2",
        STREAM_WORD_DELAY_MS="25",
    )


def produce(server: ServerProcess, reason: str) -> tuple[int, dict[str, object]]:
    """Make the server answer with `reason`; the status and the body."""
    base, port = server.base_url, server.port
    post = {"url": f"{base}/v2/ask", "timeout": 30}
    feedback = {"url": f"{base}/v2/feedback", "timeout": 30}
    calls: dict[str, Callable[[], httpx.Response]] = {
        "invalid_host": lambda: httpx.get(f"{base}/metrics", headers={"Host": "evil.example"}),
        "unauthorized": lambda: httpx.get(f"{base}/performance-stats"),
        "not_found": lambda: httpx.get(f"{base}/no-such-route"),
        "session_not_found": lambda: httpx.get(f"{base}/v2/sessions/{'0' * 32}"),
        "method_not_allowed": lambda: httpx.put(f"{base}/ask"),
        "payload_too_large": lambda: httpx.post(f"{base}/ask", content=b"x" * 100_000),
        "question_empty": lambda: httpx.post(**post, json={"question": "  "}),
        "question_not_string": lambda: httpx.post(**post, json={"question": 7}),
        "question_too_long": lambda: httpx.post(**post, json={"question": "a" * 1001}),
        "question_invalid_characters": lambda: httpx.post(**post, json={"question": "a\x00b"}),
        "missing_field": lambda: httpx.post(**post, json={}),
        "invalid_json": lambda: httpx.post(**post, content=b"{", headers={"content-type": "application/json"}),
        "invalid_body": lambda: httpx.post(**post, json=[1]),
        "invalid_type": lambda: httpx.post(**post, json={"question": "hi", "session_id": 7}),
        "invalid_request": lambda: httpx.post(**post, json={"question": "hi", "session_id": "bad id!"}),
        "answer_not_found": lambda: httpx.post(**feedback, json={"answer_id": "0" * 32, "rating": "helpful"}),
        "answer_id_invalid": lambda: httpx.post(**feedback, json={"answer_id": "no such id", "rating": "helpful"}),
        "rating_invalid": lambda: httpx.post(**feedback, json={"answer_id": "0" * 32, "rating": "meh"}),
        "comment_too_long": lambda: httpx.post(
            **feedback, json={"answer_id": "0" * 32, "rating": "wrong", "comment": "x" * 1001}
        ),
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    kb = f"{base}/admin/knowledge-base"
    made_up = {
        "category": "tests",
        "question": "What is the Quexlor walk token?",
        "alternatives": ["quexlor walk token", "explain quexlor walk"],
        "answer": "A made-up token the error walk adds to reach the no_change row.",
    }
    calls.update(
        {
            "dataset_invalid": lambda: httpx.post(kb, headers=admin, json=[{"id": "x"}], timeout=60),
            "entry_invalid": lambda: httpx.put(f"{kb}/entries/x", headers=admin, json={"question": "hi"}),
            "id_mismatch": lambda: httpx.put(f"{kb}/entries/x", headers=admin, json={**made_up, "id": "y"}),
            "entry_not_found": lambda: httpx.delete(f"{kb}/entries/no-such-entry", headers=admin, timeout=60),
            "version_not_found": lambda: httpx.post(f"{kb}/rollback/999", headers=admin, timeout=60),
            "eval_regression": lambda: httpx.post(
                kb, headers=admin, params={"require_eval": "true"}, json=[{**made_up, "id": "quexlor"}], timeout=300
            ),
        }
    )
    if reason == "no_change":
        for _ in range(2):  # the second identical PUT changes nothing
            response = httpx.put(f"{kb}/entries/quexlor-walk", headers=admin, json=made_up, timeout=120)
        return response.status_code, response.json()
    if reason in calls:
        response = calls[reason]()
        return response.status_code, response.json()
    if reason == "bad_request":
        return raw_request(port, b"POST /ask HTTP/1.1\r\nHost: localhost\r\nContent-Length: ten\r\n\r\n")
    if reason == "request_headers_too_large":
        return raw_request(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    if reason == "request_header_timeout":
        return raw_request(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: abcdefghij", pause=0.2)
    if reason == "too_many_connections":
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)
            return raw_request(port, b"")  # refused at connect, before anything is read
        finally:
            for sock in held:
                sock.close()
    if reason == "session_busy":
        session_id = httpx.post(**post, json={"question": "What is Aave?"}).json()["session_id"]
        with httpx.Client(base_url=base, timeout=30) as http:
            payload = {"question": "What is a flash loan?", "session_id": session_id}
            with http.stream("POST", "/v2/ask-stream", json=payload) as stream:
                lines = stream.iter_lines()
                while not next(lines).startswith("data:"):
                    pass
                busy = http.post("/v2/ask", json={"question": "and its risks?", "session_id": session_id})
                list(lines)
        return busy.status_code, busy.json()
    if reason == "rate_limited":
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(60):
                response = http.post("/ask", json={"question": "What is Aave?"})
                if response.status_code == 429:
                    return response.status_code, response.json()
    raise AssertionError(f"no recipe for the documented reason {reason!r}")


def test_the_error_table_is_complete_and_every_row_is_real(strict: ServerProcess) -> None:
    rows = documented_errors()
    assert len(rows) >= 25 and len({reason for _, _, reason in rows}) == len(rows)
    # Produced last: it spends the client's budget, and it must not starve the other rows.
    ordered = sorted(rows, key=lambda row: row[2] == "rate_limited")
    for status, kind, reason in ordered:
        if reason in ELSEWHERE:
            path, name = ELSEWHERE[reason]
            assert f"def {name}" in Path(ROOT / path).read_text(), (reason, path, name)
            continue
        got, body = produce(strict, reason)
        assert got == status, (reason, got, body)
        # Refused datasets and entries say what is wrong (`errors`), an eval regression by how much (`eval`).
        assert set(body) - {"detail", "type", "code", "reason"} <= {"errors", "eval"}, body
        assert {key: body[key] for key in ("detail", "type", "code", "reason")} == {
            "detail": body["detail"],
            "type": kind,
            "code": status,
            "reason": reason,
        }, body
        assert isinstance(body["detail"], str) and body["detail"]
    assert httpx.get(f"{strict.base_url}/health", timeout=10).status_code == 200  # and it keeps serving


def test_knowledge_base_changes_need_an_admin_token(server: ServerProcess) -> None:
    """The default server has no ADMIN_TOKEN: it may not change its knowledge base over the API."""
    response = httpx.delete(f"{server.base_url}/admin/knowledge-base/entries/what-is-aave", timeout=30)
    assert response.status_code == 403
    assert response.json() == {
        "detail": "Set ADMIN_TOKEN to change the knowledge base over the API",
        "type": "permission_error",
        "code": 403,
        "reason": "forbidden",
    }
    assert httpx.get(f"{server.base_url}/admin/knowledge-base", timeout=30).json()["version"] == 1
