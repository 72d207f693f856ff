"""Row changes as the changefeed reads them from the change log, and the commit windows they arrive in."""

from __future__ import annotations

import datetime
from typing import Any

import attrs


@attrs.frozen(slots=True)
class RowChange:
    """One row of `realtime.changes`: what a write did to one row (or to a whole table, for TRUNCATE)."""

    id: int
    created_at: datetime.datetime
    relid: int
    """the table's oid (a partitioned table's root), by which it is authorized"""
    schema: str
    table: str
    op: str
    """INSERT, UPDATE, DELETE, TRUNCATE, DISABLE (realtime was disabled on the table), or UNREADABLE (the row
    images could not be decoded; subscribers are told to refetch)"""
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    @property
    def channel(self) -> str:
        """The `table:` channel its subscribers are on."""
        return f"table:{self.schema}.{self.table}"

    @property
    def image(self) -> dict[str, Any] | None:
        """The row image that decides who sees the change: the old row for DELETE, else the new one."""
        return self.old if self.op == "DELETE" else self.new


@attrs.frozen(slots=True)
class Window:
    """The changes committed between two reads, in id order. `missed`: changes were pruned before being read."""

    changes: list[RowChange]
    missed: bool = False
