"""Retry timing: exponential back-off with full jitter, and jittered check-in intervals.

* :class:`BackoffPolicy` — after the n-th consecutive failure (n = 0, 1, …) wait a uniformly
  random time in ``[0, min(cap, base · multiplier**n)]`` ("full jitter"): a fleet that lost the
  gateway at the same instant spreads its retries over the whole window instead of returning in
  synchronised waves. A ``Retry-After`` from the server raises the delay to at least that value
  (still capped).
* :func:`jittered_interval` — the next regular check-in: ``next_checkin_s`` ±20 %.

Pure functions of their inputs and a :class:`random.Random`; no sleeping, no I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final

__all__ = ["CHECKIN_JITTER", "BackoffPolicy", "jittered_interval"]

#: Relative jitter applied to the server's ``next_checkin_s``.
CHECKIN_JITTER: Final = 0.2


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Full-jitter exponential back-off: ``delay(n) ~ U(0, min(cap_s, base_s·multiplier**n))``."""

    base_s: float = 1.0
    cap_s: float = 300.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and math.isfinite(self.base_s)):
            raise ValueError("base_s must be a positive finite number")
        if not (self.cap_s >= self.base_s and math.isfinite(self.cap_s)):
            raise ValueError("cap_s must be finite and at least base_s")
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError("multiplier must be >= 1")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after ``attempt`` consecutive failures (0-based)."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # log-space comparison: no float overflow for huge attempt counts
        if self.multiplier > 1 and attempt * math.log(self.multiplier) >= math.log(
            self.cap_s / self.base_s
        ):
            return self.cap_s
        return min(self.cap_s, self.base_s * self.multiplier**attempt)

    def delay(
        self, attempt: int, rng: random.Random, *, retry_after_s: float | None = None
    ) -> float:
        """A random delay for ``attempt``; at least ``retry_after_s`` (capped) when given."""
        value = rng.uniform(0.0, self.ceiling(attempt))
        if retry_after_s is not None and retry_after_s > value:
            value = min(self.cap_s, retry_after_s)
        return value


def jittered_interval(
    seconds: float, rng: random.Random, *, jitter: float = CHECKIN_JITTER
) -> float:
    """``seconds`` scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("interval must be a non-negative finite number")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")
    return seconds * rng.uniform(1.0 - jitter, 1.0 + jitter)
