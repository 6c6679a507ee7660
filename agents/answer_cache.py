"""Extractive answers remembered by (knowledge-base version, question, previous turn, conversation subjects).

An extractive answer is a pure function of those three, so a repeated question skips the graph. Generated
answers are never cached (the agent is given no cache in generative mode).
"""

from __future__ import annotations

from cachetools import LRUCache

from agents.state import AgentState
from infrastructure.metrics import ANSWER_CACHE_REQUESTS

AnswerKey = tuple[int, str, str | None, tuple[str, ...], str | None]
"""(knowledge-base version, question, previous turn's resolved question, conversation subjects, previous entry)."""


class AnswerCache:
    """A bounded LRU of final graph states (without vectors or matches), with hit and miss counts."""

    def __init__(self, max_size: int) -> None:
        self._items: LRUCache[AnswerKey, AgentState] = LRUCache(max_size)
        self.hits = 0
        self.misses = 0

    def get(self, key: AnswerKey) -> AgentState | None:
        """The remembered outcome for `key`, or None (counted as a hit or a miss)."""
        state = self._items.get(key)
        if state is None:
            self.misses += 1
        else:
            self.hits += 1
        ANSWER_CACHE_REQUESTS.labels(result="miss" if state is None else "hit").inc()
        return state

    def put(self, key: AnswerKey, state: AgentState) -> None:
        """Remember the part of a final state an answer is made from."""
        outcome: AgentState = {
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
            "unknown_terms": state.get("unknown_terms", []),
        }
        if subjects := state.get("subjects"):  # absent (not empty) when unknown: the next question recovers them
            outcome["subjects"] = subjects
        self._items[key] = outcome

    def __len__(self) -> int:
        return len(self._items)
