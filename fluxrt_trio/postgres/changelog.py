"""The change log's SQL: one page of a commit window read from realtime.changes, horizons recorded, old changes
pruned. These run on the asyncio side (each takes an asyncpg connection); changefeed.py decides when.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import asyncpg
import attrs

from ..protocol.changes import RowChange
from ..protocol.positions import NO_LIMIT, Snapshot, TablePosition
from ..protocol.rows import decode_image

log = logging.getLogger("fluxrt.changefeed")

PAGE = 5000
"""rows per read; a larger backlog is read in pages under the same pair of snapshots"""
PAGE_BYTES = 8 * 1024 * 1024
"""row images per read, in bytes of JSON text: a page stops at the row that reaches it, so that a backlog of large
rows is read a few at a time (a single row larger than this is still read, alone)"""

# The page's rows are cut where their running size (old and new image as text) reaches $5: a row is kept when the
# rows before it add up to less, so the first one always is. The one row of a page without changes has no images.
# {after} is the condition on ids past $3, which differs between a window's first page and the next (see below).
_WINDOW = """
WITH cur AS MATERIALIZED (SELECT coalesce($2::text::pg_snapshot, pg_current_snapshot()) AS s),
page AS (
SELECT cur.s::text AS snap,
       coalesce((SELECT horizon FROM realtime.pruned) > pg_snapshot_xmin($1::text::pg_snapshot), false) AS missed,
       c.id, c.created_at, c.relid, c.schema_name, c.table_name, c.op,
       c.old_record::text AS old_record, c.new_record::text AS new_record, c.xid::text::bigint AS xid
  FROM cur LEFT JOIN LATERAL (
    SELECT * FROM realtime.changes c
     WHERE c.xid >= pg_snapshot_xmax($1::text::pg_snapshot) AND c.xid < pg_snapshot_xmax(cur.s)
       AND pg_visible_in_snapshot(c.xid, cur.s) AND {after}
    UNION ALL
    SELECT * FROM realtime.changes c
     WHERE c.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot)))
       AND pg_visible_in_snapshot(c.xid, cur.s) AND {after}
  ) c ON true
 ORDER BY c.id
 LIMIT $4
), sized AS (
SELECT page.*, coalesce(octet_length(old_record), 0) + coalesce(octet_length(new_record), 0) AS size
  FROM page
), running AS (
SELECT sized.*, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto FROM sized
)
SELECT snap, missed, id, created_at, relid, schema_name, table_name, op, old_record, new_record, xid, upto
  FROM running
 WHERE upto - size < $5
 ORDER BY id
"""
# A window's first page ($3 = 0) holds every row of the window, and the xid index alone finds them. Written as
# `c.id > $3` the condition let the planner, when the table's statistics were older than its growth, intersect the
# xid range with a bitmap of the whole primary key: 7.5 ms of the backend's CPU per read of 30 rows at 310,000 rows
# in the log against 0.1 ms this way (bench/RESULTS.md, "Table changes"); `c.id + 0` is not indexable.
_FIRST_PAGE = _WINDOW.format(after="c.id + 0 > $3")
_NEXT_PAGE = _WINDOW.format(after="c.id > $3")

# One table's changes of one window ($2, $3) with ids in ($4, $5], a page at a time: a replay reads the windows
# between a client's position and where live delivery takes over (tables.py). `missed`: changes committed after $2
# may have been pruned.
_REPLAY = """
WITH page AS (
SELECT c.id, c.created_at, c.relid, c.schema_name, c.table_name, c.op,
       c.old_record::text AS old_record, c.new_record::text AS new_record, c.xid::text::bigint AS xid
  FROM (
    SELECT * FROM realtime.changes c
     WHERE c.xid >= pg_snapshot_xmax($2::text::pg_snapshot) AND c.xid < pg_snapshot_xmax($3::text::pg_snapshot)
       AND pg_visible_in_snapshot(c.xid, $3::text::pg_snapshot)
    UNION ALL
    SELECT * FROM realtime.changes c
     WHERE c.xid = ANY (ARRAY(SELECT pg_snapshot_xip($2::text::pg_snapshot)))
       AND pg_visible_in_snapshot(c.xid, $3::text::pg_snapshot)
  ) c
 WHERE c.relid = $1 AND c.id > $4 AND c.id <= $5
 ORDER BY c.id
 LIMIT $6
), running AS (
SELECT page.*,
       coalesce(octet_length(old_record), 0) + coalesce(octet_length(new_record), 0) AS size,
       sum(coalesce(octet_length(old_record), 0) + coalesce(octet_length(new_record), 0))
           OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto
  FROM page
)
SELECT coalesce((SELECT horizon FROM realtime.pruned) > pg_snapshot_xmin($2::text::pg_snapshot), false) AS missed,
       r.id, r.created_at, r.relid, r.schema_name, r.table_name, r.op, r.old_record, r.new_record, r.xid, r.upto
  FROM (SELECT 1) one LEFT JOIN running r ON r.upto - r.size < $7
 ORDER BY r.id
"""

PRUNE = """
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
PRUNE_BATCH = 10000
"""changes deleted by one pruning statement"""


@attrs.frozen(slots=True)
class Page:
    """One read of the change log."""

    snapshot: str
    """the snapshot the read ran under: the `cur` of the next page, the `prev` of the next window"""
    missed: bool
    """changes committed after `prev` were pruned before this node read them"""
    changes: list[RowChange]
    full: bool = False
    """the page stopped at PAGE rows or PAGE_BYTES: there may be more under the same snapshots"""


