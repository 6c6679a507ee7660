"""Readiness under a frozen Redis, 500s with every header, private health details, Host checks, HEAD probes.

Real servers (`python main.py`) and a real `redis-server` (tests/redis_server.py) that the tests freeze with
SIGSTOP; a few pure-ASGI checks run in process where a real server cannot show the case (a stream that
fails after its first bytes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from api.monitoring import CHECK_MAX_AGE_SECONDS, BoundedCheck
from middleware.errors import internal_error_body
from middleware.hosts import host_allowed, host_name, parse_allowed_hosts
from middleware.unhandled import UnhandledErrorMiddleware
from tests.conftest import ServerProcess, log_records, poll_until
from tests.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (make system-deps)")

ADMIN_TOKEN = "readiness-admin-token"
PROBE_DEADLINE_SECONDS = 2.0  # the bound is 0.5 s; generous for a loaded CI machine
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
PUBLIC_KEYS = {"status", "timestamp", "components"}


def assert_public(body: dict[str, Any]) -> None:
    """Only the overall status and each component's status: no sentences, figures, hosts or paths."""
    assert set(body) == PUBLIC_KEYS, body
    assert body["components"], body
    for name, status in body["components"].items():  # the original's shape: plain status strings
        assert status in ("healthy", "degraded", "unhealthy"), name


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_app(start_server: Callable[..., ServerProcess], redis_server: RedisServer) -> ServerProcess:
    """A server on that Redis, with ADMIN_TOKEN set."""
    return start_server(REDIS_URL=redis_server.url, ADMIN_TOKEN=ADMIN_TOKEN)


