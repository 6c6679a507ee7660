"""Conversation sessions behind one small async interface, kept in this process or in Redis.

`MemorySessionStore` holds sessions in process memory (idle expiry, a size cap, background clean-up).
`RedisSessionStore` keeps them in Redis so every worker and replica can continue every session: turns
are appended atomically by a server-side script, so concurrent questions never lose one.

Rules both stores keep:
- a session is created only for a question, and counted against its owner (the client address): past
  MAX_SESSIONS_PER_CLIENT the owner's own oldest session goes, never somebody else's;
- a deleted (or expired) session stays gone: `touch` and `add_turn` never recreate it;
- with Redis, every call is bounded (REDIS_OPERATION_TIMEOUT_SECONDS), a failure pauses the store for a
  moment (fast 503s instead of slow ones), and a write that arrives after its deadline is refused by
  Redis itself; the deadline comes WRITE_REPLY_MARGIN_SECONDS before the caller gives up, so that the reply
  of an applied write is back in time, and a 503 means nothing was stored.
Each `Session` carries an in-process `asyncio.Lock` that keeps questions on it in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

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
REDIS_OWNER_PREFIX = "defi:owner:"
REDIS_OPERATION_TIMEOUT_SECONDS = 1.0
PAUSE_AFTER_FAILURE_SECONDS = 1.0
# A write must run in Redis this long before its caller gives up, so that its reply is back in time: a write
# applied with its reply still on the way when the caller gives up would be stored yet reported as a 503.
WRITE_REPLY_MARGIN_SECONDS = 0.25

T = TypeVar("T")
ScriptArg = str | int | float


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
    subjects: tuple[str, ...] | None = None
    """What the conversation is about after this turn (main subject first); None: not known (older turns)."""


@dataclass
class Session:
    """A conversation: its turns and a lock that keeps questions on it in order (within this process)."""

    id: str
    created_at: float
    last_active: float
    turns: list[Turn] = field(default_factory=list)
    owner: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    version: int = field(default=0, repr=False)


def new_session_id() -> str:
    """A fresh, unguessable session id (32 hex characters)."""
    return uuid.uuid4().hex


class SessionStore(Protocol):
    """What the agent and the routes need from a session store."""

    async def get(self, session_id: str) -> Session | None:
        """A live session with its turns, or None when unknown, expired or deleted."""
        ...

    async def get_or_create(self, session_id: str | None, owner: str, *, adopt_id: bool = False) -> Session:
        """Continue `session_id` when it is live, otherwise start a session for `owner`.

        The new session gets a fresh id, or `session_id` itself with `adopt_id` (an id this server handed
        out and never stored, e.g. announced to a WebSocket at connect).
        """
        ...

    async def touch(self, session: Session) -> bool:
        """Mark a live session as used now; False (and nothing recreated) when it is gone."""
        ...

    async def add_turn(self, session: Session, turn: Turn) -> bool:
        """Record an answered question (at most SESSION_MAX_TURNS kept); False when the session is gone."""
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

    def __init__(self, ttl_seconds: float, max_sessions: int, max_turns: int, max_per_owner: int = 100) -> None:
        self._ttl = ttl_seconds
        self._max_sessions = max_sessions
        self._max_turns = max_turns
        self._max_per_owner = max_per_owner
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._owned: dict[str, OrderedDict[str, None]] = {}

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_active > self._ttl

    def _live(self, session: Session) -> bool:
        """Whether this very session is still held (not deleted, evicted or replaced)."""
        return self._sessions.get(session.id) is session

    async def get(self, session_id: str) -> Session | None:
        """Return a live session, or None when unknown or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._expired(session, time.time()):
            self._drop(session_id)
            return None
        return session

    async def get_or_create(self, session_id: str | None, owner: str, *, adopt_id: bool = False) -> Session:
        """Continue `session_id` when it is live, otherwise start a session for `owner`."""
        if session_id is not None and (session := await self.get(session_id)) is not None:
            await self.touch(session)
            return session
        now = time.time()
        new_id = session_id if adopt_id and session_id is not None else new_session_id()
        session = Session(id=new_id, created_at=now, last_active=now, owner=owner)
        self._sessions[session.id] = session
        owned = self._owned.setdefault(owner, OrderedDict())
        owned[session.id] = None
        while len(owned) > self._max_per_owner:
            oldest = next(iter(owned))
            self._drop(oldest)
            logger.info("session_evicted", reason="max_sessions_per_client")
        while len(self._sessions) > self._max_sessions:
            self._drop(next(iter(self._sessions)))
            logger.info("session_evicted", reason="max_sessions")
        ACTIVE_SESSIONS.set(len(self._sessions))
        return session

    async def touch(self, session: Session) -> bool:
        """Mark the session as used now; False when it was deleted, evicted or has expired."""
        if not self._live(session) or self._expired(session, time.time()):
            return False
        session.last_active = time.time()
        self._sessions.move_to_end(session.id)
        return True

    async def add_turn(self, session: Session, turn: Turn) -> bool:
        """Record an answered question, keeping at most the newest SESSION_MAX_TURNS."""
        if not self._live(session):
            return False
        session.turns.append(turn)
        del session.turns[: -self._max_turns]
        session.version += 1
        session.last_active = time.time()
        self._sessions.move_to_end(session.id)
        return True

    async def delete(self, session_id: str) -> bool:
        """End a session; False when there was none."""
        return self._drop(session_id)

    async def count(self) -> int:
        """Sessions held in this process."""
        return len(self._sessions)

    def _drop(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            owned = self._owned.get(session.owner)
            if owned is not None:
                owned.pop(session_id, None)
                if not owned:
                    del self._owned[session.owner]
        ACTIVE_SESSIONS.set(len(self._sessions))
        return session is not None

    def remove_expired(self) -> int:
        """Drop every expired session; return how many went."""
        now = time.time()
        expired = [key for key, session in self._sessions.items() if self._expired(session, now)]
        for key in expired:
            self._drop(key)
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
    if data.get("subjects") is not None:  # absent from turns stored before subjects were kept
        data["subjects"] = tuple(str(subject) for subject in data["subjects"])
    return Turn(**data)


def _owner_tag(owner: str) -> str:
    """The owner as stored in Redis: a hash, so client addresses never appear in keys."""
    return hashlib.sha256(owner.encode("utf-8", errors="surrogatepass")).hexdigest()[:24]


# Every write checks Redis's own clock against the caller's deadline first: a write that was queued behind a
# frozen server and runs after the caller gave up (and answered 503) changes nothing.
_DEADLINE_CHECK = """
local t = redis.call('TIME')
if tonumber(t[1]) + tonumber(t[2]) / 1000000 > tonumber(ARGV[1]) then return -1 end
"""

# KEYS: meta, turns, index, owner set. ARGV: deadline, now, ttl, id, owner tag, max per owner, key prefix.
_CREATE = (
    _DEADLINE_CHECK
    + """
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'last_active', ARGV[2], 'owner', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[6])
local evicted = 0
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[4], excess)
  for i = 1, #oldest, 2 do
    redis.call('DEL', ARGV[7] .. oldest[i], ARGV[7] .. oldest[i] .. ':turns')
    redis.call('ZREM', KEYS[3], oldest[i])
    evicted = evicted + 1
  end
end
return evicted
"""
)

# KEYS: meta, turns, index. ARGV: deadline, now, ttl, id.
_TOUCH = (
    _DEADLINE_CHECK
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_active', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
return 1
"""
)

# KEYS: meta, turns, index. ARGV: deadline, now, ttl, id, turn JSON, max turns.
_ADD_TURN = (
    _DEADLINE_CHECK
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_active', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[6]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
return 1
"""
)

# KEYS: meta, turns, index. ARGV: id, owner key prefix.
_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local removed = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if owner then redis.call('ZREM', ARGV[2] .. owner, ARGV[1]) end
return removed
"""


class RedisSessionStore:
    """Sessions in Redis, shared by every process; Redis expires them (EXPIRE is refreshed on every use).

    Keys: `defi:session:<id>` (hash: created_at, last_active, owner tag), `defi:session:<id>:turns` (list of
    JSON turns), the sorted set `defi:sessions` (id by last use) that `count()` reads, and per owner
    `defi:owner:<tag>` (id by creation) that caps sessions per client. Writes are Lua scripts, atomic and
    refused past their deadline. Session objects in use are shared within this process, so concurrent
    questions on one session wait on the same lock and the later one sees the earlier one's turn.
    """

    def __init__(
        self,
        client: Redis,
        ttl_seconds: int,
        max_turns: int,
        max_per_owner: int = 100,
        operation_timeout_seconds: float = REDIS_OPERATION_TIMEOUT_SECONDS,
    ) -> None:
        self._redis = client
        self._ttl = ttl_seconds
        self._max_turns = max_turns
        self._max_per_owner = max_per_owner
        self._timeout = operation_timeout_seconds
        self._live: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self._failing = False
        self._paused_until = 0.0
        self._create = client.register_script(_CREATE)
        self._touch = client.register_script(_TOUCH)
        self._add_turn = client.register_script(_ADD_TURN)
        self._delete = client.register_script(_DELETE)

    @staticmethod
    def _meta_key(session_id: str) -> str:
        return f"{REDIS_PREFIX}{session_id}"

    @staticmethod
    def _turns_key(session_id: str) -> str:
        return f"{REDIS_PREFIX}{session_id}:turns"

    def _keys(self, session_id: str) -> list[str]:
        return [self._meta_key(session_id), self._turns_key(session_id), REDIS_INDEX]

    def _deadline(self) -> float:
        """The latest Redis time (`TIME`) at which a write may still apply: WRITE_REPLY_MARGIN_SECONDS (at most
        a quarter of the timeout) before the caller stops waiting, the time its reply has to come back."""
        return time.time() + self._timeout - min(WRITE_REPLY_MARGIN_SECONDS, self._timeout / 4)

    async def _call(self, action: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within the timeout; fail fast for a moment after a failure."""
        if time.monotonic() < self._paused_until:
            raise SessionStoreUnavailableError("The session store is unavailable; please retry shortly.")
        try:
            result = await asyncio.wait_for(operation(), self._timeout)
        except RedisFailure as error:  # TimeoutError included
            raise self._unavailable(action, error) from error
        if result == -1:  # a write refused by its own deadline check (it ran late, or the clocks disagree)
            logger.warning("session_write_refused_late", action=action)
            raise self._unavailable(action, TimeoutError("the write reached Redis after its deadline"))
        self._recovered()
        return result

    def _unavailable(self, action: str, error: BaseException) -> SessionStoreUnavailableError:
        SHARED_STORAGE_ERRORS.labels(component="sessions").inc()
        self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_SECONDS
        if not self._failing:
            logger.warning("session_store_unavailable", action=action, error=f"{type(error).__name__}: {error}")
        self._failing = True
        return SessionStoreUnavailableError("The session store is unavailable; please retry shortly.")

    def _recovered(self) -> None:
        if self._failing:
            logger.info("session_store_recovered")
        self._failing = False

    async def get(self, session_id: str) -> Session | None:
        """Load a live session's turns from Redis (None when unknown, expired or deleted)."""
        if not SESSION_ID_PATTERN.match(session_id):
            return None
        session = self._live.get(session_id)
        version = session.version if session is not None else 0

        async def read() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._meta_key(session_id))
                pipe.lrange(self._turns_key(session_id), 0, -1)
                return list(await pipe.execute())

        meta, raw_turns = await self._call("get", read)
        if not isinstance(meta, dict) or not meta or not isinstance(raw_turns, list):
            return None
        last_active = float(meta.get(b"last_active", 0.0))
        created_at = float(meta.get(b"created_at", last_active))
        owner = meta.get(b"owner", b"").decode()
        turns = [decode_turn(raw) for raw in raw_turns]
        session = self._live.get(session_id)
        if session is None:
            session = Session(id=session_id, created_at=created_at, last_active=last_active, turns=turns, owner=owner)
            self._live[session_id] = session
        elif session.version == version:  # no turn was added here while Redis answered
            session.turns = turns
            session.last_active = last_active
        return session

    async def get_or_create(self, session_id: str | None, owner: str, *, adopt_id: bool = False) -> Session:
        """Continue `session_id` when it is live in Redis, otherwise start a session for `owner`."""
        if session_id is not None and (session := await self.get(session_id)) is not None and await self.touch(session):
            return session
        now = time.time()
        new_id = session_id if adopt_id and session_id is not None else new_session_id()
        tag = _owner_tag(owner)
        session = Session(id=new_id, created_at=now, last_active=now, owner=tag)
        keys = [self._meta_key(new_id), self._turns_key(new_id), REDIS_INDEX, REDIS_OWNER_PREFIX + tag]
        args: list[ScriptArg] = [self._deadline(), now, self._ttl, new_id, tag, self._max_per_owner, REDIS_PREFIX]
        evicted = await self._call("create", lambda: self._create(keys=keys, args=args))
        if evicted:
            logger.info("session_evicted", reason="max_sessions_per_client", count=evicted)
        self._live[session.id] = session
        return session

    async def touch(self, session: Session) -> bool:
        """Refresh a live session's expiry; False (nothing recreated) when it was deleted or has expired."""
        now = time.time()
        args: list[ScriptArg] = [self._deadline(), now, self._ttl, session.id]
        refreshed = await self._call("touch", lambda: self._touch(keys=self._keys(session.id), args=args))
        if refreshed:
            session.last_active = now
        return bool(refreshed)

    async def add_turn(self, session: Session, turn: Turn) -> bool:
        """Append the turn atomically with the trim and the expiry refresh; False when the session is gone."""
        now = time.time()
        args: list[ScriptArg] = [self._deadline(), now, self._ttl, session.id, encode_turn(turn), self._max_turns]
        stored = await self._call("add_turn", lambda: self._add_turn(keys=self._keys(session.id), args=args))
        if not stored:
            return False
        session.turns.append(turn)
        del session.turns[: -self._max_turns]
        session.version += 1
        session.last_active = now
        return True

    async def delete(self, session_id: str) -> bool:
        """Remove the session's keys; False when there was none."""
        if not SESSION_ID_PATTERN.match(session_id):
            return False
        args = [session_id, REDIS_OWNER_PREFIX]
        removed = await self._call("delete", lambda: self._delete(keys=self._keys(session_id), args=args))
        self._live.pop(session_id, None)
        return bool(removed)

    async def count(self) -> int:
        """Sessions used within the TTL, across every process (stale index entries are pruned)."""

        async def prune_and_count() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(REDIS_INDEX, "-inf", time.time() - self._ttl)
                pipe.zcard(REDIS_INDEX)
                _, live = await pipe.execute()
            return int(live)

        return await self._call("count", prune_and_count)

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
