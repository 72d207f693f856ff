"""The client side of the connect-storm benchmark (``bench/connect.py``): every client in one process, on one epoll.

Driven over stdin/stdout (one JSON object per line):

1. reads the plan (``--plan FILE``: a JSON object with ``table`` (a ``table:`` channel, or null for none) and
   ``clients``, per client
   a ``token`` and a ``room`` (a ``presence:`` channel)), prepares every upgrade request and subscribe frame, then
   prints ``{"event": "prepared"}`` (so the preparation is not part of the storm);
2. on ``{"cmd": "go"}`` opens every connection as fast as it can (``--connect-batch`` connects between two polls of
   the epoll, so answers are read while the storm goes on); each client, once its upgrade is answered 101, is done
   with ``--handshake-only``, else sends both subscribes in one write (table channel first), and with ``--track``
   tracks its presence (with a ``ref``) once the presence subscribe is acked; once every client is done or failed
   (or ``--timeout`` passed) it writes the per-client times to ``--out`` and prints ``{"event": "done", ...}``; the
   connections stay open;
3. on ``{"cmd": "quit"}`` (or end of stdin) closes everything.

Times per client (ns, CLOCK_REALTIME, 0 when it did not happen): ``start`` just before ``connect()``; ``open`` when
the epoll reported the connect complete (read time); ``upgraded``, ``table_ack``, ``presence_ack`` and ``tracked``
the kernel receive timestamp (``SO_TIMESTAMPNS``) of the segment that completed that answer, so this process being
busy with other clients does not add to them (a read holding several segments carries the newest one's stamp,
which can only overstate). Failures are counted by kind: ``connect:<errno name>`` (connect() refused at once, e.g.
no source port), ``socket:<errno name>`` (the connect or the connection failed later), ``http:<status>`` (upgrade
refused), ``closed:<stage>`` (EOF), ``close:<code>`` (a close frame), ``error:<code>`` (an error frame),
``unexpected`` (another reply where an ack was due), ``timeout:<stage>``.

With ``--sources K`` above 1, client i connects from 127.0.0.(1 + i mod K) (IP_BIND_ADDRESS_NO_PORT, so the port
is chosen at connect time per destination), for when one address runs short of source ports.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import os
import select
import socket
import sys
import time
from typing import Any

import orjson
from common import emit, raise_nofile_limit
from wsraw import (
    ANC_BUFSIZE,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SO_TIMESTAMPNS,
    WS_GUID,
    kernel_stamp,
    masked_frame,
    parse_frame,
)

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_SIZE = 65536
SAMPLES = 5
TRACK_REF = "t"

CONNECTING, UPGRADING, SUBSCRIBING, DONE, FAILED = range(5)
STAGES = ("connect", "upgrade", "subscribe", "done", "failed")
TIMES = ("start", "open", "upgraded", "table_ack", "presence_ack", "tracked")


class Client:
    __slots__ = (
        "accept",
        "buf",
        "index",
        "open",
        "presence_ack",
        "request",
        "room",
        "sock",
        "start",
        "state",
        "subscribes",
        "table_ack",
        "track",
        "tracked",
        "upgraded",
    )

    def __init__(self, index: int, request: bytes, accept: bytes, room: str, subscribes: bytes, track: bytes) -> None:
        self.index = index
        self.request = request
        self.accept = accept
        self.room = room
        self.subscribes = subscribes
        self.track = track
        self.state = CONNECTING
        self.buf = bytearray()
        self.sock: socket.socket | None = None
        self.start = self.open = self.upgraded = self.table_ack = self.presence_ack = self.tracked = 0


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class Storm:
    def __init__(self, args: argparse.Namespace, plan: dict[str, Any]) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.sources: int = args.sources
        self.batch: int = args.connect_batch
        self.timeout: float = args.timeout
        self.tracking: bool = args.track
        self.handshake_only: bool = args.handshake_only
        self.table: str | None = plan["table"]
        self.clients = [self._prepare(i, c["token"], c["room"]) for i, c in enumerate(plan["clients"])]
        self.by_fd: dict[int, Client] = {}
        self.ep = select.epoll()
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []
        self.presence_frames = 0
        self.finished = 0

    def _prepare(self, index: int, token: str, room: str) -> Client:
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /realtime?token={token} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        subscribes = masked_frame(orjson.dumps({"type": "subscribe", "channel": room}))
        if self.table:
            subscribes = masked_frame(orjson.dumps({"type": "subscribe", "channel": self.table})) + subscribes
        track = masked_frame(
            orjson.dumps(
                {"type": "presence", "channel": room, "event": "track", "payload": {"n": index}, "ref": TRACK_REF}
            )
        )
        return Client(index, request, accept, room, subscribes, track)

    # -- the storm ----------------------------------------------------------------------------------------------

    def _open(self, client: Client) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        client.start = time.time_ns()
        try:
            if self.sources > 1:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{1 + client.index % self.sources}", 0))
            err = sock.connect_ex((self.host, self.port))
        except OSError as exc:
            err = exc.errno or 0
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(client, f"connect:{errno_name(err)}", "")
            return
        client.sock = sock
        self.by_fd[sock.fileno()] = client
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def run(self) -> float:
        """The storm; returns its wall time (s)."""
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        pending = list(reversed(self.clients))
        total = len(self.clients)
        while self.finished < total:
            for _ in range(min(self.batch, len(pending))):
                self._open(pending.pop())
            now = time.perf_counter()
            if now > deadline:
                break
            for fd, ev in self.ep.poll(0 if pending else min(1.0, deadline - now)):
                client = self.by_fd.get(fd)
                if client is not None:
                    self._event(client, ev)
        for client in self.clients:
            if client.state < DONE:
                self._fail(client, f"timeout:{STAGES[client.state]}", "")
        return time.perf_counter() - t0

    def _event(self, client: Client, ev: int) -> None:
        sock = client.sock
        assert sock is not None
        if client.state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(client, f"socket:{errno_name(err)}", "connect")
                return
            client.open = time.time_ns()
            sock.send(client.request)
            client.state = UPGRADING
            self.ep.modify(sock.fileno(), select.EPOLLIN)
            return
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(RECV_SIZE, ANC_BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(client, f"socket:{errno_name(exc.errno or 0)}", STAGES[client.state])
            return
        stamp = kernel_stamp(ancdata) or time.time_ns()
        if not data:
            if client.state < DONE:
                self._fail(client, f"closed:{STAGES[client.state]}", bytes(client.buf[:200]).decode("latin-1"))
            else:
                self._drop(client)
            return
        client.buf += data
        if client.state == UPGRADING:
            end = client.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(client.buf[:end]).decode("latin-1")
            del client.buf[: end + 4]
            status = head.split(" ", 2)
            if len(status) < 2 or status[1] != "101":
                self._fail(client, f"http:{status[1] if len(status) > 1 else '?'}", head[:300])
                return
            accepts = [
                line.partition(":")[2].strip()
                for line in head.split("\r\n")[1:]
                if line.lower().startswith("sec-websocket-accept:")
            ]
            if accepts != [client.accept.decode()]:
                self._fail(client, "bad-accept", head[:300])
                return
            client.upgraded = stamp
            if self.handshake_only:
                client.state = DONE
                self.finished += 1
            else:
                sock.send(client.subscribes)
                client.state = SUBSCRIBING
        self._frames(client, stamp)

    def _frames(self, client: Client, stamp: int) -> None:
        while client.state in (SUBSCRIBING, DONE):
            frame = parse_frame(client.buf, strict=False)
            if frame is None:
                return
            opcode, payload, length = frame
            del client.buf[:length]
            if opcode == OP_PING:
                assert client.sock is not None
                client.sock.send(masked_frame(payload, OP_PONG))
                continue
            if opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                if client.state == DONE:
                    self._drop(client)
                else:
                    self._fail(client, f"close:{code}", payload[2:200].decode(errors="replace"))
                return
            if opcode != OP_TEXT:
                continue
            self._message(client, orjson.loads(payload), payload, stamp)

    def _message(self, client: Client, msg: dict[str, Any], raw: bytes, stamp: int) -> None:
        kind = msg.get("type")
        if kind == "presence":
            self.presence_frames += 1
            return
        if client.state == DONE:
            return
        if kind == "error":
            self._fail(client, f"error:{msg.get('code')}", raw[:300].decode(errors="replace"))
            return
        channel, status = msg.get("channel"), msg.get("status")
        if kind == "ack" and status == "subscribed" and channel == self.table and not client.table_ack:
            client.table_ack = stamp
        elif kind == "ack" and status == "subscribed" and channel == client.room and not client.presence_ack:
            client.presence_ack = stamp
            if self.tracking:
                assert client.sock is not None
                client.sock.send(client.track)
        elif kind == "ack" and status == "tracked" and msg.get("ref") == TRACK_REF and self.tracking:
            client.tracked = stamp
        else:
            self._fail(client, "unexpected", raw[:300].decode(errors="replace"))
            return
        if (client.table_ack or not self.table) and client.presence_ack and (client.tracked or not self.tracking):
            client.state = DONE
            self.finished += 1

    def _fail(self, client: Client, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.samples) < SAMPLES:
            self.samples.append(f"client {client.index} {kind}: {detail}")
        client.state = FAILED
        self.finished += 1
        self._drop(client)

    def _drop(self, client: Client) -> None:
        sock, client.sock = client.sock, None
        if sock is not None:
            self.by_fd.pop(sock.fileno(), None)
            self.ep.unregister(sock.fileno())
            sock.close()

    # -- after the storm ----------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every connection open and read (pings, presence) until stdin says quit or closes."""
        os.set_blocking(0, False)
        self.ep.register(0, select.EPOLLIN)
        while True:
            for fd, ev in self.ep.poll(1.0):
                if fd == 0:
                    try:
                        chunk = os.read(0, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk or b"quit" in chunk:
                        return
                    continue
                client = self.by_fd.get(fd)
                if client is not None:
                    self._event(client, ev)

    def close(self) -> None:
        for client in self.clients:
            self._drop(client)
        self.ep.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", required=True, help="JSON {table, clients: [{token, room}]}")
    parser.add_argument("--out", required=True, help="where to write the per-client times (JSON)")
    parser.add_argument("--track", action="store_true", help="track presence once the presence subscribe is acked")
    parser.add_argument("--handshake-only", action="store_true", help="done at the 101: subscribe to nothing")
    parser.add_argument("--sources", type=int, default=1, help="spread over 127.0.0.1..K (default 1: no bind)")
    parser.add_argument("--connect-batch", type=int, default=64, help="connects between two polls (default 64)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with open(args.plan, "rb") as f:
        plan = orjson.loads(f.read())
    storm = Storm(args, plan)
    emit("prepared", clients=len(storm.clients))
    try:
        line = sys.stdin.readline()
        if "go" not in line:
            return 0
        cpu0 = time.process_time()
        wall = storm.run()
        cpu = time.process_time() - cpu0
        times = {name: [getattr(c, name) for c in storm.clients] for name in TIMES}
        with open(args.out, "wb") as f:
            f.write(orjson.dumps(times))
        emit(
            "done",
            wall_s=wall,
            cpu_s=cpu,
            errors=storm.errors,
            samples=storm.samples,
            presence_frames=storm.presence_frames,
            open_connections=len(storm.by_fd),
        )
        storm.hold()
    finally:
        storm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