@pytest.fixture(scope="module")
def production_app(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A production server without ADMIN_TOKEN, serving any Host name."""
    return start_server(
        ENVIRONMENT="production",
        SECRET_KEY=uuid.uuid4().hex,
        ALLOWED_ORIGINS="https://app.example.test",
        ALLOWED_HOSTS="*",
    )


# --- 6. readiness is bounded and shared while Redis is frozen -------------------------------------------------


def _timed_status(url: str, headers: dict[str, str] | None = None) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = httpx.get(url, headers=headers, timeout=30)
    return time.monotonic() - started, response


@needs_redis
def test_readiness_answers_within_bound_while_redis_is_frozen(
    redis_app: ServerProcess, redis_server: RedisServer
) -> None:
    url = f"{redis_app.base_url}/health-status"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(url, timeout=10).json()["components"]["redis"] == "healthy"
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(CHECK_MAX_AGE_SECONDS)  # the healthy result just read may be reused that long
        for _ in range(3):
            seconds, response = _timed_status(url, admin)
            assert seconds < PROBE_DEADLINE_SECONDS, f"readiness took {seconds:.2f} s with Redis frozen"
            assert response.status_code == 200, response.text  # degraded, so the replica stays in rotation
            body = response.json()
            assert body["status"] == "degraded"
            assert body["components"]["redis"] == "unhealthy"
            assert "no answer" in body["component_details"]["redis"]["detail"]  # within 0.5 s, or to PING within 2 s
            assert body["metrics"]["active_sessions"] is None  # the session count is bounded too
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda _: _timed_status(url), range(20)))
        slowest = max(seconds for seconds, _ in results)
        assert slowest < PROBE_DEADLINE_SECONDS, f"20 concurrent probes: slowest {slowest:.2f} s"
        assert {response.status_code for _, response in results} == {200}
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)

    def recovered() -> bool:
        body = httpx.get(url, headers=admin, timeout=10).json()
        return body["status"] == "healthy" and isinstance(body["metrics"]["active_sessions"], int)

    poll_until(recovered, timeout=20)


# --- 13. health details only for the operator ------------------------------------------------------------------


@needs_redis
def test_health_details_need_the_admin_token(redis_app: ServerProcess, redis_server: RedisServer) -> None:
    url = f"{redis_app.base_url}/health-status"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        response = httpx.get(url, headers=headers, timeout=10)
        assert response.status_code == 200, response.text  # a probe without (or with a bad) token still works
        body = response.json()
        assert_public(body)
        assert set(body["components"]) == {"agent", "embeddings", "cache", "dataset", "redis", "database"}
        assert str(redis_server.port) not in response.text
        assert response.headers["cache-control"] == "no-store"
    full = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).json()
    assert "Redis reachable" in full["component_details"]["redis"]["detail"]
    assert full["component_details"]["dataset"]["entries"] > 300
    assert isinstance(full["metrics"]["active_sessions"], int)


def test_production_without_admin_token_shows_only_the_public_body(production_app: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer anything"}):
        response = httpx.get(f"{production_app.base_url}/health-status", headers=headers, timeout=10)
        assert response.status_code == 200
        assert_public(response.json())
        assert "/" not in response.text  # no cache directory


def test_development_without_admin_token_keeps_details(client: httpx.Client) -> None:
    body = client.get("/health-status").json()
    assert body["component_details"]["dataset"]["entries"] > 300 and "metrics" in body


# --- 7. a 500 carries the request id and the security headers --------------------------------------------------


@needs_redis
def test_unexpected_error_is_500_with_request_id_and_security_headers(
    redis_app: ServerProcess, redis_server: RedisServer
) -> None:
    """A damaged session record in the shared store (a turn that is not JSON) makes the session route fail."""
    created = httpx.post(f"{redis_app.base_url}/v2/ask", json={"question": "What is Aave?"}, timeout=30)
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    with redis_server.client() as client:
        client.rpush(f"defi:session:{session_id}:turns", b"{not json")
    request_id = uuid.uuid4().hex
    response = httpx.get(
        f"{redis_app.base_url}/v2/sessions/{session_id}", headers={"X-Request-ID": request_id}, timeout=10
    )
    assert response.status_code == 500, response.text
    assert response.json() == internal_error_body()
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == request_id
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    assert "Traceback" not in response.text and "JSONDecodeError" not in response.text

    def logged() -> list[dict[str, Any]]:
        return [r for r in log_records(redis_app) if r.get("request_id") == request_id]

    records = poll_until(lambda: [r for r in logged() if r["event"] == "request_finished"] and logged(), timeout=10)
    failure = next(record for record in records if record["event"] == "unhandled_error")
    assert failure["level"] == "error" and "JSONDecodeError" in failure["exception"]
    access = next(record for record in records if record["event"] == "request_finished")
    assert access["status"] == 500 and access["route"] == "/v2/sessions/{session_id}"
    # Only the middleware answered: Starlette's outermost handler never saw the exception.
    assert "Exception in ASGI application" not in redis_app.log()
    assert httpx.get(f"{redis_app.base_url}/health", timeout=10).status_code == 200


async def _run_asgi(app: Callable[[Scope, Receive, Send], Any]) -> tuple[list[Message], BaseException | None]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
    try:
        await app(scope, receive, send)
    except Exception as error:
        return sent, error
    return sent, None


async def test_unhandled_error_middleware_never_starts_a_response_twice() -> None:
    async def fails_before(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def fails_mid_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom mid-stream")

    sent, error = await _run_asgi(UnhandledErrorMiddleware(fails_before))
    assert error is None
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"]) == internal_error_body()

    sent, error = await _run_asgi(UnhandledErrorMiddleware(fails_mid_stream))
    assert isinstance(error, RuntimeError)  # left to the outer layers: the status is already on the wire
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200


# --- Host header and trailing slashes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_hosts_app(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server that answers only for the local names (ALLOWED_HOSTS is `*` by default)."""
    return start_server(ALLOWED_HOSTS="localhost,127.0.0.1,[::1]")


def test_foreign_host_is_refused_and_no_redirect_points_elsewhere(local_hosts_app: ServerProcess) -> None:
    server = local_hosts_app
    base = server.base_url
    refused = httpx.get(f"{base}/metrics/", headers={"Host": "evil.example"}, timeout=10)
    assert refused.status_code == 400
    assert refused.json() == {
        "detail": "Host 'evil.example' is not served here (see ALLOWED_HOSTS)",
        "type": "bad_request",
        "code": 400,
        "reason": "invalid_host",
    }
    assert "location" not in refused.headers
    assert refused.headers["x-request-id"] and refused.headers["x-content-type-options"] == "nosniff"
    assert httpx.post(f"{base}/ask", json={"question": "x"}, headers={"Host": "evil.example"}).status_code == 400
    slash = httpx.get(f"{base}/metrics/", timeout=10)
    assert slash.status_code == 404 and "location" not in slash.headers
    assert slash.json()["reason"] == "not_found" and slash.json()["code"] == 404
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "LOCALHOST."):
        assert httpx.get(f"{base}/metrics", headers={"Host": host}, timeout=10).status_code == 200, host
    # Probes are exempt: orchestrators probe a pod by its address.
    assert httpx.get(f"{base}/health", headers={"Host": "10.1.2.3:8000"}, timeout=10).status_code == 200
    assert httpx.get(f"{base}/health-status", headers={"Host": "10.1.2.3"}, timeout=10).status_code == 200


