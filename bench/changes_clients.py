"""Subscribers for the database-changes benchmark: every table subscriber in one process.

Driven by ``bench/changes.py`` over stdin/stdout (one JSON object per line):

1. reads the connection plan (``--plan FILE``: per connection a channel, a token, the record field carrying the
   sequence number), opens every connection (WebSocket upgrade by hand on non-blocking sockets, ``?token=``),
   subscribes each to its one ``table:`` channel, waits for every ack, then prints ``{"event": "ready", ...}``;
2. from then on records every change it receives as (sequence number, connection index, kernel receive timestamp,
   time this process read it), and obeys commands on stdin:

   - ``{"cmd": "start"}``: start counting this process's CPU time (one benchmark phase begins);
   - ``{"cmd": "collect", "expected": N, "grace": G, "timeout": T, "path": P}``: once N changes have arrived in
     total since the previous collect (or T seconds have passed), keep reading G seconds more so that extra copies
     (duplicates, rows leaking past row-level security) are seen too, write the records to P as native int64
     quadruples, print ``{"event": "collected", ...}`` and start a new record;
   - ``{"cmd": "quit"}``.

The change is matched by its sequence number, which the writers put in the row (``todos.title``,
``events.body``); the driver knows each number's commit time and who should receive it, so all judging happens
there. Anything other than a matching INSERT broadcast (an error such as CHANGES_MISSED, a frame on the wrong
channel) is counted as unexpected and a few are kept as samples.

Receive times are the kernel's (``SO_TIMESTAMPNS``, the same CLOCK_REALTIME as the writers' ``time.time_ns()``),
so this process being momentarily busy does not add to the latency; the read time is kept too, to show how far
behind it was. A read holding several segments carries the newest segment's timestamp, which can only overstate a
latency.
"""

from __future__ import annotations

import sys
from typing import Any

import subscribers


def insert_sequence(conn: subscribers.Conn, msg: Any) -> int | None:
    """The sequence number of an INSERT broadcast on the connection's own channel: the row's `conn.key` field;
    None for any other frame (KeyError, TypeError or ValueError when the frame lacks a field or the number)."""
    if msg["type"] == "broadcast" and msg["channel"] == conn.channel:
        change = msg["payload"]
        if change["type"] == "INSERT":
            return int(change["record"][conn.key])
    return None


if __name__ == "__main__":
    sys.exit(subscribers.main(__doc__, insert_sequence, "JSON list of {channel, token, key}, one per connection"))
