"""Heartbeat pings, idle timeouts and token expiry for every connection, from one timer task.

One heap of deadlines replaces a timer task per connection. Entries are checked lazily: an idle deadline that
turns out to be stale (the connection spoke since) is pushed back to its new time instead of being updated on
every received frame.

The heap holds each connection it names, so nothing in it may lie far ahead: only the next ping recurs, and an idle
or expiry deadline goes into the heap at the ping before which it falls. A closed connection is thus let go within
one heartbeat interval; held until its token's expiry, hours away, every connection closed meanwhile stayed in
memory (the soak in bench/RESULTS.md).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Protocol

import trio


class Supervised(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def last_seen(self) -> float:
        """trio.current_time() of the last frame received"""

    @property
    def expires_at(self) -> float | None:
        """UNIX time at which the connection's token expires"""

    def ping(self) -> None: ...

    def idle_timeout(self, idle: float) -> None: ...

    def token_expired(self) -> None: ...


class _Kind(enum.IntEnum):
    PING = 0
    IDLE = 1
    EXPIRY = 2


class Supervisor:
    """Pings every watched connection each `heartbeat_interval`, times it out after `connection_timeout` without a
    frame, and tells it when its token expires. A changed interval (at reload) applies once each connection's deadline
    already set has passed.

    `wall_clock` gives UNIX time, the clock of tokens' `exp`; everything else runs on Trio's clock.
    """

    def __init__(
        self, heartbeat_interval: float, connection_timeout: float, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.connection_timeout = connection_timeout
        self._wall_clock = wall_clock
        self._heap: list[tuple[float, int, _Kind, Supervised, float | None]] = []
        self._seq = itertools.count()
        self._sleep: trio.CancelScope | None = None

    def _push(self, when: float, kind: _Kind, conn: Supervised, stamp: float | None = None) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, conn, stamp))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    def watch(self, conn: Supervised) -> None:
        """Start pinging and timing out `conn`, and close it when its token expires."""
        self._next_ping(conn, trio.current_time())

    def identity_changed(self, conn: Supervised) -> None:
        """The connection has a new token; watch its expiry instead of the old one's."""
        now = trio.current_time()
        # The connection's next ping is at most an interval away; a later expiry is taken up by the pings.
        self._expiry_before(conn, now, now + self.heartbeat_interval)

    def _next_ping(self, conn: Supervised, now: float) -> None:
        """Ping `conn` an interval from `now`, and put in the heap its idle and expiry deadlines that fall before
        then: that ping takes up those that fall after."""
        at = now + self.heartbeat_interval
        self._push(at, _Kind.PING, conn)
        idle_at = conn.last_seen + self.connection_timeout
        if idle_at <= at:
            self._push(idle_at, _Kind.IDLE, conn, at)
        self._expiry_before(conn, now, at)

    def _expiry_before(self, conn: Supervised, now: float, horizon: float) -> None:
        expires_at = conn.expires_at
        if expires_at is not None:
            when = now + (expires_at - self._wall_clock())
            if when <= horizon:
                self._push(when, _Kind.EXPIRY, conn, expires_at)

    async def run(self) -> None:
        """Run forever, acting on each deadline as it comes."""
        heap = self._heap
        while True:
            self._act(trio.current_time())
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._sleep = scope
                await trio.sleep_forever()
            self._sleep = None

    def _act(self, now: float) -> None:
        """Act on every deadline up to `now`. A method of its own so that no local of this frame holds the last
        connection acted on while the supervisor sleeps."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, conn, stamp = heapq.heappop(heap)
            if not conn.closed:
                self._due(kind, conn, stamp, now)

    def _due(self, kind: _Kind, conn: Supervised, stamp: float | None, now: float) -> None:
        if kind is _Kind.PING:
            conn.ping()
            self._next_ping(conn, now)
        elif kind is _Kind.IDLE:
            idle = now - conn.last_seen
            if idle >= self.connection_timeout:
                conn.idle_timeout(idle)
            elif stamp is not None and (idle_at := conn.last_seen + self.connection_timeout) <= stamp:
                # Still before the connection's next ping (the stamp); after it, that ping puts it back.
                self._push(idle_at, _Kind.IDLE, conn, stamp)
        elif stamp == conn.expires_at:
            conn.token_expired()
