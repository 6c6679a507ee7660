"""One question budget per client, shared by every question endpoint and the WebSocket.

Every client key gets a moving window: at most `limit` questions in any `window_seconds`. Where the budgets
live depends on RATE_LIMIT_STORAGE_URI:

* `memory://` (the default): `MovingWindow` below, a plain in-process counter used only from the event loop.
  Per key it keeps a `deque` of the monotonic times of the hits it allowed (so never more than `limit` of
  them); a hit first drops the times that have left the window from the left, is allowed while fewer than
  `limit` remain, and only an allowed hit is recorded, so refusals do not extend the window. There is no
  thread, no timer and no lock: the whole decision runs in one synchronous call on the single-threaded
  event loop, so the decision and X-RateLimit-Remaining are exact and atomic (concurrent requests cannot
  both take the last unit). Keys are kept ordered by their latest allowed hit, so the least recently hit
  key is always first; each hit forgets up to two keys whose newest hit has left the window (a hit adds at
  most one key, so idle keys cannot pile up, and there is never an O(keys) pause). Budgets are per process:
  with several workers each has its own.
* anything else (e.g. `redis://`): slowapi's `Limiter` over `limits` storage with the moving-window strategy,
  called in a worker thread (`asyncio.to_thread`) so the event loop never waits on the network; the budget is
  shared by every worker and replica. When that storage cannot be reached the limiter fails open: the question
  is allowed (without X-RateLimit-* headers), `shared_storage_errors_total{component="rate_limit"}` counts it
  and one warning is logged per outage. For a Q&A bot, answering unmetered for a while beats refusing everyone.

Either way X-RateLimit-Reset (and Retry-After) is the unix time at which the oldest hit in the window leaves
it, i.e. when the budget next has room (now + window when the window held nothing but this hit).

The client is the socket peer; `X-Forwarded-For` / `Forwarded` are believed only when the peer is inside
TRUSTED_PROXIES.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import structlog

from infrastructure.metrics import SHARED_STORAGE_ERRORS
from infrastructure.redis_client import sync_storage_options

if TYPE_CHECKING:
    from limits import RateLimitItem
    from slowapi import Limiter

logger = structlog.get_logger(__name__)

STORAGE_TIMEOUT_SECONDS = 1.0
"""A remote storage's answer is awaited this long; then the question is let through (fail open)."""
PAUSE_AFTER_FAILURE_SECONDS = 1.0
"""After a failure the storage is skipped this long, so a frozen Redis does not slow every question."""

_FORWARDED_FOR = re.compile(r'for="?\[?([^;,"\]]+)', re.IGNORECASE)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RateDecision:
    """The outcome of spending one unit of a client's budget."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: float
    counted: bool = True

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds until the budget has room again (at least 1)."""
        return max(1, int(self.reset_at - time.time() + 0.999))

    def headers(self) -> dict[str, str]:
        """The X-RateLimit-* headers for this decision (none when the storage could not count it)."""
        if not self.counted:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(int(self.reset_at)),
        }


class MovingWindow:
    """At most `limit` hits per key in any `window_seconds`, in this process; for the event loop only.

    `clock` is a monotonic time source (seconds) that orders and expires the hits; `wall_clock` (unix time)
    only turns "seconds until the oldest hit expires" into `RateDecision.reset_at`. Both are parameters so
    tests can drive time; not thread-safe (no lock: every call runs to completion on the event loop).
    """

    SWEEP_PER_HIT = 2  # idle keys forgotten per hit at most; more than the one key a hit can add

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1 or window_seconds <= 0:
            raise ValueError("a moving window needs limit >= 1 and window_seconds > 0")
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        # key -> times of the allowed hits still (or until recently) in the window, oldest first. Ordered by
        # each key's newest hit, least recent first, so idle keys are found at the front.
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many client keys are remembered (those hit within about the last window)."""
        return len(self._hits)

    def hit(self, key: str) -> RateDecision:
        """Spend one unit of `key`'s budget if it has one; the decision, remaining budget and reset time."""
        now = self._clock()
        cutoff = now - self.window_seconds  # a hit at t counts during [t, t + window)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        else:
            while hits and hits[0] <= cutoff:
                hits.popleft()
        allowed = len(hits) < self.limit
        if allowed:
            hits.append(now)
            self._hits.move_to_end(key)
        self._sweep(cutoff)
        # `hits` is not empty here: either this hit was just recorded or the window holds `limit` >= 1 hits.
        reset_at = self._wall_clock() + (hits[0] + self.window_seconds - now)
        return RateDecision(allowed, self.limit, self.limit - len(hits), reset_at)

    def _sweep(self, cutoff: float) -> None:
        """Forget up to SWEEP_PER_HIT keys whose newest hit is at or before `cutoff` (their windows are empty)."""
        for _ in range(self.SWEEP_PER_HIT):
            key, hits = next(iter(self._hits.items()))
            if hits[-1] > cutoff:  # the least recently hit key is still in its window, so every key is
                return
            del self._hits[key]


