"""Server-Sent Events: the agent's stream events as `data: <json>` lines (the bytes of FastAPI's native SSE)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request, Response

from agents.agent import Question
from agents.events import StreamEvent
from api.deps import AgentDep, QuestionBudget, accept_question
from api.schemas import AskRequest, ErrorResponse, SessionAskRequest
from api.sse import ITEM_SCHEMA, EventStreamResponse, sse_data

logger = structlog.get_logger(__name__)
router = APIRouter(tags=["streaming"])


def _json_error(description: str) -> dict[str, Any]:
    """An error documented as application/json (a `model` alone would inherit the route's text/event-stream)."""
    schema = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# The 200 as FastAPI documents a native SSE endpoint: text/event-stream with an `itemSchema` of the events.
_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`data:` lines carrying `metadata`, then `word`..., then `complete` (or `error`) JSON events.",
        "content": {"text/event-stream": {"itemSchema": ITEM_SCHEMA}},
    },
    413: _json_error("Body too large"),
    422: _json_error("Invalid question or request"),
    429: _json_error("Question budget spent (see Retry-After)"),
    503: _json_error("Session store (Redis) unavailable, for a question inside a session"),
}


# Each stream's question is accepted in a dependency, before the response starts: a bad question is a 422.


async def _stateless_question(body: AskRequest, agent: AgentDep) -> Question:
    return await agent.accept(body.question, transport="sse")


async def _session_question(body: SessionAskRequest, agent: AgentDep, request: Request, response: Response) -> Question:
    return await accept_question(
        agent, request, response, body.question, body.session_id, new_session=True, transport="sse"
    )


async def _query_question(
    agent: AgentDep,
    request: Request,
    response: Response,
    question: Annotated[str, Query(description="The question.")],
    session_id: Annotated[
        str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Continue this session.")
    ] = None,
) -> Question:
    return await accept_question(agent, request, response, question, session_id, new_session=False, transport="sse")


QuestionFrom = Callable[..., Awaitable[Question]]


def stream_endpoint(accept: QuestionFrom) -> Callable[..., Awaitable[EventStreamResponse]]:
    """An SSE endpoint streaming the agent's events for the question `accept` prepared.

    The agent's stream is opened in a dependency and closed when the request ends, on the request's own
    exit stack: FastAPI stops iterating an abandoned stream without closing it, and a stream that is never
    closed would hold its session (one question at a time) until the garbage collector found it.
    Open and abandoned streams are counted by RequestContextMiddleware.
    """

    # Defaults, not Annotated: under `from __future__ import annotations` the local names could not be resolved.
    async def events_of(
        agent: AgentDep,
        question: Question = Depends(accept),  # noqa: B008
    ) -> AsyncIterator[AsyncGenerator[StreamEvent, None]]:
        events = agent.stream(question)
        try:
            yield events
        finally:
            await events.aclose()  # at once when the client is gone, or after the last event

    async def endpoint(
        response: Response,
        events: AsyncGenerator[StreamEvent, None] = Depends(events_of),  # noqa: B008
    ) -> EventStreamResponse:
        # The headers the dependencies set (X-Session-ID) follow the stream's own, as with FastAPI's SSE.
        encoded = (sse_data(event.to_wire()) async for event in events)
        return EventStreamResponse(encoded, response.status_code or 200, response.headers.raw)

    return endpoint


def _add(path: str, method: str, accept: QuestionFrom, name: str, description: str) -> None:
    router.add_api_route(
        path,
        stream_endpoint(accept),
        methods=[method],
        name=name,
        description=description,
        response_class=EventStreamResponse,
        responses=_STREAM_DOC,
        dependencies=[QuestionBudget],
    )


_add("/ask-stream", "POST", _stateless_question, "ask_stream", "Stream the answer to one question, without a session.")
_add(
    "/v2/ask-stream",
    "POST",
    _session_question,
    "ask_stream_in_session",
    "Stream the answer inside a session (its id is in the `X-Session-ID` header and `metadata`).",
)
_add("/ask-stream", "GET", _query_question, "ask_stream_get", "The same stream over GET, for browsers' `EventSource`.")
