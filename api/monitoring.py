"""The operator's view of the service: what `/health-status` and the dashboard report, and how it is judged.

A component is `healthy`, `degraded` (still answering, something is off) or `unhealthy` (cannot answer);
the service takes the worst of its components.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import structlog

from agents.answer_cache import AnswerCache
from config import Settings
from infrastructure.metrics import SSE_STREAMS_ACTIVE, WEBSOCKET_CONNECTIONS, gauge_value
from infrastructure.system_stats import EventLoopLagMonitor, SystemSampler
from infrastructure.windows import OutcomeWindow, RequestWindow
from middleware.hosts import LOOPBACK_HOSTS, parse_allowed_hosts
from services.embedding_cache import DiskCache, MemoryCache, SharedCache
from services.embeddings import EmbeddingService
from services.knowledge import LiveKnowledge
from services.sessions import SessionStore, SessionStoreUnavailableError

logger = structlog.get_logger(__name__)

Status = Literal["healthy", "degraded", "unhealthy"]
_RANK: dict[Status, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}

MONITORING_ROUTES = frozenset(
    {
        "/health",
        "/health-status",
        "/metrics",
        "/system-metrics",
        "/performance-stats",
        "/dashboard",
        "/admin/insights",
        "/static/{name}",
    }
)
"""Probes, scrapes and the dashboard's own polling: kept out of the request window so it shows real traffic."""

ADMIN_ROUTES = ("/dashboard", "/system-metrics", "/performance-stats")

CHECK_TIMEOUT_SECONDS = 0.5
"""The longest a readiness probe waits for one dependency check (the checks run concurrently)."""
CHECK_MAX_AGE_SECONDS = 1.0
"""A dependency check's result is reused by every probe for this long."""

T = TypeVar("T")


class BoundedCheck(Generic[T]):
    """One dependency check, shared by concurrent probes and bounded in time.

    At most one run is in flight: a probe that finds one waits for it instead of starting another, so probes
    never pile up on a frozen dependency. Callers wait until `timeout` s after the run started, no longer,
    and then get `fallback`; the run goes on (each check is bounded by its own client timeouts), and probes
    that come while it is overdue get `fallback` at once. A result is reused for `max_age` s.
    """

    def __init__(
        self,
        name: str,
        timeout: float = CHECK_TIMEOUT_SECONDS,
        max_age: float = CHECK_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.max_age = max_age
        self._clock = clock
        self._task: asyncio.Task[tuple[T] | None] | None = None
        self._deadline = 0.0
        self._result: tuple[float, T] | None = None

    async def result(self, run: Callable[[], Coroutine[Any, Any, T]], fallback: T) -> T:
        """A recent result, or `run()`'s within `timeout` s, or `fallback` (no answer in time, or the check failed)."""
        now = self._clock()
        if self._result is not None and now - self._result[0] < self.max_age:
            return self._result[1]
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(run), name=f"health-check-{self.name}")
            self._deadline = now + self.timeout
        remaining = self._deadline - now
        if remaining <= 0:
            return fallback
        try:
            answered = await asyncio.wait_for(asyncio.shield(self._task), remaining)
        except TimeoutError:
            return fallback
        return answered[0] if answered is not None else fallback

    async def _run(self, run: Callable[[], Coroutine[Any, Any, T]]) -> tuple[T] | None:
        """`(value,)` when the check answered (kept for `max_age` s); None when it raised (logged)."""
        try:
            value = await run()
        except Exception:
            logger.warning("health_check_failed", check=self.name, exc_info=True)
            return None
        self._result = (self._clock(), value)
        return (value,)


@dataclass
class Monitoring:
    """The in-process figures the operator endpoints read, built once per app."""

    requests: RequestWindow = field(default_factory=lambda: RequestWindow(ignored_routes=MONITORING_ROUTES))
    outcomes: OutcomeWindow = field(default_factory=OutcomeWindow)
    loop_lag: EventLoopLagMonitor = field(default_factory=EventLoopLagMonitor)
    system: SystemSampler = field(default_factory=SystemSampler)
    last_status: Status | None = None
    redis_check: BoundedCheck[str | None] = field(default_factory=lambda: BoundedCheck("redis"))
    sessions_check: BoundedCheck[int | None] = field(default_factory=lambda: BoundedCheck("sessions"))
    database_check: BoundedCheck[str | None] = field(default_factory=lambda: BoundedCheck("database"))


def component(status: Status, detail: str, **extra: Any) -> dict[str, Any]:
    """One component's entry: its status, a human sentence, and any figures."""
    return {"status": status, "detail": detail, **extra}


