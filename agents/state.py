"""Typed state that flows through the agent graph."""

from __future__ import annotations

from typing import TypedDict

from services.retrieval import Match
from services.sources import ProcessingStage, Source


class InputState(TypedDict):
    """What a caller gives the graph."""

    question: str
    previous_question: str | None
    session_id: str | None
    streaming: bool


class AgentState(InputState, total=False):
    """Everything the nodes produce, on top of the input."""

    candidates: list[str]
    resolved_question: str
    matches: list[Match]
    confidence: float
    processing_stage: ProcessingStage
    answer: str
    sources: list[Source]
    error: str | None
