"""Prometheus metric definitions: one registry of names, used by every layer above."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ACTIVE_SESSIONS = Gauge("active_sessions", "Sessions currently held by this process.")
SSE_STREAMS_ACTIVE = Gauge("sse_streams_active", "Server-sent event streams currently open.")
STREAMS_CANCELLED = Counter(
    "streams_cancelled_total", "Answer streams stopped because the client left or cancelled.", ["transport"]
)
WEBSOCKET_CONNECTIONS = Gauge("websocket_connections", "Open WebSocket connections.")
WEBSOCKET_MESSAGES = Counter(
    "websocket_messages_total", "WebSocket messages by direction and type.", ["direction", "type"]
)
RATE_LIMIT_REJECTIONS = Counter("rate_limit_rejections_total", "Requests refused by the rate limiter.", ["route"])