def worst(statuses: list[Status]) -> Status:
    """The most severe of `statuses` (healthy when there are none)."""
    return max(statuses, key=lambda status: _RANK[status], default="healthy")


def lookup_stats(entries: int | None, hits: int, misses: int) -> dict[str, Any]:
    """One cache's entries, hits, misses and hit rate since start-up."""
    lookups = hits + misses
    return {
        "entries": entries,
        "hits": hits,
        "misses": misses,
        "hit_rate": round(hits / lookups, 4) if lookups else None,
    }


def cache_stats(embeddings: EmbeddingService) -> dict[str, Any]:
    """Hits and misses of each cache layer since start-up, and the share of question look-ups served by a cache."""
    layers: dict[str, dict[str, Any]] = {}
    ordered: tuple[tuple[str, MemoryCache | SharedCache | DiskCache | None], ...] = (
        ("memory", embeddings.memory_cache),
        ("shared", getattr(embeddings, "shared_cache", None)),
        ("disk", embeddings.disk_cache),
    )
    for name, layer in ordered:
        if layer is not None:
            entries = None if isinstance(layer, SharedCache) else len(layer)
            layers[name] = lookup_stats(entries, layer.hits, layer.misses)
    # A question is looked up in the first layer; each later look-up only follows a miss above it.
    first = layers.get("memory") or layers.get("shared") or layers.get("disk")
    first_lookups = first["hits"] + first["misses"] if first else 0
    hits = sum(layer["hits"] for layer in layers.values())
    return {"hit_rate": round(hits / first_lookups, 4) if first_lookups else None, "layers": layers}


def answer_cache_stats(cache: AnswerCache | None) -> dict[str, Any] | None:
    """The answer cache's figures since start-up (None when it is off)."""
    if cache is None:
        return None
    return lookup_stats(len(cache), cache.hits, cache.misses)


def embeddings_component(embeddings: EmbeddingService) -> dict[str, Any]:
    """Unhealthy when the batching worker is gone; degraded while the last model call failed."""
    provider = embeddings.provider.name
    if not embeddings.running:
        return component("unhealthy", "the embedding worker is not running", provider=provider)
    if embeddings.last_error is not None:
        return component(
            "degraded",
            f"the last embedding call failed: {embeddings.last_error[:200]}",
            provider=provider,
            failed_at=embeddings.last_error_at,
        )
    return component(
        "healthy",
        f"{provider} provider ready",
        provider=provider,
        model=embeddings.model_id,
        model_calls=embeddings.model_calls,
    )


def cache_component(embeddings: EmbeddingService, stats: dict[str, Any]) -> dict[str, Any]:
    """Degraded when the disk cache cannot be read or written (answers still work, only slower)."""
    disk = embeddings.disk_cache
    if embeddings.memory_cache is None and disk is None:
        return component("healthy", "caching is disabled", hit_rate=None)
    if disk is not None and not disk.healthy:
        return component("degraded", f"disk cache failing: {disk.last_error}", directory=str(disk.directory), **stats)
    return component("healthy", "cache layers working", **stats)


def dataset_component(entries: int) -> dict[str, Any]:
    """Unhealthy when the knowledge base has no entries to answer from."""
    if entries == 0:
        return component("unhealthy", "the knowledge base has no entries", entries=0)
    return component("healthy", f"{entries} knowledge-base entries loaded", entries=entries)


async def count_sessions(sessions: SessionStore) -> int | None:
    """Live sessions, or None while the session store cannot be reached."""
    try:
        return await sessions.count()
    except SessionStoreUnavailableError:
        return None


def redis_component(problem: str | None) -> dict[str, Any]:
    """Healthy when Redis answers; otherwise unhealthy, with what still works."""
    if problem is None:
        return component("healthy", "Redis reachable: sessions, rate limits and the shared cache are shared")
    return component(
        "unhealthy",
        f"Redis unreachable ({problem}): session endpoints answer 503, rate limits are not enforced, "
        "stateless questions are still answered",
    )


def database_component(problem: str | None, dialect: str) -> dict[str, Any]:
    """Healthy when the database answers and the question log keeps up; otherwise degraded, with why."""
    if problem is None:
        return component("healthy", f"database reachable ({dialect}); the question log is writing", dialect=dialect)
    return component(
        "degraded",
        f"{problem}: questions are still answered; feedback answers 503 until the database is back",
        dialect=dialect,
    )


@dataclass(frozen=True)
class ServingParts:
    """What readiness judges: the embedding service, the live knowledge base and the no-match threshold."""

    embeddings: EmbeddingService
    knowledge: LiveKnowledge
    similarity_threshold: float


