"""Liveness, readiness (`/health-status`) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import State

from api.deps import KnowledgeDep, MetricsAuth, MonitoringDep, _bearer_token, _check_token
from api.monitoring import (
    Monitoring,
    ServingParts,
    count_sessions,
    health_report,
    public_report,
)
from api.schemas import HealthResponse
from infrastructure.database import Database
from infrastructure.metrics import exposition
from infrastructure.rate_limit import QuestionRateLimiter
from infrastructure.redis_client import redis_problem
from services.question_log import QuestionLog, describe
from services.sessions import MemorySessionStore, SessionStore

router = APIRouter(tags=["operations"])

_NO_STORE = {"Cache-Control": "no-store", "Vary": "Authorization"}


@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=HealthResponse)
async def health(knowledge: KnowledgeDep) -> HealthResponse:
    """Liveness: the process is up and the agent is loaded (HEAD: the same status, no body)."""
    snapshot = knowledge.current
    entries = len(snapshot.knowledge_base)
    return HealthResponse(
        status="healthy",
        agent_loaded=True,
        message=f"DeFi Q&A agent ready with {entries} knowledge-base entries",
        kb_version=snapshot.version,
    )


@router.head("/health-status", include_in_schema=False)
@router.get("/health-status", include_in_schema=False)
async def health_status(request: Request, monitoring: MonitoringDep) -> JSONResponse:
    """Readiness: each component's status; 503 when the service cannot answer. Answers within about 0.5 s.

    Dependency checks (Redis, the session count) run concurrently, each bounded and shared by concurrent
    probes (`BoundedCheck`). Details (sentences, figures, paths) only for `details_allowed` callers.
    """
    state = request.app.state
    parts = _serving_parts(state)
    configured = _redis_configured(state)
    problem, sessions, database = await asyncio.gather(
        _redis_status(state, monitoring, configured), _sessions(state, monitoring), _database_status(state, monitoring)
    )
    report = health_report(
        parts, monitoring, problem, redis_configured=configured, active_sessions=sessions, database=database
    )
    body = report if details_allowed(request) else public_report(report)
    return JSONResponse(body, status_code=503 if report["status"] == "unhealthy" else 200, headers=_NO_STORE)


def details_allowed(request: Request) -> bool:
    """Whether `/health-status` may show details: with a valid ADMIN_TOKEN bearer, or with no token outside production.

    A missing or wrong token is not an error here (probes send none): the caller gets the public body.
    """
    # getattr: unit tests give the app a bare namespace instead of Settings.
    settings = request.app.state.settings
    expected: SecretStr | None = getattr(settings, "admin_token", None)
    if expected is None:
        return not getattr(settings, "is_production", False)
    try:
        _check_token(_bearer_token(request), expected, request.url.path)
    except HTTPException:
        return False
    return True


def _serving_parts(state: State) -> ServingParts | None:
    """The services readiness judges, or None before the lifespan has built them."""
    if getattr(state, "agent", None) is None:
        return None
    return ServingParts(state.embeddings, state.knowledge, state.settings.agent_similarity_threshold)


def _redis_configured(state: State) -> bool:
    """Whether there is a Redis to judge: the REDIS_URL pool, or a remote rate-limit storage."""
    limiter: QuestionRateLimiter = state.rate_limiter
    return getattr(state, "redis", None) is not None or limiter.shared_storage


async def _redis_status(state: State, monitoring: Monitoring, configured: bool) -> str | None:
    """None when Redis answers (or none is configured); otherwise a short reason, within the check's bound."""
    if not configured:
        return None
    check = monitoring.redis_check
    return await check.result(partial(_redis_problem, state), fallback=f"no answer within {check.timeout:g} s")


async def _redis_problem(state: State) -> str | None:
    """Ping the REDIS_URL pool, else the remote rate-limit storage (blocking client, on a thread)."""
    client: Redis | None = getattr(state, "redis", None)
    if client is not None:
        return await redis_problem(client)
    limiter: QuestionRateLimiter = state.rate_limiter
    reachable = await asyncio.to_thread(limiter.storage_reachable)
    return None if reachable else "rate-limit storage does not answer"


async def _database_status(state: State, monitoring: Monitoring) -> tuple[str, str | None] | None:
    """(dialect, problem) of the database: the question log's write failure, else a bounded ping; None without one."""
    database: Database | None = getattr(state, "database", None)
    if database is None:
        return None
    log: QuestionLog | None = getattr(state, "question_log", None)
    if log is not None and (problem := log.problem()) is not None:
        return database.dialect, problem
    check = monitoring.database_check
    problem = await check.result(
        partial(_database_problem, database), fallback=f"database: no answer within {check.timeout:g} s"
    )
    return database.dialect, problem


async def _database_problem(database: Database) -> str | None:
    try:
        await database.ping()
    except (SQLAlchemyError, OSError) as error:
        return f"database unreachable ({describe(error)})"
    return None


async def _sessions(state: State, monitoring: Monitoring) -> int | None:
    """Live sessions; None when the store cannot say in time. A shared store is asked through a bounded check."""
    sessions: SessionStore | None = getattr(state, "sessions", None)
    if sessions is None:
        return None
    if isinstance(sessions, MemorySessionStore):
        return await sessions.count()
    return await monitoring.sessions_check.result(partial(count_sessions, sessions), fallback=None)


@router.get("/metrics", include_in_schema=False, dependencies=[MetricsAuth])
async def metrics() -> Response:
    """Prometheus text exposition (every worker added up when several run)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)
