"""Conversation sessions: in-process store with idle expiry, a size cap and background clean-up."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog

from infrastructure.metrics import ACTIVE_SESSIONS

logger = structlog.get_logger(__name__)

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Turn:
    """One answered question in a session."""

    question: str
    resolved_question: str
    answer: str
    confidence: float
    processing_stage: str
    sources: tuple[dict[str, Any], ...]
    timestamp: float


@dataclass
class Session:
    """A conversation: its turns and a lock that keeps questions on it in order."""

    id: str
    created_at: float
    last_active: float
    turns: list[Turn] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class SessionStore:
    """Sessions kept in this process, least recently used first out when MAX_SESSIONS is reached."""

    def __init__(self, ttl_seconds: float, max_sessions: int, max_turns: int) -> None:
        self._ttl = ttl_seconds
        self._max_sessions = max_sessions
        self._max_turns = max_turns
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_active > self._ttl

    def get(self, session_id: str) -> Session | None:
        """Return a live session, or None when unknown or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._expired(session, time.time()):
            self._drop(session_id)
            return None
        return session

    def get_or_create(self, session_id: str | None) -> Session:
        """Continue `session_id` when it is live, otherwise start a new session with a new id."""
        if session_id is not None and (session := self.get(session_id)) is not None:
            self.touch(session)
            return session
        now = time.time()
        session = Session(id=uuid.uuid4().hex, created_at=now, last_active=now)
        self._sessions[session.id] = session
        while len(self._sessions) > self._max_sessions:
            evicted, _ = self._sessions.popitem(last=False)
            logger.info("session_evicted", session_id=evicted, reason="max_sessions")
        ACTIVE_SESSIONS.set(len(self._sessions))
        return session

    def touch(self, session: Session) -> None:
        """Mark the session as used now (a live connection's session is kept even if it had expired)."""
        session.last_active = time.time()
        self._sessions[session.id] = session
        self._sessions.move_to_end(session.id)
        ACTIVE_SESSIONS.set(len(self._sessions))

    def add_turn(self, session: Session, turn: Turn) -> None:
        """Record an answered question, keeping at most the newest SESSION_MAX_TURNS."""
        session.turns.append(turn)
        del session.turns[: -self._max_turns]
        self.touch(session)

    def delete(self, session_id: str) -> bool:
        """End a session; False when there was none."""
        return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        removed = self._sessions.pop(session_id, None) is not None
        ACTIVE_SESSIONS.set(len(self._sessions))
        return removed

    def remove_expired(self) -> int:
        """Drop every expired session; return how many went."""
        now = time.time()
        expired = [key for key, session in self._sessions.items() if self._expired(session, now)]
        for key in expired:
            self._sessions.pop(key, None)
        ACTIVE_SESSIONS.set(len(self._sessions))
        return len(expired)

    async def run_cleanup(self, interval_seconds: float) -> None:
        """Background task: remove expired sessions every `interval_seconds`."""
        while True:
            await asyncio.sleep(interval_seconds)
            removed = self.remove_expired()
            if removed:
                logger.info("sessions_expired", removed=removed, active=len(self._sessions))

    def __len__(self) -> int:
        return len(self._sessions)
