"""Subscribers for the publish benchmark: every `broadcast:` subscriber in one process.

Driven by ``bench/publish.py`` exactly as ``bench/changes_clients.py`` is driven by ``bench/changes.py`` (the same
plan file, ``ready`` event and ``start``/``collect``/``quit`` commands: this is that process with another hot path).
Each connection subscribes to one ``broadcast:`` channel; what it records per delivery is (sequence number,
connection index, kernel receive timestamp, time this process read it), the sequence number being the ``"s"`` of the
payload the publisher sent (``{"s": N}``, from ``realtime.send`` or ``POST /api/broadcast``).

A delivery must be ``{"type":"broadcast","channel":C,"payload":{"s":N},"id":...}`` with C the connection's own
channel and an ``id`` (every broadcast carries its history position): anything else, an error frame such as
``CHANGES_MISSED`` included, is counted as unexpected and a few are kept as samples. The driver knows each number's
channel and commit time, so it judges who should have received it and how late.
"""

from __future__ import annotations

import sys
from typing import Any

import subscribers


def broadcast_sequence(conn: subscribers.Conn, msg: Any) -> int | None:
    """The ``"s"`` of a broadcast on the connection's own channel that carries its history position (``id``); None
    for any other frame (KeyError, TypeError or ValueError when the frame lacks a field or the number)."""
    if msg["type"] == "broadcast" and msg["channel"] == conn.channel and msg["id"]:
        return int(msg["payload"]["s"])
    return None


if __name__ == "__main__":
    sys.exit(subscribers.main(__doc__, broadcast_sequence, "JSON list of {channel, token}, one per connection"))
