"""Insights from the question log: what to add to the knowledge base, and which entries users dispute.

For the last `days` days: the answer rate over time by outcome; the declined questions grouped by meaning
(one group per missing topic, with its phrasings and the nearest existing entry); answered questions that
only just cleared the similarity threshold; entries ranked by "wrong" feedback; entries never used; and how
often each entry answered. Everything is read with SQLAlchemy on the `Database` (SQLite or PostgreSQL).

Grouping by meaning: the declined questions' texts are embedded with the service's own embedder (through
its caches) and clustered by average-linkage agglomeration on cosine similarity, stopped when the two
closest groups are on average less similar than CLUSTER_SIMILARITY. 0.25 was chosen by experiment with the
bundled MiniLM model: 42 questions about three unseen topics (sourdough, marathons, houseplants; each topic's
questions are on average 0.35-0.53 similar to one another, 0.02-0.11 across topics) come back as exactly
three groups for any stop value from 0.18 to 0.28; mixed with the 49 off-topic questions of the evaluation
set, unrelated questions ("banana bread", "lower back pain") join a topic group below 0.23. 0.25 sits in the
middle of that band. It groups by topic, not by paraphrase: the knowledge base's own entries (which
paraphrase-level clustering would keep apart) share groups with their close neighbours at this value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from infrastructure.database import Database
from infrastructure.tables import AnswerRow, FeedbackRow
from services.embeddings import EmbeddingService
from services.knowledge import KnowledgeSnapshot, LiveKnowledge
from services.knowledge_base import KnowledgeBase, stale_entries

OUTCOMES = ("answered", "no_match", "generative", "fallback", "error")
ANSWERED_OUTCOMES = ("answered", "generative", "fallback")
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "missing_topics": (
        "count",
        "distinct_questions",
        "examples",
        "nearest_entry_id",
        "nearest_entry_question",
        "nearest_score",
        "last_asked",
    ),
    "near_threshold": ("question", "entry_id", "entry_question", "confidence", "outcome", "asked_at"),
    "disputed_entries": ("entry_id", "question", "wrong", "helpful", "comments"),
    "unused_entries": ("entry_id", "question"),
    "entry_usage": ("entry_id", "question", "uses"),
    "stale_entries": ("entry_id", "question", "reviewed"),
    "answer_rate": ("start", "questions", *OUTCOMES, "answered_share"),
}
TABLES = tuple(TABLE_COLUMNS)  # the tables `?format=csv&table=<name>` and the terminal report show

CLUSTER_SIMILARITY = 0.25  # average-linkage stop: groups on average less similar than this stay apart
NEAR_THRESHOLD_MARGIN = 0.05  # "just above the threshold": confidence in [threshold, threshold + margin)
MAX_DECLINED_TEXTS = 2000  # distinct declined texts embedded and clustered, most recent first
MAX_GROUPS = 100
EXAMPLES_SHOWN = 5
MEMBERS_SHOWN = 50
MAX_NEAR_THRESHOLD = 200
MAX_DISPUTED = 100
COMMENTS_SHOWN = 5
EMBED_CONCURRENCY = 64  # questions queued on the embedder at once, so live questions are never stuck behind us
HOURLY_UP_TO_DAYS = 2


class InsightsUnavailableError(RuntimeError):
    """The question log's database cannot be read right now."""


@dataclass(frozen=True)
class Cluster:
    """One group of texts: indices into the clustered rows, most central first, with each one's centrality."""

    members: tuple[int, ...]
    centrality: tuple[float, ...]


