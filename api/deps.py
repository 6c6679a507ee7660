"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response

from agents.agent import DeFiAgent
from config import Settings
from infrastructure.rate_limit import QuestionRateLimiter, RateLimitExceededError, client_address
from services.sessions import SessionStore


def get_agent(request: Request) -> DeFiAgent:
    """The agent built at start-up."""
    agent: DeFiAgent = request.app.state.agent
    return agent


def get_sessions(request: Request) -> SessionStore:
    """The session store built at start-up."""
    store: SessionStore = request.app.state.agent.sessions
    return store


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def spend_question_budget(request: Request, response: Response) -> None:
    """Charge one question to the client's budget; 429 when it is spent. Sets X-RateLimit-* headers."""
    limiter: QuestionRateLimiter = request.app.state.rate_limiter
    peer = request.client.host if request.client else None
    key = client_address(peer, dict(request.headers), request.app.state.trusted_networks)
    decision = await limiter.spend(key)
    if not decision.allowed:
        raise RateLimitExceededError(decision)
    response.headers.update(decision.headers())


QuestionBudget = Depends(spend_question_budget)

AgentDep = Annotated[DeFiAgent, Depends(get_agent)]
SessionsDep = Annotated[SessionStore, Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
