"""Prometheus metric definitions: one registry of names, used by every layer above.

With several uvicorn workers `main.run()` sets PROMETHEUS_MULTIPROC_DIR before the workers start, so
prometheus-client keeps each worker's values in files there and `/metrics` adds them up
(`exposition()`). Gauges say how they combine across workers (`multiprocess_mode`).

Two kinds of figures are read rather than counted:

- `cache_entries{layer}`: the callable given to `register_cache_sizes` is read at scrape time. With several
  workers each worker writes its own figures to its files (at a scrape it answers, and every
  CACHE_SIZES_REFRESH_SECONDS), one sample per worker with a `pid` label.
- with several workers, `process_*{pid}`: prometheus-client's process collector does not work across
  processes, so the worker answering a scrape reads every live worker's memory, CPU time and descriptors
  with psutil (`WorkerProcessCollector`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests by method, route template and status.", ["method", "route", "status"]
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
AGENT_QUERIES = Counter("agent_queries_total", "Questions processed by the agent, by outcome.", ["outcome"])
AGENT_PROCESSING = Histogram(
    "agent_processing_seconds", "Time the agent spends on one question.", buckets=_LATENCY_BUCKETS
)
AGENT_NODE_DURATION = Histogram(
    "agent_node_seconds", "Time spent in each agent graph node.", ["node"], buckets=_LATENCY_BUCKETS
)
AGENT_CONFIDENCE = Histogram(
    "agent_confidence", "Confidence of agent answers.", buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
)
EMBEDDING_DURATION = Histogram(
    "embedding_seconds", "Time to embed one batch of texts.", ["provider"], buckets=_LATENCY_BUCKETS
)
EMBEDDING_BATCH_SIZE = Histogram(
    "embedding_batch_size", "Texts per embedding model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
EMBEDDING_CACHE_REQUESTS = Counter(
    "embedding_cache_requests_total", "Embedding cache look-ups by layer and result.", ["layer", "result"]
)
ANSWER_CACHE_REQUESTS = Counter(
    "answer_cache_requests_total", "Look-ups of whole extractive answers (question + previous turn).", ["result"]
)
ANSWER_GENERATIONS = Counter(
    "answer_generations_total",
    "Generative answers by result: `generated`, or the fallback reason (timeout, server_error, ...).",
    ["result"],
)
ACTIVE_SESSIONS = Gauge("active_sessions", "Sessions currently held.", multiprocess_mode="livesum")
SSE_STREAMS_ACTIVE = Gauge(
    "sse_streams_active", "Server-sent event streams currently open.", multiprocess_mode="livesum"
)
STREAMS_CANCELLED = Counter(
    "streams_cancelled_total", "Answer streams stopped because the client left or cancelled.", ["transport"]
)
WEBSOCKET_CONNECTIONS = Gauge("websocket_connections", "Open WebSocket connections.", multiprocess_mode="livesum")
WEBSOCKET_MESSAGES = Counter(
    "websocket_messages_total", "WebSocket messages by direction and type.", ["direction", "type"]
)
RATE_LIMIT_REJECTIONS = Counter("rate_limit_rejections_total", "Requests refused by the rate limiter.", ["route"])
SHARED_STORAGE_ERRORS = Counter(
    "shared_storage_errors_total",
    "Failed operations on shared storage (Redis): sessions, the shared embedding cache, rate-limit counting.",
    ["component"],
)
ANSWER_FEEDBACK = Counter("answer_feedback_total", "Ratings of answers by users, by rating.", ["rating"])
QUESTION_LOG_WRITTEN = Counter("question_log_written_total", "Question-log rows written to the database.")
QUESTION_LOG_DROPPED = Counter(
    "question_log_dropped_total", "Question-log rows lost: the queue was full or the database refused them."
)
QUESTION_LOG_PENDING = Gauge(
    "question_log_pending", "Question-log rows waiting to be written.", multiprocess_mode="livesum"
)
KNOWLEDGE_BASE_ENTRIES = Gauge(
    "knowledge_base_entries", "Entries in the live knowledge base.", multiprocess_mode="livemax"
)
KNOWLEDGE_BASE_VERSION = Gauge(
    "knowledge_base_version",
    "Version of the live knowledge base (lowest worker: all equal once converged).",
    multiprocess_mode="livemin",
)
KNOWLEDGE_BASE_RELOADS = Counter(
    "knowledge_base_reloads_total",
    "Knowledge-base versions made live, by result: `ok`, `invalid` (refused), `error` (could not be loaded).",
    ["result"],
)
EVENT_LOOP_LAG = Gauge(
    "event_loop_lag_seconds",
    "How late the event loop woke from its last monitoring sleep (worst worker).",
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "defi_qa_bot_build_info",
    "Always 1; the labels say which version, Python and embedding model are running.",
    ["version", "python", "embedding_model"],
    multiprocess_mode="livemax",
)


def set_build_info(version: str, python: str, embedding_model: str) -> None:
    """Publish the one build-info sample (replacing any earlier one in this process)."""
    if not multiprocess_enabled():  # clearing is not supported in multiprocess mode (one app per worker there)
        BUILD_INFO.clear()
    BUILD_INFO.labels(version=version, python=python, embedding_model=embedding_model).set(1)


def gauge_value(gauge: Gauge) -> float:
    """This process's current value of an unlabelled gauge."""
    (family,) = gauge.collect()
    return float(family.samples[0].value)


