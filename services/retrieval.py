"""Retrieval over every phrasing of every entry: hybrid cosine ranking, refined by a linear classifier.

Similarity (the one definition of `confidence`, in [0, 1]):
  a phrasing scores 0.7 x embedding cosine + 0.3 x character n-gram TF-IDF cosine (the lexical part
  catches acronyms and misspellings); an entry scores 0.7 x its best phrasing + 0.3 x the cosine to
  the centroid of all its phrasings.
Ranking: similarity + 2 x the probability a linear classifier gives the entry. The classifier (logistic
  loss over [embedding, TF-IDF] features) is trained at build time on the entries' own phrasings, so
  it learns which words separate neighbouring entries (e.g. "health factor" vs "liquidation
  threshold"). The no-match threshold applies to the top entry's similarity.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import SGDClassifier

from services.embeddings import EmbeddingService
from services.knowledge_base import Entry, KnowledgeBase
from services.text import normalize_text

logger = structlog.get_logger(__name__)

DENSE_WEIGHT = 0.7
LEXICAL_WEIGHT = 0.3
BEST_PHRASING_WEIGHT = 0.7
CENTROID_WEIGHT = 0.3
CLASSIFIER_WEIGHT = 2.0
LEXICAL_FEATURES = 20_000
CLASSIFIER_VERSION = "sgd-logloss-a1e-5-e30-f20000-v1"


@dataclass(frozen=True)
class Match:
    """A ranked entry and its similarity in [0, 1]."""

    entry: Entry
    score: float


@dataclass(frozen=True)
class ClassifierWeights:
    """One linear model per entry over [embedding, TF-IDF] features (rows = entries)."""

    coefficients: np.ndarray
    intercepts: np.ndarray


def _vectorizer(vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=(3, 5),
        sublinear_tf=True,
        dtype=np.float32,
        max_features=LEXICAL_FEATURES,
        vocabulary=vocabulary,
    )


@dataclass(frozen=True)
class LexicalIndex:
    """The fitted character n-gram TF-IDF: the term of each feature column, its idf, the phrasings' rows.

    Kept in the index file as plain arrays (no pickle), so a warm start does not refit it (~0.35 s).
    """

    terms: np.ndarray
    idf: np.ndarray
    phrasings: sparse.csr_matrix

    @classmethod
    def fit(cls, texts: list[str]) -> LexicalIndex:
        """Fit the vectorizer on the normalised phrasings."""
        vectorizer = _vectorizer()
        rows = vectorizer.fit_transform(texts).tocsr()
        return cls(vectorizer.get_feature_names_out().astype(str), vectorizer.idf_, rows)

    def vectorizer(self) -> TfidfVectorizer:
        """A vectorizer that transforms exactly as the fitted one did."""
        vectorizer = _vectorizer({term: column for column, term in enumerate(self.terms.tolist())})
        vectorizer.idf_ = self.idf
        return vectorizer

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the index file."""
        return {
            "lexical_terms": self.terms,
            "lexical_idf": self.idf,
            "lexical_data": self.phrasings.data,
            "lexical_indices": self.phrasings.indices,
            "lexical_indptr": self.phrasings.indptr,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], phrasing_count: int) -> LexicalIndex:
        """Rebuild from `to_arrays` (raises ValueError when they do not fit together)."""
        shape = (phrasing_count, len(arrays["lexical_terms"]))
        rows = sparse.csr_matrix(
            (arrays["lexical_data"], arrays["lexical_indices"], arrays["lexical_indptr"]), shape=shape
        )
        if len(arrays["lexical_idf"]) != shape[1]:
            raise ValueError("lexical idf does not match its terms")
        return cls(arrays["lexical_terms"], arrays["lexical_idf"], rows)


def _phrasings(knowledge_base: KnowledgeBase) -> tuple[list[str], list[int], np.ndarray]:
    texts: list[str] = []
    starts: list[int] = []
    owners: list[int] = []
    for index, entry in enumerate(knowledge_base.entries):
        starts.append(len(texts))
        phrasings = [normalize_text(text) for text in entry.phrasings()]
        texts.extend(phrasings)
        owners.extend([index] * len(phrasings))
    return texts, starts, np.array(owners, dtype=np.intp)


