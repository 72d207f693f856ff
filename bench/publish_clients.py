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

import argparse
import os
import sys
import time

import orjson
from changes_clients import Conn, Subscribers
from common import emit, raise_nofile_limit
from wsraw import ANC_BUFSIZE, OP_TEXT, BenchError, kernel_stamp

RECV_SIZE = 262144


class BroadcastSubscribers(Subscribers):
    """`changes_clients.Subscribers` recording broadcasts `{"s": N}` instead of table INSERTs."""

    def _read(self, conn: Conn) -> None:
        assert conn.sock is not None
        try:
            data, ancdata, _flags, _addr = conn.sock.recvmsg(RECV_SIZE, ANC_BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(conn, f"recv failed: {exc}")
            return
        read_ns = time.time_ns()
        self.reads += 1
        if not data:
            self._lost(conn, "server closed the connection")
            return
        stamp = kernel_stamp(ancdata) or read_ns
        buf = conn.buf
        buf += data
        pos = 0
        size = len(buf)
        loads = orjson.loads
        extend = self.records.extend
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            payload = bytes(buf[start:end])
            pos = end
            if b0 & 0x0F != OP_TEXT or not b0 & 0x80:
                if not self._control(conn, b0, payload):
                    return
                continue
            # The hot path: one broadcast on this connection's channel, with its id, carrying a sequence number.
            try:
                msg = loads(payload)
                if msg["type"] == "broadcast" and msg["channel"] == conn.channel and msg["id"]:
                    extend((int(msg["payload"]["s"]), conn.index, stamp, read_ns))
                    continue
            except (KeyError, TypeError, ValueError):
                pass
            self._unexpected(conn, payload)
        if pos:
            del buf[:pos]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--plan", required=True, help="JSON list of {channel, token}, one per connection")
    parser.add_argument("--timeout", type=float, default=60.0, help="connect phase timeout (s)")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with open(args.plan, "rb") as f:
        plan = orjson.loads(f.read())
    # Subscribers reads a record field name per connection (changes' plans); a broadcast's is always "s".
    subs = BroadcastSubscribers(args, [{**p, "key": "s"} for p in plan])
    try:
        connect_s = subs.connect_all()
        emit("ready", connections=len(plan), connect_s=connect_s)
        subs.run()
    except (BenchError, OSError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        subs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
