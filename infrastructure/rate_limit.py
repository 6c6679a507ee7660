"""One question budget per client, shared by every question endpoint and the WebSocket.

Built on slowapi's `Limiter` (moving window over `limits` storage: in memory by default, Redis when
RATE_LIMIT_STORAGE_URI says so). The client is the socket peer; `X-Forwarded-For` / `Forwarded` are
believed only when the peer is inside TRUSTED_PROXIES.

When a remote storage cannot be reached the limiter fails open: the question is allowed (without
X-RateLimit-* headers), `shared_storage_errors_total{component="rate_limit"}` counts it and one warning is
logged per outage. For a Q&A bot, answering unmetered for a while beats refusing everyone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import structlog
from limits import RateLimitItemPerSecond
from slowapi import Limiter

from infrastructure.metrics import SHARED_STORAGE_ERRORS
from infrastructure.redis_client import sync_storage_options

logger = structlog.get_logger(__name__)

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


class QuestionRateLimiter:
    """Counts questions per client key in a moving window."""

    SCOPE = "questions"

    def __init__(self, requests: int, window_seconds: int, storage_uri: str) -> None:
        self._in_memory = storage_uri.startswith("memory://")
        options = sync_storage_options() if storage_uri.startswith(("redis://", "rediss://")) else {}
        self._limiter = Limiter(
            key_func=lambda: "",
            storage_uri=storage_uri,
            strategy="moving-window",
            storage_options=cast(dict[str, str], options),  # passed through to redis.from_url, not only strings
        )
        self._item = RateLimitItemPerSecond(requests, window_seconds)
        self.limit = requests
        self._failing = False

    async def spend(self, client_key: str) -> RateDecision:
        """`hit` without blocking the event loop when the storage is remote (e.g. Redis); fails open."""
        if self._in_memory:
            return self.hit(client_key)
        try:
            decision = await asyncio.to_thread(self.hit, client_key)
        except Exception as error:  # every storage backend raises its own client's errors
            SHARED_STORAGE_ERRORS.labels(component="rate_limit").inc()
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
        """Ping the storage (blocking for remote stores); False when it cannot be reached."""
        try:
            return bool(self._limiter.limiter.storage.check())
        except Exception:  # every storage backend raises its own client's errors
            return False

    def hit(self, client_key: str) -> RateDecision:
        """Spend one question from `client_key`'s budget."""
        strategy = self._limiter.limiter
        allowed = strategy.hit(self._item, self.SCOPE, client_key)
        stats = strategy.get_window_stats(self._item, self.SCOPE, client_key)
        return RateDecision(allowed, self.limit, max(0, stats.remaining), stats.reset_time)


class RateLimitExceededError(Exception):
    """A client spent its whole question budget."""

    def __init__(self, decision: RateDecision) -> None:
        super().__init__(f"Rate limit exceeded: {decision.limit} questions per window")
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


def client_address(peer: str | None, headers: dict[str, str], trusted: list[Network]) -> str:
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