def cluster_by_meaning(vectors: np.ndarray, threshold: float = CLUSTER_SIMILARITY) -> list[Cluster]:
    """Average-linkage agglomerative clustering of unit `vectors` on cosine similarity.

    Repeatedly merges the two groups with the highest average pairwise similarity until that is below
    `threshold`. Each group's members are ordered by their mean similarity to the other members (the most
    central phrasing first). Groups come largest first. O(n^2) memory and about O(n^2) time: every row keeps
    its best partner, so a merge only re-scans the rows that pointed at the merged pair.
    """
    count = int(vectors.shape[0])
    if count == 0:
        return []
    unit = vectors.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    pairwise = unit @ unit.T
    similarity = pairwise.copy()  # between live groups: the average of the members' pairwise similarities
    np.fill_diagonal(similarity, -np.inf)
    sizes = np.ones(count)
    alive = np.ones(count, dtype=bool)
    groups: dict[int, list[int]] = {index: [index] for index in range(count)}
    best = similarity.argmax(axis=1)
    best_value = similarity[np.arange(count), best]
    while count > 1:
        first = int(np.argmax(np.where(alive, best_value, -np.inf)))
        if best_value[first] < threshold:
            break
        second = int(best[first])
        # Lance-Williams update for average linkage: the merged group's similarity to every other group.
        merged = (sizes[first] * similarity[first] + sizes[second] * similarity[second]) / (
            sizes[first] + sizes[second]
        )
        merged[first] = merged[second] = -np.inf
        merged[~alive] = -np.inf
        similarity[first] = merged
        similarity[:, first] = merged
        similarity[second] = -np.inf
        similarity[:, second] = -np.inf
        sizes[first] += sizes[second]
        alive[second] = False
        best_value[second] = -np.inf
        groups[first].extend(groups.pop(second))
        count -= 1
        # A merged similarity never exceeds the larger of the two it replaces, so only rows whose best partner
        # was one of the pair (and the new group itself) need a fresh scan.
        stale = np.flatnonzero(alive & ((best == first) | (best == second)))
        for row in {first, *stale.tolist()}:
            best[row] = int(np.argmax(similarity[row]))
            best_value[row] = similarity[row, best[row]]
        better = alive & (merged > best_value)
        best[better] = first
        best_value[better] = merged[better]
    clusters = []
    for members in groups.values():
        block = pairwise[np.ix_(members, members)]
        centrality = (block.sum(axis=1) - 1.0) / max(len(members) - 1, 1) if len(members) > 1 else np.ones(1)
        order = np.argsort(-centrality, kind="stable")
        clusters.append(
            Cluster(tuple(members[index] for index in order), tuple(float(centrality[index]) for index in order))
        )
    clusters.sort(key=lambda cluster: (-len(cluster.members), cluster.members[0]))
    return clusters


# --- the report -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryRef:
    """A knowledge-base entry as the report names it."""

    id: str
    question: str | None  # None when the entry is no longer in the knowledge base


@dataclass(frozen=True)
class MissingTopic:
    """Declined questions that mean the same thing: one topic the knowledge base lacks."""

    count: int  # logged questions (rows), repeats included
    distinct_questions: int
    examples: list[str]  # the most central phrasings first
    members: list[str]  # every distinct text of the group (up to MEMBERS_SHOWN), most central first
    nearest_entry: EntryRef | None
    nearest_score: float | None
    last_asked: datetime


@dataclass(frozen=True)
class NearThreshold:
    """An answered question whose confidence only just cleared the similarity threshold."""

    question: str
    entry: EntryRef | None
    confidence: float
    outcome: str
    asked_at: datetime


@dataclass(frozen=True)
class DisputedEntry:
    """An entry users rated wrong, with its helpful count and the latest comments."""

    entry: EntryRef
    wrong: int
    helpful: int
    comments: list[dict[str, str]]  # {"rating", "comment", "at"}, newest first


@dataclass(frozen=True)
class EntryUse:
    """How many questions an entry answered in the period."""

    entry: EntryRef
    uses: int


