"""Operator figures: `/system-metrics` (host and process) and `/performance-stats` (the last few minutes)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter

from api.deps import AdminOnly, AnswerCacheDep, EmbeddingsDep, MonitoringDep, SessionsDep
from api.monitoring import answer_cache_stats, cache_stats, count_sessions
from infrastructure.metrics import SSE_STREAMS_ACTIVE, WEBSOCKET_CONNECTIONS, gauge_value

router = APIRouter(tags=["operations"], include_in_schema=False, dependencies=[AdminOnly])


@router.get("/system-metrics")
async def system_metrics(monitoring: MonitoringDep) -> dict[str, Any]:
    """CPU, memory, process RSS, open file descriptors, threads, uptime and event-loop lag (psutil)."""
    return {**monitoring.system.snapshot(), "event_loop_lag": monitoring.loop_lag.summary()}


@router.get("/performance-stats")
async def performance_stats(
    monitoring: MonitoringDep, embeddings: EmbeddingsDep, answer_cache: AnswerCacheDep, sessions: SessionsDep
) -> dict[str, Any]:
    """Per-route count, latency percentiles and error rate over the sliding window; cache and answer figures."""
    return {
        "worker_pid": os.getpid(),  # these windows are per worker; Prometheus has the totals
        "requests": monitoring.requests.snapshot(),
        "answers": monitoring.outcomes.snapshot(),
        "cache": cache_stats(embeddings),
        "answer_cache": answer_cache_stats(answer_cache),
        "sessions": {"active": await count_sessions(sessions)},
        "connections": {
            "websocket": int(gauge_value(WEBSOCKET_CONNECTIONS)),
            "sse_streams": int(gauge_value(SSE_STREAMS_ACTIVE)),
        },
    }
