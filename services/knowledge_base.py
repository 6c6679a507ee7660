"""The curated DeFi Q&A dataset: schema, loading and validation."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

_ID_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
MAX_SUBJECTS = 8
MAX_SUBJECT_CHARS = 40


class DatasetError(ValueError):
    """The dataset file is missing, unreadable or has an invalid entry."""


class Entry(BaseModel):
    """One curated question with its answer and the alternative phrasings users type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=80)
    category: str = Field(min_length=1)
    question: str = Field(min_length=3)
    alternatives: tuple[str, ...] = Field(min_length=2)
    answer: str = Field(min_length=20)
    subjects: tuple[str, ...] = ()
    """What the entry is about (protocols, tokens, concepts), main one first; follow-ups inherit them."""
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
    """The validated entries and a hash of the file content (used to key the embedding matrix)."""

    entries: tuple[Entry, ...]
    content_hash: str
    path: Path

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


def load_knowledge_base(path: Path) -> KnowledgeBase:
    """Read and validate the dataset; raise DatasetError naming the first bad entry."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read dataset {path}: {error.strerror or error}") from None
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DatasetError(f"dataset {path} is not valid JSON: {error}") from None
    items = document.get("entries") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        raise DatasetError(f"dataset {path} must hold a non-empty list of entries")
    entries: list[Entry] = []
    seen: set[str] = set()
    for position, item in enumerate(items):
        label = f"entry #{position}" + (f" (id={item.get('id')!r})" if isinstance(item, dict) else "")
        try:
            entry = Entry.model_validate(item)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "entry"
            raise DatasetError(f"dataset {path}: {label}: {field}: {first['msg']}") from None
        if entry.id in seen:
            raise DatasetError(f"dataset {path}: {label}: duplicate id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    return KnowledgeBase(tuple(entries), hashlib.sha256(raw).hexdigest(), path)
