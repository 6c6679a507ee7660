"""The live knowledge base against real servers: change, validate and roll back entries without a restart.

Replicas A and B share one SQLite database and one Redis (pub/sub notifications); C joins the same database
later without Redis (it follows by polling) and with a small ADMIN_MAX_BODY_BYTES; D starts last, without
ADMIN_TOKEN, from a changed dataset file. Every server reads a module-private copy of the dataset, so an edit
of data/knowledge_base.json elsewhere cannot change what these tests expect.

The only time limit asserted is the issue's requirement: a change made on one replica is answered by every
replica within `CONVERGE_SECONDS` of the change's response.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from tests.conftest import ROOT, ServerProcess, database_rows, metric_value, poll_until
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")

TOKEN = "live-kb-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "/admin/knowledge-base"
CONVERGE_SECONDS = 5.0  # the issue's requirement, measured from the change's response
CHANGE_TIMEOUT = 300.0  # an HTTP timeout for changes on a loaded machine, never asserted
REFIT_WAIT = 600.0  # how long to wait for the background full fit before giving up
ERROR_KEYS = {"detail", "type", "code", "reason"}

ENTRY_ID = "quorvex-token"
ENTRY_QUESTION = "What is the Quorvex token?"
ENTRY_PHRASE = "exists only in this test suite"
OTHER_QUESTION = "What is impermanent loss?"

Json = dict[str, Any]


def topic(marker: str) -> Json:
    """A made-up entry (no real token is called Quorvex) whose answer carries `marker` as one word."""
    return {
        "category": "tokens",
        "question": ENTRY_QUESTION,
        "alternatives": ["what is quorvex", "quorvex qvx explained", "how does the quorvex token work"],
        "subjects": ["Quorvex"],
        "answer": f"Quorvex (QVX) is a fictional token that {ENTRY_PHRASE}; answer {marker} here.",
    }


# --- fixtures ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """Replicas A and B on one database and one Redis, and what a later replica needs to join them."""

    a: ServerProcess
    b: ServerProcess
    database_url: str
    env: dict[str, str]
    dataset: Path


def dataset_copy(directory: Path, content: bytes | None = None) -> Path:
    """The dataset (or `content`) with the labelled questions beside it, as DATASET_PATH expects."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "data" / "eval_questions.json", directory / "eval_questions.json")
    path = directory / "knowledge_base.json"
    path.write_bytes(content if content is not None else (ROOT / "data" / "knowledge_base.json").read_bytes())
    return path


