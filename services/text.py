"""Text normalisation shared by the embedding cache key, the lexical index and the benchmark's question set."""

from __future__ import annotations

import unicodedata


def normalize_text(text: str) -> str:
    """NFKC, lower case, single spaces: two questions that differ only in these are the same question."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())
