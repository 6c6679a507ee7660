"""Observability against real servers: metric deltas, request ids in the JSON log, health, operator endpoints.

Servers used here besides the shared default one (all on the warm shared cache, so each starts in seconds):

- `ops_server`: production mode with ADMIN_TOKEN and METRICS_TOKEN; only this module talks to it, so its
  sliding windows hold nothing but this module's requests;
- `open_production_server`: production mode without tokens (the start-up warning) and a budget of one
  question per minute (rate-limit rejections);
- `failing_cache_server`: its own CACHE_DIR, so the test can break the disk cache under it;
- `two_worker_server` (tests/conftest.py, shared with other modules): WORKERS=2, where /metrics must add
  both workers up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.monitoring import Monitoring, ServingParts, health_report
from api.routes import health as health_routes
from infrastructure.rate_limit import QuestionRateLimiter
from infrastructure.windows import OutcomeWindow, RequestWindow, percentile
from middleware.errors import install_error_handlers
from services.sessions import MemorySessionStore
from tests.conftest import ServerProcess, log_records, poll_until
from tests.test_browser import ARTIFACTS, Browser, browser  # noqa: F401  (the module-scoped Chromium fixture)

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
SECRET = "s" * 40
ANSWERABLE = ["What is a flash loan?", "What is impermanent loss?", "How does Aave work?"]
NO_MATCH = "best lasagna recipe with three cheeses?"
WAIT_SECONDS = 15.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers -----------------------------------------------------------------------------------------------


def scrape(server: ServerProcess, token: str | None = None) -> Samples:
    """Every sample of /metrics, keyed by name and label set."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter appears on its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def ask(server: ServerProcess, question: str, path: str = "/ask", **headers: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"question": question}, headers=headers, timeout=30)


def unique_question() -> str:
    """A question no cache layer has seen (the nonce changes the cache key, not the topic)."""
    return f"What is a flash loan, {uuid.uuid4().hex[:10]}?"


def wait_until(check: Callable[[], Any], timeout: float = WAIT_SECONDS, interval: float = 0.1) -> Any:
    return poll_until(check, timeout, interval)


def admin(server: ServerProcess, path: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def route_stats(perf: dict[str, Any], method: str, route: str) -> dict[str, Any]:
    for entry in perf["requests"]["routes"]:
        if entry["method"] == method and entry["route"] == route:
            return entry
    return {"requests": 0, "errors": 0, "client_errors": 0}


# --- servers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ops_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(
        ENVIRONMENT="production", SECRET_KEY=SECRET, ADMIN_TOKEN=ADMIN_TOKEN, METRICS_TOKEN=METRICS_TOKEN
    )


@pytest.fixture(scope="module")
def open_production_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server(ENVIRONMENT="production", SECRET_KEY=SECRET, RATE_LIMIT_REQUESTS_PER_MINUTE="1")


@pytest.fixture(scope="module")
def failing_cache_server(
    start_server: Callable[..., ServerProcess],
    server: ServerProcess,  # started first, so the shared cache already holds the dataset's index
    shared_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, Path]]:
    cache = tmp_path_factory.mktemp("failing-cache")
    shutil.copytree(shared_cache_dir / "index", cache / "index")
    yield start_server(CACHE_DIR=str(cache)), cache / "embeddings"


# --- /metrics: exact deltas after real requests --------------------------------------------------------------