def _classifier_model(jobs: int = 1) -> SGDClassifier:
    return SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=30, tol=None, random_state=0, n_jobs=jobs)


def train_classifier(
    knowledge_base: KnowledgeBase, phrasing_vectors: np.ndarray, lexical: LexicalIndex
) -> ClassifierWeights:
    """Fit the entry classifier on the knowledge base's own phrasings (deterministic). Blocking, CPU-heavy."""
    _, _, owners = _phrasings(knowledge_base)
    features = sparse.hstack([sparse.csr_matrix(phrasing_vectors), lexical.phrasings]).tocsr()
    if len(knowledge_base) == 1:  # nothing to separate: a constant model
        return ClassifierWeights(np.zeros((1, features.shape[1]), np.float32), np.zeros(1, np.float32))
    model = _classifier_model(jobs=2)
    model.fit(features, owners)
    return ClassifierWeights(model.coef_.astype(np.float32), model.intercept_.astype(np.float32))


def update_retriever(previous: Retriever, knowledge_base: KnowledgeBase, phrasing_vectors: np.ndarray) -> Retriever:
    """A retriever for a slightly changed knowledge base, in a fraction of a full fit (blocking).

    The classifier is one-vs-rest: each entry's linear model is kept when the entry's phrasings are unchanged,
    and fitted alone (its phrasings against all others) for new and changed entries. The TF-IDF keeps the
    previous vocabulary and idf (words only new phrasings use are not features). A full fit later gives
    nearly the same ranking; `KnowledgeManager` runs one in the background.
    """
    if previous.classifier is None:
        raise ValueError("the previous retriever has no classifier to update")
    texts, _, owners = _phrasings(knowledge_base)
    old = previous.lexical
    lexical = LexicalIndex(old.terms, old.idf, old.vectorizer().transform(texts).tocsr())
    features = sparse.hstack([sparse.csr_matrix(phrasing_vectors), lexical.phrasings]).tocsr()
    before = {entry.id: (row, entry) for row, entry in enumerate(previous.knowledge_base.entries)}
    coefficients = np.zeros((len(knowledge_base), features.shape[1]), dtype=np.float32)
    intercepts = np.zeros(len(knowledge_base), dtype=np.float32)
    for row, entry in enumerate(knowledge_base.entries):
        kept = before.get(entry.id)
        if len(knowledge_base) == 1:  # nothing to separate: a constant model
            continue
        if kept is not None and kept[1].phrasings() == entry.phrasings():
            coefficients[row] = previous.classifier.coefficients[kept[0]]
            intercepts[row] = previous.classifier.intercepts[kept[0]]
            continue
        model = _classifier_model()
        model.fit(features, np.where(owners == row, 1, 0))
        coefficients[row] = model.coef_[0]
        intercepts[row] = model.intercept_[0]
    return Retriever(knowledge_base, phrasing_vectors, ClassifierWeights(coefficients, intercepts), lexical)