def multiprocess_enabled() -> bool:
    """Whether prometheus-client runs in multiprocess mode (several workers)."""
    return bool(os.environ.get(MULTIPROC_ENV))


def exposition() -> tuple[bytes, str]:
    """The text exposition and its content type: this process, or every worker added up."""
    if multiprocess_enabled():
        refresh_cache_sizes()  # this worker's figures as of now; the others' are at most a few seconds old
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(WorkerProcessCollector(os.environ[MULTIPROC_ENV]))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the multiprocess directory (call at shutdown)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@contextmanager
def multiprocess_metrics(enabled: bool) -> Iterator[None]:
    """Around starting several workers: give them a fresh PROMETHEUS_MULTIPROC_DIR, removed afterwards.

    Must run before the workers import prometheus-client. A directory the operator set is used as it is
    (and must be emptied by them between runs).
    """
    if not enabled or multiprocess_enabled():
        yield
        return
    directory = tempfile.mkdtemp(prefix="defi-qa-bot-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


# --- cache sizes, read at scrape time ----------------------------------------------------------------------

CacheSizes = Callable[[], Mapping[str, int]]
"""Returns the entries held by each cache layer of this process, e.g. {"memory": 12, "disk": 400, "answer": 9}."""

CACHE_ENTRIES = "cache_entries"
_CACHE_ENTRIES_HELP = "Entries held by each cache layer (memory and disk question vectors, whole answers)."
CACHE_SIZES_REFRESH_SECONDS = 5.0
"""With several workers: how often each worker writes its cache sizes to its metric files."""

# Several workers only: the same figures in this worker's files, one sample per live worker (`pid` label).
# Not registered: with one process, `CacheSizeCollector` reads them at scrape time instead.
_CACHE_ENTRIES_FILES = Gauge(CACHE_ENTRIES, _CACHE_ENTRIES_HELP, ["layer"], multiprocess_mode="liveall", registry=None)


class CacheSizeCollector:
    """Yields `cache_entries{layer}` from a `CacheSizes` callable each time the registry is collected."""

    def __init__(self, sizes: CacheSizes) -> None:
        self.sizes = sizes

    def describe(self) -> list[Metric]:
        """The family's name without reading the caches (the registry calls this when registering)."""
        return [GaugeMetricFamily(CACHE_ENTRIES, _CACHE_ENTRIES_HELP, labels=["layer"])]

    def collect(self) -> Iterator[Metric]:
        """One sample per cache layer, as of now."""
        family = GaugeMetricFamily(CACHE_ENTRIES, _CACHE_ENTRIES_HELP, labels=["layer"])
        for layer, size in sorted(self.sizes().items()):
            family.add_metric([layer], float(size))
        yield family


@dataclass
class _CacheSizesState:
    sizes: CacheSizes | None = None
    collector: CacheSizeCollector | None = None
    refresh: asyncio.TimerHandle | None = None


_cache_sizes = _CacheSizesState()


def sizes_of(**caches: Sized | None) -> CacheSizes:
    """A `CacheSizes` reading `len()` of each named cache; a cache that is None (turned off) is left out."""

    def read() -> dict[str, int]:
        return {layer: len(cache) for layer, cache in caches.items() if cache is not None}

    return read


def register_cache_sizes(sizes: CacheSizes) -> None:
    """Publish `cache_entries{layer}` from `sizes()`, replacing an earlier registration in this process.

    One process: a collector on the default registry reads `sizes()` at every scrape. Several workers: the
    figures are written to this worker's files now, at every scrape this worker answers and, when called on
    a running event loop, every CACHE_SIZES_REFRESH_SECONDS.
    """
    if _cache_sizes.refresh is not None:
        _cache_sizes.refresh.cancel()
        _cache_sizes.refresh = None
    if _cache_sizes.collector is not None:
        REGISTRY.unregister(_cache_sizes.collector)
        _cache_sizes.collector = None
    _cache_sizes.sizes = sizes
    if not multiprocess_enabled():
        _cache_sizes.collector = CacheSizeCollector(sizes)
        REGISTRY.register(_cache_sizes.collector)
        return
    refresh_cache_sizes()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a script): figures are refreshed by the scrapes this process answers
        return

    def tick() -> None:
        refresh_cache_sizes()
        _cache_sizes.refresh = loop.call_later(CACHE_SIZES_REFRESH_SECONDS, tick)

    _cache_sizes.refresh = loop.call_later(CACHE_SIZES_REFRESH_SECONDS, tick)


