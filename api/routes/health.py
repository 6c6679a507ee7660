"""Liveness, readiness (`/health-status`) and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from starlette.datastructures import State

from api.deps import KnowledgeDep, MetricsAuth, MonitoringDep
from api.monitoring import ServingParts, count_sessions, health_report
from api.schemas import HealthResponse
from infrastructure.metrics import exposition
from infrastructure.rate_limit import QuestionRateLimiter
from infrastructure.redis_client import redis_problem

router = APIRouter(tags=["operations"])

REDIS_CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health", response_model=HealthResponse)
async def health(knowledge: KnowledgeDep) -> HealthResponse:
    """Liveness: the process is up and the agent is loaded."""
    entries = len(knowledge.current.knowledge_base)
    return HealthResponse(
        status="healthy", agent_loaded=True, message=f"DeFi Q&A agent ready with {entries} knowledge-base entries"
    )


@router.get("/health-status", include_in_schema=False)
async def health_status(request: Request, monitoring: MonitoringDep) -> JSONResponse:
    """Readiness: each component's status and headline figures; 503 when the service cannot answer."""
    state = request.app.state
    parts = _serving_parts(state)
    configured, problem = await _redis_check(state)
    sessions = await count_sessions(state.sessions) if getattr(state, "sessions", None) is not None else None
    report = health_report(parts, monitoring, problem, redis_configured=configured, active_sessions=sessions)
    return JSONResponse(report, status_code=503 if report["status"] == "unhealthy" else 200)


def _serving_parts(state: State) -> ServingParts | None:
    """The services readiness judges, or None before the lifespan has built them."""
    if getattr(state, "agent", None) is None:
        return None
    return ServingParts(state.embeddings, state.knowledge, state.settings.agent_similarity_threshold)


async def _redis_check(state: State) -> tuple[bool, str | None]:
    """(configured, problem): the REDIS_URL pool when set, else a remote rate-limit storage, else nothing."""
    client: Redis | None = getattr(state, "redis", None)
    if client is not None:
        return True, await redis_problem(client)
    limiter: QuestionRateLimiter = state.rate_limiter
    if not limiter.shared_storage:
        return False, None
    try:
        reachable = await asyncio.wait_for(asyncio.to_thread(limiter.storage_reachable), REDIS_CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        reachable = False
    return True, None if reachable else "rate-limit storage does not answer"


@router.get("/metrics", include_in_schema=False, dependencies=[MetricsAuth])
async def metrics() -> Response:
    """Prometheus text exposition (every worker added up when several run)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)
