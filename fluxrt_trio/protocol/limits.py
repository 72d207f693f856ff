"""Rate limits as plain arithmetic on timestamps: token buckets and a flood detector.

Times are seconds from any monotonic clock; callers pass `now`, so these are tested without sleeping.
"""

from __future__ import annotations

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
    tokens: float = attrs.field(default=None)
    updated: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.capacity

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take `amount` tokens if the bucket holds them; return whether it did."""
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / self.period)
        self.updated = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


@attrs.define(slots=True)
class SlidingCount:
    """Estimates how many events happened in the last `window` seconds from two fixed windows.

    The previous window's count is weighted by how much of it still overlaps the sliding window; this keeps the
    memory per connection constant, unlike a log of timestamps.
    """

    window: float = WINDOW
    start: float | None = None
    current: int = 0
    previous: int = 0

    def add(self, now: float) -> float:
        """Count one event at `now` and return the estimated count over the last window, this one included."""
        if self.start is None:
            self.start = now
        elapsed = now - self.start
        if elapsed >= self.window:
            windows = int(elapsed // self.window)
            self.previous = self.current if windows == 1 else 0
            self.current = 0
            self.start += windows * self.window
            elapsed = now - self.start
        self.current += 1
        return self.previous * (1.0 - elapsed / self.window) + self.current


@attrs.define(slots=True)
class Allowance:
    """A per-minute allowance: a token bucket for the allowance and a flood detector at twice it."""

    per_minute: int
    bucket: TokenBucket = attrs.field(default=None)
    attempts: SlidingCount = attrs.field(factory=SlidingCount)

    def __attrs_post_init__(self) -> None:
        if self.bucket is None:
            self.bucket = TokenBucket(float(self.per_minute))

    def charge(self, now: float) -> Verdict:
        """Count one message, allowed or not, and decide what happens to it."""
        if self.attempts.add(now) > 2 * self.per_minute:
            return Verdict.CLOSE
        return Verdict.ALLOW if self.bucket.take(now) else Verdict.REJECT
