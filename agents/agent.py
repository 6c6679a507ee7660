"""The DeFi agent: runs the graph for one question, optionally inside a session, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from cachetools import LRUCache

from agents.graph import AgentSettings, build_graph
from agents.state import AgentState, InputState
from agents.validation import clean_question
from infrastructure.logging import truncate_for_log
from infrastructure.metrics import AGENT_CONFIDENCE, AGENT_PROCESSING, AGENT_QUERIES, ANSWER_CACHE_REQUESTS
from services.embeddings import EmbeddingError, EmbeddingService
from services.generation import AnswerGenerator
from services.retrieval import BatchedRetriever, Retriever
from services.sessions import Session, SessionStore, SessionStoreUnavailableError, Turn

logger = structlog.get_logger(__name__)


AnswerKey = tuple[str, str | None]
"""What an extractive answer depends on: the question and the previous turn's resolved question."""


def _outcome_of(state: AgentState) -> AgentState:
    """The part of a final state an answer is made from (no vectors or matches kept in the cache)."""
    return {
        "question": state["question"],
        "previous_question": state["previous_question"],
        "session_id": None,
        "streaming": False,
        "resolved_question": state["resolved_question"],
        "confidence": state["confidence"],
        "processing_stage": state["processing_stage"],
        "answer": state["answer"],
        "sources": state["sources"],
        "error": state.get("error"),
    }


OutcomeListener = Callable[[str, float | None], None]
"""Told of every finished question: its outcome (answered / no_match / error) and confidence."""


class AgentUnavailableError(RuntimeError):
    """The agent cannot answer right now (e.g. the embedder failed); the caller should retry later."""


