"""Typed dependencies shared by the routes."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from pydantic import SecretStr
from starlette.requests import HTTPConnection

from agents.agent import DeFiAgent, Question
from agents.answer_cache import AnswerCache
from api.monitoring import Monitoring
from config import Settings
from infrastructure.metrics import RATE_LIMIT_REJECTIONS
from infrastructure.rate_limit import QuestionRateLimiter, RateLimitExceededError, client_address
from middleware.request_context import RATE_LIMIT_HEADERS_KEY, route_template
from services.embeddings import EmbeddingService
from services.feedback import FeedbackStore
from services.insights import Insights
from services.knowledge import LiveKnowledge
from services.knowledge_admin import KnowledgeManager
from services.sessions import SessionStore

# Dependencies are `async def` even where they do not await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread round trip per request for reading `app.state`.


def from_state(name: str) -> Callable[[HTTPConnection], Awaitable[Any]]:
    """A dependency returning the service the lifespan put on `app.state.<name>` (typed by its alias below)."""

    async def dependency(connection: HTTPConnection) -> Any:
        return getattr(connection.app.state, name)

    dependency.__name__ = f"get_{name}"
    return dependency


def presented_api_key(connection: HTTPConnection) -> str | None:
    """The API key the client presented (`Authorization: Bearer <key>`, or `?api_key=` on a WebSocket) when it is
    one of API_KEYS; None otherwise. Every configured key is compared, in constant time."""
    keys: list[SecretStr] = getattr(connection.app.state.settings, "api_keys", [])
    if not keys:
        return None
    given = _bearer_token(connection)
    if given is None and connection.scope["type"] == "websocket":
        given = connection.query_params.get("api_key") or None
    if given is None:
        return None
    matches = [secrets.compare_digest(given.encode(), key.get_secret_value().encode()) for key in keys]
    return given if any(matches) else None


def client_key(connection: HTTPConnection) -> str:
    """Who spends a budget and owns sessions: the API key (hashed) when one is presented, else the client's
    address (the forwarded one when the peer is a trusted proxy)."""
    key = presented_api_key(connection)
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    peer = connection.client.host if connection.client else None
    return client_address(peer, connection.headers, connection.app.state.trusted_networks)


def api_key_required(connection: HTTPConnection, everywhere: bool = False) -> bool:
    """Whether this request lacks a key it needs: /v1/* and /mcp with API_KEYS, every question endpoint also with
    API_KEYS_REQUIRED_EVERYWHERE."""
    settings: Settings = connection.app.state.settings
    if not settings.api_keys or (everywhere and not settings.api_keys_required_everywhere):
        return False
    return presented_api_key(connection) is None


async def require_api_key(request: Request) -> None:
    """401 unless the request carries one of API_KEYS (nothing to check when API_KEYS is unset)."""
    if api_key_required(request):
        raise HTTPException(
            401,
            "This endpoint requires an API key: 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def spend_budget(connection: HTTPConnection, route: str) -> dict[str, str]:
    """Charge one question to the client's budget (HTTP or WebSocket); return the X-RateLimit-* headers.

    Raises RateLimitExceededError (counted in rate_limit_rejections_total{route}) when the budget is spent.
    """
    limiter: QuestionRateLimiter = connection.app.state.rate_limiter
    decision = await limiter.spend(client_key(connection))
    if not decision.allowed:
        RATE_LIMIT_REJECTIONS.labels(route=route).inc()
        raise RateLimitExceededError(decision)
    return decision.headers()


async def charge_request(request: Request, route: str) -> None:
    """`spend_budget` for an HTTP request; the X-RateLimit-* headers go on whatever response follows, errors
    included (RequestContextMiddleware)."""
    headers = await spend_budget(request, route)
    request.scope.setdefault("state", {})[RATE_LIMIT_HEADERS_KEY] = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]


async def spend_question_budget(request: Request) -> None:
    """Charge one question to the client's budget; 429 when it is spent."""
    if api_key_required(request, everywhere=True):
        raise HTTPException(
            401,
            "This server requires an API key: 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    await charge_request(request, route_template(request.scope))


async def accept_question(
    agent: DeFiAgent,
    request: Request,
    response: Response,
    raw: object,
    session_id: str | None,
    *,
    new_session: bool,
    transport: str = "rest",
) -> Question:
    """Validate the question and resolve its session through the agent; name the session in X-Session-ID."""
    question = await agent.accept(
        raw, session_id, new_session=new_session, owner=client_key(request), transport=transport
    )
    if question.session is not None:
        response.headers["X-Session-ID"] = question.session.id
    return question


def _bearer_token(request: HTTPConnection) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _check_token(given: str | None, expected: SecretStr | None, what: str) -> None:
    """Nothing to check when `expected` is unset; otherwise 401 unless `given` matches (constant time)."""
    if expected is None:
        return
    if given is None:
        raise HTTPException(
            401, f"{what} requires an 'Authorization: Bearer <token>' header", headers={"WWW-Authenticate": "Bearer"}
        )
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            401, f"Invalid token for {what}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


async def require_admin(request: Request) -> None:
    """ADMIN_TOKEN, when set, guards the operator endpoints."""
    settings: Settings = request.app.state.settings
    _check_token(_bearer_token(request), settings.admin_token, request.url.path)


async def require_admin_page(request: Request) -> None:
    """Like `require_admin`, also accepting `?token=` so the dashboard can be opened from a link."""
    settings: Settings = request.app.state.settings
    given = _bearer_token(request) or request.query_params.get("token") or None
    _check_token(given, settings.admin_token, request.url.path)


async def require_metrics_token(request: Request) -> None:
    """METRICS_TOKEN, when set, guards /metrics."""
    settings: Settings = request.app.state.settings
    _check_token(_bearer_token(request), settings.metrics_token, request.url.path)


QuestionBudget = Depends(spend_question_budget)
ApiKey = Depends(require_api_key)
AdminOnly = Depends(require_admin)
AdminPage = Depends(require_admin_page)
MetricsAuth = Depends(require_metrics_token)

AgentDep = Annotated[DeFiAgent, Depends(from_state("agent"))]
SessionsDep = Annotated[SessionStore, Depends(from_state("sessions"))]
SettingsDep = Annotated[Settings, Depends(from_state("settings"))]
EmbeddingsDep = Annotated[EmbeddingService, Depends(from_state("embeddings"))]
KnowledgeDep = Annotated[LiveKnowledge, Depends(from_state("knowledge"))]
AnswerCacheDep = Annotated[AnswerCache | None, Depends(from_state("answer_cache"))]
MonitoringDep = Annotated[Monitoring, Depends(from_state("monitoring"))]
"""The monitoring windows, loop-lag monitor and system sampler of this process."""
FeedbackDep = Annotated[FeedbackStore, Depends(from_state("feedback"))]
InsightsDep = Annotated[Insights, Depends(from_state("insights"))]
KnowledgeManagerDep = Annotated[KnowledgeManager, Depends(from_state("knowledge_manager"))]
