"""Batching under concurrency: ranking many questions at once, and splitting embedding work over idle workers.

In process, over the real knowledge base and the real local model (no server needed for these).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from config import get_settings
from services.embedding_providers import LocalMiniLMProvider
from services.embeddings import EmbeddingService, corpus_chunks
from services.knowledge_base import KnowledgeBase, load_knowledge_base
from services.retrieval import BatchedRetriever, ClassifierWeights, Match, Retriever

DIMENSION = 384


@pytest.fixture(scope="module")
def knowledge_base() -> KnowledgeBase:
    return load_knowledge_base(get_settings().dataset_path)


@pytest.fixture(scope="module")
def index(knowledge_base: KnowledgeBase) -> tuple[np.ndarray, ClassifierWeights]:
    """Seeded random phrasing vectors and classifier weights: the real ranking maths, without the model."""
    rng = np.random.default_rng(7)
    phrasings = sum(len(entry.phrasings()) for entry in knowledge_base.entries)
    vectors = rng.normal(size=(phrasings, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    lexical_features = len(Retriever(knowledge_base, vectors, None)._vectorizer.vocabulary_)
    weights = ClassifierWeights(
        rng.normal(scale=0.1, size=(len(knowledge_base), DIMENSION + lexical_features)).astype(np.float32),
        rng.normal(scale=0.1, size=len(knowledge_base)).astype(np.float32),
    )
    return vectors, weights


@pytest.fixture(scope="module")
def retriever(knowledge_base: KnowledgeBase, index: tuple[np.ndarray, ClassifierWeights]) -> Retriever:
    return Retriever(knowledge_base, *index)


def questions(knowledge_base: KnowledgeBase, count: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(count, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [knowledge_base.entries[index * 7 % len(knowledge_base)].question for index in range(count)]
    return vectors, texts


def as_pairs(matches: list[Match]) -> list[tuple[str, float]]:
    return [(match.entry.id, round(match.score, 5)) for match in matches]


def test_search_many_ranks_each_question_as_search_does(retriever: Retriever, knowledge_base: KnowledgeBase) -> None:
    vectors, texts = questions(knowledge_base, 24)
    together = retriever.search_many(vectors, texts, 5)
    assert len(together) == 24
    for vector, text, batched in zip(vectors, texts, together, strict=True):
        alone = retriever.search(vector, text, 5)
        assert len(alone) == 5
        assert as_pairs(batched) == as_pairs(alone)
    # The lexical part is live: the entry whose own question is the text is ranked first for most rows.
    firsts = sum(matches[0].entry.question == text for matches, text in zip(together, texts, strict=True))
    assert firsts >= 20


class CountingRetriever(Retriever):
    """The real retriever, also recording how many questions each `search_many` call ranked."""

    def __init__(self, knowledge_base: KnowledgeBase, vectors: np.ndarray, weights: ClassifierWeights) -> None:
        super().__init__(knowledge_base, vectors, weights)
        self.batches: list[int] = []

    def search_many(self, vectors: np.ndarray, texts: Sequence[str], limit: int) -> list[list[Match]]:
        self.batches.append(len(texts))
        return super().search_many(vectors, texts, limit)


async def test_concurrent_requests_are_ranked_in_one_batch(
    retriever: Retriever, knowledge_base: KnowledgeBase, index: tuple[np.ndarray, ClassifierWeights]
) -> None:
    counting = CountingRetriever(knowledge_base, *index)
    batched = BatchedRetriever(counting, limit=3)
    vectors, texts = questions(knowledge_base, 12)
    # Ten requests of one question and one of two (a follow-up and its original), all at once.
    requests = [([vectors[index]], [texts[index]]) for index in range(10)] + [([vectors[10], vectors[11]], texts[10:])]
    results = await asyncio.gather(
        *(batched.search(request_vectors, request_texts) for request_vectors, request_texts in requests)
    )
    assert counting.batches == [12]
    for (request_vectors, request_texts), ranked in zip(requests, results, strict=True):
        assert len(ranked) == len(request_texts)
        for vector, text, matches in zip(request_vectors, request_texts, ranked, strict=True):
            assert as_pairs(matches) == as_pairs(retriever.search(vector, text, 3))
    # The next request, alone, is a batch of its own.
    await batched.search([vectors[0]], [texts[0]])
    assert counting.batches == [12, 1]


async def test_a_cancelled_request_does_not_disturb_the_others(
    retriever: Retriever, knowledge_base: KnowledgeBase
) -> None:
    batched = BatchedRetriever(retriever, limit=2)
    vectors, texts = questions(knowledge_base, 3)
    tasks = [asyncio.ensure_future(batched.search([vectors[index]], [texts[index]])) for index in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    first, third = await tasks[0], await tasks[2]
    assert as_pairs(first[0]) == as_pairs(retriever.search(vectors[0], texts[0], 2))
    assert as_pairs(third[0]) == as_pairs(retriever.search(vectors[2], texts[2], 2))
    assert tasks[1].cancelled()


async def test_queued_questions_are_split_over_idle_workers() -> None:
    """16 questions queued at once with two idle workers: two model calls of 8, not one of 16."""
    service = EmbeddingService(LocalMiniLMProvider(threads=1, workers=2), None, None, max_batch_size=32, workers=2)
    await service.start()
    try:
        texts = [f"What does collateral factor {number} mean on a lending market?" for number in range(16)]
        vectors = await asyncio.gather(*(service.embed_query(text) for text in texts))
        assert service.model_calls == 2
        assert all(vector.shape == (DIMENSION,) for vector in vectors)
        # One question at a time: one call each, whatever the number of workers.
        await service.embed_query("What is a lending market?")
        assert service.model_calls == 3
    finally:
        await service.close()


def test_corpus_batches_are_capped_by_count_and_by_padded_length() -> None:
    lengths = [10] * 40 + [100] * 10 + [400] * 3 + [5000]
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    chunks = corpus_chunks(order, lengths, 32, 3200)
    assert [len(chunk) for chunk in chunks] == [32, 18, 3, 1]  # 32 of the 10s; the other 8 with the 100s; ...
    assert sorted(index for chunk in chunks for index in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        padded = len(chunk) * max(lengths[index] for index in chunk)
        assert len(chunk) == 1 or padded <= 3200
    assert [len(chunk) for chunk in corpus_chunks(order, lengths, 32, None)] == [32, 22]
