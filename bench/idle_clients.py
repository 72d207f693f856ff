"""Load generator for the idle-memory benchmark (bench/idle.py): N WebSocket connections that then do nothing.

    python bench/idle_clients.py --host H --port P --path /ws --connections N [--join CHANNEL] [--sources K]

Opens N connections (upgrade by hand on non-blocking sockets, at most --concurrency handshakes in flight), each
from one of K loopback source addresses 127.0.0.F .. 127.0.0.F+K-1 in turn (F is --first-source, default 1), so
that more connections than one address has ephemeral ports fit. With --join every connection subscribes to the
broadcast channel CHANNEL and waits for its ack. Then it prints {"event": "ready", "connect_s": ...} and holds the
connections, answering pings, until its stdin closes; a connection the server closes meanwhile is an error (printed
as {"event": "error"}).
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import sys
import threading
import time

import orjson
from common import emit
from wsraw import OP_CLOSE, OP_PING, OP_PONG, BenchError, finish_handshake, masked_frame, parse_frame, send_small
from wsraw import start_handshake as send_upgrade

IP_BIND_ADDRESS_NO_PORT = 24
"""Linux: choose the source port at connect, per destination, rather than at bind (one address's ports go further)"""

CONNECTING, HANDSHAKING, JOINING, IDLE = range(4)


class Conn:
    __slots__ = ("accept", "buf", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.buf = bytearray()
        self.accept = b""


def raise_nofile(n: int) -> None:
    """Room for `n` sockets and some: the hard limit too when allowed (root), else the soft up to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class IdleClients:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.path: str = args.path
        self.n: int = args.connections
        self.sources = [f"127.0.0.{args.first_source + i}" for i in range(args.sources)]
        self.concurrency: int = args.concurrency
        self.timeout: float = args.timeout
        self.channel: str | None = args.join
        self.join_frame = (
            masked_frame(orjson.dumps({"type": "subscribe", "channel": self.channel})) if self.channel else b""
        )
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.opened = 0

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.sources[self.opened % len(self.sources)], 0))
        self.opened += 1
        sock.connect_ex((self.host, self.port))
        conn = Conn(sock)
        self.by_fd[sock.fileno()] = conn
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def _frames(self, conn: Conn) -> list[bytes]:
        """The data frames complete in conn.buf, pings answered; raises on a close frame."""
        out = []
        while (parsed := parse_frame(conn.buf)) is not None:
            opcode, payload, length = parsed
            del conn.buf[:length]
            if opcode == OP_PING:
                send_small(conn.sock, masked_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise BenchError(f"server closed a connection: {code} {payload[2:]!r}")
            elif opcode != OP_PONG:
                out.append(payload)
        return out

    def _read(self, conn: Conn) -> None:
        data = conn.sock.recv(65536)
        if not data:
            raise BenchError(f"server closed a connection (state {conn.state})")
        conn.buf += data

    def connect_all(self) -> float:
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        expected_ack = {"type": "ack", "channel": self.channel, "status": "subscribed"}
        in_flight = ready = 0
        while ready < self.n:
            while self.opened < self.n and in_flight < self.concurrency:
                self._open()
                in_flight += 1
            if time.perf_counter() > deadline:
                raise BenchError(f"only {ready}/{self.n} connections ready after {self.timeout}s")
            for fd, ev in self.ep.poll(1.0, 4096):
                conn = self.by_fd[fd]
                if conn.state == CONNECTING:
                    conn.accept = send_upgrade(conn.sock, self.host, self.port, self.path)
                    conn.state = HANDSHAKING
                    self.ep.modify(fd, select.EPOLLIN)
                    continue
                if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
                    raise BenchError("connection error during the connect phase")
                self._read(conn)
                if conn.state == HANDSHAKING:
                    if not finish_handshake(conn.buf, conn.accept, max_head=16384):
                        continue
                    if self.channel is None:
                        conn.state = IDLE
                    else:
                        send_small(conn.sock, self.join_frame)
                        conn.state = JOINING
                if conn.state == JOINING:
                    for msg in self._frames(conn):
                        if orjson.loads(msg) != expected_ack:
                            raise BenchError(f"unexpected reply to subscribe: {msg[:200]!r}")
                        conn.state = IDLE
                    if conn.state != IDLE:
                        continue
                elif self._frames(conn):
                    raise BenchError("a message on a connection that subscribed to nothing")
                in_flight -= 1
                ready += 1
        return time.perf_counter() - t0

    def hold(self, stop: threading.Event) -> None:
        """Keep the connections open, answering pings, until `stop`."""
        while not stop.is_set():
            for fd, _ev in self.ep.poll(0.5, 4096):
                conn = self.by_fd[fd]
                self._read(conn)
                for msg in self._frames(conn):
                    raise BenchError(f"a message on an idle connection: {msg[:200]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--join", default=None, help="broadcast channel every connection subscribes to")
    parser.add_argument("--sources", type=int, default=8, help="loopback source addresses 127.0.0.F..F+K-1")
    parser.add_argument("--first-source", type=int, default=1, help="F, the last byte of the first source address")
    parser.add_argument("--concurrency", type=int, default=256, help="handshakes in flight at most")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for all connections to be ready")
    args = parser.parse_args()
    raise_nofile(args.connections)
    clients = IdleClients(args)
    try:
        connect_s = clients.connect_all()
    except (BenchError, OSError) as exc:
        emit("error", error=str(exc), opened=clients.opened)
        return 1
    emit("ready", connect_s=round(connect_s, 2))
    stop = threading.Event()
    # The driver closes stdin to end the run.
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    try:
        clients.hold(stop)
    except (BenchError, OSError) as exc:
        emit("error", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