class Retriever:
    """Ranks knowledge-base entries for a question vector and text."""

    def __init__(
        self,
        knowledge_base: KnowledgeBase,
        phrasing_vectors: np.ndarray,
        classifier: ClassifierWeights | None,
        lexical: LexicalIndex | None = None,
    ) -> None:
        self.knowledge_base = knowledge_base
        texts, starts, _ = _phrasings(knowledge_base)
        lexical = lexical or LexicalIndex.fit(texts)
        if phrasing_vectors.shape[0] != len(texts):
            raise ValueError("phrasing vectors do not match the knowledge base")
        self._dense = phrasing_vectors.astype(np.float32)
        self._starts = np.array(starts, dtype=np.intp)
        centroids = np.add.reduceat(self._dense, self._starts, axis=0)
        self._centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
        if lexical.phrasings.shape[0] != len(texts):
            raise ValueError("the lexical index does not match the knowledge base")
        self.lexical = lexical
        self.classifier = classifier
        self._vectorizer = lexical.vectorizer()
        self._lexical = lexical.phrasings.T.tocsr()
        dimension = self._dense.shape[1]
        self._has_classifier = classifier is not None
        if classifier is not None:  # split once; the combined matrix is not kept
            self._dense_weights = np.ascontiguousarray(classifier.coefficients[:, :dimension])
            self._lexical_weights = np.ascontiguousarray(classifier.coefficients[:, dimension:].T)
            self._intercepts = classifier.intercepts
        self.phrasing_count = len(texts)
        self.phrasing_vectors = self._dense  # one row per phrasing, in the knowledge base's order
        self.dimension = dimension

    def search(self, vector: np.ndarray, text: str, limit: int) -> list[Match]:
        """Return up to `limit` distinct entries, best first."""
        return self.search_many(vector[np.newaxis, :], [text], limit)[0]

    def search_many(self, vectors: np.ndarray, texts: Sequence[str], limit: int) -> list[list[Match]]:
        """`search` for many questions (the rows of `vectors`): one matrix product per step for all of them."""
        queries = self._vectorizer.transform([normalize_text(text) for text in texts])
        lexical = (queries @ self._lexical).toarray()
        combined = DENSE_WEIGHT * (vectors @ self._dense.T) + LEXICAL_WEIGHT * lexical
        best_phrasing = np.maximum.reduceat(combined, self._starts, axis=1)
        similarity = np.clip(
            BEST_PHRASING_WEIGHT * best_phrasing + CENTROID_WEIGHT * (vectors @ self._centroids.T), 0, 1
        )
        ranking = similarity
        if self._has_classifier:
            ranking = similarity + CLASSIFIER_WEIGHT * self._probabilities(vectors, queries)
        limit = min(limit, ranking.shape[1])
        entries = self.knowledge_base.entries
        results: list[list[Match]] = []
        for row, scores in zip(ranking, similarity, strict=True):
            top = np.argpartition(-row, limit - 1)[:limit]
            top = top[np.argsort(-row[top], kind="stable")]
            results.append([Match(entries[index], float(scores[index])) for index in top])
        return results

    def _probabilities(self, vectors: np.ndarray, queries: sparse.csr_matrix) -> np.ndarray:
        logits = vectors @ self._dense_weights.T + (queries @ self._lexical_weights) + self._intercepts
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities: np.ndarray = logits / logits.sum(axis=1, keepdims=True)
        return probabilities


@dataclass
class _RankRequest:
    vectors: list[np.ndarray]
    texts: list[str]
    future: asyncio.Future[list[list[Match]]]


class BatchedRetriever:
    """Ranks the questions of concurrent requests together, off the event loop.

    Requests that arrive while a batch is being ranked wait and go into the next one, so under load one
    `search_many` (one TF-IDF transform, one matrix product per step) serves many questions, and the
    event loop never spends its time on the ranking. One batch runs at a time, on the ranker's own
    thread.
    """

    def __init__(self, retriever: Retriever, limit: int) -> None:
        self.retriever = retriever
        self._limit = limit
        self._pending: list[_RankRequest] = []
        self._draining = False
        # One batch at a time, on a thread of its own: nothing else queued on the loop's default pool (file
        # reads, a stuck client library) can delay the ranking of questions.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranking")

    async def search(self, vectors: Sequence[np.ndarray], texts: Sequence[str]) -> list[list[Match]]:
        """Up to `limit` matches, best first, for each (vector, text) pair."""
        future: asyncio.Future[list[list[Match]]] = asyncio.get_running_loop().create_future()
        self._pending.append(_RankRequest(list(vectors), list(texts), future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain(), name="ranking-batch")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                vectors = np.stack([vector for request in batch for vector in request.vectors])
                texts = [text for request in batch for text in request.texts]
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.retriever.search_many, vectors, texts, self._limit
                    )
                except Exception as error:  # a bug, not an expected failure: every waiting question gets it
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(error)
                    continue
                start = 0
                for request in batch:
                    end = start + len(request.texts)
                    if not request.future.done():  # a cancelled waiter (client gone) is skipped
                        request.future.set_result(results[start:end])
                    start = end
        finally:
            self._draining = False


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)  # type: ignore[arg-type]
        Path(temp_name).replace(path)
    except OSError as error:
        logger.warning("index_cache_write_failed", path=str(path), error=str(error))


