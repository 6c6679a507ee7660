"""Server-Sent Events: the agent's stream events as `data: <json>` lines (FastAPI's native SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from agents.agent import DeFiAgent
from api.deps import AgentDep, QuestionBudget
from api.schemas import AskRequest, ErrorResponse, SessionAskRequest
from services.sessions import Session

logger = structlog.get_logger(__name__)
router = APIRouter(tags=["streaming"])


def _json_error(description: str) -> dict[str, Any]:
    """An error documented as application/json (a `model` alone would inherit the route's text/event-stream)."""
    schema = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# FastAPI documents the 200 itself (text/event-stream with an `itemSchema` of the yielded events).
_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`data:` lines carrying `metadata`, then `word`..., then `complete` (or `error`) JSON events."
    },
    413: _json_error("Body too large"),
    422: _json_error("Invalid question or request"),
    429: _json_error("Question budget spent (see Retry-After)"),
    503: _json_error("Session store (Redis) unavailable, for a question inside a session"),
}


async def answer_events(agent: DeFiAgent, question: str, session: Session | None) -> AsyncIterator[ServerSentEvent]:
    """Wrap the agent's events as SSE (open and abandoned streams are counted by RequestContextMiddleware)."""
    async for event in agent.stream(question, session):
        yield ServerSentEvent(data=event)


async def _stateless_question(body: AskRequest, agent: AgentDep) -> str:
    return agent.clean_question(body.question)


async def _session_question(body: SessionAskRequest, agent: AgentDep, response: Response) -> tuple[str, Session]:
    question = agent.clean_question(body.question)
    session = await agent.sessions.get_or_create(body.session_id)
    response.headers["X-Session-ID"] = session.id
    return question, session


async def _query_question(
    agent: AgentDep,
    response: Response,
    question: Annotated[str, Query(description="The question.")],
    session_id: Annotated[
        str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Continue this session.")
    ] = None,
) -> tuple[str, Session | None]:
    cleaned = agent.clean_question(question)
    if session_id is None:
        return cleaned, None
    session = await agent.sessions.get_or_create(session_id)
    response.headers["X-Session-ID"] = session.id
    return cleaned, session


@router.post("/ask-stream", response_class=EventSourceResponse, responses=_STREAM_DOC, dependencies=[QuestionBudget])
async def ask_stream(
    question: Annotated[str, Depends(_stateless_question)], agent: AgentDep
) -> AsyncIterator[ServerSentEvent]:
    """Stream the answer to one question, without a session."""
    async for event in answer_events(agent, question, None):
        yield event


@router.post("/v2/ask-stream", response_class=EventSourceResponse, responses=_STREAM_DOC, dependencies=[QuestionBudget])
async def ask_stream_in_session(
    prepared: Annotated[tuple[str, Session], Depends(_session_question)], agent: AgentDep
) -> AsyncIterator[ServerSentEvent]:
    """Stream the answer inside a session (its id is in the `X-Session-ID` header and `metadata`)."""
    question, session = prepared
    async for event in answer_events(agent, question, session):
        yield event


@router.get("/ask-stream", response_class=EventSourceResponse, responses=_STREAM_DOC, dependencies=[QuestionBudget])
async def ask_stream_get(
    prepared: Annotated[tuple[str, Session | None], Depends(_query_question)], agent: AgentDep
) -> AsyncIterator[ServerSentEvent]:
    """The same stream over GET, for browsers' `EventSource`."""
    question, session = prepared
    async for event in answer_events(agent, question, session):
        yield event
