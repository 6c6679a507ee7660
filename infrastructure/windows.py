"""Sliding-window statistics of this process for `/performance-stats`, `/health-status` and the dashboard.

Prometheus keeps the totals; these windows answer "how is it doing right now" without a Prometheus
server: the last few minutes of requests and answers, bounded in memory (oldest samples drop first).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

WINDOW_SECONDS = 300.0
BUCKET_SECONDS = 10.0
RATE_SECONDS = 60.0
MAX_SAMPLES = 20_000

Clock = Callable[[], float]


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile (0..1) of already sorted values, interpolating between ranks; None if empty."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1.0 - weight) + sorted_values[upper] * weight


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _latency_summary(durations: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(durations)
    return {
        "avg_ms": _ms(sum(ordered) / len(ordered)) if ordered else None,
        "p50_ms": _ms(percentile(ordered, 0.50)),
        "p95_ms": _ms(percentile(ordered, 0.95)),
        "p99_ms": _ms(percentile(ordered, 0.99)),
    }


@dataclass(frozen=True)
class RequestSample:
    """One finished HTTP request."""

    at: float
    method: str
    route: str
    status: int
    seconds: float


@dataclass(frozen=True)
class OutcomeSample:
    """One question the agent finished: `answered`, `no_match` or `error`."""

    at: float
    outcome: str
    confidence: float | None


Sample = TypeVar("Sample", RequestSample, OutcomeSample)


class _Window(Generic[Sample]):
    """Samples of the last `window_seconds`, at most `max_samples` of them."""

    def __init__(self, window_seconds: float, max_samples: int, clock: Clock) -> None:
        self.window_seconds = window_seconds
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._clock = clock
        self.started_at = clock()

    def _add(self, sample: Sample) -> None:
        self._samples.append(sample)
        self._prune(sample.at)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_seconds
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()

    def _current(self) -> tuple[float, list[Sample]]:
        now = self._clock()
        self._prune(now)
        return now, list(self._samples)

    def _buckets(self, now: float, samples: list[Sample]) -> list[tuple[float, list[Sample]]]:
        """The window cut into BUCKET_SECONDS slices, oldest first, aligned to wall-clock multiples."""
        count = math.ceil(self.window_seconds / BUCKET_SECONDS)
        last_start = math.floor(now / BUCKET_SECONDS) * BUCKET_SECONDS
        first_start = last_start - (count - 1) * BUCKET_SECONDS
        slices: list[list[Sample]] = [[] for _ in range(count)]
        for sample in samples:
            index = int((sample.at - first_start) // BUCKET_SECONDS)
            if 0 <= index < count:
                slices[index].append(sample)
        return [(first_start + index * BUCKET_SECONDS, bucket) for index, bucket in enumerate(slices)]

    def _rate_span(self, now: float) -> float:
        return max(1.0, min(RATE_SECONDS, now - self.started_at))


class RequestWindow(_Window[RequestSample]):
    """HTTP requests by route template; monitoring routes (probes, scrapes, the dashboard) are left out."""

    def __init__(
        self,
        window_seconds: float = WINDOW_SECONDS,
        max_samples: int = MAX_SAMPLES,
        ignored_routes: Iterable[str] = (),
        clock: Clock = time.time,
    ) -> None:
        super().__init__(window_seconds, max_samples, clock)
        self.ignored_routes = frozenset(ignored_routes)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        """Note one finished request (ignored routes are skipped)."""
        if route not in self.ignored_routes:
            self._add(RequestSample(self._clock(), method, route, status, seconds))

    def snapshot(self) -> dict[str, Any]:
        """Totals, per-route figures and a timeline of the window."""
        now, samples = self._current()
        recent = sum(1 for sample in samples if sample.at >= now - RATE_SECONDS)
        by_route: dict[tuple[str, str], list[RequestSample]] = {}
        for sample in samples:
            by_route.setdefault((sample.method, sample.route), []).append(sample)
        routes = [
            {"method": method, "route": route, **self._summary(group)}
            for (method, route), group in sorted(by_route.items(), key=lambda item: (item[0][1], item[0][0]))
        ]
        timeline = [
            {
                "start": start,
                "requests": len(bucket),
                "errors": sum(1 for sample in bucket if sample.status >= 500),
                "client_errors": sum(1 for sample in bucket if 400 <= sample.status < 500),
                "p95_ms": _ms(percentile(sorted(sample.seconds for sample in bucket), 0.95)),
            }
            for start, bucket in self._buckets(now, samples)
        ]
        return {
            "window_seconds": self.window_seconds,
            "bucket_seconds": BUCKET_SECONDS,
            "total": {**self._summary(samples), "requests_per_second": round(recent / self._rate_span(now), 3)},
            "routes": routes,
            "timeline": timeline,
        }

    @staticmethod
    def _summary(samples: list[RequestSample]) -> dict[str, Any]:
        errors = sum(1 for sample in samples if sample.status >= 500)
        client_errors = sum(1 for sample in samples if 400 <= sample.status < 500)
        return {
            "requests": len(samples),
            "errors": errors,
            "error_rate": _share(errors, len(samples)),
            "client_errors": client_errors,
            "client_error_rate": _share(client_errors, len(samples)),
            **_latency_summary(sample.seconds for sample in samples),
        }


class OutcomeWindow(_Window[OutcomeSample]):
    """The agent's answers: answered / no-match / error shares and average confidence."""

    def __init__(
        self, window_seconds: float = WINDOW_SECONDS, max_samples: int = MAX_SAMPLES, clock: Clock = time.time
    ) -> None:
        super().__init__(window_seconds, max_samples, clock)

    def record(self, outcome: str, confidence: float | None) -> None:
        """Note one finished question (the agent's outcome callback)."""
        self._add(OutcomeSample(self._clock(), outcome, confidence))

    def snapshot(self) -> dict[str, Any]:
        """Counts, shares, average confidence and a timeline of the window."""
        now, samples = self._current()
        counts = {name: sum(1 for sample in samples if sample.outcome == name) for name in _OUTCOMES}
        confidences = [sample.confidence for sample in samples if sample.confidence is not None]
        total = len(samples)
        return {
            "window_seconds": self.window_seconds,
            "questions": total,
            **counts,
            "answered_share": _share(counts["answered"], total),
            "no_match_share": _share(counts["no_match"], total),
            "error_share": _share(counts["error"], total),
            "avg_confidence": round(sum(confidences) / len(confidences), 4) if confidences else None,
            "questions_per_second": round(
                sum(1 for sample in samples if sample.at >= now - RATE_SECONDS) / self._rate_span(now), 3
            ),
            "timeline": [
                {"start": start, **{name: sum(1 for s in bucket if s.outcome == name) for name in _OUTCOMES}}
                for start, bucket in self._buckets(now, samples)
            ],
        }


_OUTCOMES = ("answered", "no_match", "error")