@dataclass(frozen=True)
class RateBucket:
    """Questions per outcome in one day or hour."""

    start: datetime
    counts: dict[str, int]

    @property
    def questions(self) -> int:
        """Every question of the bucket."""
        return sum(self.counts.values())

    @property
    def answered_share(self) -> float | None:
        """The share answered (extractive, generative or fallback), None for an empty bucket."""
        total = self.questions
        return round(sum(self.counts[name] for name in ANSWERED_OUTCOMES) / total, 4) if total else None


@dataclass
class InsightsReport:
    """Everything `GET /admin/insights` and `scripts/insights.py` show, for one period."""

    days: int
    since: datetime
    generated_at: datetime
    kb_version: int
    similarity_threshold: float
    bucket: str  # "hour" or "day"
    answer_rate: list[RateBucket] = field(default_factory=list)
    missing_topics: list[MissingTopic] = field(default_factory=list)
    declined_texts_clustered: int = 0
    near_threshold: list[NearThreshold] = field(default_factory=list)
    disputed_entries: list[DisputedEntry] = field(default_factory=list)
    unused_entries: list[EntryRef] = field(default_factory=list)
    entry_usage: list[EntryUse] = field(default_factory=list)
    stale_entries: list[dict[str, Any]] = field(default_factory=list)  # {"entry_id", "question", "reviewed"}

    def totals(self) -> dict[str, Any]:
        """Questions per outcome over the whole period, and the answered share."""
        counts = {name: sum(bucket.counts[name] for bucket in self.answer_rate) for name in OUTCOMES}
        total = sum(counts.values())
        answered = sum(counts[name] for name in ANSWERED_OUTCOMES)
        return {"questions": total, **counts, "answered_share": round(answered / total, 4) if total else None}

    def to_json(self) -> dict[str, Any]:
        """The JSON body of `GET /admin/insights`."""
        return {
            "days": self.days,
            "since": self.since.isoformat(),
            "generated_at": self.generated_at.isoformat(),
            "kb_version": self.kb_version,
            "similarity_threshold": self.similarity_threshold,
            "totals": self.totals(),
            "answer_rate": {"bucket": self.bucket, "rows": self.table("answer_rate")},
            "missing_topics": [
                {
                    "count": topic.count,
                    "distinct_questions": topic.distinct_questions,
                    "examples": topic.examples,
                    "members": topic.members,
                    "nearest_entry": _entry_json(topic.nearest_entry, topic.nearest_score),
                    "last_asked": topic.last_asked.isoformat(),
                }
                for topic in self.missing_topics
            ],
            "declined_texts_clustered": self.declined_texts_clustered,
            "near_threshold": self.table("near_threshold"),
            "disputed_entries": [
                {
                    "entry_id": item.entry.id,
                    "question": item.entry.question,
                    "wrong": item.wrong,
                    "helpful": item.helpful,
                    "comments": item.comments,
                }
                for item in self.disputed_entries
            ],
            "unused_entries": self.table("unused_entries"),
            "entry_usage": self.table("entry_usage"),
            "stale_entries": self.table("stale_entries"),
        }

    def table(self, name: str) -> list[dict[str, Any]]:
        """One table as flat rows (CSV and terminal): scalar cells only, lists joined with ' | '."""
        if name == "answer_rate":
            return [
                {
                    "start": bucket.start.isoformat(),
                    "questions": bucket.questions,
                    **bucket.counts,
                    "answered_share": bucket.answered_share,
                }
                for bucket in self.answer_rate
            ]
        if name == "missing_topics":
            return [
                {
                    "count": topic.count,
                    "distinct_questions": topic.distinct_questions,
                    "examples": " | ".join(topic.examples),
                    "nearest_entry_id": topic.nearest_entry.id if topic.nearest_entry else None,
                    "nearest_entry_question": topic.nearest_entry.question if topic.nearest_entry else None,
                    "nearest_score": topic.nearest_score,
                    "last_asked": topic.last_asked.isoformat(),
                }
                for topic in self.missing_topics
            ]
        if name == "near_threshold":
            return [
                {
                    "question": item.question,
                    "entry_id": item.entry.id if item.entry else None,
                    "entry_question": item.entry.question if item.entry else None,
                    "confidence": item.confidence,
                    "outcome": item.outcome,
                    "asked_at": item.asked_at.isoformat(),
                }
                for item in self.near_threshold
            ]
        if name == "disputed_entries":
            return [
                {
                    "entry_id": item.entry.id,
                    "question": item.entry.question,
                    "wrong": item.wrong,
                    "helpful": item.helpful,
                    "comments": " | ".join(comment["comment"] for comment in item.comments),
                }
                for item in self.disputed_entries
            ]
        if name == "unused_entries":
            return [{"entry_id": entry.id, "question": entry.question} for entry in self.unused_entries]
        if name == "entry_usage":
            return [
                {"entry_id": use.entry.id, "question": use.entry.question, "uses": use.uses} for use in self.entry_usage
            ]
        if name == "stale_entries":
            return list(self.stale_entries)
        raise KeyError(name)


