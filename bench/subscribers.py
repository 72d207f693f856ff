"""The subscriber process of the database-changes, row-level security and publish benchmarks: every subscriber in
one process, recording each delivery's sequence number.

``bench/changes_clients.py`` (table INSERTs) and ``bench/publish_clients.py`` (broadcasts) are this process with
their own `Match`, the one thing that differs: which text frame is a delivery and where its sequence number is. The
plan file, the ``ready`` event, the ``start``/``collect``/``quit`` commands and the records written (native int64
quadruples: sequence number, connection index, kernel receive timestamp, time this process read it) are described
in changes_clients.py; any text frame the match does not accept is counted as unexpected, a few kept as samples.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any

import orjson
from common import emit, raise_nofile_limit
from wsraw import (
    ANC_BUFSIZE,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    BenchError,
    finish_handshake,
    kernel_stamp,
    masked_frame,
    open_socket,
    parse_frame,
    send_small,
    start_handshake,
)

RECV_SIZE = 262144
SAMPLES = 5

CONNECTING, HANDSHAKING, SUBSCRIBING, LIVE = range(4)

Match = Callable[["Conn", Any], int | None]
"""A delivery's sequence number from a connection and its decoded text frame; None (or KeyError, TypeError,
ValueError) when the frame is not a delivery for that connection, which then counts as unexpected."""


class Conn:
    """One subscriber connection; `key` is the plan's record field carrying the sequence number ("" without one)."""

    __slots__ = ("accept", "buf", "channel", "fd", "index", "key", "sock", "state", "token")

    def __init__(self, index: int, channel: str, token: str, key: str) -> None:
        self.index = index
        self.channel = channel
        self.token = token
        self.key = key
        self.state = CONNECTING
        self.buf = bytearray()
        self.accept = b""
        self.sock: socket.socket | None = None
        self.fd = -1


