"""An injectable clock: services never call ``datetime.now`` directly (tests move time)."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FixedClock:
    """A clock for tests: starts at ``start`` and moves only when told."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, **kwargs: float) -> None:
        self._now += dt.timedelta(**kwargs)