def health_report(
    parts: ServingParts | None,
    monitoring: Monitoring,
    redis_problem: str | None = None,
    *,
    redis_configured: bool = False,
    active_sessions: int | None = None,
    database: tuple[str, str | None] | None = None,
) -> dict[str, Any]:
    """The `/health-status` body. A Redis or database outage degrades the service, not more: it still answers.

    `database` is (dialect, problem or None) when the service has one.
    """
    components: dict[str, dict[str, Any]] = {}
    hit_rate: float | None = None
    if parts is None:
        components["agent"] = component("unhealthy", "the agent is not loaded")
    else:
        snapshot = parts.knowledge.current
        stats = cache_stats(parts.embeddings)
        hit_rate = stats["hit_rate"]
        components["agent"] = component(
            "healthy",
            "agent loaded",
            phrasings=snapshot.retriever.phrasing_count,
            similarity_threshold=parts.similarity_threshold,
        )
        components["embeddings"] = embeddings_component(parts.embeddings)
        components["cache"] = cache_component(parts.embeddings, stats)
        components["dataset"] = dataset_component(len(snapshot.knowledge_base))
    statuses: list[Status] = [entry["status"] for entry in components.values()]
    if redis_configured:
        components["redis"] = redis_component(redis_problem)
        if redis_problem is not None:
            statuses.append("degraded")
    if database is not None:
        components["database"] = database_component(database[1], database[0])
        statuses.append(components["database"]["status"])
    status = worst(statuses)
    requests = monitoring.requests.snapshot()["total"]
    outcomes = monitoring.outcomes.snapshot()
    avg_ms = requests["avg_ms"]
    _note_change(monitoring, status, components)
    return {
        "status": status,
        "timestamp": time.time(),
        # The original API documents plain strings here ("agent": "healthy"); the details sit beside them.
        "components": {name: entry["status"] for name, entry in components.items()},
        "component_details": components,
        "metrics": {
            "active_sessions": active_sessions,
            "websocket_connections": int(gauge_value(WEBSOCKET_CONNECTIONS)),
            "sse_streams_active": int(gauge_value(SSE_STREAMS_ACTIVE)),
            "cache_hit_rate": hit_rate,
            "avg_response_time": round(avg_ms / 1000.0, 6) if avg_ms is not None else None,
            "requests_in_window": requests["requests"],
            "error_rate": requests["error_rate"],
            "questions_in_window": outcomes["questions"],
            "answered_share": outcomes["answered_share"],
            "avg_confidence": outcomes["avg_confidence"],
            "event_loop_lag_ms": monitoring.loop_lag.summary()["current_ms"],
            "uptime_seconds": round(time.time() - monitoring.system.started_at, 3),
            "window_seconds": monitoring.requests.window_seconds,
        },
    }


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The `/health-status` body without details: the overall status and each component's status, nothing else."""
    return {
        "status": report["status"],
        "timestamp": report["timestamp"],
        "components": report["components"],
    }


def _note_change(monitoring: Monitoring, status: Status, components: dict[str, dict[str, Any]]) -> None:
    if monitoring.last_status is not None and status != monitoring.last_status:
        failing = {name: entry["detail"] for name, entry in components.items() if entry["status"] != "healthy"}
        log = logger.info if status == "healthy" else logger.warning
        log("health_status_changed", previous=monitoring.last_status, status=status, failing=failing)
    monitoring.last_status = status


def warn_if_operator_endpoints_open(settings: Settings) -> None:
    """In production, say at start-up which operator endpoints anyone can read."""
    if not settings.is_production:
        return
    if settings.admin_token is None:
        logger.warning(
            "operator_endpoints_open", endpoints=list(ADMIN_ROUTES), hint="set ADMIN_TOKEN to require a bearer token"
        )
    if settings.metrics_token is None:
        logger.warning(
            "metrics_endpoint_open", endpoints=["/metrics"], hint="set METRICS_TOKEN or restrict /metrics at the proxy"
        )
    hosts = set(parse_allowed_hosts(settings.allowed_hosts))
    if "*" in hosts:
        logger.warning("allowed_hosts_any", hint="set ALLOWED_HOSTS to the names clients use (any Host is served)")
    elif hosts <= LOOPBACK_HOSTS:
        logger.warning(
            "allowed_hosts_local_only",
            allowed_hosts=settings.allowed_hosts,
            hint="requests for any other host name get 400: set ALLOWED_HOSTS to the names clients use",
        )