class Subscribers:
    """Every connection of the plan on one epoll; `match` reads a text frame's sequence number (see `Match`)."""

    def __init__(self, args: argparse.Namespace, plan: list[dict[str, Any]], match: Match) -> None:
        self.match = match
        self.host: str = args.host
        self.port: int = args.port
        self.path: str = args.path
        self.timeout: float = args.timeout
        self.concurrency: int = args.connect_concurrency
        self.conns = [Conn(i, p["channel"], p["token"], p.get("key", "")) for i, p in enumerate(plan)]
        self.by_fd: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.records = array("q")
        self.unexpected: dict[str, int] = {}
        self.samples: list[str] = []
        self.closed: list[str] = []
        self.reads = 0
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()
        self.stdin_buf = b""
        self.collecting: dict[str, Any] | None = None

    # -- connecting ---------------------------------------------------------------------------------------------

    def _open(self, conn: Conn) -> None:
        sock = open_socket(self.host, self.port)
        conn.sock = sock
        conn.fd = sock.fileno()
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLOUT)

    def _send_small(self, conn: Conn, data: bytes) -> None:
        assert conn.sock is not None
        send_small(conn.sock, data)

    def _start_handshake(self, conn: Conn) -> None:
        assert conn.sock is not None
        conn.accept = start_handshake(conn.sock, self.host, self.port, f"{self.path}?token={conn.token}")
        conn.state = HANDSHAKING
        self.ep.modify(conn.fd, select.EPOLLIN)

    def connect_all(self) -> float:
        """Open and subscribe every connection, a bounded number of upgrades in flight."""
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        pending = list(reversed(self.conns))
        in_flight = ready = 0
        while ready < len(self.conns):
            while pending and in_flight < self.concurrency:
                self._open(pending.pop())
                in_flight += 1
            if time.perf_counter() > deadline:
                raise BenchError(f"only {ready}/{len(self.conns)} connections subscribed after {self.timeout}s")
            for fd, ev in self.ep.poll(1.0):
                conn = self.by_fd[fd]
                if conn.state == CONNECTING:
                    self._start_handshake(conn)
                    continue
                if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
                    raise BenchError("connection error while connecting")
                assert conn.sock is not None
                data = conn.sock.recv(65536)
                if not data:
                    raise BenchError(f"server closed a connection while connecting: {bytes(conn.buf[:300])!r}")
                conn.buf += data
                if conn.state == HANDSHAKING:
                    if not finish_handshake(conn.buf, conn.accept):
                        continue
                    self._send_small(conn, masked_frame(orjson.dumps({"type": "subscribe", "channel": conn.channel})))
                    conn.state = SUBSCRIBING
                if conn.state == SUBSCRIBING:
                    reply = self._next_control_frame(conn)
                    if reply is None:
                        continue
                    msg = orjson.loads(reply)
                    if msg != {"type": "ack", "channel": conn.channel, "status": "subscribed"}:
                        raise BenchError(f"unexpected reply to subscribe: {reply[:300]!r}")
                    conn.state = LIVE
                    in_flight -= 1
                    ready += 1
        return time.perf_counter() - t0

    def _next_control_frame(self, conn: Conn) -> bytes | None:
        """The next text frame during subscribe (pings answered); None until one is complete."""
        while True:
            frame = parse_frame(conn.buf, strict=False)
            if frame is None:
                return None
            opcode, payload, length = frame
            del conn.buf[:length]
            if opcode == OP_PING:
                self._send_small(conn, masked_frame(payload, OP_PONG))
            elif opcode == OP_TEXT:
                return payload
            elif opcode == OP_CLOSE:
                raise BenchError(f"server closed a connection while subscribing: {payload!r}")

    # -- receiving changes --------------------------------------------------------------------------------------

    def run(self) -> None:
        """Record changes and obey commands until told to quit (or stdin closes)."""
        os.set_blocking(0, False)
        self.ep.register(0, select.EPOLLIN)
        by_fd = self.by_fd
        poll = self.ep.poll
        maxevents = len(by_fd) + 2
        while True:
            timeout = 0.05 if self.collecting is not None else 1.0
            for fd, _ev in poll(timeout, maxevents):
                if fd == 0:
                    if not self._stdin():
                        return
                    continue
                conn = by_fd.get(fd)
                if conn is not None:
                    self._read(conn)
            if self.collecting is not None:
                self._check_collect()

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
        match = self.match
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
            # The hot path: one delivery carrying a sequence number, as the benchmark's match reads it.
            try:
                seq = match(conn, loads(payload))
            except (KeyError, TypeError, ValueError):
                seq = None
            if seq is None:
                self._unexpected(conn, payload)
            else:
                extend((seq, conn.index, stamp, read_ns))
        if pos:
            del buf[:pos]

    def _control(self, conn: Conn, b0: int, payload: bytes) -> bool:
        """Handle a frame that is not a whole text frame; False when the connection is gone."""
        opcode = b0 & 0x0F
        if opcode == OP_PING:
            self._send_small(conn, masked_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self._lost(conn, f"close frame {code} {payload[2:200]!r}")
            return False
        elif opcode != OP_PONG:
            self._unexpected(conn, b"opcode %d fin %d: " % (opcode, b0 >> 7) + payload[:200])
        return True

    def _unexpected(self, conn: Conn, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
            kind = f"{msg.get('type')}:{msg.get('code') or msg.get('channel')}"
        except (orjson.JSONDecodeError, AttributeError):
            kind = "unparsable"
        self.unexpected[kind] = self.unexpected.get(kind, 0) + 1
        if len(self.samples) < SAMPLES:
            self.samples.append(f"conn {conn.index} ({conn.channel}): {payload[:400].decode(errors='replace')}")

    def _lost(self, conn: Conn, why: str) -> None:
        self.closed.append(f"conn {conn.index} ({conn.channel}): {why}")
        self.ep.unregister(conn.fd)
        del self.by_fd[conn.fd]
        assert conn.sock is not None
        conn.sock.close()

    # -- commands -----------------------------------------------------------------------------------------------

    def _stdin(self) -> bool:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.stdin_buf += chunk
        while b"\n" in self.stdin_buf:
            line, _, self.stdin_buf = self.stdin_buf.partition(b"\n")
            if not line.strip():
                continue
            cmd = orjson.loads(line)
            if cmd["cmd"] == "quit":
                return False
            if cmd["cmd"] == "start":
                self.cpu0 = time.process_time()
                self.wall0 = time.perf_counter()
                self.reads = 0
            elif cmd["cmd"] == "collect":
                now = time.perf_counter()
                self.collecting = {**cmd, "deadline": now + cmd["timeout"], "done_at": None}
                self._check_collect()
        return True

    def _check_collect(self) -> None:
        c = self.collecting
        assert c is not None
        now = time.perf_counter()
        if c["done_at"] is None and len(self.records) // 4 >= c["expected"]:
            c["done_at"] = now
        if now < (c["deadline"] if c["done_at"] is None else c["done_at"] + c["grace"]):
            return
        with open(c["path"], "wb") as f:
            self.records.tofile(f)
        wall = time.perf_counter() - self.wall0
        emit(
            "collected",
            deliveries=len(self.records) // 4,
            timed_out=c["done_at"] is None,
            unexpected=self.unexpected,
            samples=self.samples,
            closed=self.closed,
            open_connections=len(self.by_fd),
            reads=self.reads,
            cpu_s=time.process_time() - self.cpu0,
            wall_s=wall,
        )
        self.records = array("q")
        self.unexpected = {}
        self.samples = []
        self.closed = []
        self.collecting = None

    def close(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.close()
        self.ep.close()


def main(description: str | None, match: Match, plan_help: str) -> int:
    """The process's command line and life: connect and subscribe every connection of ``--plan``, report ``ready``,
    record until told to quit. Exit status 1 (after an ``error`` event) when connecting or reading fails."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--plan", required=True, help=plan_help)
    parser.add_argument("--timeout", type=float, default=60.0, help="connect phase timeout (s)")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with open(args.plan, "rb") as f:
        plan = orjson.loads(f.read())
    subs = Subscribers(args, plan, match)
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
