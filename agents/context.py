"""What the graph's nodes receive at run time besides the state: settings and narrow service interfaces.

The agent builds one `GraphContext` per question (with the knowledge snapshot current at its start) and
passes it through LangGraph's runtime context; nodes read it from `runtime.context`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.generation import Passage
from services.names import UnknownTerm
from services.retrieval import Match


@dataclass(frozen=True)
class AgentSettings:
    """The knobs the graph reads."""

    similarity_threshold: float
    max_results: int
    question_max_chars: int
    word_delay_seconds: float
    context_entries: int = 3
    session_wait_seconds: float = 15.0


class QueryEmbedder(Protocol):
    """Embeds one question (through whatever caches sit in front of the model)."""

    async def embed_query(self, text: str) -> np.ndarray:
        """The question's L2-normalised vector."""
        ...


class Ranker(Protocol):
    """Ranks knowledge-base entries for questions."""

    async def search(self, vectors: Sequence[np.ndarray], texts: Sequence[str]) -> list[list[Match]]:
        """Matches, best first, for each (vector, text) pair."""
        ...


class Generator(Protocol):
    """A chat model that writes answers from passages and rewrites follow-ups (generative mode)."""

    def stream(self, question: str, passages: Sequence[Passage]) -> AsyncIterator[str]:
        """The answer's text deltas; raises GenerationError."""
        ...

    async def rewrite(self, question: str, previous_question: str) -> str | None:
        """The follow-up as a stand-alone question; raises GenerationError."""
        ...


class NameChecker(Protocol):
    """Finds names in a question that the knowledge base never mentions."""

    def unknown_terms(self, question: str) -> list[UnknownTerm]:
        """The unknown names, in order, each with why it counts as one."""
        ...


@dataclass(frozen=True)
class GraphContext:
    """Run-time dependencies of one graph run (built per question, so it holds that question's snapshot)."""

    settings: AgentSettings
    embedder: QueryEmbedder
    ranker: Ranker
    generator: Generator | None = None
    names: NameChecker | None = None
