"""The question log: every answered question, written to the database off the answer path.

`record` is synchronous and never waits: it puts the row in a bounded in-process queue that a background
task flushes in batches. While the database is unreachable, rows wait in the queue (up to
QUESTION_LOG_QUEUE_SIZE, then new ones are dropped and counted) and the health report says why; writing
resumes by itself when the database answers again. Session ids are stored only as salted hashes (the salt
lives in the database, so every replica hashes alike); client addresses are never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from infrastructure.database import Database, new_salt
from infrastructure.metrics import QUESTION_LOG_DROPPED, QUESTION_LOG_PENDING, QUESTION_LOG_WRITTEN
from infrastructure.tables import AnswerRow

logger = structlog.get_logger(__name__)

Outcome = Literal["answered", "no_match", "generative", "fallback", "error"]
Transport = Literal["rest", "sse", "websocket", "openai", "mcp"]

SALT_KEY = "session_hash_salt"
BATCH_SIZE = 500
FLUSH_INTERVAL_SECONDS = 0.5
WRITE_TIMEOUT_SECONDS = 10.0
RETRY_PAUSE_SECONDS = (0.5, 1.0, 2.0, 5.0)
PURGE_INTERVAL_SECONDS = 3600.0


class QuestionLogUnavailableError(RuntimeError):
    """The log cannot answer right now (the database is unreachable)."""


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """What the log keeps of one question; `session_id` is hashed before it is stored."""

    answer_id: str
    created_at: datetime
    transport: str
    question: str
    resolved_question: str | None
    top_entry_id: str | None
    confidence: float | None
    outcome: Outcome
    latency_ms: float
    session_id: str | None
    kb_version: int | None
    unknown_terms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoggedAnswer:
    """What feedback needs to know of a logged answer."""

    answer_id: str
    top_entry_id: str | None
    session_hash: str | None


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class QuestionLog:
    """A bounded queue of answer records flushed to the `answers` table in batches."""

    def __init__(
        self,
        database: Database,
        *,
        enabled: bool,
        max_chars: int,
        retention_days: int,
        queue_size: int,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.database = database
        self.enabled = enabled
        self._max_chars = max_chars
        self._retention = timedelta(days=retention_days)
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._pending: dict[str, AnswerRecord] = {}
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._salt: str | None = None
        self._failure: str | None = None
        self._failed_since: float | None = None
        self.dropped = 0

    async def start(self) -> None:
        """Read (or create) the shared salt; needs the database (start-up fails without it)."""
        self._salt = await self.database.shared_value(SALT_KEY, new_salt())

    def hash_session(self, session_id: str | None) -> str | None:
        """The salted SHA-256 of a session id (None stays None)."""
        if session_id is None:
            return None
        assert self._salt is not None, "QuestionLog.start() was not awaited"
        return hashlib.sha256(f"{self._salt}:{session_id}".encode()).hexdigest()

    def record(self, record: AnswerRecord) -> None:
        """Queue one row (never blocks); a full queue drops the row and counts it."""
        if not self.enabled:
            return
        if len(self._pending) >= self._queue_size:
            self._drop(1, "queue_full")
            return
        self._pending[record.answer_id] = record
        QUESTION_LOG_PENDING.inc()
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    async def run(self) -> None:
        """Flush queued rows every FLUSH_INTERVAL_SECONDS (sooner when a batch is full), pausing after failures."""
        failures = 0
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL_SECONDS)
            self._wake.clear()
            if await self.flush():
                failures = 0
            else:
                await asyncio.sleep(RETRY_PAUSE_SECONDS[min(failures, len(RETRY_PAUSE_SECONDS) - 1)])
                failures += 1

    async def flush(self) -> bool:
        """Write every queued row now; False when the database could not be reached (rows stay queued)."""
        async with self._flushing:
            while self._pending:
                batch = list(itertools.islice(self._pending.values(), self._batch_size))
                try:
                    await asyncio.wait_for(self._write(batch), WRITE_TIMEOUT_SECONDS)
                except IntegrityError as error:  # a row the database refuses would block the queue forever
                    self._remove(batch)
                    self._drop(len(batch), "refused")
                    logger.error("question_log_batch_refused", rows=len(batch), error=str(error.orig))
                    continue
                except (OperationalError, DBAPIError, SQLAlchemyError, OSError, TimeoutError) as error:
                    self._failed(error)
                    return False
                self._remove(batch)
                QUESTION_LOG_WRITTEN.inc(len(batch))
            if self._failure is not None:
                logger.info(
                    "question_log_recovered", failed_for_seconds=round(time.monotonic() - (self._failed_since or 0), 1)
                )
            self._failure = None
            self._failed_since = None
            return True

    async def find(self, answer_id: str) -> LoggedAnswer | None:
        """The logged answer with this id (flushing it first when it is still queued); None when unknown or
        older than the retention.

        Raises QuestionLogUnavailableError when the database cannot be reached.
        """
        if answer_id in self._pending and not await self.flush():
            raise QuestionLogUnavailableError(self._failure or "the database is unreachable")
        try:
            async with self.database.session() as session:
                row = (
                    await session.execute(
                        select(AnswerRow.id, AnswerRow.top_entry_id, AnswerRow.session_hash).where(
                            AnswerRow.id == answer_id, AnswerRow.created_at >= utcnow() - self._retention
                        )
                    )
                ).first()
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            raise QuestionLogUnavailableError(describe(error)) from error
        return LoggedAnswer(row.id, row.top_entry_id, row.session_hash) if row is not None else None

    async def purge(self, now: datetime | None = None) -> int:
        """Delete rows (and their feedback) older than QUESTION_LOG_RETENTION_DAYS; returns how many answers went."""
        cutoff = (now or utcnow()) - self._retention
        async with self.database.session() as session:
            result = await session.execute(delete(AnswerRow).where(AnswerRow.created_at < cutoff))
        removed = int(getattr(result, "rowcount", 0) or 0)
        if removed:
            logger.info("question_log_purged", rows=removed, older_than=cutoff.isoformat())
        return removed

    async def run_purge(self, interval: float = PURGE_INTERVAL_SECONDS) -> None:
        """Purge at start and then every `interval` seconds; a failed purge is logged and retried next time."""
        while True:
            try:
                await self.purge()
            except (SQLAlchemyError, OSError) as error:
                logger.warning("question_log_purge_failed", error=describe(error))
            await asyncio.sleep(interval)

    def problem(self) -> str | None:
        """Why the log is not writing right now (for /health-status), or None when it is."""
        if self._failure is None:
            return None
        return f"question log cannot write ({self._failure}); {len(self._pending)} rows waiting, {self.dropped} dropped"

    async def close(self) -> None:
        """Write what is still queued (bounded), then stop."""
        if self._pending:
            with suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), WRITE_TIMEOUT_SECONDS)
            if self._pending:
                self._drop(len(self._pending), "shutdown")
                self._remove(list(self._pending.values()))

    async def _write(self, batch: list[AnswerRecord]) -> None:
        rows = [self._row(record) for record in batch]
        async with self.database.session() as session:
            await session.execute(
                self.database.insert(AnswerRow).on_conflict_do_nothing(index_elements=["id"]),
                rows,
            )

    def _row(self, record: AnswerRecord) -> dict[str, object]:
        return {
            "id": record.answer_id,
            "created_at": record.created_at,
            "transport": record.transport,
            "question": record.question[: self._max_chars],
            "resolved_question": record.resolved_question[: self._max_chars] if record.resolved_question else None,
            "top_entry_id": record.top_entry_id,
            "confidence": record.confidence,
            "outcome": record.outcome,
            "latency_ms": round(record.latency_ms, 3),
            "session_hash": self.hash_session(record.session_id),
            "kb_version": record.kb_version,
            "unknown_terms": ",".join(record.unknown_terms) or None,
        }

    def _remove(self, batch: list[AnswerRecord]) -> None:
        for record in batch:
            if self._pending.pop(record.answer_id, None) is not None:
                QUESTION_LOG_PENDING.dec()

    def _drop(self, rows: int, reason: str) -> None:
        self.dropped += rows
        QUESTION_LOG_DROPPED.inc(rows)
        logger.warning("question_log_dropped", rows=rows, reason=reason, dropped_total=self.dropped)

    def _failed(self, error: BaseException) -> None:
        if self._failure is None:
            self._failed_since = time.monotonic()
            logger.error("question_log_write_failed", error=describe(error), waiting=len(self._pending))
        self._failure = describe(error)


def describe(error: BaseException) -> str:
    """A one-line description of a database error, without the SQL statement or parameters."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        return f"{type(error.orig).__name__}: {str(error.orig).splitlines()[0][:200]}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