def test_http_requests_counted_by_route_template(server: ServerProcess, client: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/v2/sessions/{session_id}"}
    before = scrape(server)
    for _ in range(3):
        assert client.get(f"/v2/sessions/{uuid.uuid4().hex}").status_code == 404
    after = scrape(server)
    assert (
        value(after, "http_requests_total", **labels, status="404")
        - value(before, "http_requests_total", **labels, status="404")
        == 3
    )
    assert (
        value(after, "http_request_duration_seconds_count", **labels)
        - value(before, "http_request_duration_seconds_count", **labels)
        == 3
    )
    assert not any(re.search(r"/v2/sessions/[0-9a-f]{32}", dict(labels).get("route", "")) for _, labels in after)


def test_agent_outcomes_and_confidence_counted(server: ServerProcess) -> None:
    before = scrape(server)
    answered = ask(server, ANSWERABLE[0]).json()
    no_match = ask(server, NO_MATCH).json()
    after = scrape(server)
    assert (answered["processing_stage"], no_match["processing_stage"]) == ("response_complete", "no_match")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("agent_queries_total", outcome="answered") == 1
    assert delta("agent_queries_total", outcome="no_match") == 1
    assert delta("agent_queries_total", outcome="error") == 0
    assert delta("agent_confidence_count") == 2
    assert delta("agent_confidence_sum") == pytest.approx(answered["confidence"] + no_match["confidence"], abs=1e-6)
    assert delta("agent_processing_seconds_count") == 2
    assert delta("http_requests_total", method="POST", route="/ask", status="200") == 2


def embedding_lookups(old: Samples, new: Samples, layer: str, result: str) -> float:
    labels = {"layer": layer, "result": result}
    return value(new, "embedding_cache_requests_total", **labels) - value(
        old, "embedding_cache_requests_total", **labels
    )


def model_calls(samples: Samples) -> float:
    return value(samples, "embedding_seconds_count", provider="local")


def test_repeated_question_is_a_memory_cache_hit(server: ServerProcess) -> None:
    """Streams skip the answer cache, so a repeat over SSE shows the embedding cache's memory layer at work."""
    question = unique_question()
    before = scrape(server)
    first = ask(server, question)
    middle = scrape(server)
    second = ask(server, question, path="/ask-stream")
    after = scrape(server)
    assert second.status_code == 200
    assert first.status_code == 200 and '"type":"complete"' in second.text.replace(" ", "")

    # First time: missed in memory and on disk, so the model ran once.
    assert [embedding_lookups(before, middle, "memory", "miss"), embedding_lookups(before, middle, "disk", "miss")] == [
        1,
        1,
    ]
    assert embedding_lookups(before, middle, "memory", "hit") == 0
    assert model_calls(middle) - model_calls(before) == 1
    # Second time: straight from memory; the disk and the model are not touched.
    assert embedding_lookups(middle, after, "memory", "hit") == 1
    assert embedding_lookups(middle, after, "memory", "miss") == 0
    assert embedding_lookups(middle, after, "disk", "miss") + embedding_lookups(middle, after, "disk", "hit") == 0
    assert model_calls(after) == model_calls(middle)


def test_repeated_question_is_answered_from_the_answer_cache(server: ServerProcess) -> None:
    """A repeated /ask skips the graph: same body, no embedding look-up, yet counted like any answer."""
    question = unique_question()
    before = scrape(server)
    first = ask(server, question)
    middle = scrape(server)
    second = ask(server, question)
    after = scrape(server)
    assert second.status_code == 200
    first_body, second_body = first.json(), second.json()
    assert first_body.pop("answer_id") != second_body.pop("answer_id")  # a cached answer is still a new answer
    assert second_body == first_body
    assert first_body["sources"][0]["id"] == "what-are-flash-loans"

    def answer_cache(old: Samples, new: Samples, result: str) -> float:
        return value(new, "answer_cache_requests_total", result=result) - value(
            old, "answer_cache_requests_total", result=result
        )

    assert [answer_cache(before, middle, "miss"), answer_cache(before, middle, "hit")] == [1, 0]
    assert [answer_cache(middle, after, "miss"), answer_cache(middle, after, "hit")] == [0, 1]
    assert embedding_lookups(middle, after, "memory", "hit") + embedding_lookups(middle, after, "memory", "miss") == 0
    assert model_calls(after) == model_calls(middle)
    answered = value(after, "agent_queries_total", outcome="answered") - value(
        middle, "agent_queries_total", outcome="answered"
    )
    assert answered == 1
    assert value(after, "agent_processing_seconds_count") - value(middle, "agent_processing_seconds_count") == 1


def test_rate_limit_rejections_counted(open_production_server: ServerProcess) -> None:
    before = scrape(open_production_server)
    assert ask(open_production_server, ANSWERABLE[0]).status_code == 200
    refused = ask(open_production_server, ANSWERABLE[1])
    assert refused.status_code == 429
    after = scrape(open_production_server)
    assert (
        value(after, "rate_limit_rejections_total", route="/ask")
        - value(before, "rate_limit_rejections_total", route="/ask")
        == 1
    )
    assert (
        value(after, "http_requests_total", method="POST", route="/ask", status="429")
        - value(before, "http_requests_total", method="POST", route="/ask", status="429")
        == 1
    )


def test_build_info_and_process_metrics(server: ServerProcess) -> None:
    samples = scrape(server)
    build = [dict(labels) for name, labels in samples if name == "defi_qa_bot_build_info"]
    assert len(build) == 1
    assert build[0]["version"] == "1.0.0"
    assert re.fullmatch(r"3\.11\.\d+", build[0]["python"])
    assert build[0]["embedding_model"] == "all-MiniLM-L6-v2-onnx-int8"
    assert value(samples, "defi_qa_bot_build_info", **build[0]) == 1
    assert value(samples, "process_resident_memory_bytes") > 50e6
    assert value(samples, "process_open_fds") > 0
    assert ("event_loop_lag_seconds", frozenset()) in samples


def test_promtool_accepts_the_exposition(server: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not installed (Debian package prometheus; `make system-deps`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ask(server, ANSWERABLE[1])
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


# --- request ids and the JSON log ----------------------------------------------------------------------------


def test_request_id_echoed_and_bound_into_log_lines(server: ServerProcess) -> None:
    request_id = uuid.uuid4().hex
    response = ask(server, ANSWERABLE[2], path="/v2/ask", **{"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    session_id = response.headers["x-session-id"]

    def lines() -> list[dict[str, Any]]:
        return [record for record in log_records(server) if record.get("request_id") == request_id]

    records = wait_until(lambda: [r for r in lines() if r["event"] == "request_finished"] and lines())
    access = next(record for record in records if record["event"] == "request_finished")
    assert access["route"] == "/v2/ask"
    assert access["status"] == 200
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] > 0
    tag = hashlib.sha256(session_id.encode()).hexdigest()[:12]
    assert access["session"] == tag and session_id not in json.dumps(records)  # the id itself is never logged
    assert access["method"] == "POST" and access["logger"] == "access" and access["level"] == "info"
    answered = next(record for record in records if record["event"] == "question_answered")
    assert answered["session"] == tag
    assert answered["question"] == ANSWERABLE[2]


def test_invalid_request_id_is_replaced(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/health", headers={"X-Request-ID": "not a valid id"}, timeout=10)
    generated = response.headers["x-request-id"]
    assert generated != "not a valid id"
    assert uuid.UUID(generated).version == 4
    access = wait_until(
        lambda: [
            r for r in log_records(server) if r.get("request_id") == generated and r["event"] == "request_finished"
        ]
    )
    assert access[0]["route"] == "/health" and access[0]["status"] == 200


# --- health --------------------------------------------------------------------------------------------------


def test_health_status_shape(client: httpx.Client) -> None:
    response = client.get("/health-status")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    # The original's shape: each component a plain status string, the details beside them.
    assert body["components"] == dict.fromkeys(("agent", "embeddings", "cache", "dataset", "database"), "healthy")
    assert set(body["component_details"]) == set(body["components"])
    for name, entry in body["component_details"].items():
        assert entry["status"] == "healthy", name
        assert isinstance(entry["detail"], str) and entry["detail"], name
    assert body["component_details"]["dataset"]["entries"] > 300
    metrics = body["metrics"]
    for key in ("active_sessions", "cache_hit_rate", "avg_response_time", "websocket_connections", "error_rate"):
        assert key in metrics
    assert isinstance(metrics["active_sessions"], int)


def test_cache_failure_degrades_health_and_recovery_restores_it(
    failing_cache_server: tuple[ServerProcess, Path],
) -> None:
    server, embeddings_dir = failing_cache_server
    url = f"{server.base_url}/health-status"
    assert httpx.get(url, timeout=10).json()["status"] == "healthy"

    # Tests run as root, where chmod stops nothing: make the directory a regular file instead.
    shutil.rmtree(embeddings_dir)
    embeddings_dir.write_text("not a directory")
    assert ask(server, unique_question()).status_code == 200  # answering goes on without the disk cache
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["cache"] == "degraded"
    assert "disk cache failing" in body["component_details"]["cache"]["detail"]
    assert {name for name, status in body["components"].items() if status != "healthy"} == {"cache"}
    wait_until(lambda: any(r["event"] == "health_status_changed" for r in log_records(server)))

    embeddings_dir.unlink()
    assert ask(server, unique_question()).status_code == 200
    # The write that follows an answer runs on the cache's own thread: wait for it.
    wait_until(lambda: httpx.get(url, timeout=10).json()["status"] == "healthy")


def _fake_parts(entries: int, last_error: str | None = None, running: bool = True) -> ServingParts:
    """Stand-ins for the embedding service and the knowledge base, as readiness reads them."""
    embeddings = SimpleNamespace(
        provider=SimpleNamespace(name="local"),
        model_id="m",
        model_calls=0,
        running=running,
        last_error=last_error,
        last_error_at=time.time() if last_error else None,
        memory_cache=None,
        disk_cache=None,
    )
    snapshot = SimpleNamespace(retriever=SimpleNamespace(phrasing_count=entries * 3), knowledge_base=[None] * entries)
    return ServingParts(embeddings, SimpleNamespace(current=snapshot), 0.4)


@pytest.mark.parametrize(
    ("parts", "status", "failing"),
    [
        (_fake_parts(3), "healthy", set()),
        (_fake_parts(3, last_error="connection refused"), "degraded", {"embeddings"}),
        (_fake_parts(3, running=False), "unhealthy", {"embeddings"}),
        (_fake_parts(0), "unhealthy", {"dataset"}),
        (None, "unhealthy", {"agent"}),
    ],
)
def test_health_status_judgement_and_503(parts: ServingParts | None, status: str, failing: set[str]) -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(health_routes.router)
    app.state.agent = object() if parts is not None else None
    if parts is not None:
        app.state.embeddings = parts.embeddings
        app.state.knowledge = parts.knowledge
    app.state.sessions = MemorySessionStore(60, 10, 5)
    app.state.settings = SimpleNamespace(agent_similarity_threshold=0.4)
    app.state.monitoring = Monitoring()
    app.state.rate_limiter = QuestionRateLimiter(10, 60, "memory://")
    with TestClient(app) as test_client:
        response = test_client.get("/health-status")
    assert response.status_code == (503 if status == "unhealthy" else 200)
    body = response.json()
    assert body["status"] == status
    assert {name for name, status in body["components"].items() if status != "healthy"} == failing


def test_redis_component_reported_when_storage_is_shared() -> None:
    # Without Redis the service still answers stateless questions: degraded, not unhealthy.
    report = health_report(_fake_parts(3), Monitoring(), "ConnectionError: refused", redis_configured=True)
    assert report["status"] == "degraded"
    assert report["components"]["redis"] == "unhealthy"
    assert "refused" in report["component_details"]["redis"]["detail"]
    healthy = health_report(_fake_parts(3), Monitoring(), None, redis_configured=True)
    assert healthy["status"] == "healthy" and healthy["components"]["redis"] == "healthy"
    assert "redis" not in health_report(_fake_parts(3), Monitoring())["components"]


# --- sliding windows (unit) ----------------------------------------------------------------------------------


def test_percentiles_and_window_expiry() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 0.99) == pytest.approx(99.01)
    now = [1000.0]
    window = RequestWindow(window_seconds=60, ignored_routes={"/metrics"}, clock=lambda: now[0])
    for index in range(10):
        window.record("GET", "/a", 500 if index == 0 else 200, (index + 1) / 1000)
    window.record("GET", "/metrics", 200, 0.001)
    stats = window.snapshot()
    assert stats["total"]["requests"] == 10 and stats["total"]["error_rate"] == 0.1
    assert stats["routes"][0]["p50_ms"] == 5.5
    now[0] += 61
    assert window.snapshot()["total"]["requests"] == 0
    outcomes = OutcomeWindow(window_seconds=60, clock=lambda: now[0])
    outcomes.record("answered", 0.9)
    outcomes.record("no_match", 0.1)
    outcomes.record("error", None)
    snapshot = outcomes.snapshot()
    assert (snapshot["answered"], snapshot["no_match"], snapshot["error"]) == (1, 1, 1)
    assert snapshot["avg_confidence"] == 0.5


def test_window_memory_is_bounded() -> None:
    window = RequestWindow(max_samples=100)
    for _ in range(1000):
        window.record("GET", "/a", 200, 0.001)
    assert window.snapshot()["total"]["requests"] == 100


# --- operator endpoints: tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/system-metrics", "/performance-stats", "/dashboard"])
def test_admin_endpoints_need_the_token(ops_server: ServerProcess, path: str) -> None:
    url = f"{ops_server.base_url}{path}"
    missing = httpx.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.json() == {
        "detail": f"{path} requires an 'Authorization: Bearer <token>' header",
        "type": "authentication_error",
        "code": 401,
        "reason": "unauthorized",
    }
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["type"] == "authentication_error"
    assert httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).status_code == 200


def test_dashboard_accepts_token_in_its_url(ops_server: ServerProcess) -> None:
    page = httpx.get(f"{ops_server.base_url}/dashboard", params={"token": ADMIN_TOKEN}, timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert '<script src="/static/dashboard.js">' in page.text
    assert httpx.get(f"{ops_server.base_url}/dashboard", params={"token": "nope"}, timeout=10).status_code == 401
    # The token in the URL is for the page only; the data endpoints want the header.
    query = httpx.get(f"{ops_server.base_url}/system-metrics", params={"token": ADMIN_TOKEN}, timeout=10)
    assert query.status_code == 401
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = httpx.get(f"{ops_server.base_url}/static/{asset}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text  # nothing from a CDN


def test_metrics_token(ops_server: ServerProcess) -> None:
    url = f"{ops_server.base_url}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"bearer {METRICS_TOKEN}"}, timeout=10).status_code == 200
    assert (
        value(scrape(ops_server, METRICS_TOKEN), "http_requests_total", method="GET", route="/metrics", status="401")
        >= 2
    )
    # Probes stay open.
    assert httpx.get(f"{ops_server.base_url}/health-status", timeout=10).status_code == 200
    assert httpx.get(f"{ops_server.base_url}/health", timeout=10).status_code == 200


def test_open_endpoints_without_tokens(server: ServerProcess) -> None:
    for path in ("/system-metrics", "/performance-stats", "/dashboard", "/metrics"):
        assert httpx.get(f"{server.base_url}{path}", timeout=10).status_code == 200, path


def test_production_warns_about_open_operator_endpoints(
    open_production_server: ServerProcess, ops_server: ServerProcess
) -> None:
    events = {record["event"]: record for record in log_records(open_production_server)}
    assert events["operator_endpoints_open"]["level"] == "warning"
    assert events["operator_endpoints_open"]["endpoints"] == ["/dashboard", "/system-metrics", "/performance-stats"]
    assert events["metrics_endpoint_open"]["level"] == "warning"
    guarded = {record["event"] for record in log_records(ops_server)}
    assert "operator_endpoints_open" not in guarded and "metrics_endpoint_open" not in guarded
    assert ADMIN_TOKEN not in ops_server.log() and METRICS_TOKEN not in ops_server.log()


# --- /system-metrics and /performance-stats move ------------------------------------------------------------


def test_system_metrics_move(ops_server: ServerProcess) -> None:
    first = admin(ops_server, "/system-metrics")
    process = first["process"]
    assert process["pid"] == ops_server.pid
    assert process["rss_bytes"] > 50e6 and process["threads"] > 1 and process["open_fds"] > 3
    assert first["cpu"]["count"] >= 1 and first["memory"]["total_bytes"] > 0
    lag = wait_until(
        lambda: (snapshot := admin(ops_server, "/system-metrics"))["event_loop_lag"]["samples"] > 0 and snapshot
    )["event_loop_lag"]
    assert lag["current_ms"] >= 0 and lag["max_ms"] >= lag["current_ms"]

    sockets = [socket.create_connection(("127.0.0.1", ops_server.port)) for _ in range(10)]
    try:
        for _ in range(3):
            ask(ops_server, unique_question())  # new questions: the model runs, CPU time grows
        moved = wait_until(
            lambda: (
                (snapshot := admin(ops_server, "/system-metrics"))["process"]["open_fds"] >= process["open_fds"] + 10
                and snapshot
            )
        )
    finally:
        for sock in sockets:
            sock.close()
    assert moved["uptime_seconds"] > first["uptime_seconds"]
    assert (
        moved["process"]["cpu_user_seconds"] + moved["process"]["cpu_system_seconds"]
        > process["cpu_user_seconds"] + process["cpu_system_seconds"]
    )


def test_performance_stats_move(ops_server: ServerProcess) -> None:
    before = admin(ops_server, "/performance-stats")
    confidences = [ask(ops_server, question).json()["confidence"] for question in ANSWERABLE]
    confidences.append(ask(ops_server, NO_MATCH).json()["confidence"])
    repeated = unique_question()
    confidences += [ask(ops_server, repeated).json()["confidence"] for _ in range(2)]
    for _ in range(3):
        httpx.get(f"{ops_server.base_url}/v2/sessions/{uuid.uuid4().hex}", timeout=10)
    after = admin(ops_server, "/performance-stats")

    ask_before, ask_after = route_stats(before, "POST", "/ask"), route_stats(after, "POST", "/ask")
    assert ask_after["requests"] - ask_before["requests"] == 6
    assert ask_after["errors"] == ask_before["errors"] == 0
    assert 0 < ask_after["p50_ms"] <= ask_after["p95_ms"] <= ask_after["p99_ms"]
    sessions = route_stats(after, "GET", "/v2/sessions/{session_id}")
    assert sessions["client_errors"] - route_stats(before, "GET", "/v2/sessions/{session_id}")["client_errors"] == 3
    assert sessions["client_error_rate"] == 1.0
    assert after["requests"]["total"]["requests"] - before["requests"]["total"]["requests"] == 9
    assert not any(
        entry["route"] in {"/performance-stats", "/metrics", "/health"} for entry in after["requests"]["routes"]
    )
    assert sum(bucket["requests"] for bucket in after["requests"]["timeline"]) == after["requests"]["total"]["requests"]

    answers_before, answers = before["answers"], after["answers"]
    assert answers["answered"] - answers_before["answered"] == 5
    assert answers["no_match"] - answers_before["no_match"] == 1
    assert answers["questions"] == answers["answered"] + answers["no_match"] + answers["error"]
    assert answers["answered_share"] == pytest.approx(answers["answered"] / answers["questions"], abs=1e-4)
    old_sum = (answers_before["avg_confidence"] or 0.0) * answers_before["questions"]
    expected = (old_sum + sum(confidences)) / answers["questions"]
    assert answers["avg_confidence"] == pytest.approx(expected, abs=1e-3)

    # The repeated question came from the answer cache; every /ask looked there first.
    answers_cached, answers_cached_before = after["answer_cache"], before["answer_cache"]
    assert answers_cached["hits"] - answers_cached_before["hits"] >= 1
    lookups = answers_cached["hits"] + answers_cached["misses"]
    assert lookups - (answers_cached_before["hits"] + answers_cached_before["misses"]) == 6
    assert answers_cached["hit_rate"] == pytest.approx(answers_cached["hits"] / lookups, abs=1e-4)
    memory_before, memory = before["cache"]["layers"]["memory"], after["cache"]["layers"]["memory"]
    assert memory["misses"] - memory_before["misses"] >= 1  # questions new to the embedding cache
    assert after["cache"]["hit_rate"] is not None and 0 <= after["cache"]["hit_rate"] <= 1


# --- several workers -----------------------------------------------------------------------------------------


def test_metrics_add_up_across_workers(two_worker_server: tuple[ServerProcess, set[int]]) -> None:
    """Requests on new connections spread over both workers; every scrape, whichever worker answers it, has the sum."""
    two_workers, _ = two_worker_server
    base = two_workers.base_url
    route = "/v2/sessions/{session_id}"
    count = 40

    def miss(_: int) -> int:
        return httpx.get(f"{base}/v2/sessions/{uuid.uuid4().hex}", timeout=10).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert set(pool.map(miss, range(count))) == {404}
    served: dict[int, int] = {}  # worker pid -> requests its own window saw

    def both_workers_reported() -> bool:
        perf = httpx.get(f"{base}/performance-stats", timeout=10).json()
        served[perf["worker_pid"]] = route_stats(perf, "GET", route)["requests"]
        return len(served) == 2

    wait_until(both_workers_reported, timeout=60, interval=0.01)
    assert sum(served.values()) == count
    assert all(share > 0 for share in served.values()), served  # the traffic really was split
    for _ in range(6):
        samples = scrape(two_workers)
        assert value(samples, "http_requests_total", method="GET", route=route, status="404") == count
        assert value(samples, "http_request_duration_seconds_count", method="GET", route=route) == count
    assert [name for name, _ in samples if name == "defi_qa_bot_build_info"] == ["defi_qa_bot_build_info"]
    # Workers log uvicorn's own access line too, query string included: a `?token=` must not reach the log.
    secret = uuid.uuid4().hex
    logged = two_workers.log().count('"path": "/dashboard"')
    assert httpx.get(f"{base}/dashboard", params={"token": secret}, timeout=10).status_code == 200
    wait_until(lambda: two_workers.log().count('"path": "/dashboard"') > logged)
    time.sleep(0.5)  # uvicorn's line follows the middleware's
    assert secret not in two_workers.log()
    promtool = shutil.which("promtool")
    if promtool:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard in headless Chromium ----------------------------------------------------------------------

READ_DASHBOARD = """
const text = (id) => document.getElementById(id).textContent;
return {
  refreshes: Number(document.body.dataset.refreshes || 0),
  status: text('overall-status'),
  requests: text('req-count'),
  answered: text('answered'),
  noMatch: text('no-match'),
  p95: text('lat-p95'),
  rate: text('req-rate'),
  hitRate: text('cache-hit-rate'),
  sessions: text('sessions'),
  rss: text('rss'),
  components: [...document.querySelectorAll('#components li')]
    .map((li) => li.dataset.component + ':' + li.dataset.status),
  routes: [...document.querySelectorAll('#routes tr')].map((tr) => tr.dataset.route).filter(Boolean),
  problem: document.getElementById('problem').hidden ? null : document.getElementById('problem').textContent,
};
"""

CHART_INK = """
const canvas = document.getElementById(arguments[0]);
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) ink += 1;
return ink;
"""
# Pixels painted in one colour (r, g, b), at any coverage: the bars of one series, not the axes or grid
# (a bar thinner than a pixel is drawn with partial alpha over the transparent canvas, same colour).
CHART_COLOR_PIXELS = """
const canvas = document.getElementById(arguments[0]);
const [r, g, b] = arguments[1];
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const near = (x, y) => Math.abs(x - y) <= 3;
let count = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] > 0 && near(data[i], r) && near(data[i + 1], g) && near(data[i + 2], b)) count += 1;
}
return count;
"""
ANSWERED_BAR = [0x34, 0x54, 0xD1]  # COLORS.ok in api/static/dashboard.js
NO_MATCH_BAR = [0xE0, 0xA1, 0x00]  # COLORS.client


@pytest.mark.browser
def test_dashboard_in_a_real_browser(browser: Browser, ops_server: ServerProcess) -> None:  # noqa: F811
    browser.open(f"{ops_server.base_url}/dashboard?token={ADMIN_TOKEN}&refresh=1")
    assert browser.run("return document.title") == "DeFi Q&A Bot · Dashboard"
    first = browser.wait_for(
        f"const r = (() => {{ {READ_DASHBOARD} }})(); return r.refreshes >= 1 && r.requests !== '–' && r", 15
    )
    assert first["problem"] is None, first["problem"]  # every fetch carried the token and succeeded
    assert first["status"] == "healthy"
    assert set(first["components"]) == {
        "agent:healthy",
        "embeddings:healthy",
        "cache:healthy",
        "dataset:healthy",
        "database:healthy",
    }
    assert first["rss"].endswith("MiB")

    for question in ANSWERABLE[:2]:
        assert ask(ops_server, question).status_code == 200
    assert ask(ops_server, NO_MATCH).status_code == 200
    assert httpx.post(f"{ops_server.base_url}/v2/ask", json={"question": ANSWERABLE[0]}, timeout=30).status_code == 200

    expected = {
        "requests": str(int(first["requests"]) + 4),
        "answered": str(int(first["answered"]) + 3),
        "noMatch": str(int(first["noMatch"]) + 1),
    }
    moved = browser.wait_for(
        f"const r = (() => {{ {READ_DASHBOARD} }})();"
        f"return r.requests === {json.dumps(expected['requests'])} && r.answered === {json.dumps(expected['answered'])}"
        f" && r.noMatch === {json.dumps(expected['noMatch'])} && r",
        15,
    )
    assert moved["refreshes"] > first["refreshes"]
    assert int(moved["sessions"]) >= 1
    assert moved["p95"] != "–" and float(moved["p95"]) > 0
    assert "POST /v2/ask" in moved["routes"] and "POST /ask" in moved["routes"]
    assert moved["problem"] is None
    # The answers chart has bars for answered and for no-match questions. Total ink is not compared with
    # before: a new maximum rescales the older bars and the window slides, so it can shrink.
    assert browser.run(CHART_COLOR_PIXELS, "chart-answers", ANSWERED_BAR) > 0
    assert browser.run(CHART_COLOR_PIXELS, "chart-answers", NO_MATCH_BAR) > 0
    assert browser.run(CHART_INK, "chart-requests") > 0
    browser.screenshot(ARTIFACTS / "dashboard.png")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
