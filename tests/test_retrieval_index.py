"""The lexical (TF-IDF) part of the dataset index survives the index file: same features, same scores."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from config import get_settings
from services.knowledge_base import KnowledgeBase, load_knowledge_base
from services.retrieval import LexicalIndex, Retriever, _atomic_save, _load
from services.text import normalize_text

REQUIRED = ("vectors", "coefficients", "intercepts")  # what build_retriever asks `_load` for


@pytest.fixture(scope="module")
def knowledge_base() -> KnowledgeBase:
    return load_knowledge_base(get_settings().dataset_path)


def phrasings(knowledge_base: KnowledgeBase) -> list[str]:
    return [normalize_text(text) for entry in knowledge_base.entries for text in entry.phrasings()]


def test_lexical_index_round_trips_through_an_npz_file(knowledge_base: KnowledgeBase, tmp_path: Path) -> None:
    texts = phrasings(knowledge_base)
    fitted = LexicalIndex.fit(texts)
    path = tmp_path / "index.npz"
    np.savez(path, **fitted.to_arrays())
    with np.load(path, allow_pickle=False) as archive:  # no pickle: plain arrays only
        restored = LexicalIndex.from_arrays({name: archive[name] for name in archive.files}, len(texts))

    assert restored.terms.tolist() == fitted.terms.tolist()
    assert (restored.phrasings != fitted.phrasings).nnz == 0
    questions = ["wht is impermanant loss", "How does an AMM price a swap?", "ve-tokenomics and bribes"]
    before = fitted.vectorizer().transform(questions)
    after = restored.vectorizer().transform(questions)
    assert before.nnz > 0
    assert abs(before - after).max() == 0


def test_retriever_from_a_stored_lexical_index_ranks_like_a_fresh_fit(knowledge_base: KnowledgeBase) -> None:
    texts = phrasings(knowledge_base)
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
    stored = LexicalIndex.from_arrays(LexicalIndex.fit(texts).to_arrays(), len(texts))
    fresh = Retriever(knowledge_base, vectors, None)
    reused = Retriever(knowledge_base, vectors, None, stored)
    queries = rng.normal(size=(5, 384)).astype(np.float32)
    words = ["health factor on Aave", "flash loan attack", "what is a DAO", "slippage tolerance", "LST depeg"]
    for first, second in zip(fresh.search_many(queries, words, 5), reused.search_many(queries, words, 5), strict=True):
        assert [(match.entry.id, match.score) for match in first] == [(match.entry.id, match.score) for match in second]


def test_a_lexical_index_that_does_not_fit_is_refused(knowledge_base: KnowledgeBase) -> None:
    arrays = LexicalIndex.fit(phrasings(knowledge_base)).to_arrays()
    arrays["lexical_idf"] = arrays["lexical_idf"][:-1]
    with pytest.raises(ValueError):
        LexicalIndex.from_arrays(arrays, len(phrasings(knowledge_base)))


def test_no_flipped_byte_in_an_index_file_raises_or_goes_unnoticed(tmp_path: Path) -> None:
    """Issue 14, item 4, byte by byte: a damaged index file is read as missing (so it is rebuilt) or, when the
    flipped byte is one zip ignores, as it was written; never an exception that stops start-up, never changed
    vectors. A flip in a member's header raised NotImplementedError or RuntimeError, which stopped start-up."""
    rng = np.random.default_rng(5)
    written: dict[str, np.ndarray] = {
        "vectors": rng.normal(size=(12, 8)).astype(np.float32),
        "coefficients": rng.normal(size=(3, 8)),
        "intercepts": rng.normal(size=3),
        "lexical_terms": np.array(["aave", "loan"]),
    }
    path = tmp_path / "index.npz"
    _atomic_save(path, **written)
    original = path.read_bytes()
    outcomes: Counter[str] = Counter()
    for position in range(len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        arrays = _load(path, REQUIRED)
        if arrays is None:
            outcomes["rebuilt"] += 1
            continue
        outcomes["unchanged"] += 1
        for name in REQUIRED:
            assert arrays[name].dtype == written[name].dtype and np.array_equal(arrays[name], written[name]), position
    assert outcomes["rebuilt"] > outcomes["unchanged"] > 0, outcomes
