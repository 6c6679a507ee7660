"""Regroup a chat model's token deltas into whole words before they become `word` events.

Clients join `word` contents with single spaces (the original React frontend among them), so a sub-word
piece such as "man" in " imper" + "man" + "ent" must never be sent on its own.
"""

from __future__ import annotations


class WordRegrouper:
    """Collects deltas; a word is released once whitespace follows it, or at `finish()`."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, delta: str) -> list[str]:
        """Add a delta; return the words it completed, in order."""
        text = self._pending + delta
        words = text.split()
        if not text or text[-1].isspace():
            self._pending = ""
            return words
        self._pending = words[-1]
        return words[:-1]

    def finish(self) -> list[str]:
        """Release the last word (the stream ended)."""
        words = self._pending.split()
        self._pending = ""
        return words
