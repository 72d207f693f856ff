"""Broadcast history, as plain values: the last messages of each `broadcast:` channel, kept to replay to a client
that resumes (docs/protocol.md, Resume). No I/O, no clock: times are passed in.

A channel keeps at most `size` messages, none older than `ttl` seconds, each as the frame already sent to live
subscribers, so a replay re-sends bytes and encodes nothing. A message is known by its position, a pair of integers
that grows with every message of a channel: `(0, n)` for a node's own counter, the `(milliseconds, sequence)` of a
Redis stream id in a cluster. What leaves a channel's ring (pushed out by newer messages, expired, or added out of
order) raises the ring's floor: a client whose position is below the floor missed something that is gone, so it
cannot resume; at or above it, it gets exactly what followed. Memory is bounded by `size` per channel and by `ttl`:
a channel whose newest message has expired goes whole.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import attrs

Position = tuple[int, int]

START: Position = (0, 0)
"""before every message"""


@attrs.define(slots=True)
class _Entry:
    position: Position
    time: float
    frame: bytes


@attrs.define(slots=True)
class _Ring:
    floor: Position
    """every message of the channel after this position that was added is still here"""
    entries: collections.deque[_Entry] = attrs.field(factory=collections.deque)

    @property
    def newest(self) -> _Entry:
        return self.entries[-1]


class History:
    """The rings of every channel with messages in the last `ttl` seconds. `size` must be at least 1 (a node with
    history turned off keeps no History)."""

    def __init__(self, size: int, ttl: float) -> None:
        if size < 1 or not ttl > 0:
            raise ValueError(f"a history keeps at least one message for some time, got size={size} ttl={ttl}")
        self.size = size
        self.ttl = ttl
        self._rings: collections.OrderedDict[str, _Ring] = collections.OrderedDict()
        """in the order of their newest message, oldest first, so that expiry looks only at the front"""
        self._expired: Position = START
        """just above the newest position of any ring that expired whole: a ring that starts again starts there"""
        self._messages = 0
        self._bytes = 0

    # ---- what the hub tells it -------------------------------------------------------------------------------

    def add(self, channel: str, position: Position, now: float, frame: bytes) -> bool:
        """Keep `frame`, sent at `now` on `channel` as the message at `position`; True when kept. A position at or
        below the channel's newest is not kept (False) and raises its floor: the order of the channel is broken
        there."""
        self.sweep(now)
        ring = self._rings.get(channel)
        if ring is None:
            ring = self._rings[channel] = _Ring(self._expired)
        elif ring.entries and position <= ring.newest.position:
            ring.floor = max(ring.floor, position)
            return False
        else:
            self._rings.move_to_end(channel)
        ring.entries.append(_Entry(position, now, frame))
        self._messages += 1
        self._bytes += len(frame)
        self._trim(ring, now)
        return True

    def sweep(self, now: float) -> None:
        """Drop the channels whose newest message is older than `ttl` (whole rings; older messages of the others go
        when their channel is next used)."""
        rings = self._rings
        while rings:
            channel, ring = next(iter(rings.items()))
            if ring.entries and now - ring.newest.time <= self.ttl:
                return
            del rings[channel]
            self._messages -= len(ring.entries)
            self._bytes -= sum(len(entry.frame) for entry in ring.entries)
            # Above its newest too: a client that had it cannot tell whether something followed.
            newest = ring.newest.position if ring.entries else START
            self._expired = max(self._expired, (newest[0], newest[1] + 1), ring.floor)

    # ---- what a resuming client gets -----------------------------------------------------------------------

    def after(self, channel: str, position: Position, now: float) -> list[bytes] | None:
        """The frames of `channel` after `position`, oldest first; None when a message after it is gone (pushed
        out, expired, or never added). The caller answers for the rest: that every message after `position` was
        offered to this history."""
        self.sweep(now)
        ring = self._rings.get(channel)
        if ring is None:
            return [] if position >= self._expired else None
        self._trim(ring, now)
        if position < ring.floor:
            return None
        return [entry.frame for entry in _after(ring.entries, position)]

    # ---- what /metrics shows -------------------------------------------------------------------------------

    @property
    def messages(self) -> int:
        """Messages kept, in every channel."""
        return self._messages

    @property
    def bytes(self) -> int:
        """Bytes of the frames kept."""
        return self._bytes

    @property
    def channels(self) -> int:
        return len(self._rings)

    # ---- inside --------------------------------------------------------------------------------------------

    def _trim(self, ring: _Ring, now: float) -> None:
        entries = ring.entries
        dropped = 0
        while entries and (len(entries) > self.size or now - entries[0].time > self.ttl):
            entry = entries.popleft()
            ring.floor = max(ring.floor, entry.position)
            self._bytes -= len(entry.frame)
            dropped += 1
        self._messages -= dropped


def _after(entries: collections.deque[_Entry], position: Position) -> Iterator[_Entry]:
    """The entries after `position`: the newest ones, found from the end (a resuming client is usually close)."""
    count = 0
    for entry in reversed(entries):
        if entry.position <= position:
            break
        count += 1
    start = len(entries) - count
    for index in range(start, len(entries)):
        yield entries[index]
