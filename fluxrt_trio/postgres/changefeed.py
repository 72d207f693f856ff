"""Reading realtime.changes in commit windows, so that no change is lost, repeated or reordered.

Each read takes every row whose transaction committed after the previous read's snapshot (`prev`) and is visible
in the snapshot the read itself runs under (`cur`), ordered by id; `cur` becomes the next `prev`. "Committed after
prev" is "xid >= xmax(prev), or xid in xip(prev)"; the explicit visibility test against `cur` keeps a READ
COMMITTED read exact and makes paging a large backlog safe (ARCHITECTURE.md, Change capture, has the measurements
and the broken variants). `prev` lives in this process, so a lost connection resumes where it stopped.
"""

from __future__ import annotations

import datetime
import functools
import logging
from typing import Any

import asyncpg
import trio

from ..protocol.changes import RowChange, Window
from ..protocol.rows import decode_image
from .bridge import DatabaseUnavailable, close_connection, connect, describe, on_connection

log = logging.getLogger("fluxrt.changefeed")

PAGE = 5000
"""rows per read; a larger backlog is read in pages under the same pair of snapshots"""

_WINDOW = """
WITH cur AS MATERIALIZED (SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS s)
SELECT cur.s::text AS snap,
       coalesce((SELECT horizon FROM realtime.pruned) > pg_snapshot_xmin($1::text::pg_snapshot), false) AS missed,
       c.id, c.created_at, c.relid, c.schema_name, c.table_name, c.op,
       c.old_record::text AS old_record, c.new_record::text AS new_record
  FROM cur LEFT JOIN LATERAL (
    SELECT * FROM realtime.changes c
     WHERE c.xid >= pg_snapshot_xmax($1::text::pg_snapshot) AND c.xid < pg_snapshot_xmax(cur.s)
       AND pg_visible_in_snapshot(c.xid, cur.s) AND c.id > $3
    UNION ALL
    SELECT * FROM realtime.changes c
     WHERE c.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot)))
       AND pg_visible_in_snapshot(c.xid, cur.s) AND c.id > $3
  ) c ON true
 ORDER BY c.id
 LIMIT $4
"""

_PRUNE = """
WITH h AS (
    SELECT taken_at, snap FROM realtime.horizons WHERE taken_at <= clock_timestamp() - $1::interval
     ORDER BY taken_at DESC LIMIT 1
), gone AS (
    DELETE FROM realtime.changes WHERE id IN (
        SELECT id FROM realtime.changes, h WHERE xid < pg_snapshot_xmin(h.snap) ORDER BY id LIMIT $2)
    RETURNING 1
), mark AS (
    INSERT INTO realtime.pruned (horizon) SELECT pg_snapshot_xmin(snap) FROM h
    ON CONFLICT (only_row) DO UPDATE SET horizon = greatest(realtime.pruned.horizon, EXCLUDED.horizon)
    RETURNING 1
), old AS (
    DELETE FROM realtime.horizons WHERE taken_at < (SELECT taken_at FROM h) RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM mark), (SELECT count(*) FROM old)
"""

NOTIFY_CHANNEL = "fluxrt_changes"
BACKOFF_START = 0.1
"""seconds before the first reconnect; doubles up to 5 s, back to this after every good connection"""


