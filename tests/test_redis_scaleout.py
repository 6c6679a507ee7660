"""Scale-out with Redis, with real processes: replicas and workers behave as one service.

Every test here runs against a `redis-server` the test module starts on a free port (tests/redis_server.py):

- replicas A and B (two `python main.py` processes, two ports) on one Redis: sessions, the question budget
  and the embedding cache are shared;
- one server with WORKERS=2 on the same Redis: the same guarantees through one port, and `/metrics` sums;
- a server on a Redis of its own, which the last test kills and restarts: stateless questions keep being
  answered, session endpoints answer 503 in the error format, and everything recovers without a restart.

Replicas trust 127.0.0.1 as a proxy, so each test names its own clients with `X-Forwarded-For` and the
budgets of different tests never mix.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from websockets.sync.client import connect

from config import Settings
from infrastructure.redis_client import create_redis
from services.embedding_cache import SharedCache, cache_key
from services.embedding_providers import LocalMiniLMProvider
from services.sessions import RedisSessionStore, SessionStoreUnavailableError, Turn
from services.sources import Source
from tests.conftest import ServerProcess, free_port, metric_value, poll_until
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")

LIMIT = 6
EXTRA = 4
FOLLOW_UPS = ["what are its risks?", "how does it handle liquidations?", "what about its fees?"]
ANSWERABLE = [
    "What is Aave?",
    "What is a flash loan?",
    "What is impermanent loss?",
    "What is a stablecoin?",
    "What is MEV?",
    "What is slippage?",
    "What is a DAO?",
    "What is TVL?",
    "What is Uniswap?",
    "What is gas?",
    "What is staking?",
    "What is a bridge?",
]
ANSWERABLE_PAYLOAD = {"question": "What is impermanent loss?"}
WAIT_SECONDS = 20.0
_addresses = itertools.count(1)


# --- helpers -----------------------------------------------------------------------------------------------


def new_client_address() -> str:
    """A client address no other request in this run has used (its own question budget)."""
    n = next(_addresses)
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def post(server: ServerProcess, path: str, payload: dict[str, Any], client: str | None = None) -> httpx.Response:
    """One request on a new connection (so requests to a multi-worker server spread over its workers)."""
    headers = {"X-Forwarded-For": client or new_client_address()}
    return httpx.post(f"{server.base_url}{path}", json=payload, headers=headers, timeout=30)


def ask_in_session(server: ServerProcess, question: str, session_id: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"question": question}
    if session_id is not None:
        payload["session_id"] = session_id
    response = post(server, "/v2/ask", payload)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["x-session-id"] == body["session_id"]
    return body


def turns(server: ServerProcess, session_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/v2/sessions/{session_id}", timeout=10)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["turns"]
    return found


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def wait_until(check: Callable[[], Any], timeout: float = WAIT_SECONDS, interval: float = 0.1) -> Any:
    return poll_until(check, timeout, interval)


def assert_session_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {
        "detail": "The session store is unavailable; please retry shortly.",
        "type": "service_unavailable",
        "code": 503,
        "reason": "session_store_unavailable",
    }
    assert response.headers["retry-after"] == "5"


# --- Redis and servers -------------------------------------------------------------------------------------


def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def outage_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _redis(tmp_path_factory)


def _scaled_env(redis: RedisServer) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "RATE_LIMIT_REQUESTS_PER_MINUTE": str(LIMIT),
        "TRUSTED_PROXIES": "127.0.0.1/32",
    }


@pytest.fixture(scope="module")
def replicas(
    start_server: Callable[..., ServerProcess], shared_redis: RedisServer
) -> tuple[ServerProcess, ServerProcess]:
    return start_server(**_scaled_env(shared_redis)), start_server(**_scaled_env(shared_redis))


@pytest.fixture(scope="module")
def two_workers(start_server: Callable[..., ServerProcess], shared_redis: RedisServer) -> ServerProcess:
    server = start_server(WORKERS="2", **_scaled_env(shared_redis))
    pids: set[int] = set()

    def both_ready() -> bool:  # the port answers once one worker is up; wait for the other as well
        pids.add(httpx.get(f"{server.base_url}/performance-stats", timeout=10).json()["worker_pid"])
        return len(pids) == 2

    wait_until(both_ready, timeout=180, interval=0.05)
    return server


# --- the pieces, against the real Redis (no app server) ----------------------------------------------------


def test_rate_limit_storage_follows_redis_url_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    assert Settings(_env_file=None).rate_limit_storage_uri == "memory://"  # type: ignore[call-arg]
    shared = Settings(_env_file=None, redis_url="redis://cache:6379/0")  # type: ignore[call-arg]
    assert shared.rate_limit_storage_uri == "redis://cache:6379/0"
    explicit = Settings(  # type: ignore[call-arg]
        _env_file=None, redis_url="redis://cache:6379/0", rate_limit_storage_uri="memory://"
    )
    assert explicit.rate_limit_storage_uri == "memory://"
    assert Settings(_env_file=None, redis_url="  ").redis_url is None  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="redis:// or rediss://"):
        Settings(_env_file=None, redis_url="http://cache:6379")  # type: ignore[call-arg]


def _turn(question: str) -> Turn:
    return Turn(question, question, "answer", 0.5, "response_complete", (Source("x", "q", 0.5),), 1.0)


async def test_two_stores_appending_at_once_keep_every_turn(shared_redis: RedisServer) -> None:
    """Two stores on one Redis stand for two processes: 2 x 15 appends at once, none lost; then the trim."""
    first_client, second_client = create_redis(shared_redis.url), create_redis(shared_redis.url)
    try:
        first = RedisSessionStore(first_client, ttl_seconds=60, max_turns=40)
        second = RedisSessionStore(second_client, ttl_seconds=60, max_turns=40)
        session = await first.get_or_create(None, "client-a")
        other = await second.get_or_create(session.id, "client-b")
        assert other.id == session.id and other is not session
        await asyncio.gather(
            *(first.add_turn(session, _turn(f"a{i}")) for i in range(15)),
            *(second.add_turn(other, _turn(f"b{i}")) for i in range(15)),
        )
        loaded = await second.get(session.id)
        assert loaded is not None
        assert sorted(turn.question for turn in loaded.turns) == sorted(
            [f"a{i}" for i in range(15)] + [f"b{i}" for i in range(15)]
        )
        assert loaded.turns[0] == _turn(loaded.turns[0].question)  # the JSON round trip keeps the turn as it was
        assert 0 < await first_client.ttl(f"defi:session:{session.id}:turns") <= 60
        short = RedisSessionStore(first_client, ttl_seconds=60, max_turns=5)
        await short.add_turn(session, _turn("newest"))
        trimmed = await short.get(session.id)
        assert trimmed is not None and len(trimmed.turns) == 5 and trimmed.turns[-1].question == "newest"
        assert await first.count() >= 1
        assert await second.delete(session.id) is True
        assert await first.get(session.id) is None
        assert await first.delete(session.id) is False
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_dead_redis_is_a_miss_for_the_cache_and_503_for_sessions() -> None:
    client = create_redis(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        cache = SharedCache(client, expiry_days=1)
        started = time.monotonic()
        assert await cache.get("k") is None
        await cache.put("k", np.ones(4, dtype=np.float32))
        assert cache.misses == 1 and not cache.healthy
        with pytest.raises(SessionStoreUnavailableError):
            await RedisSessionStore(client, 60, 20).get_or_create(None, "client")
        assert time.monotonic() - started < 5.0
    finally:
        await client.aclose()


# --- two replicas on one Redis -----------------------------------------------------------------------------


def test_session_started_on_one_replica_continues_on_the_other(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    first = ask_in_session(a, "What is Aave?")
    session_id = first["session_id"]
    assert first["sources"][0]["id"] == "what-is-aave"
    follow_up = ask_in_session(b, "what are its risks?", session_id)  # B has never seen this session
    assert follow_up["session_id"] == session_id
    assert follow_up["sources"][0]["id"] == "aave-risks"
    assert "Aave" in follow_up["answer"]
    streamed = post(a, "/v2/ask-stream", {"question": "What is a flash loan?", "session_id": session_id})
    assert streamed.status_code == 200 and streamed.headers["x-session-id"] == session_id
    assert sse_events(streamed)[-1]["type"] == "complete"
    expected = ["What is Aave?", "what are its risks?", "What is a flash loan?"]
    assert [turn["question"] for turn in turns(a, session_id)] == expected
    assert turns(b, session_id) == turns(a, session_id)
    assert httpx.delete(f"{b.base_url}/v2/sessions/{session_id}", timeout=10).status_code == 204
    assert httpx.get(f"{a.base_url}/v2/sessions/{session_id}", timeout=10).status_code == 404


def test_question_budget_is_exact_across_replicas(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    client = new_client_address()
    targets = [replicas[i % 2] for i in range(LIMIT + EXTRA)]

    def ask(server: ServerProcess) -> httpx.Response:
        return post(server, "/ask", {"question": "What is a liquidity pool?"}, client=client)

    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(ask, targets))
    assert Counter(response.status_code for response in responses) == {200: LIMIT, 429: EXTRA}
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in responses if r.status_code == 200)
    # One shared count: every allowed request saw a count of its own or later (`limits` takes the hit and
    # reads the window in two calls, so two concurrent requests may report the same remaining value),
    # and the last one in saw the budget spent.
    assert all(0 <= value < LIMIT for value in remaining) and 0 in remaining, remaining
    for refused in (r for r in responses if r.status_code == 429):
        assert set(refused.json()) == {"detail", "type", "code", "reason"}
        assert refused.json()["code"] == 429 and refused.json()["reason"] == "rate_limited"
    # Another client still has its whole budget, on either replica.
    assert post(replicas[1], "/ask", {"question": "What is a liquidity pool?"}).status_code == 200


def test_embedding_computed_on_one_replica_is_a_shared_hit_on_the_other(
    replicas: tuple[ServerProcess, ServerProcess], shared_redis: RedisServer
) -> None:
    a, b = replicas
    question = f"What is a flash loan, {uuid.uuid4().hex[:10]}?"
    key = SharedCache.PREFIX + cache_key(LocalMiniLMProvider.model_id, question)
    hits_before = metric_value(b, "embedding_cache_requests_total", layer="shared", result="hit")
    calls_before = metric_value(b, "embedding_batch_size_count")
    assert post(a, "/ask", {"question": question}).status_code == 200
    with shared_redis.client() as redis:
        stored = redis.get(key)
        assert isinstance(stored, bytes) and len(stored) == 384 * 4  # float32 vector
        assert 0 < redis.ttl(key) <= 30 * 86_400
    assert post(b, "/ask", {"question": question}).status_code == 200
    assert metric_value(b, "embedding_cache_requests_total", layer="shared", result="hit") == hits_before + 1
    assert metric_value(b, "embedding_batch_size_count") == calls_before  # B never ran the model for it


def test_concurrent_turns_on_one_session_across_replicas_are_all_recorded(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    session_id = ask_in_session(replicas[0], "What is Aave?")["session_id"]
    questions = ANSWERABLE[1:]

    def ask(index: int) -> dict[str, Any]:
        return ask_in_session(replicas[index % 2], questions[index], session_id)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(ask, range(len(questions))))
    assert {answer["session_id"] for answer in answers} == {session_id}
    recorded = turns(replicas[1], session_id)
    assert len(recorded) == 1 + len(questions)
    assert recorded[0]["question"] == "What is Aave?"
    assert sorted(turn["question"] for turn in recorded[1:]) == sorted(questions)


# --- two workers behind one port ---------------------------------------------------------------------------


def test_two_workers_share_sessions_budget_and_metrics(two_workers: ServerProcess) -> None:
    session_id = ask_in_session(two_workers, "What is Aave?")["session_id"]
    follow_ups = FOLLOW_UPS * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda question: ask_in_session(two_workers, question, session_id), follow_ups))
    assert {answer["session_id"] for answer in answers} == {session_id}
    assert len(turns(two_workers, session_id)) == 1 + len(follow_ups)

    served: dict[int, int] = {}  # worker pid -> /v2/ask requests its own window saw

    def both_workers_reported() -> bool:
        perf = httpx.get(f"{two_workers.base_url}/performance-stats", timeout=10).json()
        routes = perf["requests"]["routes"]
        served[perf["worker_pid"]] = sum(
            r["requests"] for r in routes if r["method"] == "POST" and r["route"] == "/v2/ask"
        )
        return len(served) == 2

    wait_until(both_workers_reported, interval=0.01)
    assert sum(served.values()) == 1 + len(follow_ups)
    assert all(share > 0 for share in served.values()), served  # both workers continued the one session

    client = new_client_address()
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(
            pool.map(lambda _: post(two_workers, "/ask", ANSWERABLE_PAYLOAD, client=client).status_code, range(10))
        )
    assert Counter(statuses) == {200: LIMIT, 429: 10 - LIMIT}

    for _ in range(4):  # whichever worker answers the scrape reports the totals of both
        answered = metric_value(two_workers, "http_requests_total", method="POST", route="/v2/ask", status="200")
        assert answered == 1 + len(follow_ups)
        assert metric_value(two_workers, "http_requests_total", method="POST", route="/ask", status="200") == LIMIT
        assert metric_value(two_workers, "http_requests_total", method="POST", route="/ask", status="429") == 10 - LIMIT


# --- Redis goes away and comes back ------------------------------------------------------------------------


def _health(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/health-status", timeout=10)
    assert response.status_code == 200, response.text  # degraded at worst: stateless questions still work
    body: dict[str, Any] = response.json()
    return body


def _timed(call: Callable[[], httpx.Response]) -> httpx.Response:
    started = time.monotonic()
    response = call()
    assert time.monotonic() - started < 5.0, "a request hung on the dead Redis"
    return response


def test_redis_outage_and_recovery_without_restart(
    start_server: Callable[..., ServerProcess], outage_redis: RedisServer
) -> None:
    server = start_server(REDIS_URL=outage_redis.url, STREAM_WORD_DELAY_MS="10")
    base = server.base_url
    session_id = ask_in_session(server, "What is Aave?")["session_id"]
    health = _health(server)
    assert health["status"] == "healthy" and health["components"]["redis"] == "healthy"

    # Redis dies while a session's answer streams: the words still arrive, then an error says the turn was lost.
    payload = {"question": "What is a flash loan?", "session_id": session_id}
    with httpx.stream("POST", f"{base}/v2/ask-stream", json=payload, timeout=30) as streamed:
        lines = streamed.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if events[-1]["type"] == "word":
                    break
        outage_redis.kill()
        events += [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert sum(event["type"] == "word" for event in events) > 5
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "session_store_unavailable"
    assert events[-1]["code"] == 503
    for question in ("What is a flash loan?", f"What is MEV, {uuid.uuid4().hex[:8]}?"):  # cached and new
        answered = _timed(partial(httpx.post, f"{base}/ask", json={"question": question}, timeout=10))
        assert answered.status_code == 200, answered.text
        assert "x-ratelimit-limit" not in answered.headers  # not counted while the storage is down
    stream = _timed(lambda: httpx.post(f"{base}/ask-stream", json={"question": "What is gas?"}, timeout=10))
    assert stream.status_code == 200 and sse_events(stream)[-1]["type"] == "complete"
    assert_session_store_unavailable(
        _timed(lambda: httpx.post(f"{base}/v2/ask", json={"question": "what are its risks?", "session_id": session_id}))
    )
    assert_session_store_unavailable(
        _timed(lambda: httpx.post(f"{base}/v2/ask-stream", json={"question": "What is Aave?"}, timeout=10))
    )
    query = {"question": "what are its risks?", "session_id": session_id}
    assert_session_store_unavailable(_timed(lambda: httpx.get(f"{base}/ask-stream", params=query, timeout=10)))
    assert_session_store_unavailable(_timed(lambda: httpx.get(f"{base}/v2/sessions/{session_id}", timeout=10)))
    assert_session_store_unavailable(_timed(lambda: httpx.delete(f"{base}/v2/sessions/{session_id}", timeout=10)))
    with connect(f"{server.ws_url}/ws/ask", open_timeout=5) as ws:
        # Connecting needs no Redis (the session is created with the first question); the question is refused
        # with an error message and the socket stays open for the next one.
        assert json.loads(ws.recv(timeout=5))["status"] == "connected"
        ws.send(json.dumps({"type": "question", "question": "What is Aave?"}))
        started = time.monotonic()
        refusal = json.loads(ws.recv(timeout=5))
        assert time.monotonic() - started < 5.0
        assert refusal["type"] == "error" and refusal["reason"] == "session_store_unavailable"
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=5))["type"] == "pong"
    health = _health(server)
    assert health["status"] == "degraded"
    assert health["components"]["redis"] == "unhealthy"
    assert "session endpoints answer 503" in health["component_details"]["redis"]["detail"]
    assert health["metrics"]["active_sessions"] is None
    assert metric_value(server, "shared_storage_errors_total", component="sessions") > 0
    assert metric_value(server, "shared_storage_errors_total", component="rate_limit") > 0

    outage_redis.start()  # same port, empty: the old session is gone, as after any Redis restart
    wait_until(lambda: httpx.post(f"{base}/v2/ask", json={"question": "What is Aave?"}, timeout=10).status_code == 200)
    renewed = ask_in_session(server, "what are its risks?", session_id)
    assert renewed["session_id"] != session_id
    continued = ask_in_session(server, "what are its risks?", ask_in_session(server, "What is Aave?")["session_id"])
    assert continued["sources"][0]["id"] == "aave-risks"
    assert httpx.post(f"{base}/ask", json={"question": "What is a DAO?"}, timeout=10).headers["x-ratelimit-limit"]
    with connect(f"{server.ws_url}/ws/ask", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["status"] == "connected"
    wait_until(lambda: _health(server)["status"] == "healthy")
    assert _health(server)["components"]["redis"] == "healthy"
    assert "Traceback" not in server.log()
