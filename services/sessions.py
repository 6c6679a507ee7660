"""Conversation sessions behind one small async interface, kept in this process or in Redis.

`MemorySessionStore` holds sessions in process memory (idle expiry, a size cap, background clean-up).
`RedisSessionStore` keeps them in Redis so every worker and replica can continue every session: turns
are appended atomically (RPUSH + LTRIM + EXPIRE in one MULTI), so concurrent questions never lose one.
Either way each `Session` carries an in-process `asyncio.Lock` that keeps questions on it in order.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Protocol

import structlog
from redis.asyncio import Redis

from infrastructure.metrics import ACTIVE_SESSIONS, SHARED_STORAGE_ERRORS
from infrastructure.redis_client import RedisFailure
from services.sources import ProcessingStage, Source

logger = structlog.get_logger(__name__)

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
REDIS_PREFIX = "defi:session:"
REDIS_INDEX = "defi:sessions"
REDIS_REPORTER = "defi:sessions:reporter"


class SessionStoreUnavailableError(RuntimeError):
    """The session store (Redis) cannot be reached; session endpoints answer 503 until it is back."""


@dataclass(frozen=True)
class Turn:
    """One answered question in a session."""

    question: str
    resolved_question: str
    answer: str
    confidence: float
    processing_stage: ProcessingStage
    sources: tuple[Source, ...]
    timestamp: float


@dataclass
class Session:
    """A conversation: its turns and a lock that keeps questions on it in order (within this process)."""

    id: str
    created_at: float
    last_active: float
    turns: list[Turn] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    version: int = field(default=0, repr=False)


class SessionStore(Protocol):
    """What the agent and the routes need from a session store."""

    async def get(self, session_id: str) -> Session | None:
        """A live session with its turns, or None when unknown or expired."""
        ...

    async def get_or_create(self, session_id: str | None) -> Session:
        """Continue `session_id` when it is live, otherwise start a new session with a new id."""
        ...

    async def touch(self, session: Session) -> None:
        """Mark the session as used now (a live connection's session is kept even if it had expired)."""
        ...

    async def add_turn(self, session: Session, turn: Turn) -> None:
        """Record an answered question, keeping at most the newest SESSION_MAX_TURNS."""
        ...

    async def delete(self, session_id: str) -> bool:
        """End a session; False when there was none."""
        ...

    async def count(self) -> int:
        """Live sessions (all processes for a shared store)."""
        ...

    async def run_cleanup(self, interval_seconds: float) -> None:
        """Background task: expire or count sessions every `interval_seconds`."""
        ...


class MemorySessionStore:
    """Sessions kept in this process, least recently used first out when MAX_SESSIONS is reached."""

    def __init__(self, ttl_seconds: float, max_sessions: int, max_turns: int) -> None:
        self._ttl = ttl_seconds
        self._max_sessions = max_sessions
        self._max_turns = max_turns
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_active > self._ttl

    async def get(self, session_id: str) -> Session | None:
        """Return a live session, or None when unknown or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._expired(session, time.time()):
            self._drop(session_id)
            return None
        return session

    async def get_or_create(self, session_id: str | None) -> Session:
        """Continue `session_id` when it is live, otherwise start a new session with a new id."""
        if session_id is not None and (session := await self.get(session_id)) is not None:
            await self.touch(session)
            return session
        now = time.time()
        session = Session(id=uuid.uuid4().hex, created_at=now, last_active=now)
        self._sessions[session.id] = session
        while len(self._sessions) > self._max_sessions:
            evicted, _ = self._sessions.popitem(last=False)
            logger.info("session_evicted", session_id=evicted, reason="max_sessions")
        ACTIVE_SESSIONS.set(len(self._sessions))
        return session

    async def touch(self, session: Session) -> None:
        """Mark the session as used now (a live connection's session is kept even if it had expired)."""
        session.last_active = time.time()
        self._sessions[session.id] = session
        self._sessions.move_to_end(session.id)
        ACTIVE_SESSIONS.set(len(self._sessions))

    async def add_turn(self, session: Session, turn: Turn) -> None:
        """Record an answered question, keeping at most the newest SESSION_MAX_TURNS."""
        session.turns.append(turn)
        del session.turns[: -self._max_turns]
        session.version += 1
        await self.touch(session)

    async def delete(self, session_id: str) -> bool:
        """End a session; False when there was none."""
        return self._drop(session_id)

    async def count(self) -> int:
        """Sessions held in this process."""
        return len(self._sessions)

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


def encode_turn(turn: Turn) -> str:
    """A turn as compact JSON (the form stored in Redis)."""
    return json.dumps(asdict(turn), separators=(",", ":"))


def decode_turn(raw: str | bytes) -> Turn:
    """The inverse of `encode_turn`."""
    data = json.loads(raw)
    data["sources"] = tuple(Source(**source) for source in data["sources"])
    return Turn(**data)


class RedisSessionStore:
    """Sessions in Redis, shared by every process; Redis expires them (EXPIRE is refreshed on every use).

    Keys: `defi:session:<id>` (hash: created_at, last_active) and `defi:session:<id>:turns` (list of JSON
    turns), plus the sorted set `defi:sessions` (id by last use) that `count()` reads. Session objects in
    use are shared within this process, so concurrent questions on one session wait on the same lock and
    the later one sees the earlier one's turn.
    """

    def __init__(self, client: Redis, ttl_seconds: int, max_turns: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._max_turns = max_turns
        self._live: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._failing = False

    @staticmethod
    def _meta_key(session_id: str) -> str:
        return f"{REDIS_PREFIX}{session_id}"

    @staticmethod
    def _turns_key(session_id: str) -> str:
        return f"{REDIS_PREFIX}{session_id}:turns"

    def _unavailable(self, action: str, error: BaseException) -> SessionStoreUnavailableError:
        SHARED_STORAGE_ERRORS.labels(component="sessions").inc()
        if not self._failing:
            logger.warning("session_store_unavailable", action=action, error=f"{type(error).__name__}: {error}")
        self._failing = True
        return SessionStoreUnavailableError("The session store is unavailable; please retry shortly.")

    def _recovered(self) -> None:
        if self._failing:
            logger.info("session_store_recovered")
        self._failing = False

    async def get(self, session_id: str) -> Session | None:
        """Load a live session's turns from Redis (None when unknown or expired)."""
        if not SESSION_ID_PATTERN.match(session_id):
            return None
        session = self._live.get(session_id)
        version = session.version if session is not None else 0
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._meta_key(session_id))
                pipe.lrange(self._turns_key(session_id), 0, -1)
                meta, raw_turns = await pipe.execute()
        except RedisFailure as error:
            raise self._unavailable("get", error) from error
        self._recovered()
        if not meta:
            return None
        last_active = float(meta.get(b"last_active", 0.0))
        created_at = float(meta.get(b"created_at", last_active))
        turns = [decode_turn(raw) for raw in raw_turns]
        session = self._live.get(session_id)
        if session is None:
            session = Session(id=session_id, created_at=created_at, last_active=last_active, turns=turns)
            self._live[session_id] = session
        elif session.version == version:  # no turn was added here while Redis answered
            session.turns = turns
            session.last_active = last_active
        return session

    async def get_or_create(self, session_id: str | None) -> Session:
        """Continue `session_id` when it is live in Redis, otherwise start a new session with a new id."""
        if session_id is not None and (session := await self.get(session_id)) is not None:
            await self.touch(session)
            return session
        now = time.time()
        session = Session(id=uuid.uuid4().hex, created_at=now, last_active=now)
        await self._save_activity(session, now, "create")
        self._live[session.id] = session
        return session

    async def touch(self, session: Session) -> None:
        """Refresh the session's expiry (recreating its record if it had already expired)."""
        now = time.time()
        await self._save_activity(session, now, "touch")
        session.last_active = now

    async def _save_activity(self, session: Session, now: float, action: str) -> None:
        meta, turns = self._meta_key(session.id), self._turns_key(session.id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(meta, "created_at", session.created_at)
                pipe.hset(meta, "last_active", now)
                pipe.expire(meta, self._ttl)
                pipe.expire(turns, self._ttl)
                pipe.zadd(REDIS_INDEX, {session.id: now})
                await pipe.execute()
        except RedisFailure as error:
            raise self._unavailable(action, error) from error
        self._recovered()

    async def add_turn(self, session: Session, turn: Turn) -> None:
        """Append the turn atomically with the trim and the expiry refresh (one MULTI/EXEC)."""
        now = time.time()
        meta, turns = self._meta_key(session.id), self._turns_key(session.id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(meta, "created_at", session.created_at)
                pipe.hset(meta, "last_active", now)
                pipe.rpush(turns, encode_turn(turn))
                pipe.ltrim(turns, -self._max_turns, -1)
                pipe.expire(meta, self._ttl)
                pipe.expire(turns, self._ttl)
                pipe.zadd(REDIS_INDEX, {session.id: now})
                await pipe.execute()
        except RedisFailure as error:
            raise self._unavailable("add_turn", error) from error
        self._recovered()
        session.turns.append(turn)
        del session.turns[: -self._max_turns]
        session.version += 1
        session.last_active = now

    async def delete(self, session_id: str) -> bool:
        """Remove the session's keys; False when there was none."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._meta_key(session_id), self._turns_key(session_id))
                pipe.zrem(REDIS_INDEX, session_id)
                deleted, _ = await pipe.execute()
        except RedisFailure as error:
            raise self._unavailable("delete", error) from error
        self._recovered()
        self._live.pop(session_id, None)
        return bool(deleted)

    async def count(self) -> int:
        """Sessions used within the TTL, across every process (stale index entries are pruned)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(REDIS_INDEX, "-inf", time.time() - self._ttl)
                pipe.zcard(REDIS_INDEX)
                _, live = await pipe.execute()
        except RedisFailure as error:
            raise self._unavailable("count", error) from error
        self._recovered()
        return int(live)

    async def run_cleanup(self, interval_seconds: float) -> None:
        """Background task: Redis expires sessions itself; this prunes the index and updates the gauge.

        One process at a time (holder of `defi:sessions:reporter`) reports the shared count and the others
        report 0, so `active_sessions` summed over workers and replicas is the number of live sessions.
        """
        reporter = uuid.uuid4().hex
        hold_seconds = max(1, int(interval_seconds * 3))
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                claimed = await self._redis.set(REDIS_REPORTER, reporter, nx=True, ex=hold_seconds)
                if not claimed and await self._redis.get(REDIS_REPORTER) == reporter.encode():
                    claimed = await self._redis.expire(REDIS_REPORTER, hold_seconds)
                ACTIVE_SESSIONS.set(await self.count() if claimed else 0)
            except RedisFailure as error:
                self._unavailable("count", error)
            except SessionStoreUnavailableError:
                continue
