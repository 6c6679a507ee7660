"""Prometheus metric definitions: one registry of names, used by every layer above.

With several uvicorn workers `main.run()` sets PROMETHEUS_MULTIPROC_DIR before the workers start, so
prometheus-client keeps each worker's values in files there and `/metrics` adds them up
(`exposition()`). Gauges say how they combine across workers (`multiprocess_mode`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests by method, route template and status.", ["method", "route", "status"]
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
AGENT_QUERIES = Counter("agent_queries_total", "Questions processed by the agent, by outcome.", ["outcome"])
AGENT_PROCESSING = Histogram(
    "agent_processing_seconds", "Time the agent spends on one question.", buckets=_LATENCY_BUCKETS
)
AGENT_NODE_DURATION = Histogram(
    "agent_node_seconds", "Time spent in each agent graph node.", ["node"], buckets=_LATENCY_BUCKETS
)
AGENT_CONFIDENCE = Histogram(
    "agent_confidence", "Confidence of agent answers.", buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
)
EMBEDDING_DURATION = Histogram(
    "embedding_seconds", "Time to embed one batch of texts.", ["provider"], buckets=_LATENCY_BUCKETS
)
EMBEDDING_BATCH_SIZE = Histogram(
    "embedding_batch_size", "Texts per embedding model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
EMBEDDING_CACHE_REQUESTS = Counter(
    "embedding_cache_requests_total", "Embedding cache look-ups by layer and result.", ["layer", "result"]
)
ANSWER_CACHE_REQUESTS = Counter(
    "answer_cache_requests_total", "Look-ups of whole extractive answers (question + previous turn).", ["result"]
)
ANSWER_GENERATIONS = Counter(
    "answer_generations_total",
    "Generative answers by result: `generated`, or the fallback reason (timeout, server_error, ...).",
    ["result"],
)
ACTIVE_SESSIONS = Gauge("active_sessions", "Sessions currently held.", multiprocess_mode="livesum")
SSE_STREAMS_ACTIVE = Gauge(
    "sse_streams_active", "Server-sent event streams currently open.", multiprocess_mode="livesum"
)
STREAMS_CANCELLED = Counter(
    "streams_cancelled_total", "Answer streams stopped because the client left or cancelled.", ["transport"]
)
WEBSOCKET_CONNECTIONS = Gauge("websocket_connections", "Open WebSocket connections.", multiprocess_mode="livesum")
WEBSOCKET_MESSAGES = Counter(
    "websocket_messages_total", "WebSocket messages by direction and type.", ["direction", "type"]
)
RATE_LIMIT_REJECTIONS = Counter("rate_limit_rejections_total", "Requests refused by the rate limiter.", ["route"])
SHARED_STORAGE_ERRORS = Counter(
    "shared_storage_errors_total",
    "Failed operations on shared storage (Redis): sessions, the shared embedding cache, rate-limit counting.",
    ["component"],
)
EVENT_LOOP_LAG = Gauge(
    "event_loop_lag_seconds",
    "How late the event loop woke from its last monitoring sleep (worst worker).",
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "defi_qa_bot_build_info",
    "Always 1; the labels say which version, Python and embedding model are running.",
    ["version", "python", "embedding_model"],
    multiprocess_mode="livemax",
)


def set_build_info(version: str, python: str, embedding_model: str) -> None:
    """Publish the one build-info sample (replacing any earlier one in this process)."""
    if not multiprocess_enabled():  # clearing is not supported in multiprocess mode (one app per worker there)
        BUILD_INFO.clear()
    BUILD_INFO.labels(version=version, python=python, embedding_model=embedding_model).set(1)


def gauge_value(gauge: Gauge) -> float:
    """This process's current value of an unlabelled gauge."""
    (family,) = gauge.collect()
    return float(family.samples[0].value)


def multiprocess_enabled() -> bool:
    """Whether prometheus-client runs in multiprocess mode (several workers)."""
    return bool(os.environ.get(MULTIPROC_ENV))


def exposition() -> tuple[bytes, str]:
    """The text exposition and its content type: this process, or every worker added up."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the multiprocess directory (call at shutdown)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@contextmanager
def multiprocess_metrics(enabled: bool) -> Iterator[None]:
    """Around starting several workers: give them a fresh PROMETHEUS_MULTIPROC_DIR, removed afterwards.

    Must run before the workers import prometheus-client. A directory the operator set is used as it is
    (and must be emptied by them between runs).
    """
    if not enabled or multiprocess_enabled():
        yield
        return
    directory = tempfile.mkdtemp(prefix="defi-qa-bot-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