def _load(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Every array of the index file (None when one of `names` is missing, or a number is not finite)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        missing = [name for name in names if name not in arrays]
        if missing:
            raise KeyError(f"missing arrays: {missing}")
    except Exception as error:  # damaged: rebuild
        # Any exception, not a list: what zipfile and numpy raise for damaged bytes is open-ended (a flipped
        # byte in a member's header gives NotImplementedError or RuntimeError, in its data BadZipFile).
        logger.warning("index_cache_unreadable", path=str(path), error=f"{type(error).__name__}: {error}")
        return None
    if not all(np.isfinite(array).all() for array in arrays.values() if array.dtype.kind in "fc"):
        logger.warning("index_cache_invalid", path=str(path))
        return None
    return arrays


def _cached_lexical(arrays: dict[str, np.ndarray], phrasing_count: int) -> LexicalIndex | None:
    """The stored lexical index, or None (an index file written before it was stored, or a damaged one)."""
    try:
        return LexicalIndex.from_arrays(arrays, phrasing_count)
    except (KeyError, ValueError):
        return None


async def build_retriever(
    knowledge_base: KnowledgeBase,
    embeddings: EmbeddingService,
    cache_dir: Path | None,
    reuse: Retriever | None = None,
    *,
    incremental: bool = False,
) -> tuple[Retriever, bool]:
    """Embed every phrasing and train the classifier, reusing the index file for (dataset, model).

    File reads and the CPU-heavy fitting run on threads; embedding goes through the embedding service,
    and only for phrasings `reuse` (the live retriever, when a changed dataset replaces it) lacks. With
    `incremental` (and `reuse`), the classifier is updated rather than fitted (`update_retriever`) and no
    index file is written. Returns the retriever and whether everything came from the index file.
    """
    texts = [text for entry in knowledge_base.entries for text in entry.phrasings()]
    normalized, _, _ = _phrasings(knowledge_base)
    key = hashlib.sha256(
        f"{knowledge_base.content_hash}\n{embeddings.model_id}\n{CLASSIFIER_VERSION}".encode()
    ).hexdigest()
    path = cache_dir / "index" / f"{key}.npz" if cache_dir is not None else None
    cached = (
        await asyncio.to_thread(_load, path, ("vectors", "coefficients", "intercepts")) if path is not None else None
    )
    if (
        cached is not None
        and cached["vectors"].shape[0] == len(texts)
        and len(cached["intercepts"]) == len(knowledge_base)
    ):
        weights = ClassifierWeights(cached["coefficients"], cached["intercepts"])
        vectors = cached["vectors"].astype(np.float32)
        lexical = _cached_lexical(cached, len(texts))
        if lexical is None:  # an older index file: fit once and store it beside the rest
            lexical = await asyncio.to_thread(LexicalIndex.fit, normalized)
            if path is not None:
                await asyncio.to_thread(_atomic_save, path, **_index_arrays(vectors, weights, lexical))
        return await asyncio.to_thread(Retriever, knowledge_base, vectors, weights, lexical), True
    vectors = await _embed_phrasings(texts, embeddings, reuse)
    if incremental and reuse is not None and reuse.classifier is not None:
        return await asyncio.to_thread(update_retriever, reuse, knowledge_base, vectors), False

    def fit() -> Retriever:
        lexical = LexicalIndex.fit(normalized)
        weights = train_classifier(knowledge_base, vectors, lexical)
        if path is not None:
            _atomic_save(path, **_index_arrays(vectors, weights, lexical))
        return Retriever(knowledge_base, vectors, weights, lexical)

    return await asyncio.to_thread(fit), False


def _index_arrays(vectors: np.ndarray, weights: ClassifierWeights, lexical: LexicalIndex) -> dict[str, np.ndarray]:
    return {
        "vectors": vectors,
        "coefficients": weights.coefficients,
        "intercepts": weights.intercepts,
        **lexical.to_arrays(),
    }


async def _embed_phrasings(texts: list[str], embeddings: EmbeddingService, reuse: Retriever | None) -> np.ndarray:
    """Vectors for `texts`: those `reuse` already holds are copied, only the others go to the model."""
    known: dict[str, np.ndarray] = {}
    if reuse is not None:
        previous = [text for entry in reuse.knowledge_base.entries for text in entry.phrasings()]
        known = dict(zip(previous, reuse.phrasing_vectors, strict=True))
    missing = sorted({text for text in texts if text not in known})
    if missing:
        known.update(zip(missing, await embeddings.embed_corpus(missing), strict=True))
    return np.stack([known[text] for text in texts]).astype(np.float32)
