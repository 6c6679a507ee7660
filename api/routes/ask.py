"""Question endpoints: stateless `/ask` and session-aware `/v2/ask`, plus session inspection."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from agents.agent import AgentResult
from api.deps import AgentDep, QuestionBudget, SessionsDep, SettingsDep, accept_question
from api.schemas import (
    AskRequest,
    AskResponse,
    SessionAskRequest,
    SessionOut,
    TurnOut,
    answer_fields,
    documented_errors,
)
from middleware.errors import error_response

router = APIRouter(tags=["questions"])

_ERRORS = documented_errors(
    {
        413: "Body too large",
        422: "Invalid question",
        429: "Question budget spent (see Retry-After)",
        503: "Embedding model or session store unavailable",
    }
)
_SESSION_ERRORS = documented_errors(
    {
        404: "Unknown or expired session",
        503: "Session store (Redis) unavailable",
    }
)


def _to_response(result: AgentResult) -> AskResponse:
    return AskResponse.model_validate(answer_fields(result))  # one validation of the whole response, sources included


@router.post("/ask", response_model=AskResponse, responses=_ERRORS, dependencies=[QuestionBudget])
async def ask(body: AskRequest, agent: AgentDep) -> AskResponse:
    """Answer one question without a session."""
    return _to_response(await agent.answer(await agent.accept(body.question)))


@router.post("/v2/ask", response_model=AskResponse, responses=_ERRORS, dependencies=[QuestionBudget])
async def ask_in_session(body: SessionAskRequest, agent: AgentDep, request: Request, response: Response) -> AskResponse:
    """Answer a question inside a session; unknown or expired ids start a new session."""
    question = await accept_question(agent, request, response, body.question, body.session_id, new_session=True)
    return _to_response(await agent.answer(question))


@router.get("/v2/sessions/{session_id}", response_model=SessionOut, responses=_SESSION_ERRORS)
async def get_session(session_id: str, sessions: SessionsDep, settings: SettingsDep) -> SessionOut | Response:
    """The turns of a live session."""
    session = await sessions.get(session_id)
    if session is None:
        return error_response(404, f"Session {session_id[:128]} not found or expired", "session_not_found")
    return SessionOut(
        session_id=session.id,
        created_at=session.created_at,
        last_active=session.last_active,
        expires_at=session.last_active + settings.session_ttl_seconds,
        turns=[
            TurnOut(
                question=turn.question,
                answer=turn.answer,
                confidence=turn.confidence,
                processing_stage=turn.processing_stage,
                sources=list(turn.sources),
                timestamp=turn.timestamp,
            )
            for turn in session.turns
        ],
    )


@router.delete("/v2/sessions/{session_id}", status_code=204, responses=_SESSION_ERRORS)
async def delete_session(session_id: str, sessions: SessionsDep) -> Response:
    """End a session."""
    if not await sessions.delete(session_id):
        return error_response(404, f"Session {session_id[:128]} not found or expired", "session_not_found")
    return Response(status_code=204)