def refresh_cache_sizes() -> None:
    """Several workers: write this worker's current cache sizes to its metric files (no-op otherwise)."""
    if _cache_sizes.sizes is None or not multiprocess_enabled():
        return
    for layer, size in _cache_sizes.sizes().items():
        _CACHE_ENTRIES_FILES.labels(layer=layer).set(size)


# --- process figures of every worker, read at scrape time ----------------------------------------------------


def live_worker_pids(directory: str) -> list[int]:
    """This process and the running siblings that keep live gauges in the multiprocess `directory`.

    Every worker publishes live gauges (build info, event-loop lag) and a worker that stops cleanly removes
    them (`mark_process_dead`). A worker that was killed leaves its files behind, so a pid counts only while a
    process with that pid runs under the same parent (the uvicorn supervisor): a reused pid is not a worker.
    """
    own = os.getpid()
    candidates = {own}
    for path in Path(directory).glob("gauge_live*_*.db"):
        suffix = path.stem.rsplit("_", 1)[-1]
        if suffix.isdigit():
            candidates.add(int(suffix))
    parent = os.getppid()
    live = []
    for pid in sorted(candidates):
        try:
            process = psutil.Process(pid)
            if pid == own or (process.ppid() == parent and process.status() != psutil.STATUS_ZOMBIE):
                live.append(pid)
        except psutil.Error:  # gone (or not ours to read)
            continue
    return live


class WorkerProcessCollector:
    """`process_*` figures of every live worker, labelled by `pid`, as prometheus-client's own collector names them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        """Read each worker with psutil; a worker that exits meanwhile is left out."""
        resident = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", labels=["pid"])
        virtual = GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", labels=["pid"])
        cpu = CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", labels=["pid"]
        )
        fds = GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", labels=["pid"])
        started = GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", labels=["pid"]
        )
        for pid in live_worker_pids(self.directory):
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    memory = process.memory_info()
                    times = process.cpu_times()
                    open_fds = process.num_fds()
                    created = process.create_time()
            except psutil.Error:
                continue
            label = [str(pid)]
            resident.add_metric(label, float(memory.rss))
            virtual.add_metric(label, float(memory.vms))
            cpu.add_metric(label, float(times.user + times.system))
            fds.add_metric(label, float(open_fds))
            started.add_metric(label, float(created))
        yield from (resident, virtual, cpu, fds, started)
