"""The agent's stream events, typed, each serialised in one place (`to_wire()`).

SSE and the WebSocket send exactly what `to_wire()` returns, so the streamed wire format is defined here
(sources and processing stages in `services/sources.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from services.sources import Source

StreamStage = Literal["response_complete", "no_match", "cancelled"]
"""A stream's final stage: as `ProcessingStage`, or cancelled by the client (WebSocket `cancel`)."""


@dataclass(frozen=True, slots=True)
class MetadataEvent:
    """First event of a stream: session, answer length (None while a model writes it), confidence, sources."""

    session_id: str | None
    total_words: int | None
    confidence: float
    sources: tuple[Source, ...]
    unknown_terms: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive (`unknown_terms` only when the question names unknown things)."""
        wire: dict[str, Any] = {
            "type": "metadata",
            "session_id": self.session_id,
            "total_words": self.total_words,
            "confidence": self.confidence,
            "sources": [source.to_wire() for source in self.sources],
        }
        if self.unknown_terms:
            wire["unknown_terms"] = list(self.unknown_terms)
        return wire


@dataclass(frozen=True, slots=True)
class WordEvent:
    """One whole word of the answer (or, with `reference`, one whole reference line)."""

    content: str
    index: int
    confidence: float
    reference: bool = False  # a reference line appended for the original frontend (WebSocket only)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive (`reference: true` only on reference lines)."""
        wire: dict[str, Any] = {
            "type": "word",
            "content": self.content,
            "index": self.index,
            "confidence": self.confidence,
        }
        if self.reference:
            wire["reference"] = True
        return wire


@dataclass(frozen=True, slots=True)
class CompleteEvent:
    """Last event of a successful (or cancelled) stream."""

    final_confidence: float
    processing_stage: StreamStage
    total_words: int
    error: str | None = None
    answer_id: str | None = None  # the id to rate the answer with (POST /v2/feedback); None when cancelled
    kb_version: int | None = None  # the knowledge-base version that answered

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive (`error` only when the answer fell back)."""
        wire: dict[str, Any] = {
            "type": "complete",
            "final_confidence": self.final_confidence,
            "processing_stage": self.processing_stage,
            "total_words": self.total_words,
        }
        if self.error is not None:
            wire["error"] = self.error
        if self.answer_id is not None:
            wire["answer_id"] = self.answer_id
        if self.kb_version is not None:
            wire["kb_version"] = self.kb_version
        return wire


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Ends a failed stream, or reports a refused message on a WebSocket.

    `code` is the HTTP status the same failure gets over REST (an integer, as in the error bodies) and
    `reason` the stable machine-readable reason.
    """

    message: str
    reason: str
    code: int

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive: `message` and `error` carry the same text (older clients read `error`)."""
        return {
            "type": "error",
            "message": self.message,
            "error": self.message,
            "code": self.code,
            "reason": self.reason,
        }


StreamEvent = MetadataEvent | WordEvent | CompleteEvent | ErrorEvent
"""What `DeFiAgent.stream` yields."""
