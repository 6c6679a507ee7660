"""Typed state that flows through the agent graph."""

from __future__ import annotations

from typing import NotRequired, TypedDict

from agents.followup import FollowUp
from services.retrieval import Match
from services.sources import ProcessingStage, Source


class InputState(TypedDict):
    """What a caller gives the graph."""

    question: str
    previous_question: str | None
    session_id: str | None
    streaming: bool
    previous_subjects: NotRequired[tuple[str, ...] | None]
    """What the conversation was about after the previous turn; None or absent: not known."""
    previous_entry: NotRequired[str | None]
    """The id of the entry the previous turn answered with (None: it declined)."""


class AgentState(InputState, total=False):
    """Everything the nodes produce, on top of the input."""

    follow_up: FollowUp
    candidates: list[str]
    resolved_question: str
    matches: list[Match]
    confidence: float
    subjects: tuple[str, ...]
    processing_stage: ProcessingStage
    answer: str
    sources: list[Source]
    error: str | None
    unknown_terms: list[str]