@pytest.fixture(scope="module")
def cluster(
    start_server: Callable[..., ServerProcess], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Cluster:
    directory = tmp_path_factory.mktemp("live-kb")
    dataset = dataset_copy(directory / "seed")
    database_url = f"sqlite:///{directory}/shared.db"
    # No background full refit while the module runs: each would take a core for tens of seconds in the middle
    # of other tests; test_a_small_change_is_refitted_in_the_background checks that path on its own server.
    env = {
        "ADMIN_TOKEN": TOKEN,
        "DATABASE_URL": database_url,
        "DATASET_PATH": str(dataset),
        "KB_REFIT_DELAY_SECONDS": "3600",
    }
    # One after the other: A writes the index to the session's cache, so B starts warm.
    a = start_server(**env, REDIS_URL=redis_server.url)
    b = start_server(**env, REDIS_URL=redis_server.url)
    return Cluster(a, b, database_url, env, dataset)


# --- helpers -------------------------------------------------------------------------------------------------


def ask(server: ServerProcess, question: str = ENTRY_QUESTION) -> Json:
    response = httpx.post(f"{server.base_url}/ask", json={"question": question}, timeout=60)
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


def answers_with(marker: str, version: int | None = None) -> Callable[[Json], bool]:
    """The answer is the entry's, with `marker` (and given by `version`, when named)."""

    def check(body: Json) -> bool:
        return (
            body["processing_stage"] == "response_complete"
            and body["sources"][0]["id"] == ENTRY_ID
            and marker in body["answer"].split()
            and (version is None or body["kb_version"] == version)
        )

    return check


def declined(version: int | None = None) -> Callable[[Json], bool]:
    """The entry is gone: the question is declined or answered by another entry."""

    def check(body: Json) -> bool:
        gone = body["processing_stage"] == "no_match" or body["sources"][0]["id"] != ENTRY_ID
        return gone and ENTRY_PHRASE not in body["answer"] and (version is None or body["kb_version"] == version)

    return check


def answered_within(server: ServerProcess, check: Callable[[Json], bool], since: float) -> Json:
    """The first answer passing `check`, asked no later than CONVERGE_SECONDS after `since`; else fail."""
    last: Json = {}
    while time.monotonic() - since <= CONVERGE_SECONDS:
        last = ask(server)
        if check(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{server.base_url} did not converge within {CONVERGE_SECONDS}s; last answer {last}")


def change(method: str, server: ServerProcess, path: str, body: Any = None, expected: int = 200) -> Json:
    """A change through the admin API; its JSON body."""
    kwargs: Json = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = httpx.request(method, f"{server.base_url}{BASE}{path}", headers=AUTH, timeout=CHANGE_TIMEOUT, **kwargs)
    assert response.status_code == expected, response.text
    result: Json = response.json()
    if expected == 200:
        assert result["status"] == "live"
    return result


def status(server: ServerProcess, headers: dict[str, str] | None = None) -> Json:
    response = httpx.get(f"{server.base_url}{BASE}", headers=AUTH if headers is None else headers, timeout=30)
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


def versions(server: ServerProcess, headers: dict[str, str] | None = None) -> list[Json]:
    response = httpx.get(f"{server.base_url}{BASE}/versions", headers=AUTH if headers is None else headers, timeout=30)
    assert response.status_code == 200, response.text
    found: list[Json] = response.json()["versions"]
    return found


def health_version(server: ServerProcess) -> int:
    version: int = httpx.get(f"{server.base_url}/health", timeout=30).json()["kb_version"]
    return version


def stored_document(cluster: Cluster, version: int) -> bytes:
    """The dataset of one version, as the database holds it."""
    [row] = database_rows(
        cluster.database_url, "SELECT document FROM knowledge_base_versions WHERE version = :v", v=version
    )
    document: str = row["document"]
    return document.encode()


def check_error(response: httpx.Response, status_code: int, reason: str | None = None) -> Json:
    """The response is `status_code` in the error format (with `reason`, when named)."""
    assert response.status_code == status_code, response.text
    body: Json = response.json()
    assert set(body) >= ERROR_KEYS, body
    assert body["code"] == status_code and isinstance(body["detail"], str) and body["detail"], body
    if reason is not None:
        assert body["reason"] == reason, body
    return body


def wait_refitted(server: ServerProcess, version: int) -> None:
    """Wait until `version` is live with its full fit done (the provisional classifier replaced, the index saved)."""

    def refitted() -> bool:
        live = status(server)
        return live["version"] == version and not live["provisional"]

    poll_until(refitted, REFIT_WAIT, 0.5)


# --- 1. add, change, delete, roll back: on this replica at once, on the other within 5 s -------------------------


def test_entry_lifecycle_reaches_every_replica(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    before = status(a)["version"]
    assert declined()(ask(a)) and declined()(ask(b))

    added = change("PUT", a, f"/entries/{ENTRY_ID}", topic("first-text"))
    since = time.monotonic()
    assert added["change"] == "put_entry" and added["detail"] == ENTRY_ID and added["version"] > before
    assert answers_with("first-text", added["version"])(ask(a))  # the very next question on A
    answered_within(b, answers_with("first-text", added["version"]), since)
    assert health_version(a) == health_version(b) == added["version"]
    assert metric_value(a, "knowledge_base_version") == added["version"]

    edited = change("PUT", a, f"/entries/{ENTRY_ID}", topic("second-text"))
    since = time.monotonic()
    assert edited["entries"] == added["entries"]  # replaced in place, not added twice
    assert answers_with("second-text", edited["version"])(ask(a))
    answered_within(b, answers_with("second-text", edited["version"]), since)

    deleted = change("DELETE", a, f"/entries/{ENTRY_ID}")
    since = time.monotonic()
    assert deleted["change"] == "delete_entry" and deleted["entries"] == added["entries"] - 1
    assert declined(deleted["version"])(ask(a))
    answered_within(b, declined(deleted["version"]), since)

    # Roll back to the first text: made on B this time, so A follows through Redis.
    restored = change("POST", b, f"/rollback/{added['version']}")
    since = time.monotonic()
    assert restored["checksum"] == added["checksum"] and restored["detail"] == f"to v{added['version']}"
    assert answers_with("first-text", restored["version"])(ask(b))
    answered_within(a, answers_with("first-text", restored["version"]), since)

    original = change("POST", a, f"/rollback/{before}")
    since = time.monotonic()
    assert declined(original["version"])(ask(a))
    answered_within(b, declined(original["version"]), since)
    assert status(a)["checksum"] == status(b)["checksum"] == original["checksum"]

    history = versions(a)[:6]
    assert [(v["version"], v["change"], v["detail"]) for v in history] == [
        (original["version"], "rollback", f"to v{before}"),
        (restored["version"], "rollback", f"to v{added['version']}"),
        (deleted["version"], "delete_entry", ENTRY_ID),
        (edited["version"], "put_entry", ENTRY_ID),
        (added["version"], "put_entry", ENTRY_ID),
        (before, history[5]["change"], history[5]["detail"]),
    ]
    assert history[0]["checksum"] == history[5]["checksum"]
    assert [v["version"] for v in history] == sorted((v["version"] for v in history), reverse=True)


# --- 2. a bounded load (REST + SSE + WebSocket) on both replicas through three swaps ----------------------------


@dataclass
class Outcome:
    """One question of the load: its transport, whether it ended well and what answered it."""

    transport: str
    question: str
    ok: bool
    kb_version: int | None = None
    text: str = ""
    top_id: str | None = None
    problem: str = ""


async def rest_once(http: httpx.AsyncClient, question: str) -> Outcome:
    response = await http.post("/ask", json={"question": question})
    if response.status_code != 200:
        return Outcome("rest", question, False, problem=f"{response.status_code} {response.text}")
    body = response.json()
    top = body["sources"][0]["id"] if body["sources"] else None
    return Outcome("rest", question, True, body.get("kb_version"), body["answer"], top)


async def sse_once(http: httpx.AsyncClient, question: str) -> Outcome:
    events: list[Json] = []
    async with aconnect_sse(http, "POST", "/ask-stream", json={"question": question}) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            return Outcome("sse", question, False, problem=f"{source.response.status_code} {source.response.text}")
        async for sse in source.aiter_sse():
            events.append(json.loads(sse.data))
    return stream_outcome("sse", question, events)


async def ws_once(url: str, question: str) -> Outcome:
    events: list[Json] = []
    async with connect(url, open_timeout=30, close_timeout=2) as ws:
        await ws.send(json.dumps({"type": "question", "question": question}))
        while not events or events[-1]["type"] not in {"complete", "error"}:
            message = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if message["type"] not in {"status", "heartbeat"}:
                events.append(message)
    return stream_outcome("ws", question, events)


def stream_outcome(transport: str, question: str, events: list[Json]) -> Outcome:
    """A stream ends well with metadata, words and `complete` (SSE and WebSocket alike)."""
    if not events or events[0]["type"] != "metadata" or events[-1]["type"] != "complete":
        return Outcome(transport, question, False, problem=f"stream ended {events[-1:] or 'empty'}")
    words = [event["content"] for event in events[1:-1] if event["type"] == "word" and not event.get("reference")]
    sources = events[0]["sources"]
    top = sources[0]["id"] if sources else None
    return Outcome(transport, question, True, events[-1].get("kb_version"), " ".join(words), top)


async def load_client(
    index: int, servers: list[ServerProcess], stop: asyncio.Event, outcomes: list[Outcome], cap: int
) -> None:
    """Ask questions in turn on the replicas until `stop` (then three more), at most `cap`."""
    transport = ("rest", "sse", "ws")[index % 3]
    async with httpx.AsyncClient(timeout=60) as http:
        asked = after_stop = 0
        while asked < cap and after_stop < 3:
            server = servers[asked % len(servers)]
            question = (ENTRY_QUESTION, OTHER_QUESTION)[(asked // 2) % 2]
            http.base_url = httpx.URL(server.base_url)
            try:
                if transport == "rest":
                    outcome = await rest_once(http, question)
                elif transport == "sse":
                    outcome = await sse_once(http, question)
                else:
                    outcome = await ws_once(f"{server.ws_url}/ws/ask", question)
            except Exception as error:  # a failure of any kind is an error of the load
                outcome = Outcome(transport, question, False, problem=f"{type(error).__name__}: {error}")
            outcomes.append(outcome)
            asked += 1
            after_stop += stop.is_set()


async def load_through_changes(cluster: Cluster, markers: list[str]) -> tuple[list[Outcome], dict[int, str]]:
    """Three clients (REST, SSE, WebSocket) on both replicas while the entry's answer changes once per marker."""
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    servers = [cluster.a, cluster.b]
    clients = [asyncio.create_task(load_client(i, servers, stop, outcomes, cap=400)) for i in range(3)]
    texts: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=cluster.a.base_url, headers=AUTH, timeout=CHANGE_TIMEOUT) as admin:
        for marker in markers:
            while len(outcomes) < 3 * (len(texts) + 1) and not all(client.done() for client in clients):
                await asyncio.sleep(0.05)  # some answers before and between the swaps
            response = await admin.put(f"{BASE}/entries/{ENTRY_ID}", json=topic(marker))
            assert response.status_code == 200, response.text
            texts[response.json()["version"]] = marker
    stop.set()
    await asyncio.gather(*clients)
    return outcomes, texts


def test_load_through_swaps_has_no_errors_and_consistent_versions(cluster: Cluster) -> None:
    start = change("PUT", cluster.a, f"/entries/{ENTRY_ID}", topic("load-zero"))
    answered_within(cluster.b, answers_with("load-zero", start["version"]), time.monotonic())

    outcomes, texts = asyncio.run(load_through_changes(cluster, ["load-one", "load-two", "load-three"]))
    texts[start["version"]] = "load-zero"

    failures = [outcome for outcome in outcomes if not outcome.ok]
    assert failures == [], failures
    assert {outcome.transport for outcome in outcomes} == {"rest", "sse", "ws"}
    existing = {v["version"] for v in versions(cluster.a)}
    assert {outcome.kb_version for outcome in outcomes} <= existing
    entry_answers = [outcome for outcome in outcomes if outcome.question == ENTRY_QUESTION]
    for outcome in entry_answers:  # the text is the one of the version that says it answered
        assert outcome.kb_version in texts and outcome.top_id == ENTRY_ID, outcome
        assert texts[outcome.kb_version] in outcome.text.split(), (outcome, texts)
    seen = {outcome.kb_version for outcome in entry_answers}
    assert start["version"] in seen and max(texts) in seen, (seen, texts)  # the load spanned the swaps
    assert all(outcome.top_id != ENTRY_ID for outcome in outcomes if outcome.question == OTHER_QUESTION)


# --- 3. an invalid dataset is refused with errors per entry; validate changes nothing ---------------------------


def seed_entries(cluster: Cluster) -> list[Json]:
    entries: list[Json] = json.loads(cluster.dataset.read_bytes())
    return entries


def test_invalid_dataset_is_refused_and_validate_reports_without_changing(cluster: Cluster) -> None:
    a = cluster.a
    entries = seed_entries(cluster)
    ids = [entry["id"] for entry in entries[:5]]
    entries[1]["id"] = ids[0]  # a duplicate id
    entries[2]["answer"] = ""  # an empty answer
    entries[3]["colour"] = "blue"  # an unknown key
    entries[4]["question"] = "What is " + "very " * 80 + "long?"  # over MAX_QUESTION_CHARS (300)
    invalid = json.dumps(entries).encode()
    live, history = status(a), versions(a)

    refused = check_error(
        httpx.post(f"{a.base_url}{BASE}", content=invalid, headers=AUTH, timeout=CHANGE_TIMEOUT), 422, "dataset_invalid"
    )
    named = {(error["entry"], error["field"]) for error in refused["errors"]}
    assert named == {(ids[0], "id"), (ids[2], "answer"), (ids[3], "colour"), (ids[4], "question")}, refused
    assert all(error["message"] for error in refused["errors"])
    after = status(a)
    assert [after[key] for key in ("version", "checksum", "entries")] == [
        live[key] for key in ("version", "checksum", "entries")
    ]
    assert versions(a) == history

    response = httpx.post(f"{a.base_url}{BASE}/validate", content=invalid, headers=AUTH, timeout=CHANGE_TIMEOUT)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["valid"] is False and report["errors"] == refused["errors"], report

    # A good dataset: the live one with one answer changed.
    proposed = json.loads(stored_document(cluster, live["version"]))
    target = proposed[0]["id"]
    proposed[0]["answer"] += " This sentence was added by a validation that changes nothing."
    response = httpx.post(
        f"{a.base_url}{BASE}/validate", content=json.dumps(proposed).encode(), headers=AUTH, timeout=CHANGE_TIMEOUT
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["valid"] is True and report["errors"] == [], report
    assert report["diff"] == {"added": [], "changed": [target], "removed": []}
    for side in ("live", "proposed"):
        figures = report["eval"][side]
        assert all(0.0 <= figures[key] <= 1.0 for key in ("hit@1", "hit@3", "decline_accuracy")), report["eval"]
    assert status(a)["checksum"] == live["checksum"] and versions(a) == history


# --- 4. a replace of the whole dataset embeds only what the live index lacks ------------------------------------


def test_replace_embeds_only_the_changed_phrasing(cluster: Cluster) -> None:
    a = cluster.a
    entries = seed_entries(cluster)  # the live version may hold the test entry; the replace removes it
    target = entries[1]
    target["answer"] += " This sentence was added by the replace test."
    texts_before = metric_value(a, "embedding_batch_size_sum")
    calls_before = metric_value(a, "embedding_batch_size_count")

    replaced = change("POST", a, "", json.dumps(entries).encode())

    assert replaced["change"] == "replace" and replaced["entries"] == len(entries)
    assert metric_value(a, "embedding_batch_size_sum") - texts_before == 1  # the changed answer, nothing else
    assert metric_value(a, "embedding_batch_size_count") - calls_before == 1
    body = ask(a, target["question"])
    assert body["sources"][0]["id"] == target["id"] and body["kb_version"] == replaced["version"], body
    assert "added by the replace test." in body["answer"], body
    assert declined(replaced["version"])(ask(a))


# --- 5. authentication and bad input, all in the error format ---------------------------------------------------


def test_admin_requests_need_the_token_and_valid_input(cluster: Cluster) -> None:
    a = cluster.a
    history = versions(a)
    url = f"{a.base_url}{BASE}"
    requests: list[tuple[str, str, Json]] = [
        ("GET", "", {}),
        ("GET", "/versions", {}),
        ("POST", "/validate", {"content": b"[]"}),
        ("POST", "", {"content": b"[]"}),
        ("PUT", f"/entries/{ENTRY_ID}", {"json": topic("no-token")}),
        ("DELETE", f"/entries/{ENTRY_ID}", {}),
        ("POST", f"/rollback/{history[-1]['version']}", {}),
    ]
    for method, path, kwargs in requests:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
            response = httpx.request(method, f"{url}{path}", headers=headers, timeout=30, **kwargs)
            check_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")

    def refused(method: str, path: str, status_code: int, reason: str, **kwargs: Any) -> Json:
        response = httpx.request(method, f"{url}{path}", headers=AUTH, timeout=CHANGE_TIMEOUT, **kwargs)
        return check_error(response, status_code, reason)

    malformed = b'{"category": "tokens", "question": '
    refused("PUT", f"/entries/{ENTRY_ID}", 422, "invalid_json", content=malformed)
    body = refused("POST", "", 422, "dataset_invalid", content=malformed)
    assert [(error["entry"], error["field"]) for error in body["errors"]] == [("dataset", "json")]
    refused("PUT", f"/entries/{ENTRY_ID}", 422, "invalid_body", json=[topic("a-list")])
    refused("PUT", f"/entries/{ENTRY_ID}", 422, "id_mismatch", json={**topic("mismatch"), "id": "another-id"})
    body = refused("PUT", f"/entries/{ENTRY_ID}", 422, "entry_invalid", json={**topic("short"), "answer": "Too short."})
    assert [(error["entry"], error["field"]) for error in body["errors"]] == [(ENTRY_ID, "answer")]
    refused("DELETE", "/entries/no-such-entry-anywhere", 404, "entry_not_found")
    refused("POST", "/rollback/999999", 404, "version_not_found")
    assert versions(a) == history  # nothing refused became a version


# --- 6. restarts: a new replica serves the newest version and follows by polling; a changed seed file -----------


@pytest.fixture(scope="module")
def late_replica(cluster: Cluster, start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, Json]:
    """Replica C, started on the shared database after a change, without Redis, with the smallest body limit."""
    latest = change("PUT", cluster.a, f"/entries/{ENTRY_ID}", topic("before-restart"))
    return start_server(**cluster.env, ADMIN_MAX_BODY_BYTES="16384"), latest


def test_restarted_replica_serves_the_newest_version_and_follows_by_polling(
    cluster: Cluster, late_replica: tuple[ServerProcess, Json]
) -> None:
    c, latest = late_replica
    assert versions(c)[0] == versions(cluster.a)[0]  # no new seed version: the file did not change
    assert health_version(c) == latest["version"]
    assert answers_with("before-restart", latest["version"])(ask(c))

    after = change("PUT", cluster.a, f"/entries/{ENTRY_ID}", topic("after-restart"))
    since = time.monotonic()
    answered_within(c, answers_with("after-restart", after["version"]), since)  # C has no Redis: it polls
    answered_within(cluster.b, answers_with("after-restart", after["version"]), since)


def test_body_over_the_admin_limit_is_refused(cluster: Cluster, late_replica: tuple[ServerProcess, Json]) -> None:
    c, _ = late_replica
    history = versions(c)
    oversized = json.dumps(seed_entries(cluster)[:40]).encode()
    assert len(oversized) > 16384
    for path in ("", "/validate"):
        response = httpx.post(f"{c.base_url}{BASE}{path}", content=oversized, headers=AUTH, timeout=30)
        check_error(response, 413)
    entry = {**topic("oversized"), "answer": "Quorvex " * 2500}  # over 16 KiB in one entry
    response = httpx.put(f"{c.base_url}{BASE}/entries/{ENTRY_ID}", json=entry, headers=AUTH, timeout=30)
    check_error(response, 413)
    assert versions(c) == history


def test_changed_seed_file_becomes_a_new_version(
    cluster: Cluster,
    late_replica: tuple[ServerProcess, Json],
    start_server: Callable[..., ServerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    a, (c, _) = cluster.a, late_replica
    entries = seed_entries(cluster)
    target = entries[2]
    target["answer"] += " This sentence was added to the seed file."
    replaced = change("POST", a, "", json.dumps(entries).encode())
    edited = stored_document(cluster, replaced["version"])  # the canonical bytes
    newest = change("PUT", a, f"/entries/{ENTRY_ID}", topic("newest-before-seed"))  # the file is not the newest

    path = dataset_copy(tmp_path_factory.mktemp("edited-seed"), edited)
    d = start_server(DATABASE_URL=cluster.database_url, DATASET_PATH=str(path))  # no ADMIN_TOKEN
    since = time.monotonic()

    seed = versions(d, headers={})[0]  # reads are open without ADMIN_TOKEN
    assert seed["version"] > newest["version"] and seed["change"] == "seed", seed
    assert seed["detail"] == str(path) and seed["checksum"] == replaced["checksum"], seed
    assert health_version(d) == seed["version"]
    body = ask(d, target["question"])
    assert body["sources"][0]["id"] == target["id"] and "added to the seed file." in body["answer"], body
    assert declined(seed["version"])(ask(d))  # the file's dataset, not the newest version before it
    answered_within(c, declined(seed["version"]), since)  # the polling replica follows D's import

    for method, route, kwargs in [
        ("PUT", f"/entries/{ENTRY_ID}", {"json": topic("forbidden")}),
        ("DELETE", f"/entries/{target['id']}", {}),
        ("POST", "", {"content": edited}),
        ("POST", "/validate", {"content": edited}),
        ("POST", f"/rollback/{newest['version']}", {}),
    ]:
        response = httpx.request(method, f"{d.base_url}{BASE}{route}", headers=AUTH, timeout=30, **kwargs)
        check_error(response, 403, "forbidden")
    assert versions(d, headers={})[0] == seed


# --- 7. a small change goes live with a quickly updated classifier, then the whole classifier is refitted -------


def test_a_small_change_is_refitted_in_the_background(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("refit")
    dataset = dataset_copy(directory / "seed")
    server = start_server(
        ADMIN_TOKEN=TOKEN,
        DATABASE_URL=f"sqlite:///{directory}/refit.db",
        DATASET_PATH=str(dataset),
        KB_REFIT_DELAY_SECONDS="0.5",
    )
    assert status(server)["provisional"] is False  # a start fits the whole classifier
    changed = change("PUT", server, f"/entries/{ENTRY_ID}", topic("refit-pending"))
    live = status(server)
    assert live["version"] == changed["version"] and live["provisional"] is True, live  # a full fit takes seconds
    assert answers_with("refit-pending", changed["version"])(ask(server))
    wait_refitted(server, changed["version"])
    assert answers_with("refit-pending", changed["version"])(ask(server))  # same version, same answer
