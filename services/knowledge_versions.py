"""Knowledge-base versions in the database: every dataset the service has served, numbered 1, 2, 3...

The newest version is the live one on every replica. Versions are never changed or deleted; a rollback
adds a new version holding an older one's dataset, so the history reads in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from infrastructure.database import Database
from infrastructure.tables import KnowledgeVersionRow
from services.question_log import utcnow

INSERT_ATTEMPTS = 5  # two replicas numbering a version at once: the loser takes the next number


@dataclass(frozen=True, slots=True)
class KnowledgeVersion:
    """What is known of one version without its dataset."""

    version: int
    created_at: datetime
    change: str
    detail: str | None
    checksum: str
    entry_count: int

    def to_wire(self) -> dict[str, object]:
        """The JSON form of the admin API."""
        return {
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "change": self.change,
            "detail": self.detail,
            "checksum": self.checksum,
            "entries": self.entry_count,
        }


_COLUMNS = (
    KnowledgeVersionRow.version,
    KnowledgeVersionRow.created_at,
    KnowledgeVersionRow.change,
    KnowledgeVersionRow.detail,
    KnowledgeVersionRow.checksum,
    KnowledgeVersionRow.entry_count,
)


class KnowledgeVersions:
    """Reads and appends knowledge-base versions."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def latest_number(self) -> int | None:
        """The newest version number (None before the first)."""
        async with self._database.session() as session:
            return await session.scalar(select(func.max(KnowledgeVersionRow.version)))

    async def get(self, version: int) -> tuple[KnowledgeVersion, bytes] | None:
        """A version and its dataset (JSON bytes), or None."""
        async with self._database.session() as session:
            row = (
                await session.execute(
                    select(*_COLUMNS, KnowledgeVersionRow.document).where(KnowledgeVersionRow.version == version)
                )
            ).first()
        if row is None:
            return None
        return KnowledgeVersion(*row[:6]), row.document.encode()

    async def history(self, limit: int = 100) -> list[KnowledgeVersion]:
        """The newest `limit` versions, newest first."""
        async with self._database.session() as session:
            rows = await session.execute(select(*_COLUMNS).order_by(KnowledgeVersionRow.version.desc()).limit(limit))
        return [KnowledgeVersion(*row) for row in rows]

    async def last_seed_checksum(self) -> str | None:
        """The checksum of the newest version imported from the dataset file."""
        async with self._database.session() as session:
            return await session.scalar(
                select(KnowledgeVersionRow.checksum)
                .where(KnowledgeVersionRow.change == "seed")
                .order_by(KnowledgeVersionRow.version.desc())
                .limit(1)
            )

    async def add(self, document: bytes, change: str, detail: str | None, entry_count: int) -> KnowledgeVersion:
        """Store a dataset as the next version and return it."""
        checksum = hashlib.sha256(document).hexdigest()
        for attempt in range(INSERT_ATTEMPTS):
            try:
                async with self._database.session() as session:
                    number = (await session.scalar(select(func.max(KnowledgeVersionRow.version))) or 0) + 1
                    created = utcnow()
                    session.add(
                        KnowledgeVersionRow(
                            version=number,
                            created_at=created,
                            change=change,
                            detail=detail,
                            checksum=checksum,
                            entry_count=entry_count,
                            document=document.decode(),
                        )
                    )
                return KnowledgeVersion(number, created, change, detail, checksum, entry_count)
            except IntegrityError:
                if attempt == INSERT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")