async def current_snapshot(conn: asyncpg.Connection) -> str:
    snapshot: str = await conn.fetchval("SELECT pg_current_snapshot()::text")
    return snapshot


async def read_page(
    conn: asyncpg.Connection, prev: str, cur: str | None, after: int, max_bytes: int = PAGE_BYTES
) -> Page:
    """The changes committed after snapshot `prev` and visible in `cur` (a new snapshot when None), with ids above
    `after`, in id order: at most PAGE of them, and no more once their images reach `max_bytes`."""
    rows = await conn.fetch(_NEXT_PAGE if after else _FIRST_PAGE, prev, cur, after, PAGE, max_bytes)
    first, last = rows[0], rows[-1]
    snapshot = first[0]
    changes = [_change(tuple(r)[2:11], prev, snapshot) for r in rows if r[2] is not None]
    return Page(snapshot, bool(first[1]), changes, len(changes) >= PAGE or last[11] >= max_bytes)


@attrs.frozen(slots=True)
class ReplayPage:
    changes: list[RowChange]
    missed: bool
    """changes committed after the window's `prev` were pruned: the replay would not be all that was missed"""
    full: bool
    """the page stopped at PAGE rows or PAGE_BYTES: there may be more in the window"""
    size: int = 0
    """bytes of row images in the page (JSON text)"""


async def read_replay_page(
    conn: asyncpg.Connection,
    relid: int,
    prev: Snapshot,
    cur: Snapshot,
    after: int,
    until: int = NO_LIMIT,
    max_bytes: int = PAGE_BYTES,
) -> ReplayPage:
    """Table `relid`'s changes of the window (`prev`, `cur`) with ids in (`after`, `until`], in id order, as the
    changefeed would have read them: at most PAGE, and no more once their images reach `max_bytes`. Each carries
    its position in that window, so a client that resumes from a replayed event continues exactly after it."""
    prev_text, cur_text = prev.text(), cur.text()
    rows = await conn.fetch(_REPLAY, relid, prev_text, cur_text, after, until, PAGE, max_bytes)
    changes = [_change(tuple(r)[1:10], prev_text, cur_text) for r in rows if r[1] is not None]
    last = rows[-1][10] or 0
    return ReplayPage(changes, bool(rows[0][0]), len(changes) >= PAGE or last >= max_bytes, last)


_RETAINED = """
SELECT (SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2) AS relid,
       (SELECT horizon FROM realtime.pruned)::text::bigint AS horizon,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax
"""


@attrs.frozen(slots=True)
class Retained:
    """What decides whether a table's position can be resumed from: the table's oid now (None: no such table) and
    the pruning horizon (None: nothing pruned yet)."""

    relid: int | None
    horizon: int | None
    xmax: int
    """the first transaction id not yet started when this was asked"""

    def ahead(self, position: TablePosition) -> bool:
        """Whether `position` names transactions that had not started when this was asked."""
        return position.cut.cur.xmax > self.xmax

    def keeps(self, position: TablePosition) -> bool:
        """Whether `position` is this table's (not another's, nor a dropped one's of the same name), not from the
        future (a forged one would hold its client out of live delivery), and everything committed after it is
        still in the change log."""
        if position.relid != self.relid or self.ahead(position):
            return False
        return self.horizon is None or self.horizon <= position.cut.prev.xmin


async def retained(conn: asyncpg.Connection, schema: str, table: str) -> Retained:
    row = await conn.fetchrow(_RETAINED, schema, table)
    assert row is not None  # a SELECT of two scalar subqueries has one row
    return Retained(row["relid"], row["horizon"], row["xmax"])


async def record_horizon(conn: asyncpg.Connection) -> None:
    """Remember the current snapshot: once it is `retention` old, what committed before it may be pruned."""
    await conn.execute("INSERT INTO realtime.horizons (snap) VALUES (pg_current_snapshot())")


async def sweep_lifecycle(conn: asyncpg.Connection) -> int:
    """Log a DROP or RENAME row for each enabled table dropped or renamed since the last sweep (the event triggers
    of migration 0007 do it at once when a superuser installed them); return how many."""
    logged: int = await conn.fetchval("SELECT realtime.sweep_lifecycle()")
    return logged


async def prune_batch(conn: asyncpg.Connection, retention: datetime.timedelta) -> int:
    """Delete up to PRUNE_BATCH changes older than the newest horizon at least `retention` old; return how many."""
    deleted: int = await conn.fetchval(PRUNE, retention, PRUNE_BATCH)
    return deleted


def _change(row: tuple[Any, ...], prev: str, cur: str) -> RowChange:
    change_id, created_at, relid, schema, table, op, old, new, xid = row
    position = f"t1~{relid}~{prev}~{cur}~{change_id}"
    try:
        return RowChange(
            change_id, created_at, relid, schema, table, op, decode_image(old), decode_image(new), xid, position
        )
    except (ValueError, RecursionError) as exc:
        # One row that cannot be decoded must not stop the feed for everyone.
        log.error("undecodable change", extra={"ctx_id": change_id, "ctx_error": repr(exc)[:200]})
        return RowChange(change_id, created_at, relid, schema, table, "UNREADABLE", None, None, xid, position)
