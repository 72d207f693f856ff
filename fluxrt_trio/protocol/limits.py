"""Rate limits as plain arithmetic on timestamps: token buckets and a flood detector.

Times are seconds from any monotonic clock; callers pass `now`, so these are tested without sleeping.
"""

from __future__ import annotations

import array
import enum

import attrs

WINDOW = 60.0


class Verdict(enum.Enum):
    ALLOW = "allow"
    REJECT = "reject"
    """Over the allowance: drop this message, keep the connection."""
    CLOSE = "close"
    """More than twice the allowance within one minute: close the connection."""


@attrs.define(slots=True)
class TokenBucket:
    """Holds at most `capacity` tokens and refills `capacity` of them per `period` seconds, continuously."""

    capacity: float
    period: float = WINDOW
    tokens: float = attrs.field(default=attrs.Factory(lambda self: self.capacity, takes_self=True))
    """full to start with"""
    updated: float | None = None

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take `amount` tokens if the bucket holds them; return whether it did."""
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / self.period)
        self.updated = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


class SlidingCount:
    """Counts events over the last `window` seconds, at one-second resolution.

    A ring of per-second counts: exact up to the second in which the window starts, with constant memory (a
    timestamp per event would cost kilobytes per connection). The ring is allocated only once events fall in two
    different seconds less than a window apart; until then a count and its second are enough, so connections that
    send nothing, or only within one second now and then (a client's subscribes as it connects), hold no ring.
    """

    __slots__ = ("_last", "_slots", "_total", "window")

    def __init__(self, window: float = WINDOW) -> None:
        self.window = int(window)
        self._slots: array.array[int] | None = None
        self._last = 0
        self._total = 0

    def add(self, now: float) -> int:
        """Count one event at `now` and return how many happened in the window ending now, this one included."""
        second = int(now)
        slots = self._slots
        if slots is None:
            if self._total == 0 or second >= self._last + self.window:
                # The first event, or the first since every earlier one left the window.
                self._last, self._total = second, 1
                return 1
            if second <= self._last:
                self._total += 1
                return self._total
            slots = self._slots = array.array("I", [0]) * self.window
            slots[self._last % self.window] = self._total
        if second > self._last:
            # Forget the seconds that have left the window since the last event.
            for s in range(self._last + 1, min(second, self._last + self.window) + 1):
                i = s % self.window
                self._total -= slots[i]
                slots[i] = 0
            self._last = second
        slots[self._last % self.window] += 1
        self._total += 1
        return self._total


@attrs.define(slots=True)
class Allowance:
    """A per-minute allowance: a token bucket for the allowance and a flood detector at twice it."""

    per_minute: int
    bucket: TokenBucket = attrs.field(
        default=attrs.Factory(lambda self: TokenBucket(float(self.per_minute)), takes_self=True)
    )
    attempts: SlidingCount = attrs.field(factory=SlidingCount)

    def resize(self, per_minute: int) -> None:
        """Change the allowance from now on; tokens already earned are kept, up to the new capacity. The flood
        detector starts counting afresh, so a client that kept to the old allowance is not closed under the new one."""
        self.per_minute = per_minute
        self.attempts = SlidingCount()
        self.bucket.capacity = float(per_minute)
        self.bucket.tokens = min(self.bucket.tokens, float(per_minute))

    def charge(self, now: float) -> Verdict:
        """Count one message, allowed or not, and decide what happens to it."""
        if self.attempts.add(now) > 2 * self.per_minute:
            return Verdict.CLOSE
        return Verdict.ALLOW if self.bucket.take(now) else Verdict.REJECT