def _entry_json(entry: EntryRef | None, score: float | None) -> dict[str, Any] | None:
    return None if entry is None else {"id": entry.id, "question": entry.question, "score": score}


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- the service ------------------------------------------------------------------------------------------------


class Insights:
    """Reads the question log and feedback, groups declined questions by meaning with the service's embedder."""

    def __init__(
        self,
        database: Database,
        embeddings: EmbeddingService,
        knowledge: LiveKnowledge,
        similarity_threshold: float,
        cluster_similarity: float = CLUSTER_SIMILARITY,
        review_max_days: int = 180,
    ) -> None:
        self._database = database
        self._embeddings = embeddings
        self._knowledge = knowledge
        self._threshold = similarity_threshold
        self._cluster_similarity = cluster_similarity
        self._review_max_days = review_max_days
        self._running = asyncio.Lock()  # one report at a time: it embeds up to MAX_DECLINED_TEXTS questions

    async def report(self, days: int, now: datetime | None = None) -> InsightsReport:
        """The report for the last `days` days; raises InsightsUnavailableError when the database cannot be read."""
        now = now or datetime.now(UTC)
        since = now - timedelta(days=days)
        snapshot = self._knowledge.current
        bucket = "hour" if days <= HOURLY_UP_TO_DAYS else "day"
        report = InsightsReport(
            days=days,
            since=since,
            generated_at=now,
            kb_version=snapshot.version,
            similarity_threshold=self._threshold,
            bucket=bucket,
        )
        async with self._running:
            try:
                declined = await self._read(report, snapshot.knowledge_base, now)
            except (SQLAlchemyError, OSError, TimeoutError) as error:
                raise InsightsUnavailableError(f"{type(error).__name__}: {error}".splitlines()[0][:200]) from error
            report.missing_topics = await self._group_declined(declined, snapshot)
        report.declined_texts_clustered = len(declined)
        knowledge_base = snapshot.knowledge_base
        report.stale_entries = [
            {"entry_id": item["entry"], "question": entry.question if entry else None, "reviewed": item["reviewed"]}
            for item in stale_entries(knowledge_base, self._review_max_days)
            for entry in [knowledge_base.by_id(item["entry"])]
        ]
        return report

    async def _read(self, report: InsightsReport, knowledge_base: KnowledgeBase, now: datetime) -> list[_Declined]:
        since = report.since
        in_period = AnswerRow.created_at >= since
        async with self._database.session() as session:
            bucket_key = self._bucket_expression(report.bucket)
            rate_rows = (
                await session.execute(
                    select(bucket_key.label("bucket"), AnswerRow.outcome, func.count())
                    .where(in_period)
                    .group_by(bucket_key, AnswerRow.outcome)
                )
            ).all()
            text = func.coalesce(AnswerRow.resolved_question, AnswerRow.question)
            last = func.max(AnswerRow.created_at)
            declined_rows = (
                await session.execute(
                    select(text.label("text"), func.count().label("rows"), last.label("last"))
                    .where(in_period, AnswerRow.outcome == "no_match")
                    .group_by(text)
                    .order_by(last.desc())
                    .limit(MAX_DECLINED_TEXTS)
                )
            ).all()
            near_rows = (
                await session.execute(
                    select(
                        AnswerRow.question,
                        AnswerRow.top_entry_id,
                        AnswerRow.confidence,
                        AnswerRow.outcome,
                        AnswerRow.created_at,
                    )
                    .where(
                        in_period,
                        AnswerRow.outcome.in_(ANSWERED_OUTCOMES),
                        AnswerRow.confidence >= self._threshold,
                        AnswerRow.confidence < self._threshold + NEAR_THRESHOLD_MARGIN,
                    )
                    .order_by(AnswerRow.confidence, AnswerRow.created_at.desc())
                    .limit(MAX_NEAR_THRESHOLD)
                )
            ).all()
            wrong = func.sum(case((FeedbackRow.rating == "wrong", 1), else_=0))
            helpful = func.sum(case((FeedbackRow.rating == "helpful", 1), else_=0))
            disputed_rows = (
                await session.execute(
                    select(FeedbackRow.entry_id, wrong.label("wrong"), helpful.label("helpful"))
                    .where(FeedbackRow.updated_at >= since, FeedbackRow.entry_id.is_not(None))
                    .group_by(FeedbackRow.entry_id)
                    .having(wrong > 0)
                    .order_by(wrong.desc(), helpful, FeedbackRow.entry_id)
                    .limit(MAX_DISPUTED)
                )
            ).all()
            comments: dict[str, list[dict[str, str]]] = {}
            if disputed_rows:
                comment_rows = (
                    await session.execute(
                        select(FeedbackRow.entry_id, FeedbackRow.rating, FeedbackRow.comment, FeedbackRow.updated_at)
                        .where(
                            FeedbackRow.updated_at >= since,
                            FeedbackRow.entry_id.in_([row.entry_id for row in disputed_rows]),
                            FeedbackRow.comment.is_not(None),
                        )
                        .order_by(FeedbackRow.updated_at.desc())
                    )
                ).all()
                for row in comment_rows:
                    listed = comments.setdefault(row.entry_id, [])
                    if len(listed) < COMMENTS_SHOWN:
                        listed.append(
                            {"rating": row.rating, "comment": row.comment, "at": _aware(row.updated_at).isoformat()}
                        )
            usage_rows = (
                await session.execute(
                    select(AnswerRow.top_entry_id, func.count().label("uses"))
                    .where(in_period, AnswerRow.outcome.in_(ANSWERED_OUTCOMES), AnswerRow.top_entry_id.is_not(None))
                    .group_by(AnswerRow.top_entry_id)
                    .order_by(func.count().desc(), AnswerRow.top_entry_id)
                )
            ).all()

        def entry(entry_id: str) -> EntryRef:
            found = knowledge_base.by_id(entry_id)
            return EntryRef(entry_id, found.question if found is not None else None)

        report.answer_rate = _rate_buckets(rate_rows, report.bucket, report.since, now)
        report.near_threshold = [
            NearThreshold(
                row.question,
                entry(row.top_entry_id) if row.top_entry_id else None,
                float(row.confidence),
                row.outcome,
                _aware(row.created_at),
            )
            for row in near_rows
        ]
        report.disputed_entries = [
            DisputedEntry(entry(row.entry_id), int(row.wrong), int(row.helpful), comments.get(row.entry_id, []))
            for row in disputed_rows
        ]
        report.entry_usage = [EntryUse(entry(row.top_entry_id), int(row.uses)) for row in usage_rows]
        used = {use.entry.id for use in report.entry_usage}
        report.unused_entries = [
            EntryRef(item.id, item.question) for item in knowledge_base.entries if item.id not in used
        ]
        return [_Declined(row.text, int(row.rows), _aware(row.last)) for row in declined_rows]

    def _bucket_expression(self, bucket: str) -> Any:
        """The created_at's day or hour as text ('2025-05-01' or '2025-05-01 13'), in UTC, on either dialect."""
        if self._database.dialect == "postgresql":
            return func.to_char(
                func.timezone("UTC", AnswerRow.created_at), "YYYY-MM-DD HH24" if bucket == "hour" else "YYYY-MM-DD"
            )
        return func.strftime("%Y-%m-%d %H" if bucket == "hour" else "%Y-%m-%d", AnswerRow.created_at)

    async def _group_declined(self, declined: list[_Declined], snapshot: KnowledgeSnapshot) -> list[MissingTopic]:
        if not declined:
            return []
        texts = [item.text for item in declined]
        vectors = await self._embed(texts)
        clusters = await asyncio.to_thread(cluster_by_meaning, vectors, self._cluster_similarity)
        clusters = _largest(clusters, declined)
        retriever = snapshot.retriever
        matches = await asyncio.to_thread(retriever.search_many, vectors, texts, 1)
        topics = []
        for cluster in clusters:
            members = [declined[index] for index in cluster.members]
            nearest_votes: dict[str, list[float]] = {}
            for index in cluster.members:
                if matches[index]:
                    nearest_votes.setdefault(matches[index][0].entry.id, []).append(matches[index][0].score)
            nearest: EntryRef | None = None
            score: float | None = None
            if nearest_votes:
                # The entry most members ranked first; ties go to the one they came closest to.
                best_id = max(nearest_votes, key=lambda key: (len(nearest_votes[key]), max(nearest_votes[key])))
                found = snapshot.knowledge_base.by_id(best_id)
                nearest = EntryRef(best_id, found.question if found is not None else None)
                score = round(max(nearest_votes[best_id]), 4)
            topics.append(
                MissingTopic(
                    count=sum(item.rows for item in members),
                    distinct_questions=len(members),
                    examples=[item.text for item in members[:EXAMPLES_SHOWN]],
                    members=[item.text for item in members[:MEMBERS_SHOWN]],
                    nearest_entry=nearest,
                    nearest_score=score,
                    last_asked=max(item.last for item in members),
                )
            )
        topics.sort(key=lambda topic: (-topic.count, -topic.last_asked.timestamp()))
        return topics

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """The texts' vectors through the embedder's caches and batching, a bounded number queued at a time."""
        limit = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(text: str) -> np.ndarray:
            async with limit:
                return await self._embeddings.embed_query(text)

        return np.stack(await asyncio.gather(*(one(text) for text in texts)))


