"""Row changes as the changefeed reads them from the change log, and the commit windows they arrive in."""

from __future__ import annotations

import datetime
from typing import Any

import attrs

from .channels import ChannelError, ChannelKind, parse_channel
from .positions import Cut, Snapshot

SEND = "SEND"
"""the op of a change-log row written by `realtime.send(channel, payload)`"""


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
    """INSERT, UPDATE, DELETE, TRUNCATE (`new` is {"partition": "schema.name"} when one partition was truncated),
    DISABLE (realtime was disabled on the table; `new` is {"partition_of": "schema.name"}, its root, when it became
    a partition), DROP (the table was dropped), RENAME (it was renamed: `new` is {"schema", "table"}, the new name;
    `schema` and `table` are the old one), UNREADABLE (the row images could not be decoded; subscribers are told to
    refetch), or SEND (a `realtime.send`: not a row change, see `logged_broadcast`)"""
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    xid: int = 0
    """the writing transaction (for `positions.Cut.covers`)"""
    position: str = ""
    """where the change sits in its table's stream, sent to clients as `payload.id` (positions.TablePosition)"""

    @property
    def channel(self) -> str:
        """The `table:` channel its subscribers are on."""
        return f"table:{self.schema}.{self.table}"

    @property
    def image(self) -> dict[str, Any] | None:
        """The row image that decides who sees the change: the old row for DELETE, else the new one."""
        return self.old if self.op == "DELETE" else self.new


class LoggedBroadcastError(ValueError):
    """A SEND row of the change log that is not a broadcast; the message says what is wrong with it."""


def logged_broadcast(change: RowChange) -> tuple[str, Any]:
    """The channel and payload of a SEND row (`realtime.send`), which must name a `broadcast:` channel.

    Raises LoggedBroadcastError for a row that `realtime.send` would not have written (one inserted into the log
    by other means, or an undecodable one)."""
    image = change.new
    if change.op != SEND or not isinstance(image, dict) or "payload" not in image:
        raise LoggedBroadcastError(f"change {change.id} is not a realtime.send row ({change.op})")
    try:
        channel = parse_channel(image.get("channel"))
    except ChannelError as exc:
        raise LoggedBroadcastError(f"change {change.id}: {exc}") from None
    if channel.kind is not ChannelKind.BROADCAST:
        raise LoggedBroadcastError(f"change {change.id}: {channel.name!r} is not a broadcast: channel")
    return channel.name, image["payload"]


@attrs.frozen(slots=True)
class Window:
    """The changes committed between two reads, in id order. `missed`: changes were pruned before being read.

    A window read in several pages comes as several Windows with the same `prev` and `cur`, all but the last with
    `complete` False. A Window without changes may still say how far the reads got (a progress report)."""

    changes: list[RowChange]
    missed: bool = False
    prev: Snapshot | None = None
    cur: Snapshot | None = None
    complete: bool = True

    def cut(self) -> Cut | None:
        """Where the stream stands once this window is delivered: None when it does not say."""
        if self.cur is None or self.prev is None:
            return None
        if self.complete:
            return Cut.after_window(self.cur)
        return Cut(self.prev, self.cur, self.changes[-1].id if self.changes else 0)
