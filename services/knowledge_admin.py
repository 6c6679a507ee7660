"""Changing the live knowledge base without a restart: validate, diff, replace, edit one entry, roll back.

Every change becomes a new version in the database (services/knowledge_versions.py), then the new
snapshot replaces the live one atomically; questions in flight finish on the snapshot they started with.
Only phrasings the live index lacks are embedded. Other replicas notice the new version (Redis pub/sub
when there is a Redis, and a poll of the newest version number in any case) and load it in the
background. `data/knowledge_base.json` stays the seed: a fresh database imports it as version 1, and a
changed file at start-up becomes a new version.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from infrastructure.database import Database
from infrastructure.metrics import KNOWLEDGE_BASE_ENTRIES, KNOWLEDGE_BASE_RELOADS, KNOWLEDGE_BASE_VERSION
from services.embeddings import EmbeddingService
from services.evaluation import LabelledQuestion, retrieval_figures
from services.knowledge import KnowledgeSnapshot, LiveKnowledge, build_snapshot
from services.knowledge_base import (
    Entry,
    KnowledgeBase,
    Problem,
    check_dataset,
    dump_dataset,
    parse_dataset,
    stale_entries,
)
from services.knowledge_versions import KnowledgeVersion, KnowledgeVersions
from services.retrieval import Retriever

logger = structlog.get_logger(__name__)

CHANNEL = "defi-qa:knowledge-base"
POLL_SECONDS = 2.0  # without Redis: how often each replica reads the newest version number
POLL_SECONDS_WITH_REDIS = 15.0  # with Redis the notification does it; the poll only catches a missed message
MAX_EVAL_DROP = 0.02  # ?require_eval=true refuses a change whose hit@1 falls by more than this
NEAR_DUPLICATE = 0.95  # two entries whose questions are this similar (cosine) are probably one
MAX_WARNINGS = 100
INCREMENTAL_MAX_ENTRIES = 25  # changes touching more entries refit the whole classifier before going live


class ChangeRefusedError(Exception):
    """A change that was not applied: the HTTP status, a sentence, a stable reason and any details."""

    def __init__(self, status: int, detail: str, reason: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.extra = extra


@dataclass
class ValidationReport:
    """What `validate` found; nothing was changed."""

    errors: list[Problem]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    diff: dict[str, list[str]] | None = None
    eval: dict[str, Any] | None = None
    stale_entries: list[dict[str, Any]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        """The JSON body of `POST /admin/knowledge-base/validate`."""
        return {
            "valid": not self.errors,
            "errors": [{"entry": p.entry, "field": p.field, "message": p.message} for p in self.errors],
            "warnings": self.warnings,
            "diff": self.diff,
            "eval": self.eval,
            "stale_entries": self.stale_entries,
        }


async def sync_seed(database: Database, versions: KnowledgeVersions, seed_path: Path) -> tuple[int, KnowledgeBase]:
    """Import the dataset file as a new version when it differs from the last one imported; the newest version.

    Done under the database's exclusive lock, so workers starting together import it once.
    """
    async with database.exclusive():
        raw = await asyncio.to_thread(seed_path.read_bytes)
        seed = parse_dataset(raw, str(seed_path))
        if await versions.last_seed_checksum() != seed.content_hash:
            added = await versions.add(raw, "seed", str(seed_path), len(seed))
            logger.info("knowledge_base_seed_imported", version=added.version, entries=len(seed), path=str(seed_path))
        newest = await versions.latest_number()
        assert newest is not None
        stored = await versions.get(newest)
    assert stored is not None
    record, document = stored
    return record.version, parse_dataset(document, f"database v{record.version}")


def diff_datasets(live: KnowledgeBase, proposed: KnowledgeBase) -> dict[str, list[str]]:
    """Entry ids added, changed (any field) and removed between two datasets.

    Fields only: an entry's private vocabulary (every subject of its dataset) differs as soon as any entry
    adds a subject, and must not make every entry count as changed.
    """
    before = {entry.id: entry.model_dump() for entry in live.entries}
    after = {entry.id: entry.model_dump() for entry in proposed.entries}
    return {
        "added": [entry_id for entry_id in after if entry_id not in before],
        "changed": [entry_id for entry_id in after if entry_id in before and after[entry_id] != before[entry_id]],
        "removed": [entry_id for entry_id in before if entry_id not in after],
    }


def phrasing_warnings(retriever: Retriever, only: set[str] | None = None) -> list[dict[str, Any]]:
    """Alternatives closer to another entry's question than to their own, and near-duplicate questions.

    `only` limits the warnings to those entries (the ones a change adds or edits).
    """
    entries = retriever.knowledge_base.entries
    vectors = retriever.phrasing_vectors
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    starts = np.cumsum([0] + [len(entry.phrasings()) for entry in entries[:-1]])
    questions = vectors[starts]
    warnings: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        if only is not None and entry.id not in only:
            continue
        alternatives = vectors[starts[index] + 1 : starts[index] + 1 + len(entry.alternatives)]
        scores = alternatives @ questions.T
        own = scores[:, index].copy()
        scores[:, index] = -1.0
        for row, phrasing in enumerate(entry.alternatives):
            other = int(np.argmax(scores[row]))
            if scores[row, other] > own[row]:
                warnings.append(
                    {
                        "entry": entry.id,
                        "kind": "alternative_closer_to_other_entry",
                        "message": f"alternative {phrasing!r} is closer to {entries[other].id!r}'s question "
                        f"({scores[row, other]:.2f}) than to its own ({own[row]:.2f})",
                        "other_entry": entries[other].id,
                    }
                )
    similarity = questions @ questions.T
    for first, second in zip(*np.nonzero(np.triu(similarity, k=1) >= NEAR_DUPLICATE), strict=True):
        pair = (entries[first].id, entries[second].id)
        if only is not None and not only & set(pair):
            continue
        warnings.append(
            {
                "entry": pair[0],
                "kind": "near_duplicate_questions",
                "message": f"the questions of {pair[0]!r} and {pair[1]!r} are near-duplicates "
                f"({similarity[first, second]:.2f}); users will get either one",
                "other_entry": pair[1],
            }
        )
    return warnings[:MAX_WARNINGS]


class KnowledgeManager:
    """Applies changes to the live knowledge base and keeps this process on the newest version."""

    def __init__(
        self,
        live: LiveKnowledge,
        versions: KnowledgeVersions,
        embeddings: EmbeddingService,
        *,
        max_results: int,
        cache_dir: Path | None,
        threshold: float,
        eval_questions: Sequence[LabelledQuestion],
        review_max_days: int,
        refit_delay_seconds: float = 30.0,
        redis: Redis | None = None,
    ) -> None:
        self._live = live
        self._versions = versions
        self._embeddings = embeddings
        self._max_results = max_results
        self._cache_dir = cache_dir
        self._threshold = threshold
        self._eval_questions = list(eval_questions)
        self.review_max_days = review_max_days
        self._refit_delay_seconds = refit_delay_seconds
        self._redis = redis
        self._lock = asyncio.Lock()
        self._refining: set[asyncio.Task[None]] = set()
        self._published(live.current)

    def status(self) -> dict[str, Any]:
        """The live version: number, size, checksum, when and from what it was loaded, stale entries."""
        snapshot = self._live.current
        return {
            "version": snapshot.version,
            "entries": len(snapshot.knowledge_base),
            "checksum": snapshot.knowledge_base.content_hash,
            "loaded_at": snapshot.loaded_at,
            "loaded_from": snapshot.loaded_from,
            "provisional": snapshot.provisional,
            "review_max_days": self.review_max_days,
            "stale_entries": stale_entries(snapshot.knowledge_base, self.review_max_days),
        }

    async def history(self, limit: int = 100) -> list[KnowledgeVersion]:
        """The newest versions, newest first."""
        return await self._versions.history(limit)

    async def validate(self, raw: bytes) -> ValidationReport:
        """Check a whole dataset against the live one; changes nothing."""
        proposed, problems = check_dataset(raw, "request")
        if proposed is None:
            return ValidationReport(errors=problems)
        current = self._live.current
        diff = diff_datasets(current.knowledge_base, proposed)
        snapshot = await self._build(proposed, current)
        touched = set(diff["added"]) | set(diff["changed"])
        return ValidationReport(
            errors=[],
            warnings=phrasing_warnings(snapshot.retriever, touched),
            diff=diff,
            eval=await self._compare(current, snapshot),
            stale_entries=stale_entries(proposed, self.review_max_days),
        )

    async def replace(self, raw: bytes, *, require_eval: bool = False) -> KnowledgeVersion:
        """Make a whole new dataset live (raises ChangeRefusedError when it is invalid or worse)."""
        proposed, problems = check_dataset(raw, "request")
        if proposed is None:
            KNOWLEDGE_BASE_RELOADS.labels(result="invalid").inc()
            raise ChangeRefusedError(
                422,
                f"The dataset has {len(problems)} problem(s); nothing was changed",
                "dataset_invalid",
                errors=[{"entry": p.entry, "field": p.field, "message": p.message} for p in problems],
            )
        return await self._apply(lambda _: list(proposed.entries), "replace", None, require_eval)

    async def put_entry(self, entry: Entry, *, require_eval: bool = False) -> KnowledgeVersion:
        """Add an entry, or replace the one with the same id (keeping its place)."""

        def change(entries: list[Entry]) -> list[Entry]:
            ids = [existing.id for existing in entries]
            if entry.id in ids:
                entries[ids.index(entry.id)] = entry
            else:
                entries.append(entry)
            return entries

        return await self._apply(change, "put_entry", entry.id, require_eval)

    async def delete_entry(self, entry_id: str, *, require_eval: bool = False) -> KnowledgeVersion:
        """Remove one entry (404 when there is none with this id; the last entry cannot be removed)."""

        def change(entries: list[Entry]) -> list[Entry]:
            kept = [entry for entry in entries if entry.id != entry_id]
            if len(kept) == len(entries):
                raise ChangeRefusedError(404, f"No entry with id {entry_id!r}", "entry_not_found")
            if not kept:
                raise ChangeRefusedError(422, "The knowledge base cannot be empty", "dataset_empty")
            return kept

        return await self._apply(change, "delete_entry", entry_id, require_eval)

    async def rollback(self, version: int, *, require_eval: bool = False) -> KnowledgeVersion:
        """Make an earlier version's dataset live again, as a new version."""
        stored = await self._versions.get(version)
        if stored is None:
            raise ChangeRefusedError(404, f"No knowledge-base version {version}", "version_not_found")
        return await self._apply(None, "rollback", f"to v{version}", require_eval, document=stored[1])

    async def sync(self) -> bool:
        """Load the newest stored version if this process is behind; whether it changed anything."""
        newest = await self._versions.latest_number()
        if newest is None or newest == self._live.current.version:
            return False
        async with self._lock:
            current = self._live.current
            if newest == current.version:
                return False
            stored = await self._versions.get(newest)
            if stored is None:
                return False
            try:
                knowledge_base = parse_dataset(stored[1], f"database v{newest}")
                snapshot = await self._build(knowledge_base, current, version=newest)
            except Exception:
                KNOWLEDGE_BASE_RELOADS.labels(result="error").inc()
                raise
            self._make_live(snapshot, f"database v{newest} ({stored[0].change})")
        logger.info("knowledge_base_synced", version=newest, entries=len(knowledge_base))
        return True

    async def run(self) -> None:
        """Keep this process on the newest version: Redis notifications when there is a Redis, and a poll."""
        listener = asyncio.create_task(self._listen()) if self._redis is not None else None
        interval = POLL_SECONDS_WITH_REDIS if self._redis is not None else POLL_SECONDS
        try:
            while True:
                await asyncio.sleep(interval)
                await self._sync_logged()
        finally:
            if listener is not None:
                listener.cancel()

    async def _listen(self) -> None:
        assert self._redis is not None
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    await self._sync_logged()  # whatever was published while we were not listening
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._sync_logged()
            except (RedisError, OSError) as error:
                logger.warning("knowledge_base_listen_failed", error=str(error))
                await asyncio.sleep(1.0)

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
        except (SQLAlchemyError, OSError, ValueError) as error:
            logger.warning("knowledge_base_sync_failed", error=f"{type(error).__name__}: {error}")

    async def _apply(
        self,
        change: Callable[[list[Entry]], list[Entry]] | None,
        kind: str,
        detail: str | None,
        require_eval: bool,
        document: bytes | None = None,
    ) -> KnowledgeVersion:
        """Apply `change` to the live entries (or make `document` live as it is), store it, swap it in."""
        await self._sync_logged()  # build on the newest version, not on a stale one
        async with self._lock:
            current = self._live.current
            if change is not None:
                document = dump_dataset(change(list(current.knowledge_base.entries)))
            assert document is not None
            proposed = parse_dataset(document, "request")
            if proposed.content_hash == current.knowledge_base.content_hash and kind != "rollback":
                raise ChangeRefusedError(409, "The change leaves the knowledge base as it is", "no_change")
            snapshot = await self._build(proposed, current)
            if require_eval:
                figures = await self._compare(current, snapshot)
                if figures is not None and figures["proposed"]["hit@1"] < figures["live"]["hit@1"] - MAX_EVAL_DROP:
                    KNOWLEDGE_BASE_RELOADS.labels(result="invalid").inc()
                    raise ChangeRefusedError(
                        422,
                        f"hit@1 would fall from {figures['live']['hit@1']} to {figures['proposed']['hit@1']} "
                        f"(more than {MAX_EVAL_DROP}); nothing was changed",
                        "eval_regression",
                        eval=figures,
                    )
            record = await self._versions.add(document, kind, detail, len(proposed))
            self._make_live(
                dataclasses.replace(snapshot, version=record.version), f"database v{record.version} ({kind})"
            )
        logger.info("knowledge_base_changed", version=record.version, change=kind, detail=detail, entries=len(proposed))
        await self._notify(record.version)
        return record

    async def _build(
        self, knowledge_base: KnowledgeBase, previous: KnowledgeSnapshot, version: int = 0, *, full: bool = False
    ) -> KnowledgeSnapshot:
        """The snapshot of `knowledge_base`: small changes update `previous`'s classifier (seconds), others fit one."""
        diff = diff_datasets(previous.knowledge_base, knowledge_base)
        touched = len(diff["added"]) + len(diff["changed"])
        return await build_snapshot(
            knowledge_base,
            self._embeddings,
            version=version,
            loaded_from=knowledge_base.source,
            max_results=self._max_results,
            cache_dir=self._cache_dir,
            previous=previous,
            incremental=not full and touched <= INCREMENTAL_MAX_ENTRIES,
        )

    def _refine_later(self, snapshot: KnowledgeSnapshot) -> None:
        """After a provisional snapshot went live: fit the whole classifier in the background, then swap it in.

        The fit waits `refit_delay_seconds` (KB_REFIT_DELAY_SECONDS) first, and a newer change cancels a waiting
        one: a burst of edits costs one full fit, not one per edit, and the quick updates of the burst do not
        compete with it.
        """
        for task in self._refining:
            task.cancel()
        if not snapshot.provisional:
            return
        task = asyncio.create_task(self._refine(snapshot))
        self._refining.add(task)
        task.add_done_callback(self._refining.discard)

    async def _refine(self, provisional: KnowledgeSnapshot) -> None:
        await asyncio.sleep(self._refit_delay_seconds)
        if self._live.current is not provisional:
            return
        try:
            refined = await self._build(provisional.knowledge_base, provisional, provisional.version, full=True)
        except Exception as error:  # the provisional snapshot keeps serving; the next change tries again
            logger.warning("knowledge_base_refit_failed", version=provisional.version, error=str(error))
            return
        async with self._lock:
            if self._live.current is provisional:  # not replaced meanwhile
                self._live.swap(dataclasses.replace(refined, loaded_from=provisional.loaded_from))
                logger.info("knowledge_base_refitted", version=provisional.version)

    async def _compare(self, live: KnowledgeSnapshot, proposed: KnowledgeSnapshot) -> dict[str, Any] | None:
        before = await retrieval_figures(live.retriever, self._embeddings, self._eval_questions, self._threshold)
        after = await retrieval_figures(proposed.retriever, self._embeddings, self._eval_questions, self._threshold)
        return {"live": before, "proposed": after} if before is not None and after is not None else None

    def _make_live(self, snapshot: KnowledgeSnapshot, loaded_from: str) -> None:
        snapshot = dataclasses.replace(snapshot, loaded_from=loaded_from)
        self._live.swap(snapshot)
        KNOWLEDGE_BASE_RELOADS.labels(result="ok").inc()
        self._published(snapshot)
        self._refine_later(snapshot)

    @staticmethod
    def _published(snapshot: KnowledgeSnapshot) -> None:
        KNOWLEDGE_BASE_ENTRIES.set(len(snapshot.knowledge_base))
        KNOWLEDGE_BASE_VERSION.set(snapshot.version)

    async def _notify(self, version: int) -> None:
        if self._redis is None:
            return
        try:
            await asyncio.wait_for(self._redis.publish(CHANNEL, str(version)), 2.0)
        except (RedisError, OSError, TimeoutError) as error:  # the other replicas' poll catches up
            logger.warning("knowledge_base_notify_failed", version=version, error=str(error))
