"""What an answer cites and how a question ended: records kept in sessions and sent by every transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

ProcessingStage = Literal["response_complete", "no_match"]
"""How a question ended: answered from the knowledge base, or declined."""


@dataclass(frozen=True, slots=True)
class Source:
    """A knowledge-base entry an answer was drawn from, with its similarity score in [0, 1]."""

    id: str
    question: str
    score: Annotated[float, Field(ge=0.0, le=1.0)]

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive."""
        return {"id": self.id, "question": self.question, "score": self.score}