@dataclass(frozen=True)
class _Declined:
    text: str
    rows: int
    last: datetime


def _largest(clusters: list[Cluster], declined: list[_Declined]) -> list[Cluster]:
    """The MAX_GROUPS clusters with the most logged questions."""
    ranked = sorted(clusters, key=lambda cluster: -sum(declined[index].rows for index in cluster.members))
    return ranked[:MAX_GROUPS]


def _rate_buckets(rows: Sequence[Any], bucket: str, since: datetime, now: datetime) -> list[RateBucket]:
    """Every day (or hour) of the period, oldest first, empty ones included."""
    step = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    pattern = "%Y-%m-%d %H" if bucket == "hour" else "%Y-%m-%d"
    start = since.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        start = start.replace(hour=0)
    buckets: dict[datetime, dict[str, int]] = {}
    moment = start
    while moment <= now:
        buckets[moment] = dict.fromkeys(OUTCOMES, 0)
        moment += step
    for key, outcome, count in rows:
        moment = datetime.strptime(str(key), pattern).replace(tzinfo=UTC)
        counts = buckets.setdefault(moment, dict.fromkeys(OUTCOMES, 0))
        counts[outcome] = counts.get(outcome, 0) + int(count)
    return [RateBucket(moment, counts) for moment, counts in sorted(buckets.items())]
