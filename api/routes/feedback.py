"""Feedback on answers: `POST /v2/feedback` (the WebSocket's `feedback` message goes through `submit_feedback` too)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Response

from api.deps import FeedbackDep, QuestionBudget
from api.schemas import FeedbackRequest, FeedbackResponse, documented_errors
from middleware.errors import error_response
from services.feedback import FeedbackDisabledError, FeedbackStore, FeedbackUnavailableError, UnknownAnswerError

router = APIRouter(tags=["feedback"])

_ERRORS = documented_errors(
    {
        404: "No answer with this id (or it is older than the retention)",
        409: "The question log is turned off, so there is nothing to rate",
        413: "Body too large",
        422: "Bad answer id, rating or comment",
        429: "Budget spent (see Retry-After): feedback spends it like a question",
        503: "The database cannot be reached; retry later",
    }
)


@dataclass(frozen=True)
class FeedbackRefusedError(Exception):
    """Feedback that could not be stored: the status, sentence and reason the client receives."""

    status: int
    detail: str
    reason: str


async def submit_feedback(store: FeedbackStore, request: FeedbackRequest) -> FeedbackResponse:
    """Store a rating; raises FeedbackRefusedError (404 unknown answer, 409 log off, 503 database down)."""
    try:
        stored = await store.record(request.answer_id, request.rating, request.comment, request.session_id)
    except UnknownAnswerError as error:
        raise FeedbackRefusedError(404, str(error), "answer_not_found") from None
    except FeedbackDisabledError as error:
        raise FeedbackRefusedError(409, str(error), "feedback_disabled") from None
    except FeedbackUnavailableError:
        raise FeedbackRefusedError(
            503, "Feedback cannot be stored right now; retry shortly", "database_unavailable"
        ) from None
    return FeedbackResponse(answer_id=stored.answer_id, rating=stored.rating)


@router.post("/v2/feedback", response_model=FeedbackResponse, responses=_ERRORS, dependencies=[QuestionBudget])
async def post_feedback(body: FeedbackRequest, feedback: FeedbackDep) -> FeedbackResponse | Response:
    """Rate an answer `helpful` or `wrong` (optionally with a comment); rating it again replaces the rating."""
    try:
        return await submit_feedback(feedback, body)
    except FeedbackRefusedError as refused:
        return error_response(refused.status, refused.detail, refused.reason)