class Changefeed:
    """Reads windows forever and sends them on `out`; reconnects with backoff, losing nothing.

    `state` is "connecting", "ok" or "degraded" (the database is away); see /health.
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
        self._prev: str | None = None
        self._gap_reported: str | None = None
        self._backoff = BACKOFF_START
        self._report: trio.TaskStatus[None] | None = None
        self._cur: str | None = None
        self._after = 0
        self._cur_taken_at = 0.0
        self._wake = trio.Event()
        self.state = "connecting"
        self.last_error: str | None = None
        self.windows = 0
        self.changes = 0
        self.caught_up_at: float | None = None
        """trio.current_time() just before the snapshot of the last read that reached the end: every change
        committed before then has been read"""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Reports started after the first attempt to connect, whether or not it succeeded:
        the changefeed keeps trying, with backoff reset by every good connection."""
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

    def _degraded(self, reason: str) -> None:
        if self.state != "degraded":
            log.warning("database unreachable; changes will be read when it is back", extra={"ctx_error": reason})
        self.state = "degraded"
        self.last_error = reason

    async def _session(self, conn: Any) -> None:
        if self._listen:

            def wake(*_: Any) -> None:
                self._wake.set()

            await on_connection(conn, lambda c: c.add_listener(NOTIFY_CHANNEL, wake))
        if self._prev is None:
            self._prev = await on_connection(conn, lambda c: c.fetchval("SELECT pg_current_snapshot()::text"))
        if self.state != "ok":
            log.info("changefeed connected")
        self.state = "ok"
        self.last_error = None
        self._backoff = BACKOFF_START
        self._started()
        while True:
            await self._read(conn)
            if self._wake.is_set():
                self._wake = trio.Event()
                continue
            with trio.move_on_after(self._poll_interval):
                await self._wake.wait()

    async def _read(self, conn: Any) -> None:
        """Send every change committed since the previous read, a page at a time under one pair of snapshots.

        `_cur` and `_after` survive a lost connection, so a read interrupted between pages resumes after the last
        page sent instead of sending it again.
        """
        while True:
            if self._cur is None:
                # This read's snapshot is taken after this instant; a read resumed after a lost connection keeps
                # the snapshot, and the instant, of its first page.
                self._cur_taken_at = trio.current_time()
            rows = await on_connection(
                conn, functools.partial(_fetch_window, prev=self._prev, cur=self._cur, after=self._after)
            )
            if rows[0][1] and self._gap_reported != self._prev:
                # Rows this node had not read yet were pruned: however long it was away (or stalled), say so,
                # once for this gap.
                self._gap_reported = self._prev
                log.error("changes were pruned before this node could read them; subscribers are told to refetch")
                await self._out.send(Window([], missed=True))
            self._cur = rows[0][0]
            page = [_change(r) for r in rows if r[2] is not None]
            if page:
                self.windows += 1
                self.changes += len(page)
                await self._out.send(Window(page))
                self._after = page[-1].id
            if len(page) < PAGE:
                break
        self._prev, self._cur, self._after = self._cur, None, 0
        self.caught_up_at = self._cur_taken_at

    def lag(self) -> float | None:
        """Seconds since the changefeed last read everything committed: an upper bound on the age of the oldest
        change not yet read (about one poll interval while all is well). None before the first read."""
        return None if self.caught_up_at is None else trio.current_time() - self.caught_up_at

    async def prune(self) -> int:
        """Record a horizon, delete what fell out of retention, return the rows deleted. Uses its own connection."""
        conn = await connect(self._dsn)
        try:
            deleted = 0
            interval = datetime.timedelta(seconds=self._retention)
            await on_connection(
                conn, lambda c: c.execute("INSERT INTO realtime.horizons (snap) VALUES (pg_current_snapshot())")
            )
            while True:
                n: int = await on_connection(conn, lambda c: c.fetchval(_PRUNE, interval, 10000))
                deleted += n
                if n < 10000:
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


def _change(row: tuple[Any, ...]) -> RowChange:
    _, _, change_id, created_at, relid, schema, table, op, old, new = row
    try:
        return RowChange(change_id, created_at, relid, schema, table, op, decode_image(old), decode_image(new))
    except (ValueError, RecursionError) as exc:
        # One row that cannot be decoded must not stop the feed for everyone.
        log.error("undecodable change", extra={"ctx_id": change_id, "ctx_error": repr(exc)[:200]})
        return RowChange(change_id, created_at, relid, schema, table, "UNREADABLE", None, None)


async def _fetch_window(
    conn: asyncpg.Connection, prev: str | None, cur: str | None, after: int
) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(_WINDOW, prev, cur, after, PAGE)
    return [tuple(r) for r in rows]
