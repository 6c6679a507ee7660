"""The curated DeFi Q&A dataset: schema, loading and validation."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

_ID_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
MAX_SUBJECTS = 8
MAX_SUBJECT_CHARS = 40
MAX_ENTRIES = 5000
MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 4000
MAX_ALTERNATIVES = 40
_FIGURES = re.compile(r"\d")  # an answer with digits states figures: fees, rates, dates, amounts


class DatasetError(ValueError):
    """The dataset file is missing, unreadable or has an invalid entry."""


class Entry(BaseModel):
    """One curated question with its answer and the alternative phrasings users type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=80)
    category: str = Field(min_length=1, max_length=80)
    question: str = Field(min_length=3, max_length=MAX_QUESTION_CHARS)
    alternatives: tuple[Annotated[str, Field(max_length=MAX_QUESTION_CHARS)], ...] = Field(
        min_length=2, max_length=MAX_ALTERNATIVES
    )
    answer: str = Field(min_length=20, max_length=MAX_ANSWER_CHARS)
    subjects: tuple[str, ...] = ()
    """What the entry is about (protocols, tokens, concepts), main one first; follow-ups inherit them."""
    reviewed: date | None = None
    """When a person last checked the entry's facts against current sources (YYYY-MM-DD)."""
    _vocabulary: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID_PATTERN.match(value):
            raise ValueError("id must be lower-case kebab-case (letters, digits, dashes)")
        return value

    @field_validator("category", "question", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return " ".join(value.split())

    @field_validator("alternatives")
    @classmethod
    def _alternatives_not_blank(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not phrasing.strip() for phrasing in value):
            raise ValueError("alternative phrasings must not be blank")
        return tuple(phrasing.strip() for phrasing in value)

    @field_validator("subjects")
    @classmethod
    def _check_subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        subjects = tuple(" ".join(subject.split()) for subject in value)
        if len(subjects) > MAX_SUBJECTS:
            raise ValueError(f"at most {MAX_SUBJECTS} subjects")
        if any(not subject or len(subject) > MAX_SUBJECT_CHARS for subject in subjects):
            raise ValueError(f"subjects must be non-blank and at most {MAX_SUBJECT_CHARS} characters")
        if any(not any(character.isalnum() for character in subject) for subject in subjects):
            raise ValueError("a subject must contain a letter or a digit")
        if len({subject.casefold() for subject in subjects}) != len(subjects):
            raise ValueError("duplicate subject")
        return subjects

    def phrasings(self) -> list[str]:
        """Every text indexed for this entry: the question, each alternative, the answer."""
        return [self.question, *self.alternatives, self.answer]

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every subject of the knowledge base this entry belongs to (set by `KnowledgeBase`), so a ranked
        entry tells which names a question uses are subjects ("How does Aave handle liquidations?")."""
        return self._vocabulary


@dataclass(frozen=True)
class KnowledgeBase:
    """The validated entries and a hash of their JSON (it keys the index file and checks versions)."""

    entries: tuple[Entry, ...]
    content_hash: str
    source: str
    """Where it was read from: the dataset file's path, or `database v<N>`."""

    def __post_init__(self) -> None:
        vocabulary: dict[str, str] = {}
        for entry in self.entries:
            for subject in entry.subjects:
                vocabulary.setdefault(subject.casefold(), subject)
        for entry in self.entries:
            entry._vocabulary = tuple(vocabulary.values())

    def by_id(self, entry_id: str) -> Entry | None:
        """Return the entry with this id, or None."""
        return next((entry for entry in self.entries if entry.id == entry_id), None)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the entry (id, or position when it has no usable id), field and why."""

    entry: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.entry}: {self.field}: {self.message}"


def check_dataset(raw: bytes, source: str) -> tuple[KnowledgeBase | None, list[Problem]]:
    """Validate a whole dataset (JSON bytes); every problem found, and the knowledge base when there are none.

    The document is a JSON list of entries (or `{"entries": [...]}`); `source` names where it came from.
    """
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        return None, [Problem("dataset", "json", f"not valid JSON: {error}")]
    items = document.get("entries") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        return None, [Problem("dataset", "entries", "must be a non-empty list of entries")]
    if len(items) > MAX_ENTRIES:
        return None, [Problem("dataset", "entries", f"at most {MAX_ENTRIES} entries")]
    entries: list[Entry] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None
        label = raw_id if isinstance(raw_id, str) and raw_id else f"#{position}"
        try:
            entry = Entry.model_validate(item)
        except ValidationError as error:
            for detail in error.errors():
                field = ".".join(str(part) for part in detail["loc"]) or "entry"
                problems.append(Problem(label, field, detail["msg"]))
            continue
        if entry.id in seen:
            problems.append(Problem(label, "id", f"duplicate id {entry.id!r}"))
            continue
        seen.add(entry.id)
        entries.append(entry)
    if problems:
        return None, problems
    return KnowledgeBase(tuple(entries), hashlib.sha256(raw).hexdigest(), source), []


def parse_dataset(raw: bytes, source: str) -> KnowledgeBase:
    """Validate a dataset (JSON bytes); raise DatasetError naming the first problem."""
    knowledge_base, problems = check_dataset(raw, source)
    if knowledge_base is None:
        raise DatasetError(f"dataset {source}: {problems[0]}")
    return knowledge_base


def dump_dataset(entries: Sequence[Entry]) -> bytes:
    """The canonical JSON of a dataset (the format of data/knowledge_base.json), as stored for each version."""
    document = [entry.model_dump(mode="json", exclude_defaults=True) for entry in entries]
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


def load_knowledge_base(path: Path) -> KnowledgeBase:
    """Read and validate the dataset file; raise DatasetError naming the first bad entry."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read dataset {path}: {error.strerror or error}") from None
    return parse_dataset(raw, str(path))


def stale_entries(knowledge_base: KnowledgeBase, max_days: int, today: date | None = None) -> list[dict[str, Any]]:
    """Entries whose answers hold figures (digits: fees, rates, dates, amounts) not reviewed for `max_days`."""
    today = today or date.today()
    stale = []
    for entry in knowledge_base.entries:
        if not _FIGURES.search(entry.answer):
            continue
        if entry.reviewed is None or (today - entry.reviewed).days > max_days:
            stale.append({"entry": entry.id, "reviewed": entry.reviewed.isoformat() if entry.reviewed else None})
    return stale
