"""Positions in a table channel's stream, as plain values: what a client has seen, and what is left to replay.

The change log is read in commit windows: a window holds the changes committed after snapshot `prev` and visible in
snapshot `cur`, sent in id order (postgres/changefeed.py). A `Cut` is a point in that stream: every change visible in
`prev`, and of the window (prev, cur) those with id up to `upto`. The position of an event is the cut just after
it. Snapshots are the database's (PostgreSQL `pg_snapshot`), so a position written by one node means the same on
every node reading the same change log, whatever windows those nodes read.
"""

from __future__ import annotations

import attrs

MAX_OID = 2**32
NO_LIMIT = 2**63 - 1
"""above every change id and transaction id (both are bigint-sized in the database)"""

NO_XIP: frozenset[int] = frozenset()
"""one empty set for every snapshot with no transaction in progress, the common case (216 bytes apiece otherwise,
for each resume's positions kept until its replay is done)"""

MAX_POSITION = 4096
"""characters of a position at most: a snapshot lists the transactions in progress, which a client must not use to
make the server parse megabytes"""


@attrs.frozen(slots=True)
class Snapshot:
    """A `pg_snapshot`: transactions below `xmin` are finished, from `xmax` on not yet started, and in between the
    ones in `xip` are in progress."""

    xmin: int
    xmax: int
    xip: frozenset[int] = NO_XIP

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Raises ValueError for text that is not `xmin:xmax:xip,...` with xmin <= xip < xmax."""
        xmin_text, xmax_text, xip_text = text.split(":")
        xmin, xmax = int(xmin_text), int(xmax_text)
        xip = frozenset(int(x) for x in xip_text.split(",")) if xip_text else NO_XIP
        if not 0 < xmin <= xmax < NO_LIMIT or any(not xmin <= x < xmax for x in xip):
            raise ValueError(f"not a snapshot: {text[:80]!r}")
        return cls(xmin, xmax, xip)

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def sees(self, xid: int) -> bool:
        """Whether transaction `xid` had committed (or aborted) when this snapshot was taken."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def includes(self, other: Snapshot) -> bool:
        """Whether every transaction `other` sees, this one sees too (it was taken at the same time or later)."""
        if other.xmax > self.xmax:
            return False
        # Below other.xmax, this snapshot must not hold in progress what `other` already saw finished.
        return all(x in other.xip for x in self.xip if x < other.xmax)


@attrs.frozen(slots=True)
class Cut:
    """Every change visible in `prev`, and of those visible in `cur` but not in `prev` the ones with id <= `upto`."""

    prev: Snapshot
    cur: Snapshot
    upto: int

    @classmethod
    def after_window(cls, cur: Snapshot) -> Cut:
        """The cut after a whole window read up to `cur`."""
        return cls(cur, cur, 0)

    def covers(self, xid: int, change_id: int) -> bool:
        """Whether the change `change_id`, written by transaction `xid`, is on this side of the cut."""
        return self.prev.sees(xid) or (self.cur.sees(xid) and change_id <= self.upto)

    def includes(self, other: Cut) -> bool:
        """Whether every change `other` covers, this cut covers too (a sufficient test: later whole windows, or the
        same window read further)."""
        if self.prev.includes(other.cur):
            return True
        return self.prev == other.prev and self.cur == other.cur and self.upto >= other.upto


@attrs.frozen(slots=True)
class TablePosition:
    """A position as a client holds it: the table (by oid, so that a position is never taken for another table's,
    nor for a table dropped and created again) and the cut after the event."""

    relid: int
    cut: Cut

    def text(self) -> str:
        cut = self.cut
        return f"t1~{self.relid}~{cut.prev.text()}~{cut.cur.text()}~{cut.upto}"

    @classmethod
    def parse(cls, text: object) -> TablePosition | None:
        """None for anything this server did not write (a client must treat positions as opaque)."""
        if not isinstance(text, str) or len(text) > MAX_POSITION:
            return None
        try:
            version, relid, prev, cur, upto = text.split("~")
            if version != "t1":
                return None
            position = cls(int(relid), Cut(Snapshot.parse(prev), Snapshot.parse(cur), int(upto)))
        except ValueError:
            return None
        cut = position.cut
        if not 0 < position.relid < MAX_OID or not 0 <= cut.upto < NO_LIMIT or not cut.cur.includes(cut.prev):
            return None
        # Only what this server writes: no signs, spaces, underscores, other digits, or xip out of order.
        return position if position.text() == text else None


ReplayWindow = tuple[Snapshot, Snapshot, int, int]
"""(prev, cur, after, until): the changes of the window (prev, cur) with ids in (after, until]"""


def replay_windows(since: Cut, until: Cut) -> list[ReplayWindow]:
    """The windows to read, in order, for what `until` covers beyond `since` (which it must include): the rest of
    the client's window, everything committed after it up to where `until`'s window starts, then `until`'s window
    as far as it goes. Each replayed change then has an exact position of its own (the cut just after it)."""
    if since.prev == until.prev and since.cur == until.cur:
        return [(since.prev, since.cur, since.upto, until.upto)] if until.upto > since.upto else []
    windows: list[ReplayWindow] = []
    if since.prev != since.cur:
        windows.append((since.prev, since.cur, since.upto, NO_LIMIT))
    if since.cur != until.prev:
        windows.append((since.cur, until.prev, 0, NO_LIMIT))
    if until.prev != until.cur and until.upto > 0:
        windows.append((until.prev, until.cur, 0, until.upto))
    return windows
