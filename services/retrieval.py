"""Hybrid retrieval over every phrasing of every entry: MiniLM cosine plus character n-gram TF-IDF.

A phrasing scores 0.7 x embedding cosine + 0.3 x character n-gram TF-IDF cosine (the lexical part
catches acronyms and misspellings). An entry scores 0.8 x its best phrasing + 0.2 x the cosine to the
centroid of all its phrasings (which rewards questions close to the entry as a whole, not to one
stray wording). Clipped to [0, 1], that entry score is the one definition of `confidence`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from sklearn.feature_extraction.text import TfidfVectorizer

from services.embedding_cache import normalize_text
from services.embeddings import EmbeddingService
from services.knowledge_base import Entry, KnowledgeBase

logger = structlog.get_logger(__name__)

DENSE_WEIGHT = 0.7
LEXICAL_WEIGHT = 0.3
BEST_PHRASING_WEIGHT = 0.8
CENTROID_WEIGHT = 0.2


@dataclass(frozen=True)
class Match:
    """A ranked entry and its score in [0, 1]."""

    entry: Entry
    score: float


class Retriever:
    """Ranks knowledge-base entries for a question vector and text."""

    def __init__(self, knowledge_base: KnowledgeBase, phrasing_vectors: np.ndarray) -> None:
        self.knowledge_base = knowledge_base
        phrasings: list[str] = []
        starts: list[int] = []
        for entry in knowledge_base.entries:
            starts.append(len(phrasings))
            phrasings.extend(normalize_text(text) for text in entry.phrasings())
        if phrasing_vectors.shape[0] != len(phrasings):
            raise ValueError("phrasing vectors do not match the knowledge base")
        self._dense = phrasing_vectors.astype(np.float32)
        self._starts = np.array(starts, dtype=np.intp)
        centroids = np.add.reduceat(self._dense, self._starts, axis=0)
        self._centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
        self._vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, dtype=np.float32)
        self._lexical = self._vectorizer.fit_transform(phrasings).T.tocsr()
        self.phrasing_count = len(phrasings)

    def search(self, vector: np.ndarray, text: str, limit: int) -> list[Match]:
        """Return up to `limit` distinct entries, best first."""
        dense = self._dense @ vector
        query = self._vectorizer.transform([normalize_text(text)])
        lexical = (query @ self._lexical).toarray().ravel()
        combined = DENSE_WEIGHT * dense + LEXICAL_WEIGHT * lexical
        best_phrasing = np.maximum.reduceat(combined, self._starts)
        per_entry = BEST_PHRASING_WEIGHT * best_phrasing + CENTROID_WEIGHT * (self._centroids @ vector)
        limit = min(limit, per_entry.shape[0])
        top = np.argpartition(-per_entry, limit - 1)[:limit]
        top = top[np.argsort(-per_entry[top], kind="stable")]
        entries = self.knowledge_base.entries
        return [Match(entries[index], float(np.clip(per_entry[index], 0.0, 1.0))) for index in top]


def _index_path(cache_dir: Path, knowledge_base: KnowledgeBase, model_id: str) -> Path:
    key = hashlib.sha256(f"{knowledge_base.content_hash}\n{model_id}".encode()).hexdigest()
    return cache_dir / "index" / f"{key}.npy"


def load_or_build_vectors(
    knowledge_base: KnowledgeBase, embeddings: EmbeddingService, cache_dir: Path | None
) -> tuple[np.ndarray, bool]:
    """Embed every phrasing, reusing the matrix cached for (dataset hash, model id). Blocking.

    Returns the matrix and whether it came from the cache.
    """
    texts = [text for entry in knowledge_base.entries for text in entry.phrasings()]
    path = _index_path(cache_dir, knowledge_base, embeddings.model_id) if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            matrix = np.load(path, allow_pickle=False)
            if matrix.ndim == 2 and matrix.shape[0] == len(texts) and np.isfinite(matrix).all():
                return matrix.astype(np.float32), True
            logger.warning("index_cache_invalid", path=str(path), shape=list(matrix.shape))
        except (OSError, ValueError) as error:
            logger.warning("index_cache_unreadable", path=str(path), error=str(error))
    matrix = embeddings.embed_corpus_blocking(texts)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                np.save(file, matrix, allow_pickle=False)
            Path(temp_name).replace(path)
        except OSError as error:
            logger.warning("index_cache_write_failed", path=str(path), error=str(error))
    return matrix, False