def test_foreign_host_websocket_is_refused(local_hosts_app: ServerProcess) -> None:
    server = local_hosts_app
    request = (
        "GET /ws/ask HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert b" 403 " in status_line, status_line


def test_any_host_allowed_still_never_redirects(production_app: ServerProcess) -> None:
    response = httpx.get(f"{production_app.base_url}/metrics/", headers={"Host": "evil.example"}, timeout=10)
    assert response.status_code == 404 and "location" not in response.headers
    assert httpx.get(f"{production_app.base_url}/metrics", headers={"Host": "evil.example"}).status_code == 200
    events = {record["event"] for record in log_records(production_app)}
    assert "allowed_hosts_any" in events and "allowed_hosts_local_only" not in events


def test_host_patterns() -> None:
    patterns = parse_allowed_hosts(" API.example.com , *.example.org,[::1], localhost:8000 ")
    assert patterns == ("api.example.com", "*.example.org", "[::1]", "localhost")
    assert host_name("[::1]:8000") == "[::1]" and host_name("Api.Example.com.:443") == "api.example.com"
    assert host_allowed("a.example.org", patterns) and host_allowed("b.a.example.org", patterns)
    assert not host_allowed("example.org", patterns) and not host_allowed("evilexample.org", patterns)
    assert not host_allowed("", patterns) and host_allowed("anything", ("*",))


# --- HEAD on the probes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/health-status"])
def test_head_on_probes(client: httpx.Client, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"].startswith("application/json")


# --- the bounded check itself -----------------------------------------------------------------------------------


async def test_bounded_check_runs_once_for_concurrent_callers_and_reuses_its_result() -> None:
    runs = 0
    release = asyncio.Event()

    async def slow() -> str | None:
        nonlocal runs
        runs += 1
        await release.wait()
        return None

    check: BoundedCheck[str | None] = BoundedCheck("test", timeout=2.0, max_age=60)
    # `slow` never returns on its own: without the bound these would wait forever.
    gathered = asyncio.gather(*(check.result(slow, fallback="timed out") for _ in range(50)))
    results = await asyncio.wait_for(gathered, timeout=30)
    assert results == ["timed out"] * 50 and runs == 1
    # Still the same run, already overdue: answered without a second 2 s wait.
    again = await asyncio.wait_for(check.result(slow, fallback="timed out"), timeout=1.0)
    assert again == "timed out" and runs == 1
    release.set()
    await asyncio.sleep(0)
    assert await check.result(slow, fallback="timed out") is None and runs == 1  # its answer, reused

    async def broken() -> int | None:
        raise ValueError("bug in a check")

    failing: BoundedCheck[int | None] = BoundedCheck("broken", timeout=0.2, max_age=60)
    assert await failing.result(broken, fallback=-1) == -1
