"""Sessions over /v2/ask: continuity, follow-ups, inspection, deletion and expiry."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import ServerProcess


def ask(client: httpx.Client, question: str, session_id: str | None = None) -> dict[str, object]:
    payload: dict[str, object] = {"question": question}
    if session_id is not None:
        payload["session_id"] = session_id
    response = client.post("/v2/ask", json=payload)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    assert response.headers["x-session-id"] == body["session_id"]
    return body


def test_new_session_is_created_and_continued(client: httpx.Client) -> None:
    first = ask(client, "What is Aave?")
    session_id = first["session_id"]
    assert isinstance(session_id, str) and len(session_id) == 32
    second = ask(client, "What is a flash loan?", session_id)
    assert second["session_id"] == session_id
    turns = client.get(f"/v2/sessions/{session_id}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["What is Aave?", "What is a flash loan?"]


def test_follow_up_uses_previous_turn(client: httpx.Client) -> None:
    first = ask(client, "What is Aave?")
    assert first["sources"][0]["id"] == "what-is-aave"
    follow_up = ask(client, "what are its risks?", first["session_id"])
    assert follow_up["sources"][0]["id"] == "aave-risks"
    assert "Aave" in follow_up["answer"]


def test_repeated_follow_up_keeps_its_own_context(client: httpx.Client) -> None:
    """The same follow-up after different openers, twice over: the answer cache must key on the previous turn."""
    for _ in range(2):  # the second round is answered from the answer cache
        for opener, expected in (("What is Aave?", "aave-risks"), ("What is yield farming?", "yield-farming-risks")):
            first = ask(client, opener)
            follow_up = ask(client, "what are its risks?", str(first["session_id"]))
            assert follow_up["sources"][0]["id"] == expected
            turns = client.get(f"/v2/sessions/{first['session_id']}").json()["turns"]
            assert [turn["question"] for turn in turns] == [opener, "what are its risks?"]


def test_follow_up_without_session_has_no_context(client: httpx.Client) -> None:
    response = client.post("/ask", json={"question": "what are its risks?"}).json()
    assert response["session_id"] is None
    assert not response["sources"] or response["sources"][0]["id"] != "aave-risks"


def test_what_about_switches_topic(client: httpx.Client) -> None:
    first = ask(client, "What is Aave?")
    follow_up = ask(client, "what about Compound?", first["session_id"])
    assert follow_up["sources"][0]["id"] == "what-is-compound"


def test_unknown_session_starts_a_fresh_one(client: httpx.Client) -> None:
    body = ask(client, "What is TVL?", "does-not-exist-123")
    assert body["session_id"] != "does-not-exist-123"
    turns = client.get(f"/v2/sessions/{body['session_id']}").json()["turns"]
    assert len(turns) == 1


def test_get_and_delete_session(client: httpx.Client) -> None:
    session_id = ask(client, "What is slippage?")["session_id"]
    session = client.get(f"/v2/sessions/{session_id}").json()
    assert session["session_id"] == session_id
    assert session["expires_at"] > session["last_active"]
    assert session["turns"][0]["processing_stage"] == "response_complete"
    assert client.delete(f"/v2/sessions/{session_id}").status_code == 204
    missing = client.get(f"/v2/sessions/{session_id}")
    assert missing.status_code == 404
    assert missing.json()["reason"] == "session_not_found"
    assert client.delete(f"/v2/sessions/{session_id}").status_code == 404


def test_sessions_expire(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(SESSION_TTL_SECONDS="1", SESSION_CLEANUP_INTERVAL_SECONDS="0.2")
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        session_id = ask(client, "What is Aave?")["session_id"]
        assert client.get(f"/v2/sessions/{session_id}").status_code == 200
        time.sleep(1.6)
        assert client.get(f"/v2/sessions/{session_id}").status_code == 404
        renewed = ask(client, "what are its risks?", session_id)
        assert renewed["session_id"] != session_id
        assert "active_sessions 1.0" in client.get("/metrics").text


def test_max_sessions_evicts_least_recently_used(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(MAX_SESSIONS="2")
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        first = ask(client, "What is Aave?")["session_id"]
        second = ask(client, "What is Uniswap?")["session_id"]
        ask(client, "What is gas?", first)  # first is now the most recent
        ask(client, "What is a DAO?")
        assert client.get(f"/v2/sessions/{first}").status_code == 200
        assert client.get(f"/v2/sessions/{second}").status_code == 404
