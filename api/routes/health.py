"""Liveness, readiness (`/health-status`) and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from agents.agent import DeFiAgent
from api.deps import AgentDep, MetricsAuth, MonitoringDep
from api.monitoring import health_report
from api.schemas import HealthResponse
from infrastructure.metrics import exposition
from infrastructure.rate_limit import QuestionRateLimiter

router = APIRouter(tags=["operations"])

REDIS_CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health", response_model=HealthResponse)
async def health(agent: AgentDep) -> HealthResponse:
    """Liveness: the process is up and the agent is loaded."""
    entries = len(agent.retriever.knowledge_base)
    return HealthResponse(
        status="healthy", agent_loaded=True, message=f"DeFi Q&A agent ready with {entries} knowledge-base entries"
    )


@router.get("/health-status", include_in_schema=False)
async def health_status(request: Request, monitoring: MonitoringDep) -> JSONResponse:
    """Readiness: each component's status and headline figures; 503 when the service cannot answer."""
    agent: DeFiAgent | None = getattr(request.app.state, "agent", None)
    report = health_report(agent, monitoring, await _redis_reachable(request.app.state.rate_limiter))
    return JSONResponse(report, status_code=503 if report["status"] == "unhealthy" else 200)


async def _redis_reachable(limiter: QuestionRateLimiter) -> bool | None:
    """None without shared rate-limit storage; otherwise whether it answers within the timeout."""
    if not limiter.shared_storage:
        return None
    try:
        return await asyncio.wait_for(asyncio.to_thread(limiter.storage_reachable), REDIS_CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return False


@router.get("/metrics", include_in_schema=False, dependencies=[MetricsAuth])
async def metrics() -> Response:
    """Prometheus text exposition (every worker added up when several run)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)
