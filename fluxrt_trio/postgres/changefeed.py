"""Reading realtime.changes in commit windows, so that no change is lost, repeated or reordered.

Each read takes every row whose transaction committed after the previous read's snapshot (`prev`) and is visible
in the snapshot the read itself runs under (`cur`), ordered by id; `cur` becomes the next `prev`. "Committed after
prev" is "xid >= xmax(prev), or xid in xip(prev)"; the explicit visibility test against `cur` keeps a READ
COMMITTED read exact and makes paging a large backlog safe (docs/architecture.md, Change capture, has the measurements
and the broken variants). `prev` lives in this process, so a lost connection resumes where it stopped.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import trio

from ..protocol.changes import Window
from ..protocol.positions import Snapshot
from . import changelog
from .bridge import DatabaseUnavailable, close_connection, connect, describe, on_connection

log = logging.getLogger("fluxrt.changefeed")

BACKOFF_START = 0.1
"""seconds before the first reconnect; doubles up to 5 s, back to this after every read that worked"""
BUSY_SHARE = 0.1
"""after a read that found changes, the next comes this share of the poll interval later (1 ms of the default
10 ms), and each read that finds nothing doubles the wait back up to the poll interval: while changes flow, a
change waits for the next read about a tenth as long, and an idle database is read as often as before. While
delivery is still busy with earlier windows, an early read would only queue behind them: the next read then comes
when delivery is done (`Changefeed.delivered`) or after the poll interval. docs/architecture.md ("Reads come sooner
while changes flow") has the measurements."""


class Changefeed:
    """Reads windows forever and sends them on `out`; reconnects with backoff, losing nothing.

    `state` is "connecting", "ok" (the last read worked) or "degraded" (the database is away, or reads fail);
    see /health.
    """

    def __init__(
        self,
        dsn: str,
        out: trio.MemorySendChannel[Window],
        *,
        poll_interval: float,
        retention: float,
        listen: bool = True,
    ) -> None:
        self._dsn = dsn
        self._out = out
        self._poll_interval = poll_interval
        self._retention = retention
        self._listen = listen
        self.delivering: Callable[[], bool] = lambda: False
        """whether the delivery of windows already sent is still going on (set by whoever delivers them)"""
        self._flowing = False
        """the last read found changes"""
        self._prev: str | None = None
        self._in_gap = False
        """the last read found changes pruned before this node read them (reported once until a read does not)"""
        self._backoff = BACKOFF_START
        self._report: trio.TaskStatus[None] | None = None
        self._cur: str | None = None
        self._after = 0
        self._cur_taken_at = 0.0
        self._wake = trio.Event()
        self._ok = trio.Event()
        """set while the state is "ok"; replaced by a fresh one when the database goes away"""
        self.state = "connecting"
        self.last_error: str | None = None
        self.windows = 0
        self.changes = 0
        self.progress_wanted = False
        """set to have the next read that finds nothing report how far it read (an empty Window)"""
        self.caught_up_at: float | None = None
        """trio.current_time() just before the snapshot of the last read that reached the end: every change
        committed before then has been read"""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Reports started after the first attempt to connect, whether or not it succeeded:
        the changefeed keeps trying, with backoff reset by every read that worked."""
        self._report = task_status
        while True:
            try:
                conn = await connect(self._dsn)
            except DatabaseUnavailable as exc:
                self._degraded(str(exc))
            else:
                try:
                    await self._session(conn)
                except DatabaseUnavailable as exc:
                    self._degraded(str(exc))
                except asyncpg.PostgresError as exc:
                    # Not a lost connection: the SQL failed (a broken migration, a revoked privilege). Keep trying,
                    # loudly; the position is kept, so nothing is lost once it is fixed.
                    log.error("reading changes failed", extra={"ctx_error": describe(exc)})
                    self._degraded(describe(exc))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await close_connection(conn)
            self._started()
            await trio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)

    def _started(self) -> None:
        report, self._report = self._report, None
        if report is not None:
            report.started()

    def _healthy(self) -> None:
        # Only a read that worked counts: a server that accepts connections but fails every read (out of memory,
        # a missing table) must not reset the backoff, or the feed would reconnect ten times a second.
        log.info("changefeed connected")
        self.state = "ok"
        self._ok.set()
        self.last_error = None
        self._backoff = BACKOFF_START

    def _degraded(self, reason: str) -> None:
        if self.state != "degraded":
            log.warning("database unreachable; changes will be read when it is back", extra={"ctx_error": reason})
        if self._ok.is_set():
            self._ok = trio.Event()
        self.state = "degraded"
        self.last_error = reason

    async def _session(self, conn: Any) -> None:
        if self._listen:

            def wake(*_: Any) -> None:
                self._wake.set()

            await on_connection(conn, lambda c: c.add_listener(changelog.NOTIFY_CHANNEL, wake))
        if self._prev is None:
            self._prev = await on_connection(conn, changelog.current_snapshot)
            # Where this node's stream starts: what committed before it is for replays only.
            start = Snapshot.parse(self._prev)
            await self._out.send(Window([], prev=start, cur=start))
        self._started()
        wait = self._poll_interval
        while True:
            # A read while earlier windows are still being delivered only queues its window behind them: then the
            # next read waits for `delivered` (or the poll interval) instead of coming soon.
            behind = self.delivering()
            found = self._flowing = await self._read(conn)
            if self._wake.is_set():
                self._wake = trio.Event()
                continue
            wait = next_wait(wait, found=found, behind=behind, poll_interval=self._poll_interval)
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _read(self, conn: Any) -> bool:
        """Send every change committed since the previous read, a page at a time under one pair of snapshots;
        return whether there were any.

        `_cur` and `_after` survive a lost connection, so a read interrupted between pages resumes after the last
        page sent instead of sending it again.
        """
        prev = self._prev
        assert prev is not None
        found = False
        while True:
            if self._cur is None:
                # This read's snapshot is taken after this instant; a read resumed after a lost connection keeps
                # the snapshot, and the instant, of its first page.
                self._cur_taken_at = trio.current_time()
            page = await on_connection(
                conn, functools.partial(changelog.read_page, prev=prev, cur=self._cur, after=self._after)
            )
            if self.state != "ok":
                self._healthy()
            if page.missed and not self._in_gap:
                # Rows this node had not read yet were pruned: however long it was away (or stalled), say so,
                # once for this gap. The read after it may find the same loss again (its `prev` was taken before
                # the pruning committed): still the same gap.
                log.error("changes were pruned before this node could read them; subscribers are told to refetch")
                await self._out.send(Window([], missed=True))
            self._in_gap = page.missed
            self._cur = page.snapshot
            if page.changes:
                found = True
                self.windows += 1
                self.changes += len(page.changes)
                window = Window(
                    page.changes, prev=Snapshot.parse(prev), cur=Snapshot.parse(page.snapshot), complete=not page.full
                )
                await self._out.send(window)
                self._after = page.changes[-1].id
            elif self.progress_wanted:
                # Nothing new, but a replay waits for the stream to pass a position: say how far it got.
                self.progress_wanted = False
                snapshot = Snapshot.parse(page.snapshot)
                await self._out.send(Window([], prev=snapshot, cur=snapshot))
            if not page.full:
                break
        self._prev, self._cur, self._after = self._cur, None, 0
        self.caught_up_at = self._cur_taken_at
        return found

    def delivered(self) -> None:
        """Every window sent has been delivered: read again now if the last read found changes, since more may have
        committed meanwhile."""
        if self._flowing:
            self._wake.set()

    def want_progress(self) -> None:
        """Have the next read that finds nothing new say how far it read (an empty Window): a replay waits for it."""
        self.progress_wanted = True
        self._wake.set()

    async def wait_ok(self) -> None:
        """Return once the changefeed is connected and reading (at once if it is now)."""
        await self._ok.wait()

    def lag(self) -> float | None:
        """Seconds since the changefeed last read everything committed: an upper bound on the age of the oldest
        change not yet read (about one poll interval while all is well). None before the first read."""
        return None if self.caught_up_at is None else trio.current_time() - self.caught_up_at

    async def prune(self) -> int:
        """Record a horizon, delete what fell out of retention, then log tables dropped or renamed meanwhile
        (changelog.sweep_lifecycle: the fallback when the event triggers are missing); return the rows deleted.
        Uses its own connection. Raises what the database raised; when only the sweep fails (a database not yet
        migrated to 0007, say), the rows were deleted all the same."""
        conn = await connect(self._dsn)
        try:
            deleted = 0
            interval = datetime.timedelta(seconds=self._retention)
            await on_connection(conn, changelog.record_horizon)
            while True:
                n = await on_connection(conn, lambda c: changelog.prune_batch(c, interval))
                deleted += n
                if n < changelog.PRUNE_BATCH:
                    break
            # After the deleting, so that a sweep that fails never lets the change log grow.
            await on_connection(conn, changelog.sweep_lifecycle)
            return deleted
        finally:
            with trio.CancelScope(shield=True):
                await close_connection(conn)

    async def prune_forever(self) -> None:
        """Prune every tenth of the retention (at least every minute); errors are logged and retried."""
        period = min(max(self._retention / 10, 0.05), 60.0)
        while True:
            await trio.sleep(period)
            try:
                deleted = await self.prune()
            except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
                log.warning("pruning failed; will retry", extra={"ctx_error": describe(exc)})
            else:
                if deleted:
                    log.debug("pruned", extra={"ctx_rows": deleted})


def next_wait(wait: float, *, found: bool, behind: bool, poll_interval: float) -> float:
    """Seconds from a read to the next, given the wait before it: after a read that found changes, BUSY_SHARE of
    `poll_interval`, or all of it when the delivery was `behind` (still busy with earlier windows as the read
    began; `Changefeed.delivered` cuts that wait short); else twice `wait`, never more than `poll_interval`."""
    if found:
        return poll_interval if behind else poll_interval * BUSY_SHARE
    return min(wait * 2, poll_interval)
