"""The in-memory moving window behind QuestionRateLimiter, driven by an injected clock (no server, no sleeping)."""

from __future__ import annotations

import random
import threading

import pytest

from infrastructure.rate_limit import MovingWindow, QuestionRateLimiter

WALL_OFFSET = 1_700_000_000.0  # the fake wall clock reads the fake monotonic clock plus this


class FakeClock:
    """A monotonic clock the test moves by hand, and a wall clock that follows it at a fixed offset."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET


def window(limit: int, seconds: float = 60.0) -> tuple[MovingWindow, FakeClock]:
    clock = FakeClock()
    return MovingWindow(limit, seconds, clock, clock.wall), clock


def test_exactly_limit_allowed_then_refused() -> None:
    limiter, clock = window(3)
    allowed = []
    for _ in range(7):
        allowed.append(limiter.hit("client").allowed)
        clock.now += 1
    assert allowed == [True, True, True, False, False, False, False]


def test_remaining_counts_down_to_zero_and_stays_there() -> None:
    limiter, clock = window(4)
    remaining = []
    for _ in range(6):
        decision = limiter.hit("client")
        assert decision.limit == 4
        remaining.append(decision.remaining)
        clock.now += 0.5
    assert remaining == [3, 2, 1, 0, 0, 0]


def test_reset_is_when_the_oldest_hit_leaves_the_window_in_unix_time() -> None:
    limiter, clock = window(2)
    first = limiter.hit("client")
    assert first.reset_at == clock.wall() + 60  # only this hit in the window: now + window
    clock.now += 10
    assert limiter.hit("client").reset_at == first.reset_at  # still the first hit that leaves first
    clock.now += 5
    refused = limiter.hit("client")
    assert not refused.allowed and refused.reset_at == first.reset_at
    assert refused.headers() == {
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(first.reset_at)),
    }


def test_budget_comes_back_as_hits_leave_the_window() -> None:
    limiter, clock = window(2)
    start = clock.now
    assert limiter.hit("client").allowed  # t = 0
    clock.now = start + 10
    assert limiter.hit("client").allowed  # t = 10
    clock.now = start + 59.9
    assert not limiter.hit("client").allowed
    clock.now = start + 60  # the hit at t = 0 has left: room for exactly one
    again = limiter.hit("client")
    assert again.allowed and again.remaining == 0
    assert again.reset_at == start + 10 + 60 + WALL_OFFSET
    assert not limiter.hit("client").allowed
    clock.now = start + 500  # long after: the whole budget is back
    fresh = [limiter.hit("client") for _ in range(3)]
    assert [d.allowed for d in fresh] == [True, True, False]
    assert [d.remaining for d in fresh] == [1, 0, 0]


def test_refused_hits_do_not_extend_the_window() -> None:
    limiter, clock = window(1)
    start = clock.now
    first = limiter.hit("client")
    assert first.allowed
    for offset in (1, 30, 59, 59.99):
        clock.now = start + offset
        refused = limiter.hit("client")
        assert not refused.allowed
        assert refused.reset_at == first.reset_at  # refusals never move the reset
    clock.now = start + 60  # refused at 59.99, yet allowed: only the allowed hit at t = 0 counted
    assert limiter.hit("client").allowed


def test_separate_keys_have_separate_budgets() -> None:
    limiter, clock = window(1)
    a = limiter.hit("203.0.113.7")
    assert a.allowed
    clock.now += 20
    assert not limiter.hit("203.0.113.7").allowed
    b = limiter.hit("198.51.100.9")
    assert b.allowed and b.remaining == 0
    assert b.reset_at == a.reset_at + 20
    assert not limiter.hit("198.51.100.9").allowed
    clock.now += 40  # a's hit has left its window, b's has not
    assert limiter.hit("203.0.113.7").allowed
    assert not limiter.hit("198.51.100.9").allowed


def test_idle_keys_are_forgotten_from_within_hits() -> None:
    limiter, clock = window(5)
    start = clock.now
    for offset, key in ((0, "a"), (10, "b"), (20, "c")):
        clock.now = start + offset
        limiter.hit(key)
    clock.now = start + 50
    limiter.hit("a")  # a is hit again: its newest hit is now t = 50, so it is no longer the idle one
    assert len(limiter) == 3
    clock.now = start + 75  # b (t = 10) has left the window; c (t = 20) and a (t = 50) have not
    limiter.hit("d")
    assert len(limiter) == 3  # a, c, d
    clock.now = start + 500  # all idle but d's next hit
    limiter.hit("d")
    assert len(limiter) == 1
    # A forgotten key simply starts over with its whole budget.
    assert limiter.hit("b").remaining == 4


def test_a_backlog_of_idle_keys_drains_by_a_bounded_amount_per_hit() -> None:
    limiter, clock = window(1)
    for i in range(10):
        limiter.hit(f"idle-{i}")
    assert len(limiter) == 10
    clock.now += 61
    sizes = []
    for _ in range(6):
        limiter.hit("busy")
        sizes.append(len(limiter))
    per_hit = MovingWindow.SWEEP_PER_HIT
    assert per_hit >= 2  # a hit may add one key, so more than one must go for a backlog to shrink
    expected = [max(1, 10 + 1 - per_hit * (n + 1)) for n in range(6)]
    assert sizes == expected
    assert sizes[-1] == 1


def test_a_full_window_is_never_forgotten() -> None:
    limiter, clock = window(1)
    for i in range(20):  # a backlog of idle keys, swept two per hit below
        limiter.hit(f"idle-{i}")
    clock.now += 100
    start = clock.now
    assert limiter.hit("hammer").allowed
    for step in range(1, 60):
        clock.now = start + step
        assert not limiter.hit("hammer").allowed  # never swept (and so never reset) while refused
        limiter.hit(f"new-{step}")
    assert len(limiter) == 60  # the idle keys are gone; hammer and the 59 new keys remain
    clock.now = start + 60
    assert limiter.hit("hammer").allowed


def test_matches_a_brute_force_model_on_random_traffic() -> None:
    rng = random.Random(20240611)
    limit, seconds = 5, 10.0
    limiter, clock = window(limit, seconds)
    allowed_at: dict[str, list[float]] = {}
    keys = [f"client-{i}" for i in range(40)]
    for _ in range(20000):
        clock.now += rng.choice((0.0, 0.0, 0.01, 0.3, 1.0, 4.0, 12.0))
        key = rng.choice(keys[:5]) if rng.random() < 0.7 else rng.choice(keys)
        in_window = [t for t in allowed_at.get(key, []) if t > clock.now - seconds]
        expect_allowed = len(in_window) < limit
        if expect_allowed:
            in_window.append(clock.now)
            allowed_at.setdefault(key, []).append(clock.now)
        decision = limiter.hit(key)
        assert decision.allowed == expect_allowed
        assert decision.remaining == limit - len(in_window)
        assert decision.reset_at == pytest.approx(min(in_window) + seconds + WALL_OFFSET, abs=1e-6)
    clock.now += seconds
    for _ in range(len(keys)):
        limiter.hit("last")
    assert len(limiter) == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        MovingWindow(0, 60)
    with pytest.raises(ValueError):
        MovingWindow(5, 0)


async def test_question_rate_limiter_in_memory_starts_no_threads() -> None:
    clock = FakeClock()
    threads_before = set(threading.enumerate())
    limiter = QuestionRateLimiter(3, 60, "memory://", clock=clock, wall_clock=clock.wall)
    assert not limiter.shared_storage
    assert limiter.storage_reachable()
    assert limiter.limit == 3
    decisions = []
    for _ in range(5):
        decisions.append(await limiter.spend("client"))
        clock.now += 1
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert all(d.counted for d in decisions)
    assert limiter.hit("other").remaining == 2
    clock.now += 60
    assert (await limiter.spend("client")).allowed
    assert set(threading.enumerate()) == threads_before  # no timer, no expiry thread
