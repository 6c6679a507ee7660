"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import AgentDep
from api.schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health(agent: AgentDep) -> HealthResponse:
    """Liveness: the process is up and the agent is loaded."""
    entries = len(agent.retriever.knowledge_base)
    return HealthResponse(
        status="healthy", agent_loaded=True, message=f"DeFi Q&A agent ready with {entries} knowledge-base entries"
    )


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
