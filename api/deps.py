"""Typed dependencies shared by the routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response
from pydantic import SecretStr

from agents.agent import DeFiAgent
from api.monitoring import Monitoring
from config import Settings
from infrastructure.rate_limit import QuestionRateLimiter, RateLimitExceededError, client_address
from services.sessions import SessionStore

# Dependencies are `async def` even where they do not await: FastAPI runs a plain `def` dependency in its
# thread pool, a thread round trip per request for reading `app.state`.


async def get_agent(request: Request) -> DeFiAgent:
    """The agent built at start-up."""
    agent: DeFiAgent = request.app.state.agent
    return agent


async def get_sessions(request: Request) -> SessionStore:
    """The session store built at start-up."""
    store: SessionStore = request.app.state.agent.sessions
    return store


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def spend_question_budget(request: Request, response: Response) -> None:
    """Charge one question to the client's budget; 429 when it is spent. Sets X-RateLimit-* headers."""
    limiter: QuestionRateLimiter = request.app.state.rate_limiter
    peer = request.client.host if request.client else None
    key = client_address(peer, request.headers, request.app.state.trusted_networks)
    decision = await limiter.spend(key)
    if not decision.allowed:
        raise RateLimitExceededError(decision)
    response.headers.update(decision.headers())


async def get_monitoring(request: Request) -> Monitoring:
    """The request/answer windows, loop-lag monitor and system sampler of this process."""
    monitoring: Monitoring = request.app.state.monitoring
    return monitoring


def _bearer_token(request: Request) -> str | None:
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
AdminOnly = Depends(require_admin)
AdminPage = Depends(require_admin_page)
MetricsAuth = Depends(require_metrics_token)

AgentDep = Annotated[DeFiAgent, Depends(get_agent)]
SessionsDep = Annotated[SessionStore, Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MonitoringDep = Annotated[Monitoring, Depends(get_monitoring)]
