"""The DeFi agent: its one job is to answer or stream a question, optionally inside a session.

It sees its services only through narrow interfaces (an embedder, the live knowledge base, a session
store, optionally a chat model) and exposes none of them. A question's path: the route hands the raw
text and session id to `accept` (validation, session), then `answer` or `stream` runs the graph with
the knowledge snapshot current at that moment and records the turn.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from agents.answer_cache import AnswerCache, AnswerKey
from agents.context import AgentSettings, Generator, GraphContext, NameChecker, QueryEmbedder, Ranker
from agents.events import CompleteEvent, ErrorEvent, StreamEvent
from agents.graph import build_graph
from agents.state import AgentState, InputState
from agents.validation import clean_question
from infrastructure.logging import session_tag, truncate_for_log
from infrastructure.metrics import AGENT_CONFIDENCE, AGENT_PROCESSING, AGENT_QUERIES
from services.embedding_providers import EmbeddingError
from services.question_log import AnswerRecord, Outcome, utcnow
from services.sessions import Session, SessionStore, SessionStoreUnavailableError, Turn
from services.sources import ProcessingStage, Source

logger = structlog.get_logger(__name__)

EMBEDDING_UNAVAILABLE = "The embedding model is unavailable; please retry shortly."

AnswerListener = Callable[[AnswerRecord], None]
"""Told of every finished question (answered, declined or failed); must not block (e.g. the question log's queue)."""


class AgentUnavailableError(RuntimeError):
    """The agent cannot answer right now (e.g. the embedder failed); the caller should retry later."""


class SessionBusyError(RuntimeError):
    """Another question on the same session was still being answered after SESSION_WAIT_SECONDS."""


class KnowledgeView(Protocol):
    """What the agent reads of one knowledge-base snapshot."""

    @property
    def version(self) -> int:
        """The snapshot's version (part of the answer cache key)."""
        ...

    @property
    def ranker(self) -> Ranker:
        """Ranks this snapshot's entries."""
        ...

    @property
    def names(self) -> NameChecker:
        """Every name this snapshot's entries mention (for questions about unknown ones)."""
        ...


class KnowledgeSource(Protocol):
    """The live knowledge base: the snapshot to answer a new question from."""

    @property
    def current(self) -> KnowledgeView:
        """The current snapshot."""
        ...


@dataclass(frozen=True)
class Question:
    """A validated question and the session it belongs to (None: a stateless question)."""

    text: str
    session: Session | None = None
    transport: str = "rest"
    previous: str | None = None
    """Without a session: the previous question of the conversation, given by the caller (OpenAI-style APIs)."""


@dataclass(frozen=True)
class AgentResult:
    """A finished answer."""

    answer: str
    confidence: float
    processing_stage: ProcessingStage
    sources: list[Source]
    resolved_question: str
    session_id: str | None = None
    error: str | None = None
    unknown_terms: tuple[str, ...] = ()
    answer_id: str = ""
    kb_version: int | None = None


class DeFiAgent:
    """Answers DeFi questions from the knowledge base; session-aware."""

    def __init__(
        self,
        embedder: QueryEmbedder,
        knowledge: KnowledgeSource,
        sessions: SessionStore,
        settings: AgentSettings,
        generator: Generator | None = None,
        answer_cache: AnswerCache | None = None,
        on_answer: AnswerListener | None = None,
    ) -> None:
        self._embedder = embedder
        self._knowledge = knowledge
        self._sessions = sessions
        self._settings = settings
        self._generator = generator
        self._answers = answer_cache if generator is None else None  # generated answers are not repeatable
        self._on_answer = on_answer
        self._graph = build_graph(generative=generator is not None)

    async def accept(
        self,
        raw: object,
        session_id: str | None = None,
        *,
        new_session: bool = False,
        owner: str = "",
        adopt_id: bool = False,
        transport: str = "rest",
        previous: str | None = None,
    ) -> Question:
        """Validate a question (raises InvalidQuestionError) and attach its session.

        `session_id` continues that session (a new one is started when it is unknown, expired or deleted);
        `new_session` starts one when no id is given; otherwise the question is stateless. A new session
        counts against `owner` (the client); `adopt_id` creates it under `session_id` itself (an id this
        server announced but never stored). `transport` names the surface it came from, for the question log.
        `previous` gives a stateless question its conversation (the question before it), as a session would.
        """
        text = clean_question(raw, self._settings.question_max_chars)
        if session_id is None and not new_session:
            before = clean_question(previous, self._settings.question_max_chars) if previous is not None else None
            return Question(text, transport=transport, previous=before)
        session = await self._sessions.get_or_create(session_id, owner, adopt_id=adopt_id)
        return Question(text, session, transport)

    async def answer(self, question: Question) -> AgentResult:
        """Answer one question; inside a session the previous turn gives follow-ups their context.

        Questions on one session are answered one at a time, in order (streams included): this one waits
        for the running one up to SESSION_WAIT_SECONDS, then raises SessionBusyError.
        """
        async with self._turn_of(question.session):
            started = time.perf_counter()
            snapshot = self._knowledge.current
            return await self._finish(question, await self._final_state(question, snapshot, started), snapshot, started)

    async def stream(self, question: Question) -> AsyncGenerator[StreamEvent, None]:
        """Yield `metadata`, `word`... and `complete` events; an `error` event ends a failed stream.

        No lock is held while events are yielded: a consumer that stops iterating (a client gone) can
        never block the session. The previous turn is read at the start and this turn appended at the end.
        """
        try:
            async with self._turn_of(question.session):
                async for event in self._stream_locked(question):
                    yield event
        except SessionBusyError as error:
            yield ErrorEvent(str(error), "session_busy", 409)

    async def _stream_locked(self, question: Question) -> AsyncIterator[StreamEvent]:
        started = time.perf_counter()
        snapshot = self._knowledge.current
        final: AgentState | None = None
        try:
            async for mode, chunk in self._graph.astream(
                self._input(question, streaming=True),
                context=self._context(snapshot),
                stream_mode=["custom", "values"],
            ):
                if mode == "custom" and isinstance(chunk, tuple):  # several events at once (agents.graph.compose)
                    for event in chunk:
                        yield cast(StreamEvent, event)
                elif mode == "custom":
                    yield cast(StreamEvent, chunk)
                else:
                    final = cast(AgentState, chunk)
        except EmbeddingError as error:
            self._failed(error, question, snapshot.version, started)
            yield ErrorEvent(EMBEDDING_UNAVAILABLE, "embedding_unavailable", 503)
            return
        AGENT_PROCESSING.observe(time.perf_counter() - started)
        assert final is not None
        try:
            result = await self._finish(question, final, snapshot, started)
        except SessionStoreUnavailableError as error:  # the answer went out but the turn could not be saved
            yield ErrorEvent(str(error), "session_store_unavailable", 503)
            return
        yield CompleteEvent(
            result.confidence,
            result.processing_stage,
            len(result.answer.split()),
            result.error,
            result.answer_id,
            result.kb_version,
        )

    @asynccontextmanager
    async def _turn_of(self, session: Session | None) -> AsyncIterator[None]:
        """Hold the session's lock for one question (nothing for a stateless one), waiting a bounded time."""
        if session is None:
            yield
            return
        try:
            await asyncio.wait_for(session.lock.acquire(), self._settings.session_wait_seconds)
        except TimeoutError:
            raise SessionBusyError(
                "Another question on this session is still being answered; retry when it has finished"
            ) from None
        try:
            yield
        finally:
            session.lock.release()

    def _context(self, snapshot: KnowledgeView) -> GraphContext:
        return GraphContext(self._settings, self._embedder, snapshot.ranker, self._generator, snapshot.names)

    @staticmethod
    def _input(question: Question, streaming: bool) -> InputState:
        session = question.session
        last = session.turns[-1] if session is not None and session.turns else None
        previous = last.resolved_question if last is not None else question.previous
        return {
            "question": question.text,
            "previous_question": previous,
            "previous_subjects": last.subjects if last is not None else None,
            "previous_entry": last.sources[0].id if last is not None and last.sources else None,
            "session_id": session.id if session is not None else None,
            "streaming": streaming,
        }

    async def _final_state(self, question: Question, snapshot: KnowledgeView, started: float) -> AgentState:
        """Run the graph, or reuse the outcome of an identical earlier run from the answer cache."""
        state = self._input(question, streaming=False)
        subjects = tuple(state.get("previous_subjects") or ())
        key: AnswerKey = (
            snapshot.version,
            state["question"],
            state["previous_question"],
            subjects,
            state.get("previous_entry"),
        )
        final = self._answers.get(key) if self._answers is not None else None
        if final is None:
            try:
                final = cast(AgentState, await self._graph.ainvoke(state, context=self._context(snapshot)))
            except EmbeddingError as error:
                self._failed(error, question, snapshot.version, started)
                raise AgentUnavailableError(EMBEDDING_UNAVAILABLE) from error
            if self._answers is not None:
                self._answers.put(key, final)
        AGENT_PROCESSING.observe(time.perf_counter() - started)
        return final

    def _failed(self, error: EmbeddingError, question: Question, kb_version: int, started: float) -> None:
        AGENT_QUERIES.labels(outcome="error").inc()
        logger.error("agent_failed", error=str(error))
        self._tell(question, new_answer_id(), "error", None, None, None, kb_version, started, ())

    def _tell(
        self,
        question: Question,
        answer_id: str,
        outcome: Outcome,
        confidence: float | None,
        resolved_question: str | None,
        top_entry_id: str | None,
        kb_version: int,
        started: float,
        unknown_terms: tuple[str, ...],
    ) -> None:
        if self._on_answer is None:
            return
        self._on_answer(
            AnswerRecord(
                answer_id=answer_id,
                created_at=utcnow(),
                transport=question.transport,
                question=question.text,
                resolved_question=resolved_question if resolved_question != question.text else None,
                top_entry_id=top_entry_id,
                confidence=confidence,
                outcome=outcome,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                session_id=question.session.id if question.session is not None else None,
                kb_version=kb_version,
                unknown_terms=unknown_terms,
            )
        )

    def _outcome(self, state: AgentState, unknown_terms: tuple[str, ...]) -> Outcome:
        if state["processing_stage"] != "response_complete":
            return "no_match"
        if (state.get("error") or "").startswith("generative_fallback"):
            return "fallback"
        # In generative mode the graph hands every matched question without unknown names to the chat model.
        return "generative" if self._generator is not None and not unknown_terms else "answered"

    async def _finish(
        self, question: Question, state: AgentState, snapshot: KnowledgeView, started: float
    ) -> AgentResult:
        stage = state["processing_stage"]
        session = question.session
        AGENT_QUERIES.labels(outcome="answered" if stage == "response_complete" else "no_match").inc()
        AGENT_CONFIDENCE.observe(state["confidence"])
        result = AgentResult(
            answer=state["answer"],
            confidence=state["confidence"],
            processing_stage=stage,
            sources=state["sources"],
            resolved_question=state["resolved_question"],
            session_id=session.id if session is not None else None,
            error=state.get("error"),
            unknown_terms=tuple(state.get("unknown_terms", ())),
            answer_id=new_answer_id(),
            kb_version=snapshot.version,
        )
        if session is not None:
            turn = Turn(
                question=question.text,
                resolved_question=result.resolved_question,
                answer=result.answer,
                confidence=result.confidence,
                processing_stage=stage,
                sources=tuple(result.sources),
                timestamp=time.time(),
                subjects=state.get("subjects"),  # None after a cached answer: the next question recovers them
            )
            if not await self._sessions.add_turn(session, turn):
                logger.info("turn_not_recorded", reason="session_deleted_or_expired", session=session_tag(session.id))
        logger.info(
            "question_answered",
            question=truncate_for_log(question.text),
            processing_stage=stage,
            confidence=result.confidence,
            top_source=result.sources[0].id if result.sources else None,
            session=session_tag(result.session_id),
        )
        self._tell(
            question,
            result.answer_id,
            self._outcome(state, result.unknown_terms),
            result.confidence,
            result.resolved_question,
            result.sources[0].id if result.sources else None,
            snapshot.version,
            started,
            result.unknown_terms,
        )
        return result


def new_answer_id() -> str:
    """A fresh, unguessable answer id (32 hex characters)."""
    return secrets.token_hex(16)
