"""Back-off schedule properties (full jitter) and jittered check-in intervals."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from fleettrust.agent.backoff import BackoffPolicy, jittered_interval


def test_ceiling_doubles_then_caps_and_never_overflows() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=300.0)
    ceilings = [policy.ceiling(n) for n in range(20)]
    assert ceilings[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(a <= b for a, b in itertools.pairwise(ceilings))
    assert max(ceilings) == 300.0
    assert policy.ceiling(10**9) == 300.0


def test_delays_are_full_jitter_within_bounds() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=300.0)
    rng = random.Random(7)
    for attempt in range(30):
        samples = [policy.delay(attempt, rng) for _ in range(400)]
        ceiling = policy.ceiling(attempt)
        assert all(0.0 <= s <= ceiling for s in samples)
        # uniform on [0, ceiling]: mean ~ ceiling/2, and it really spreads out
        assert abs(statistics.fmean(samples) / ceiling - 0.5) < 0.08
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling


def test_retry_after_raises_the_delay_but_not_beyond_the_cap() -> None:
    policy = BackoffPolicy(base_s=1.0, cap_s=60.0)
    rng = random.Random(1)
    assert all(policy.delay(0, rng, retry_after_s=30) >= 30 for _ in range(50))
    assert policy.delay(0, rng, retry_after_s=10_000) == 60.0


def test_same_seed_same_schedule() -> None:
    policy = BackoffPolicy()
    a = [policy.delay(n, random.Random(42)) for n in range(10)]
    b = [policy.delay(n, random.Random(42)) for n in range(10)]
    assert a == b


def test_jittered_interval_is_plus_minus_20_percent() -> None:
    rng = random.Random(3)
    samples = [jittered_interval(300, rng) for _ in range(2000)]
    assert 240 <= min(samples) < 246
    assert 354 < max(samples) <= 360


@pytest.mark.parametrize("kwargs", [{"base_s": 0}, {"base_s": 5, "cap_s": 1},
                                    {"multiplier": 0.5}, {"cap_s": float("inf")}])
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        BackoffPolicy(**kwargs)
