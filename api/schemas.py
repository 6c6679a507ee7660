"""Request and response bodies of the HTTP API (they also document /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from agents.agent import AgentResult
from services.sources import ProcessingStage, Source


class AskRequest(BaseModel):
    """A stateless question."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"question": "What is impermanent loss?"}]})

    question: StrictStr = Field(description="The question, 1 to QUESTION_MAX_CHARS characters after stripping.")


class SessionAskRequest(AskRequest):
    """A question inside a conversation; omit `session_id` to start one."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"question": "What are its risks?", "session_id": "5f0c2a…"}]}
    )

    session_id: StrictStr | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$", description="An id returned by an earlier answer."
    )


class AskResponse(BaseModel):
    """An answer. `confidence` is the best entry's similarity in [0, 1]."""

    answer: str
    confidence: float = Field(ge=0.0, le=1.0)
    processing_stage: ProcessingStage
    error: str | None = None
    session_id: str | None = None
    sources: list[Source]
    unknown_terms: list[str] = Field(
        default_factory=list,
        description="Names in the question that the knowledge base never mentions; the answer says so.",
    )
    answer_id: str = Field(description="This answer's id: rate it with POST /v2/feedback.")
    kb_version: int | None = Field(default=None, description="The knowledge-base version that answered.")


def answer_fields(result: AgentResult) -> dict[str, Any]:
    """The fields of an answer as `/ask`, `/v2/ask` and MCP's `ask_defi` return it (validated by their model)."""
    return {
        "answer": result.answer,
        "confidence": result.confidence,
        "processing_stage": result.processing_stage,
        "error": result.error,
        "session_id": result.session_id,
        "sources": result.sources,
        "unknown_terms": list(result.unknown_terms),
        "answer_id": result.answer_id,
        "kb_version": result.kb_version,
    }


class FeedbackRequest(BaseModel):
    """A rating of one answer."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"answer_id": "9f1c…", "rating": "wrong", "comment": "The fee changed"}]}
    )

    answer_id: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The `answer_id` of an answer.")
    rating: Literal["helpful", "wrong"]
    comment: StrictStr | None = Field(default=None, max_length=1000, description="Optional, up to 1,000 characters.")
    session_id: StrictStr | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,128}$",
        description="The rater's session (default: the answer's own); one rating per answer and session.",
    )


class FeedbackResponse(BaseModel):
    """A stored rating (a second one from the same session replaced the first)."""

    status: Literal["recorded"] = "recorded"
    answer_id: str
    rating: Literal["helpful", "wrong"]


class TurnOut(BaseModel):
    """One answered question of a session."""

    question: str
    answer: str
    confidence: float
    processing_stage: ProcessingStage
    sources: list[Source]
    timestamp: float


class SessionOut(BaseModel):
    """A session and its turns, oldest first."""

    session_id: str
    created_at: float
    last_active: float
    expires_at: float
    turns: list[TurnOut]


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["healthy"]
    agent_loaded: bool
    message: str
    kb_version: int | None = Field(default=None, description="The live knowledge-base version.")


class ErrorResponse(BaseModel):
    """The error format of every endpoint: `code` is the HTTP status, `reason` the stable reason."""

    detail: str = Field(description="What went wrong, for people.")
    type: str = Field(description="The class of error, e.g. validation_error.")
    code: int = Field(description="The HTTP status of the response.")
    reason: str = Field(description="A stable machine-readable reason, e.g. question_empty.")


def documented_errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: each status answered with an `ErrorResponse`, described for /openapi.json."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}
