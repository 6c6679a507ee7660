"""The database schema: every table the service keeps, declared once (migrations in infrastructure/migrations/).

Kept: one row per answered question (the question log), the feedback on answers, and small service-wide
values such as the salt that hashes session ids. Nothing here stores a client address.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ANSWER_ID_LENGTH = 32
ENTRY_ID_LENGTH = 100


class Base(DeclarativeBase):
    """The declarative base of every table."""


class AnswerRow(Base):
    """One question and how it was answered (the question log)."""

    __tablename__ = "answers"

    id: Mapped[str] = mapped_column(String(ANSWER_ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    transport: Mapped[str] = mapped_column(String(16))
    question: Mapped[str] = mapped_column(Text)
    resolved_question: Mapped[str | None] = mapped_column(Text)  # only when a follow-up was rewritten
    top_entry_id: Mapped[str | None] = mapped_column(String(ENTRY_ID_LENGTH))
    confidence: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[float] = mapped_column(Float)
    session_hash: Mapped[str | None] = mapped_column(String(64))
    kb_version: Mapped[int | None] = mapped_column(Integer)
    unknown_terms: Mapped[str | None] = mapped_column(Text)  # comma-separated names the knowledge base lacks

    __table_args__ = (
        Index("ix_answers_created_at", "created_at"),
        Index("ix_answers_outcome_created_at", "outcome", "created_at"),
        Index("ix_answers_top_entry_id", "top_entry_id"),
    )


class FeedbackRow(Base):
    """A rating of one answer; one per answer and rater (the rater's session, hashed, or '' without one)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    answer_id: Mapped[str] = mapped_column(String(ANSWER_ID_LENGTH), ForeignKey("answers.id", ondelete="CASCADE"))
    rater_hash: Mapped[str] = mapped_column(String(64))
    rating: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    entry_id: Mapped[str | None] = mapped_column(String(ENTRY_ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("answer_id", "rater_hash", name="uq_feedback_answer_rater"),
        Index("ix_feedback_created_at", "created_at"),
        Index("ix_feedback_entry_id", "entry_id"),
    )


class ServiceValueRow(Base):
    """A small service-wide value shared by every process (e.g. the session-hash salt)."""

    __tablename__ = "service_values"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class KnowledgeVersionRow(Base):
    """One version of the knowledge base: the whole dataset as JSON, and how it came to be."""

    __tablename__ = "knowledge_base_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    change: Mapped[str] = mapped_column(String(32))  # seed, replace, put_entry, delete_entry, rollback
    detail: Mapped[str | None] = mapped_column(Text)  # the seed file, the entry id, the version rolled back to
    checksum: Mapped[str] = mapped_column(String(64))  # SHA-256 of `document`
    entry_count: Mapped[int] = mapped_column(Integer)
    document: Mapped[str] = mapped_column(Text)
