"""Load generator for the cluster benchmark (bench/cluster.py), driven like fanout_clients.py over stdin/stdout.

Two modes:

* ``fanout``: fanout_clients.py's subscribers and publisher, unchanged but for where they connect: the N subscribers
  are spread in equal shares over ``--ports`` (the first N/k on the first port, and so on) and the publisher connects
  to the first. Warm-up, byte counting, burst and paced runs, kernel timestamps: all fanout_clients.py's.
* ``presence``: the presence storm. One observer per port subscribes to the room, then ``--members`` connections
  (in equal shares over the ports) subscribe too; after ``go`` every member tracks once, as fast as this process can
  send. Until every port agrees, a fresh connection ("probe") is opened on each port not yet agreeing, every
  ``--probe-interval`` seconds (one at a time per port), and the keys of the ``sync`` it gets are counted. The result
  gives, per port, the first probe whose ``sync`` held every member (and the last that did not), when the observer's
  state (sync plus diffs) first held every member, and the presence frames the observer and the members received.
"""

from __future__ import annotations

import argparse
import itertools
import os
import select
import socket
import sys
import time
from typing import Any

import orjson
from common import emit, raise_nofile_limit
from fanout_clients import Conn, FanoutClients
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


class SpreadClients(FanoutClients):
    """FanoutClients whose subscribers are spread over several ports (nodes) in equal shares, the publisher on the
    first port."""

    def __init__(self, args: argparse.Namespace, ports: list[int]) -> None:
        super().__init__(args)
        self.ports = ports
        self._opened = 0
        self._port_of: dict[int, int] = {}

    def _new_conn(self, rcvbuf: int | None = None) -> Conn:
        # Subscribers are opened first, in order, then the publisher: the count says which this one is.
        i = self._opened
        self._opened += 1
        self.port = self.ports[i * len(self.ports) // self.n] if i < self.n else self.ports[0]
        conn = super()._new_conn(rcvbuf)
        self._port_of[conn.fd] = self.port
        return conn

    def _start_handshake(self, conn: Conn) -> None:
        self.port = self._port_of[conn.fd]
        super()._start_handshake(conn)


def run_fanout(args: argparse.Namespace) -> int:
    ports = [int(p) for p in args.ports.split(",")]
    args.port = ports[0]
    args.server_pid = None
    args.slow = 0
    args.slow_rcvbuf = 4096
    args.sweep_pause = 0.0
    clients = SpreadClients(args, ports)
    try:
        connect_s = clients.connect_all()
        emit("ready", connections=args.connections, connect_s=connect_s)
        if sys.stdin.readline().strip() != "go":
            raise BenchError("driver went away before 'go'")
        clients.warmup()
        result = clients.paced_run(args.pace) if args.pace > 0 else clients.timed_run()
        emit("result", connect_s=connect_s, **result)
    except (BenchError, OSError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        clients.close()
    return 0


# ---- the presence storm ------------------------------------------------------------------------------------------

CONNECTING, HANDSHAKING, SUBSCRIBING, SYNCING, IDLE = range(5)


class Ws:
    """One connection of the storm: a member, an observer or a probe, on the node at `port`."""

    __slots__ = ("accept", "buf", "fd", "frames", "keys", "node", "port", "role", "sock", "state")

    def __init__(self, sock: socket.socket, port: int, node: int, role: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.port = port
        self.node = node
        self.role = role
        self.state = CONNECTING
        self.buf = bytearray()
        self.accept = b""
        self.frames = 0
        """observers: presence frames after the first sync; members: bytes after it"""
        self.keys: set[str] = set()
        """observers: the room's keys as the sync and the diffs so far say"""


class PresenceStorm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.path: str = args.path
        self.ports = [int(p) for p in args.ports.split(",")]
        self.channel = f"presence:{args.room}"
        self.members_n: int = args.members
        self.timeout: float = args.timeout
        self.probe_interval: float = args.probe_interval
        self.concurrency: int = args.connect_concurrency
        self.ep = select.epoll()
        self.by_fd: dict[int, Ws] = {}
        self.members: list[Ws] = []
        self.observers: list[Ws] = []
        self.subscribe_frame = masked_frame(orjson.dumps({"type": "subscribe", "channel": self.channel}))
        self.errors: list[str] = []

    # -- connections ---------------------------------------------------------------------------------------------

    def _open(self, node: int, role: str) -> Ws:
        port = self.ports[node]
        ws = Ws(open_socket(self.host, port), port, node, role)
        self.by_fd[ws.fd] = ws
        self.ep.register(ws.fd, select.EPOLLOUT)
        return ws

    def _close(self, ws: Ws) -> None:
        self.ep.unregister(ws.fd)
        del self.by_fd[ws.fd]
        ws.sock.close()

    def _next_text(self, ws: Ws) -> bytes | None:
        """The next complete text frame in ws.buf (pings answered), or None until more bytes arrive."""
        while (parsed := parse_frame(ws.buf)) is not None:
            opcode, payload, length = parsed
            del ws.buf[:length]
            if opcode == OP_PING:
                send_small(ws.sock, masked_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise BenchError(f"server closed a {ws.role} on port {ws.port}: code={code} {payload[2:]!r}")
            elif opcode == OP_TEXT:
                return payload
            elif opcode != OP_PONG:
                raise BenchError(f"unexpected opcode {opcode:#x}")
        return None

    def _advance(self, ws: Ws, ev: int) -> tuple[int, dict[str, Any] | None]:
        """Move a connecting connection on; returns (kernel timestamp, the sync payload once it arrived). What
        follows the sync stays in ws.buf (a probe's diffs, during the storm)."""
        if ws.state == CONNECTING:
            ws.accept = start_handshake(ws.sock, self.host, ws.port, self.path)
            ws.state = HANDSHAKING
            self.ep.modify(ws.fd, select.EPOLLIN)
            return 0, None
        if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
            raise BenchError(f"connection error on a {ws.role} connecting to port {ws.port}")
        data, anc, _flags, _addr = ws.sock.recvmsg(65536, ANC_BUFSIZE)
        if not data:
            raise BenchError(f"server closed a {ws.role} on port {ws.port} while connecting")
        stamp = kernel_stamp(anc) or time.time_ns()
        ws.buf += data
        if ws.state == HANDSHAKING:
            if not finish_handshake(ws.buf, ws.accept, max_head=16384):
                return stamp, None
            send_small(ws.sock, self.subscribe_frame)
            ws.state = SUBSCRIBING
        while (msg := self._next_text(ws)) is not None:
            got = orjson.loads(msg)
            if ws.state == SUBSCRIBING:
                if got != {"type": "ack", "channel": self.channel, "status": "subscribed"}:
                    raise BenchError(f"unexpected reply to subscribe: {msg[:200]!r}")
                ws.state = SYNCING
            elif ws.state == SYNCING:
                if got.get("type") != "presence" or got.get("event") != "sync":
                    raise BenchError(f"expected a presence sync after the ack, got {msg[:200]!r}")
                ws.state = IDLE
                return stamp, got["payload"]
        return stamp, None

    def connect_all(self) -> float:
        """Open and subscribe one observer per port, then the members (equal shares over the ports)."""
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        plan = [(node, "observer") for node in range(len(self.ports))]
        plan += [(i * len(self.ports) // self.members_n, "member") for i in range(self.members_n)]
        pending: set[int] = set()
        while plan or pending:
            while plan and len(pending) < self.concurrency:
                node, role = plan.pop(0)
                pending.add(self._open(node, role).fd)
            if time.perf_counter() > deadline:
                raise BenchError(f"{len(plan) + len(pending)} connections not subscribed after {self.timeout}s")
            for fd, ev in self.ep.poll(1.0):
                ws = self.by_fd[fd]
                if ws.state == IDLE:
                    raise BenchError(f"a {ws.role} got a frame before the storm: {bytes(ws.sock.recv(200))!r}")
                _stamp, sync = self._advance(ws, ev)
                if sync is None:
                    continue
                if sync or ws.buf:
                    raise BenchError(f"room not empty before the storm: {len(sync)} keys, then {bytes(ws.buf[:200])!r}")
                pending.discard(fd)
                (self.observers if ws.role == "observer" else self.members).append(ws)
        return time.perf_counter() - t0

    # -- the storm -----------------------------------------------------------------------------------------------

    def storm(self) -> dict[str, Any]:
        nodes = len(self.ports)
        total = self.members_n
        # Interleave the nodes, so that every node sees its members track from the start.
        by_node = [[ws for ws in self.members if ws.node == node] for node in range(nodes)]
        order = [ws for group in itertools.zip_longest(*by_node) for ws in group if ws is not None]
        frames = [
            masked_frame(
                orjson.dumps({"type": "presence", "channel": self.channel, "event": "track", "payload": {"i": i}})
            )
            for i in range(total)
        ]
        agreed_ns: list[int | None] = [None] * nodes
        short: list[tuple[int, int] | None] = [None] * nodes
        """per node, the last probe that did not show every member: (stamp, keys it showed)"""
        probes = [0] * nodes
        probe_open: list[Ws | None] = [None] * nodes
        next_probe = [0.0] * nodes
        observed_ns: list[int | None] = [None] * nodes
        progress: list[list[float]] = [[] for _ in range(nodes)]
        """per node, when the observer first held 10%, 20%, ... 100% of the members (ms after the first track)"""
        last_frame = time.perf_counter()
        errors: list[str] = []
        scratch = bytearray(262144)

        cpu0 = time.process_time()
        t0_ns = time.time_ns()
        for ws, frame in zip(order, frames, strict=True):
            ws.sock.setblocking(True)
            ws.sock.sendall(frame)
            ws.sock.setblocking(False)
        tracks_sent_ns = time.time_ns()
        deadline = time.perf_counter() + self.timeout
        while True:
            now = time.perf_counter()
            done = all(a is not None for a in agreed_ns) and all(o is not None for o in observed_ns)
            # Once agreed everywhere, wait for the diffs still under way to the members, so that they are counted.
            if done and now - last_frame > 1.0:
                break
            if now > deadline:
                errors.append(f"not agreed within {self.timeout}s")
                break
            for node in range(nodes):
                if agreed_ns[node] is None and probe_open[node] is None and now >= next_probe[node]:
                    probe_open[node] = self._open(node, "probe")
                    probes[node] += 1
            for fd, ev in self.ep.poll(0.005):
                ws = self.by_fd[fd]
                if ws.role == "probe":
                    stamp, sync = self._advance(ws, ev)
                    if sync is None:
                        continue
                    if len(sync) >= total:
                        agreed_ns[ws.node] = stamp
                    else:
                        short[ws.node] = (stamp, len(sync))
                    self._close(ws)
                    probe_open[ws.node] = None
                    next_probe[ws.node] = time.perf_counter() + self.probe_interval
                    continue
                if ws.role == "member":
                    # A million diffs reach the members: parsing them here took this process a second and more,
                    # and its reads then lagged the nodes. Their bytes are counted; the observers check the frames.
                    n = ws.sock.recv_into(scratch)
                    if not n:
                        raise BenchError(f"server closed a member on port {ws.port} during the storm")
                    ws.frames += n
                    last_frame = time.perf_counter()
                    continue
                data, anc, _flags, _addr = ws.sock.recvmsg(262144, ANC_BUFSIZE)
                if not data:
                    raise BenchError(f"server closed a {ws.role} on port {ws.port} during the storm")
                last_frame = time.perf_counter()
                ws.buf += data
                while (msg := self._next_text(ws)) is not None:
                    got = orjson.loads(msg)
                    if got.get("type") != "presence":
                        errors.append(msg[:200].decode(errors="replace"))
                        continue
                    ws.frames += 1
                    payload = got["payload"]
                    if got["event"] == "sync":
                        ws.keys = set(payload)
                    else:
                        ws.keys.difference_update(payload.get("leaves", {}))
                        ws.keys.update(payload.get("joins", {}))
                stamp = kernel_stamp(anc) or time.time_ns()
                for share in range(len(progress[ws.node]), 10):
                    if len(ws.keys) < total * (share + 1) // 10:
                        break
                    progress[ws.node].append((stamp - t0_ns) / 1e6)
                if observed_ns[ws.node] is None and len(ws.keys) >= total:
                    observed_ns[ws.node] = stamp
        member_bytes = [sum(ws.frames for ws in self.members if ws.node == node) for node in range(nodes)]
        member_counts = [sum(1 for ws in self.members if ws.node == node) for node in range(nodes)]
        return {
            "members": total,
            "ports": self.ports,
            "send_tracks_ms": (tracks_sent_ns - t0_ns) / 1e6,
            "agreed_ms": [None if a is None else (a - t0_ns) / 1e6 for a in agreed_ns],
            "last_short_ms": [None if s is None else (s[0] - t0_ns) / 1e6 for s in short],
            "last_short_keys": [None if s is None else s[1] for s in short],
            "probes": probes,
            "observer_complete_ms": [None if o is None else (o - t0_ns) / 1e6 for o in observed_ns],
            "observer_progress_ms": progress,
            "observer_frames": [ws.frames for ws in sorted(self.observers, key=lambda w: w.node)],
            "observer_keys": [len(ws.keys) for ws in sorted(self.observers, key=lambda w: w.node)],
            "member_bytes": member_bytes,
            "member_counts": member_counts,
            "errors": errors[:10],
            "error_count": len(errors),
            "client_cpu_pct": 100.0 * (time.process_time() - cpu0) / max((time.time_ns() - t0_ns) / 1e9, 1e-9),
        }

    def close(self) -> None:
        for ws in self.by_fd.values():
            ws.sock.close()
        self.ep.close()


def run_presence(args: argparse.Namespace) -> int:
    storm = PresenceStorm(args)
    try:
        connect_s = storm.connect_all()
        emit("ready", connections=args.members + len(storm.ports), connect_s=connect_s)
        if sys.stdin.readline().strip() != "go":
            raise BenchError("driver went away before 'go'")
        emit("result", connect_s=connect_s, **storm.storm())
    except (BenchError, OSError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        storm.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("mode", choices=("fanout", "presence"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="comma-separated ports of the nodes")
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--channel", default="broadcast:bench", help="fanout: the broadcast channel")
    parser.add_argument("--connections", type=int, default=5000, help="fanout: subscribers")
    parser.add_argument("--messages", type=int, default=200, help="fanout: broadcasts")
    parser.add_argument("--payload-bytes", type=int, default=100, help="fanout: payload data size")
    parser.add_argument("--pace", type=float, default=0.0, help="fanout: ms between broadcasts (0: a burst)")
    parser.add_argument("--room", default="storm", help="presence: the room")
    parser.add_argument("--members", type=int, default=1000, help="presence: members, each tracking once")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="presence: seconds between probes")
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-phase stall timeout (s)")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    return run_fanout(args) if args.mode == "fanout" else run_presence(args)


if __name__ == "__main__":
    sys.exit(main())
