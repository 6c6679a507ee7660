"""Feedback on answers: a user says an answer was helpful or wrong, optionally with a comment.

A rating refers to an answer in the question log. One rating per answer and rater: the rater is the
session the feedback comes from (hashed), or the answer's own session when none is given, so a second
rating from the same conversation replaces the first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import SQLAlchemyError

from infrastructure.metrics import ANSWER_FEEDBACK
from infrastructure.tables import FeedbackRow
from services.question_log import (
    FLUSH_INTERVAL_SECONDS,
    QuestionLog,
    QuestionLogUnavailableError,
    describe,
    utcnow,
)

Rating = Literal["helpful", "wrong"]
COMMENT_MAX_CHARS = 1000
OTHER_QUEUES_SECONDS = 2 * FLUSH_INTERVAL_SECONDS


class UnknownAnswerError(LookupError):
    """No logged answer has this id."""


class FeedbackDisabledError(RuntimeError):
    """The question log is off (QUESTION_LOG_ENABLED=false): there is no answer to attach feedback to."""


class FeedbackUnavailableError(RuntimeError):
    """The database cannot be reached; the caller should retry later."""


@dataclass(frozen=True, slots=True)
class RecordedFeedback:
    """A stored rating."""

    answer_id: str
    rating: Rating
    entry_id: str | None


class FeedbackStore:
    """Stores ratings in the `feedback` table, next to the question log they refer to."""

    def __init__(self, log: QuestionLog) -> None:
        self._log = log

    async def record(
        self, answer_id: str, rating: Rating, comment: str | None = None, session_id: str | None = None
    ) -> RecordedFeedback:
        """Store (or replace) a rating. Raises UnknownAnswerError, FeedbackDisabledError or FeedbackUnavailableError."""
        if not self._log.enabled:
            raise FeedbackDisabledError("Feedback needs the question log, which is turned off on this server")
        try:
            answer = await self._log.find(answer_id)
            if answer is None:  # another worker or replica may still hold it in its queue (flushed within 0.5 s)
                await asyncio.sleep(OTHER_QUEUES_SECONDS)
                answer = await self._log.find(answer_id)
        except QuestionLogUnavailableError as error:
            raise FeedbackUnavailableError(str(error)) from error
        if answer is None:
            raise UnknownAnswerError(f"No answer with id {answer_id!r}")
        rater = self._log.hash_session(session_id) if session_id else answer.session_hash
        now = utcnow()
        database = self._log.database
        values = {
            "answer_id": answer_id,
            "rater_hash": rater or "",
            "rating": rating,
            "comment": comment or None,
            "entry_id": answer.top_entry_id,
            "created_at": now,
            "updated_at": now,
        }
        statement = (
            database.insert(FeedbackRow)
            .values(**values)
            .on_conflict_do_update(
                index_elements=["answer_id", "rater_hash"],
                set_={"rating": rating, "comment": comment or None, "updated_at": now},
            )
        )
        try:
            async with database.session() as session:
                await session.execute(statement)
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            raise FeedbackUnavailableError(describe(error)) from error
        ANSWER_FEEDBACK.labels(rating=rating).inc()
        return RecordedFeedback(answer_id, rating, answer.top_entry_id)
