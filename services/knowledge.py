"""The live knowledge base: an immutable snapshot (entries + index + ranker, with a version) behind one holder.

Readers take `LiveKnowledge.current` once per question and keep that snapshot to the end, so a swap
never changes the knowledge base under a question in flight.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from services.embeddings import EmbeddingService
from services.knowledge_base import KnowledgeBase
from services.names import NameVocabulary
from services.retrieval import BatchedRetriever, Retriever, build_retriever


@dataclass(frozen=True)
class KnowledgeSnapshot:
    """One version of the knowledge base with its index, ready to rank questions."""

    version: int
    knowledge_base: KnowledgeBase
    retriever: Retriever
    ranker: BatchedRetriever
    loaded_at: float
    loaded_from: str
    index_from_cache: bool
    names: NameVocabulary
    provisional: bool = False
    """The classifier was updated for a change, not fitted on the whole dataset (a full fit follows)."""


class LiveKnowledge:
    """Holds the current snapshot; `swap` replaces it atomically (one reference assignment on the loop)."""

    def __init__(self, snapshot: KnowledgeSnapshot) -> None:
        self._current = snapshot

    @property
    def current(self) -> KnowledgeSnapshot:
        """The snapshot new questions are answered from."""
        return self._current

    def swap(self, snapshot: KnowledgeSnapshot) -> KnowledgeSnapshot:
        """Make `snapshot` current; return the one it replaces."""
        previous, self._current = self._current, snapshot
        return previous


async def build_snapshot(
    knowledge_base: KnowledgeBase,
    embeddings: EmbeddingService,
    *,
    version: int,
    loaded_from: str,
    max_results: int,
    cache_dir: Path | None,
    previous: KnowledgeSnapshot | None = None,
    incremental: bool = False,
) -> KnowledgeSnapshot:
    """Index `knowledge_base` and wrap it as a snapshot.

    The index file for this dataset and model is reused when it exists; otherwise only the phrasings the
    `previous` snapshot does not hold are embedded. `incremental` updates `previous`'s classifier instead of
    fitting a new one (seconds instead of a minute; the snapshot is then `provisional`).
    """
    reuse = previous.retriever if previous is not None else None
    retriever, from_cache = await build_retriever(knowledge_base, embeddings, cache_dir, reuse, incremental=incremental)
    texts = [text for entry in knowledge_base.entries for text in entry.phrasings()]
    names = await asyncio.to_thread(NameVocabulary.from_texts, texts)
    return KnowledgeSnapshot(
        version=version,
        knowledge_base=knowledge_base,
        retriever=retriever,
        ranker=BatchedRetriever(retriever, max_results),
        loaded_at=time.time(),
        loaded_from=loaded_from,
        index_from_cache=from_cache,
        names=names,
        provisional=incremental and not from_cache and reuse is not None,
    )