@dataclass(frozen=True)
class AgentResult:
    """A finished answer."""

    answer: str
    confidence: float
    processing_stage: str
    sources: list[dict[str, Any]]
    resolved_question: str
    session_id: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DeFiAgent:
    """Answers DeFi questions from the knowledge base; session-aware."""

    def __init__(
        self,
        embeddings: EmbeddingService,
        retriever: Retriever,
        sessions: SessionStore,
        settings: AgentSettings,
        generator: AnswerGenerator | None = None,
        answer_cache_size: int = 0,
    ) -> None:
        self.embeddings = embeddings
        self.retriever = retriever
        self.sessions = sessions
        self.settings = settings
        self.generator = generator
        self._graph = build_graph(embeddings, BatchedRetriever(retriever, settings.max_results), settings, generator)
        self.on_outcome: OutcomeListener | None = None
        # Extractive answers are a pure function of (question, previous question) over a knowledge base that
        # never changes while the process runs, so a repeated question skips the graph. Generated ones are not.
        self._answers: LRUCache[AnswerKey, AgentState] | None = (
            LRUCache(answer_cache_size) if answer_cache_size > 0 and generator is None else None
        )
        self.answer_cache_hits = 0
        self.answer_cache_misses = 0

    @property
    def answer_cache_entries(self) -> int | None:
        """Answers held by the answer cache (None when it is off)."""
        return len(self._answers) if self._answers is not None else None

    def clean_question(self, raw: object) -> str:
        """Validate and strip a question (raises InvalidQuestionError)."""
        return clean_question(raw, self.settings.question_max_chars)

    async def answer(self, question: str, session: Session | None = None) -> AgentResult:
        """Answer one question; inside `session` the previous turn gives follow-ups their context."""
        async with self._session_lock(session):
            state = await self._final_state(self._input(question, session, streaming=False))
            return await self._finish(question, state, session)

    async def stream(self, question: str, session: Session | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield `metadata`, `word`... and `complete` events; an `error` event ends a failed stream.

        No lock is held while events are yielded: a consumer that stops iterating (a client gone) can
        never block the session. The previous turn is read at the start and this turn appended at the end.
        """
        started = time.perf_counter()
        final: AgentState | None = None
        try:
            async for mode, chunk in self._graph.astream(
                self._input(question, session, streaming=True), stream_mode=["custom", "values"]
            ):
                if mode == "custom":
                    yield cast(dict[str, Any], chunk)
                else:
                    final = cast(AgentState, chunk)
        except EmbeddingError as error:
            self._count("error", None)
            logger.error("agent_failed", error=str(error))
            message = "The embedding model is unavailable; please retry shortly."
            yield {"type": "error", "message": message, "error": message, "code": "embedding_unavailable"}
            return
        AGENT_PROCESSING.observe(time.perf_counter() - started)
        assert final is not None
        try:
            result = await self._finish(question, final, session)
        except SessionStoreUnavailableError as error:  # the answer went out but the turn could not be saved
            message = str(error)
            yield {"type": "error", "message": message, "error": message, "code": "session_store_unavailable"}
            return
        complete: dict[str, Any] = {
            "type": "complete",
            "final_confidence": result.confidence,
            "processing_stage": result.processing_stage,
            "total_words": len(result.answer.split()),
        }
        if result.error is not None:  # e.g. a generative answer that fell back to the extractive one
            complete["error"] = result.error
        yield complete

    def _count(self, outcome: str, confidence: float | None) -> None:
        AGENT_QUERIES.labels(outcome=outcome).inc()
        if self.on_outcome is not None:
            self.on_outcome(outcome, confidence)

    def _session_lock(self, session: Session | None) -> AbstractAsyncContextManager[object]:
        return session.lock if session is not None else nullcontext()

    @staticmethod
    def _input(question: str, session: Session | None, streaming: bool) -> InputState:
        previous = session.turns[-1].resolved_question if session is not None and session.turns else None
        return {
            "question": question,
            "previous_question": previous,
            "session_id": session.id if session is not None else None,
            "streaming": streaming,
        }

    async def _final_state(self, state: InputState) -> AgentState:
        """Run the graph, or reuse the outcome of an identical earlier run from the answer cache."""
        started = time.perf_counter()
        key: AnswerKey = (state["question"], state["previous_question"])
        final = self._answers.get(key) if self._answers is not None else None
        if self._answers is not None:
            ANSWER_CACHE_REQUESTS.labels(result="miss" if final is None else "hit").inc()
            if final is None:
                self.answer_cache_misses += 1
            else:
                self.answer_cache_hits += 1
        if final is None:
            final = await self._run(state)
            if self._answers is not None:
                self._answers[key] = _outcome_of(final)
        AGENT_PROCESSING.observe(time.perf_counter() - started)
        return final

    async def _run(self, state: InputState) -> AgentState:
        try:
            final: AgentState = await self._graph.ainvoke(state)  # type: ignore[assignment]
        except EmbeddingError as error:
            self._count("error", None)
            logger.error("agent_failed", error=str(error))
            raise AgentUnavailableError("The embedding model is unavailable; please retry shortly.") from error
        return final

    async def _finish(self, question: str, state: AgentState, session: Session | None) -> AgentResult:
        stage = state["processing_stage"]
        self._count("answered" if stage == "response_complete" else "no_match", state["confidence"])
        AGENT_CONFIDENCE.observe(state["confidence"])
        result = AgentResult(
            answer=state["answer"],
            confidence=state["confidence"],
            processing_stage=stage,
            sources=state["sources"],
            resolved_question=state["resolved_question"],
            session_id=session.id if session is not None else None,
            error=state.get("error"),
        )
        if session is not None:
            await self.sessions.add_turn(
                session,
                Turn(
                    question=question,
                    resolved_question=result.resolved_question,
                    answer=result.answer,
                    confidence=result.confidence,
                    processing_stage=stage,
                    sources=tuple(result.sources),
                    timestamp=time.time(),
                ),
            )
        logger.info(
            "question_answered",
            question=truncate_for_log(question),
            processing_stage=stage,
            confidence=result.confidence,
            top_source=result.sources[0]["id"] if result.sources else None,
            session_id=result.session_id,
        )
        return result