class QuestionRateLimiter:
    """Counts questions per client key in a moving window (in this process, or in a remote storage)."""

    SCOPE = "questions"

    def __init__(
        self,
        requests: int,
        window_seconds: int,
        storage_uri: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = requests
        self._in_memory = storage_uri.startswith("memory://")
        self._window = MovingWindow(requests, window_seconds, clock, wall_clock) if self._in_memory else None
        self._limiter: Limiter | None = None
        self._item: RateLimitItem | None = None
        if not self._in_memory:
            # Imported here: slowapi and limits take ~0.12 s to import, and the default memory:// never needs them.
            from limits import RateLimitItemPerSecond
            from slowapi import Limiter

            options = sync_storage_options() if storage_uri.startswith(("redis://", "rediss://")) else {}
            self._limiter = Limiter(
                key_func=lambda: "",
                storage_uri=storage_uri,
                strategy="moving-window",
                storage_options=cast(dict[str, str], options),  # passed through to redis.from_url, not only strings
            )
            self._item = RateLimitItemPerSecond(requests, window_seconds)
        self._failing = False
        self._paused_until = 0.0
        # Its own threads: calls stuck on a frozen storage must never hold the loop's default pool, which
        # ranks questions; when these are all stuck, a question waits at most STORAGE_TIMEOUT_SECONDS.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rate-limit")

    async def spend(self, client_key: str) -> RateDecision:
        """`hit` without blocking the event loop when the storage is remote (e.g. Redis); fails open."""
        if self._window is not None:
            return self._window.hit(client_key)
        if time.monotonic() < self._paused_until:  # the storage just failed: do not queue behind it
            return RateDecision(True, self.limit, self.limit, time.time(), counted=False)
        try:
            call = asyncio.get_running_loop().run_in_executor(self._executor, self.hit, client_key)
            decision = await asyncio.wait_for(call, STORAGE_TIMEOUT_SECONDS)
        except Exception as error:  # every storage backend raises its own client's errors; TimeoutError too
            SHARED_STORAGE_ERRORS.labels(component="rate_limit").inc()
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_SECONDS
            if not self._failing:
                logger.warning("rate_limit_storage_unavailable", error=f"{type(error).__name__}: {error}"[:300])
            self._failing = True
            return RateDecision(True, self.limit, self.limit, time.time(), counted=False)
        if self._failing:
            logger.info("rate_limit_storage_recovered")
        self._failing = False
        return decision

    @property
    def shared_storage(self) -> bool:
        """Whether budgets live in an external store (Redis, ...) rather than this process."""
        return not self._in_memory

    def storage_reachable(self) -> bool:
        """Ping the storage (blocking for remote stores); False when it cannot be reached. Memory: True."""
        if self._limiter is None:
            return True
        try:
            return bool(self._limiter.limiter.storage.check())
        except Exception:  # every storage backend raises its own client's errors
            return False

    def hit(self, client_key: str) -> RateDecision:
        """Spend one question from `client_key`'s budget (blocking for a remote storage; memory: loop only)."""
        if self._window is not None:
            return self._window.hit(client_key)
        assert self._limiter is not None and self._item is not None
        strategy = self._limiter.limiter
        allowed = strategy.hit(self._item, self.SCOPE, client_key)
        stats = strategy.get_window_stats(self._item, self.SCOPE, client_key)
        return RateDecision(allowed, self.limit, max(0, stats.remaining), stats.reset_time)


class RateLimitExceededError(Exception):
    """A client spent its whole question budget."""

    def __init__(self, decision: RateDecision) -> None:
        self.detail = (
            f"Rate limit exceeded: {decision.limit} questions per window; retry in {decision.retry_after_seconds} s"
        )
        super().__init__(self.detail)
        self.decision = decision


def parse_networks(values: Iterable[str]) -> list[Network]:
    """CIDRs (or single addresses) to networks; raises ValueError on a bad one."""
    return [ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip()]


def _in_networks(address: str, networks: list[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


def from_trusted_proxy(peer: str | None, trusted: list[Network]) -> bool:
    """Whether the socket peer is one of TRUSTED_PROXIES (so its forwarded headers may be believed)."""
    return peer is not None and bool(trusted) and _in_networks(peer, trusted)


def client_address(peer: str | None, headers: Mapping[str, str], trusted: list[Network]) -> str:
    """The client's address: the socket peer, or what a trusted proxy says it forwarded for.

    Walks the forwarding chain from the right (the hop nearest us) and returns the first address that
    is not a trusted proxy, so a client cannot prepend a spoofed address of its own.
    """
    address = peer or "unknown"
    if not trusted or not _in_networks(address, trusted):
        return address
    chain: list[str] = []
    if forwarded := headers.get("forwarded"):
        chain = [match.strip() for match in _FORWARDED_FOR.findall(forwarded)]
    elif forwarded_for := headers.get("x-forwarded-for"):
        chain = [part.strip() for part in forwarded_for.split(",") if part.strip()]
    for hop in reversed(chain):
        if not _in_networks(hop, trusted):
            return hop
    return chain[0] if chain else address
