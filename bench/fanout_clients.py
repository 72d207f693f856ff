"""Load generator for the fan-out benchmark: N subscribers plus one publisher, in one process.

Driven by ``bench/fanout.py`` over stdin/stdout (one JSON object per stdout line):

1. opens N connections (WebSocket upgrade done by hand on non-blocking sockets), subscribes
   each to the channel and waits for every ack, opens the publisher connection, then prints
   ``{"event": "ready", ...}``;
2. waits for a ``go`` line on stdin (the driver reads the server's idle RSS meanwhile);
3. warm-up: the publisher sends one broadcast; every subscriber's first frame is fully parsed
   and checked, which also fixes the frame size F (all payloads have the same length);
4. timed run: the publisher sends M broadcasts at once (or, with ``--pace MS``, one every MS
   milliseconds); receivers only count bytes until each connection has exactly M * F, then
   prints ``{"event": "result", ...}`` and exits. Paced runs also time each message's fan-out.

With ``--slow S``, S more connections (a small SO_RCVBUF) subscribe to the same channel after the N and then
never read: they stand for clients that stopped reading. They take no part in the warm-up, the byte count or the
latencies. Once the timed run is over they finally read, to learn whether the server ended them: a connection the
server closed reads to EOF (or ECONNRESET) after whatever the kernel still held; the counts are in the result.

A full WebSocket library per connection would make this process the bottleneck, hence raw
epoll and byte counting in the timed phase. Any frame of another size (ping, close, an extra
message) breaks the exact ``M * F`` byte count per connection and is reported as an error.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import select
import socket
import ssl
import sys
import time
from typing import Any

import orjson
from common import emit, proc_times, raise_nofile_limit
from wsraw import (
    ANC_BUFSIZE,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    BenchError,
    TlsStream,
    finish_handshake,
    kernel_stamp,
    masked_frame,
    open_socket,
    parse_frame,
    send_small,
    start_handshake,
)

# Kernel timestamps are read once a connection has fewer than this many bytes left (see timed_run).
NEAR_BYTES = 8192

# How long the slow clients get, once the timed run is over, to read to the end of their streams.
SLOW_DRAIN_S = 15.0

# Connection states, in order.
CONNECTING, TLS_HANDSHAKING, HANDSHAKING, SUBSCRIBING, IDLE = range(5)


def make_payload(seq: int, size: int) -> dict[str, str]:
    """Fixed-size payload: seq is a zero-padded string so every frame has the same length."""
    return {"seq": f"{seq:010d}", "data": "x" * size}


class Conn:
    __slots__ = ("accept", "buf", "fd", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | TlsStream = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.buf = bytearray()
        self.accept = b""


class FanoutClients:
    """All sockets of one benchmark run, multiplexed on one epoll."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.path: str = args.path
        self.channel: str = args.channel
        self.n: int = args.connections
        self.m: int = args.messages
        self.payload_size: int = args.payload_bytes
        self.concurrency: int = args.connect_concurrency
        self.timeout: float = args.timeout
        self.sweep_pause: float = args.sweep_pause
        self.server_pid: int | None = args.server_pid
        self.n_slow: int = args.slow
        self.slow_rcvbuf: int = args.slow_rcvbuf
        self.tls: ssl.SSLContext | None = None
        if args.tls_ca is not None:
            # Verifies the server's certificate against the bench's CA and the host name, as a real client would.
            self.tls = ssl.create_default_context(cafile=args.tls_ca)
        self.cipher = ""
        self.ep = select.epoll()
        self.subs: list[Conn] = []
        self.slow: list[Conn] = []
        self.by_fd: dict[int, Conn] = {}
        self.publisher: Conn | None = None
        self.subscribe_frame = masked_frame(orjson.dumps({"type": "subscribe", "channel": self.channel}))
        self.frame_size = 0

    # -- helpers -----------------------------------------------------------------------------

    def _new_conn(self, rcvbuf: int | None = None) -> Conn:
        conn = Conn(open_socket(self.host, self.port, rcvbuf))
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLOUT)
        return conn

    def _start_handshake(self, conn: Conn) -> None:
        """Move a connection on from CONNECTING (its connect completed) or TLS_HANDSHAKING (something arrived): with
        TLS, start or continue the TLS handshake; once there is a stream, send the upgrade request."""
        if conn.state == CONNECTING and self.tls is not None:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise BenchError(f"connect to {self.host}:{self.port} failed: {os.strerror(err)}")
            assert isinstance(conn.sock, socket.socket)
            conn.sock = TlsStream(conn.sock, self.tls, self.host)
            conn.state = TLS_HANDSHAKING
            self.ep.modify(conn.fd, select.EPOLLIN)
        if conn.state == TLS_HANDSHAKING:
            assert isinstance(conn.sock, TlsStream)
            if not conn.sock.handshake():
                return
            self.cipher = conn.sock.cipher()
        conn.accept = start_handshake(conn.sock, self.host, self.port, self.path)
        conn.state = HANDSHAKING
        self.ep.modify(conn.fd, select.EPOLLIN)

    def _finish_handshake(self, conn: Conn) -> bool:
        """Consume the 101 response from conn.buf; False if it is not complete yet."""
        return finish_handshake(conn.buf, conn.accept, max_head=16384)

    def _next_message(self, conn: Conn) -> tuple[bytes, int] | None:
        """Pop the next data frame from conn.buf as (payload, frame_length), answering pings."""
        while True:
            parsed = parse_frame(conn.buf)
            if parsed is None:
                return None
            opcode, payload, length = parsed
            del conn.buf[:length]
            if opcode == OP_PING:
                send_small(conn.sock, masked_frame(payload, OP_PONG))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise BenchError(f"server closed a connection: code={code} reason={payload[2:]!r}")
            if opcode != OP_TEXT:
                raise BenchError(f"unexpected opcode {opcode:#x}")
            return payload, length

    def _read_into_buf(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            # Part of a TLS record: the rest is still to come.
            return
        if not data:
            raise BenchError(f"server closed a connection (state {conn.state})")
        conn.buf += data

    # -- phases ------------------------------------------------------------------------------

    def connect_all(self) -> float:
        """Open and subscribe the N subscribers, then the slow clients, then the publisher."""
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        self._connect(self.n, self.subs, None, deadline)
        self._connect(self.n_slow, self.slow, self.slow_rcvbuf, deadline)
        for conn in self.slow:
            # From here on nothing reads them, so the server's frames pile up in its send buffer and then its queue.
            self.ep.unregister(conn.fd)
        self.publisher = self._open_publisher(deadline)
        return time.perf_counter() - t0

    def _connect(self, count: int, into: list[Conn], rcvbuf: int | None, deadline: float) -> None:
        """Open and subscribe ``count`` connections into ``into``, at most ``concurrency`` handshakes in flight."""
        to_open = count
        in_flight = 0
        ready = 0
        expected_ack = {"type": "ack", "channel": self.channel, "status": "subscribed"}
        while ready < count:
            while to_open and in_flight < self.concurrency:
                self._new_conn(rcvbuf)
                to_open -= 1
                in_flight += 1
            if time.perf_counter() > deadline:
                raise BenchError(f"only {ready}/{count} connections subscribed after {self.timeout}s")
            for fd, ev in self.ep.poll(1.0, len(self.by_fd) + 1):
                conn = self.by_fd[fd]
                if conn.state < HANDSHAKING:
                    self._start_handshake(conn)
                    continue
                if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
                    raise BenchError("connection error during connect phase")
                self._read_into_buf(conn)
                if conn.state == IDLE:
                    # Already subscribed (e.g. a server ping): the warm-up parser deals with it.
                    continue
                if conn.state == HANDSHAKING:
                    if not self._finish_handshake(conn):
                        continue
                    send_small(conn.sock, self.subscribe_frame)
                    conn.state = SUBSCRIBING
                parsed = self._next_message(conn)
                if parsed is None:
                    continue
                msg = parsed[0]
                ack = orjson.loads(msg)
                if ack != expected_ack:
                    raise BenchError(f"unexpected reply to subscribe: {msg[:200]!r}")
                if conn.buf:
                    raise BenchError("unexpected bytes after the subscribe ack")
                conn.state = IDLE
                into.append(conn)
                in_flight -= 1
                ready += 1

    def _open_publisher(self, deadline: float) -> Conn:
        conn = self._new_conn()
        while conn.state != IDLE:
            if time.perf_counter() > deadline:
                raise BenchError("publisher connection timed out")
            for fd, _ev in self.ep.poll(1.0):
                if fd != conn.fd:
                    # A subscriber got something while idle; leave it for the warm-up parser.
                    continue
                if conn.state < HANDSHAKING:
                    self._start_handshake(conn)
                else:
                    self._read_into_buf(conn)
                    if self._finish_handshake(conn):
                        conn.state = IDLE
        return conn

    def warmup(self) -> None:
        """One broadcast whose frame every subscriber parses in full: validates the stream and
        learns the exact frame size F used for byte counting in the timed phase."""
        assert self.publisher is not None
        payload = make_payload(0, self.payload_size)
        self._send_blocking(
            self.publisher,
            masked_frame(orjson.dumps({"type": "broadcast", "channel": self.channel, "payload": payload})),
        )
        waiting = {c.fd for c in self.subs}
        deadline = time.perf_counter() + self.timeout
        sizes: set[int] = set()
        while waiting:
            if time.perf_counter() > deadline:
                raise BenchError(f"{len(waiting)}/{self.n} subscribers missed the warm-up broadcast")
            for fd, _ev in self.ep.poll(1.0, len(self.by_fd) + 1):
                conn = self.by_fd[fd]
                if conn is self.publisher:
                    raise BenchError(f"publisher received data: {conn.sock.recv(200)!r}")
                self._read_into_buf(conn)
                parsed = self._next_message(conn)
                if parsed is None:
                    continue
                if fd not in waiting:
                    raise BenchError("subscriber received more than the warm-up broadcast")
                msg, frame_len = parsed
                got = orjson.loads(msg)
                if got != {"type": "broadcast", "channel": self.channel, "payload": payload}:
                    raise BenchError(f"unexpected broadcast frame: {msg[:200]!r}")
                if conn.buf:
                    raise BenchError("unexpected bytes after the warm-up broadcast")
                sizes.add(frame_len)
                waiting.discard(fd)
        if len(sizes) != 1:
            raise BenchError(f"broadcast frame sizes differ between connections: {sorted(sizes)}")
        self.frame_size = sizes.pop()

    def _send_blocking(self, conn: Conn, data: bytes) -> None:
        conn.sock.setblocking(True)
        try:
            conn.sock.sendall(data)
        finally:
            conn.sock.setblocking(False)

    def timed_run(self) -> dict[str, Any]:
        """Publish M messages at once and count bytes until every subscriber has M frames.

        The end time is the kernel's arrival timestamp (SO_TIMESTAMPNS) of each connection's
        last bytes, so the rate doesn't depend on how promptly this process gets to read them.
        Timestamps cost an extra ~0.5 us per read, so they are only asked for once a connection
        is within NEAR_BYTES of done; a read that completes a connection from further back (this
        process lagging) falls back to the time of the read, which can only lower the rate.
        """
        assert self.publisher is not None
        pub = self.publisher
        frames = b"".join(
            masked_frame(
                orjson.dumps(
                    {
                        "type": "broadcast",
                        "channel": self.channel,
                        "payload": make_payload(seq, self.payload_size),
                    }
                )
            )
            for seq in range(1, self.m + 1)
        )
        target = self.m * self.frame_size
        near = target - NEAR_BYTES
        # Flat per-fd tables: the hot loop below runs once per readable socket per poll.
        max_fd = max(self.by_fd) + 1
        received = [0] * max_fd
        recv_into: list[Any] = [None] * max_fd
        recvmsg_into: list[Any] = [None] * max_fd
        for conn in self.subs:
            recv_into[conn.fd] = conn.sock.recv_into
            recvmsg_into[conn.fd] = conn.sock.recvmsg_into
        tls = self._tls_streams(max_fd)
        pub_fd = pub.fd
        buf = bytearray(1 << 18)
        bufs = [buf]
        poll = self.ep.poll
        maxevents = len(self.by_fd) + 1
        remaining = len(self.subs)
        overshoot = untimestamped = 0
        pub_rx = 0
        polls = recvs = 0
        end_ns = 0
        pause = self.sweep_pause
        out = memoryview(frames)

        cpu0 = time.process_time()
        server_cpu0 = proc_times(self.server_pid)
        t0 = time.perf_counter()
        t0_ns = time.time_ns()
        # Non-blocking send so a large M can't stall receiving; the rest goes out on EPOLLOUT.
        try:
            sent = pub.sock.send(out)
        except BlockingIOError:
            sent = 0
        out = out[sent:]
        if out:
            self.ep.modify(pub_fd, select.EPOLLIN | select.EPOLLOUT)
        t_last = t0
        idle_deadline = t0 + self.timeout
        while remaining:
            events = poll(1.0, maxevents)
            polls += 1
            if not events:
                if time.perf_counter() > idle_deadline:
                    break
                continue
            for fd, ev in events:
                if fd == pub_fd:
                    if ev & select.EPOLLOUT:
                        try:
                            sent = pub.sock.send(out)
                        except BlockingIOError:
                            sent = 0
                        out = out[sent:]
                        if not out:
                            self.ep.modify(pub_fd, select.EPOLLIN)
                    if ev & select.EPOLLIN:
                        pub_rx += self._publisher_read()
                    continue
                recvs += 1
                total = received[fd]
                stamp = 0
                try:
                    if total < near:
                        n = recv_into[fd](buf)
                    else:
                        n, ancdata, _flags, _addr = recvmsg_into[fd](bufs, ANC_BUFSIZE)
                        stamp = kernel_stamp(ancdata)
                except BlockingIOError:
                    # Only over TLS: part of a record.
                    continue
                if n == 0:
                    raise BenchError("server closed a subscriber during the timed run")
                if tls and tls[fd].has_more and total + n < target:
                    # Plaintext left in the TLS stream with nothing in the kernel to report: read it again.
                    events.append((fd, 0))
                total += n
                received[fd] = total
                if total >= target:
                    if total > target:
                        overshoot += 1
                    # Done: stop polling it so the remaining connections get all the attention.
                    self.ep.unregister(fd)
                    remaining -= 1
                    t_last = time.perf_counter()
                    if not stamp:
                        untimestamped += 1
                        stamp = t0_ns + int((t_last - t0) * 1e9)
                    end_ns = max(end_ns, stamp)
            idle_deadline = time.perf_counter() + self.timeout
            if pause:
                time.sleep(pause)
        cpu1 = time.process_time()
        server_cpu1 = proc_times(self.server_pid)
        wall = max(time.perf_counter() - t0, 1e-9)
        # Finished connections were unregistered; anything still readable on them is an extra
        # frame that the exact byte count would otherwise miss.
        overshoot += self._count_extra_bytes(received, target)
        elapsed = (end_ns - t0_ns) / 1e9 if end_ns else t_last - t0
        delivered = sum(min(received[c.fd], target) for c in self.subs) // self.frame_size
        return {
            "frames_expected": self.n * self.m,
            "frames_delivered": delivered,
            "incomplete_connections": remaining,
            "overshoot_connections": overshoot,
            "publisher_rx_bytes": pub_rx,
            "frame_size": self.frame_size,
            "elapsed_s": elapsed,
            "elapsed_read_s": t_last - t0,
            "untimestamped_connections": untimestamped,
            "msgs_per_s": delivered / elapsed if elapsed > 0 else 0.0,
            "polls": polls,
            "recv_calls": recvs,
            **cpu_fields(cpu1 - cpu0, server_cpu0, server_cpu1, wall),
        }

    def paced_run(self, pace_ms: float) -> dict[str, Any]:
        """Publish M messages one at a time, ``pace_ms`` apart, and time each one's fan-out.

        The publisher sends a broadcast, then waits ``pace_ms`` after that send before the next
        one, so the spacing is never shorter than the pace (if this process is busy, a send is
        late, never bunched with the next). Per message, the fan-out latency is the time from the
        publisher's ``send()`` (CLOCK_REALTIME, taken just before the call) to the kernel receive
        timestamp (SO_TIMESTAMPNS, also CLOCK_REALTIME) of the last subscriber's copy.

        Every read is limited to the bytes up to the next message boundary, so the timestamp the
        kernel reports is that of the segment that completed that message, not of a later one
        read in the same call. The kernel merges a segment that arrives while an earlier one is
        still unread into it and keeps the later timestamp, so a completion read after the next
        message was already published may be stamped late; those are counted
        (``late_completions``) and reported.
        """
        assert self.publisher is not None
        pub = self.publisher
        m = self.m
        size = self.frame_size
        frames = [
            masked_frame(
                orjson.dumps(
                    {
                        "type": "broadcast",
                        "channel": self.channel,
                        "payload": make_payload(seq, self.payload_size),
                    }
                )
            )
            for seq in range(1, m + 1)
        ]
        target = m * size
        max_fd = max(self.by_fd) + 1
        received = [0] * max_fd
        recvmsg_into: list[Any] = [None] * max_fd
        for conn in self.subs:
            recvmsg_into[conn.fd] = conn.sock.recvmsg_into
        tls = self._tls_streams(max_fd)
        pub_fd = pub.fd
        view = memoryview(bytearray(size))
        whole = [view]
        # Index k (1..m) is message k; index 0 is unused.
        sent_ns = [0] * (m + 1)
        first_ns = [0] * (m + 1)
        last_ns = [0] * (m + 1)
        done = [0] * (m + 1)
        latency_sum_ns = 0
        poll = self.ep.poll
        maxevents = len(self.by_fd) + 1
        remaining = len(self.subs)
        untimestamped = late = 0
        pub_rx = 0
        polls = recvs = 0
        end_ns = 0
        pace = pace_ms / 1000.0
        next_seq = 1  # next message to publish

        cpu0 = time.process_time()
        server_cpu0 = proc_times(self.server_pid)
        t0 = time.perf_counter()
        next_send = t0
        idle_deadline = t0 + self.timeout
        while remaining:
            now = time.perf_counter()
            if next_seq <= m and now >= next_send:
                frame = frames[next_seq - 1]
                sent_ns[next_seq] = time.time_ns()
                # One small frame into an otherwise idle socket; a short write would be a bug.
                if pub.sock.send(frame) != len(frame):
                    raise BenchError("short write on the publisher")
                next_seq += 1
                now = time.perf_counter()
                next_send = now + pace
            wait = max(0.0, next_send - now) if next_seq <= m else 1.0
            events = poll(wait, maxevents)
            polls += 1
            if not events:
                if next_seq > m and time.perf_counter() > idle_deadline:
                    break
                continue
            for fd, _ev in events:
                if fd == pub_fd:
                    pub_rx += self._publisher_read()
                    continue
                recvs += 1
                total = received[fd]
                partial = total % size
                bufs = whole if not partial else [view[: size - partial]]
                try:
                    n, ancdata, _flags, _addr = recvmsg_into[fd](bufs, ANC_BUFSIZE)
                except BlockingIOError:
                    # Only over TLS: part of a record.
                    continue
                if n == 0:
                    raise BenchError("server closed a subscriber during the timed run")
                if tls and tls[fd].has_more and total + n < target:
                    # The next message's plaintext is here already (this read stops at the boundary) and the kernel
                    # has nothing to report: read it again. Its completion counts as late, as the plain socket's
                    # merged segment does.
                    events.append((fd, 0))
                stamp = kernel_stamp(ancdata)
                if not stamp:
                    untimestamped += 1
                    stamp = time.time_ns()
                total += n
                received[fd] = total
                if total % size:
                    continue
                # This read completed message k on this connection (reads never cross a boundary).
                k = total // size
                if stamp > last_ns[k]:
                    last_ns[k] = stamp
                if not first_ns[k] or stamp < first_ns[k]:
                    first_ns[k] = stamp
                done[k] += 1
                latency_sum_ns += stamp - sent_ns[k]
                if next_seq > k + 1:
                    late += 1
                if total == target:
                    self.ep.unregister(fd)
                    remaining -= 1
                    end_ns = max(end_ns, stamp)
            idle_deadline = time.perf_counter() + self.timeout
        cpu1 = time.process_time()
        server_cpu1 = proc_times(self.server_pid)
        wall = max(time.perf_counter() - t0, 1e-9)
        overshoot = self._count_extra_bytes(received, target)
        start_ns = sent_ns[1]
        elapsed = (end_ns - start_ns) / 1e9 if end_ns and start_ns else wall
        delivered = sum(min(received[c.fd], target) for c in self.subs) // size
        complete = [k for k in range(1, m + 1) if done[k] == self.n]
        sends = [sent_ns[k] for k in range(1, m + 1) if sent_ns[k]]
        gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(sends)]
        return {
            "frames_expected": self.n * m,
            "frames_delivered": delivered,
            "incomplete_connections": remaining,
            "overshoot_connections": overshoot,
            "publisher_rx_bytes": pub_rx,
            "frame_size": size,
            "elapsed_s": elapsed,
            "elapsed_read_s": wall,
            "untimestamped_connections": 0,
            "untimestamped_reads": untimestamped,
            "msgs_per_s": delivered / elapsed if elapsed > 0 else 0.0,
            "polls": polls,
            "recv_calls": recvs,
            "pace_ms": pace_ms,
            "send_gap_ms_min": min(gaps) if gaps else None,
            "send_gap_ms_max": max(gaps) if gaps else None,
            "offered_msgs_per_s": (len(sends) - 1) / ((sends[-1] - sends[0]) / 1e9) if len(sends) > 1 else None,
            # Per fully delivered message, in ms: send -> last / first subscriber's copy.
            "latency_last_ms": [(last_ns[k] - sent_ns[k]) / 1e6 for k in complete],
            "latency_first_ms": [(first_ns[k] - sent_ns[k]) / 1e6 for k in complete],
            "latency_mean_delivery_ms": latency_sum_ns / 1e6 / sum(done) if sum(done) else None,
            # Messages whose last copy arrived after the next message had been sent: the server
            # had not finished this fan-out when the next one began (the pace is too fast for it).
            "overlapped_messages": sum(1 for k in complete[:-1] if last_ns[k] > sent_ns[k + 1]),
            "late_completions": late,
            **cpu_fields(cpu1 - cpu0, server_cpu0, server_cpu1, wall),
        }

    def drain_slow(self, timeout: float) -> dict[str, Any]:
        """Read every slow client's stream to its end, for at most ``timeout`` seconds; how they ended.

        A client that never read cannot have seen a close frame when the server gave up on it, so a connection counts
        as closed by the server when its stream ends (EOF or ECONNRESET) once read. The frames read on the way are
        parsed: the broadcasts the kernel had buffered for it, and the close frame if the server got it that far.
        """
        for conn in self.slow:
            conn.buf.clear()
            self.ep.register(conn.fd, select.EPOLLIN)
        open_fds = {conn.fd for conn in self.slow}
        frames = dict.fromkeys(open_fds, 0)
        codes: collections.Counter[str] = collections.Counter()
        resets = 0
        deadline = time.perf_counter() + timeout
        while open_fds and time.perf_counter() < deadline:
            for fd, _ev in self.ep.poll(0.2, len(self.by_fd) + 1):
                if fd not in open_fds:
                    continue
                conn = self.by_fd[fd]
                try:
                    data = conn.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                    resets += 1
                if not data:
                    open_fds.discard(fd)
                    self.ep.unregister(fd)
                    continue
                conn.buf += data
                while (parsed := parse_frame(conn.buf)) is not None:
                    opcode, payload, length = parsed
                    del conn.buf[:length]
                    if opcode == OP_CLOSE:
                        codes[str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "none"] += 1
                    else:
                        frames[fd] += 1
        return {
            "slow_clients": len(self.slow),
            "slow_closed": len(self.slow) - len(open_fds),
            "slow_resets": resets,
            "slow_close_frames": dict(codes),
            "slow_frames_min": min(frames.values(), default=0),
            "slow_frames_max": max(frames.values(), default=0),
        }

    def _tls_streams(self, size: int) -> list[Any]:
        """The subscribers' TLS streams indexed by descriptor, or an empty list without TLS."""
        if self.tls is None:
            return []
        streams: list[Any] = [None] * size
        for conn in self.subs:
            streams[conn.fd] = conn.sock
        return streams

    def _publisher_read(self) -> int:
        """Bytes the publisher received (none are expected: the server sends a publisher nothing back)."""
        assert self.publisher is not None
        try:
            return len(self.publisher.sock.recv(65536))
        except BlockingIOError:
            return 0

    def _count_extra_bytes(self, received: list[int], target: int) -> int:
        """Subscribers that got all ``target`` bytes and still have more to read."""
        extra = 0
        for conn in self.subs:
            if received[conn.fd] == target:
                try:
                    if conn.sock.recv(1, socket.MSG_PEEK):
                        extra += 1
                except BlockingIOError:
                    pass
        return extra

    def close(self) -> None:
        for conn in self.by_fd.values():
            conn.sock.close()
        self.ep.close()


def cpu_fields(
    client_cpu_s: float, server_cpu0: tuple[float, float] | None, server_cpu1: tuple[float, float] | None, wall: float
) -> dict:
    """This process's CPU use and the server's (also its kernel share, stime) over a run of ``wall`` seconds."""
    server_cpu_s = server_sys_s = None
    if server_cpu0 is not None and server_cpu1 is not None:
        server_sys_s = server_cpu1[1] - server_cpu0[1]
        server_cpu_s = server_cpu1[0] - server_cpu0[0] + server_sys_s
    return {
        "client_cpu_s": client_cpu_s,
        "client_cpu_pct": 100.0 * client_cpu_s / wall,
        "server_cpu_s": server_cpu_s,
        "server_sys_s": server_sys_s,
        "server_cpu_pct": 100.0 * server_cpu_s / wall if server_cpu_s is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--channel", default="broadcast:bench")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-phase stall timeout (s)")
    parser.add_argument("--sweep-pause", type=float, default=0.0, help="sleep after each epoll sweep (s)")
    parser.add_argument(
        "--pace", type=float, default=0.0, help="ms between broadcasts (default 0: all at once, a burst)"
    )
    parser.add_argument("--slow", type=int, default=0, help="also open this many subscribers that never read")
    parser.add_argument(
        "--slow-rcvbuf", type=int, default=4096, help="SO_RCVBUF of the slow subscribers, so they fill fast"
    )
    parser.add_argument(
        "--tls-ca", help="connect over TLS, verifying the server's certificate against this PEM CA certificate"
    )
    parser.add_argument("--server-pid", type=int, help="report this process's CPU use in the run")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    parser.add_argument("--no-wait", action="store_true", help="don't wait for 'go' on stdin")
    args = parser.parse_args()

    raise_nofile_limit()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    clients = FanoutClients(args)
    try:
        connect_s = clients.connect_all()
        emit("ready", connections=args.connections, connect_s=connect_s, tls=clients.cipher)
        if not args.no_wait and sys.stdin.readline().strip() != "go":
            raise BenchError("driver went away before 'go'")
        clients.warmup()
        result = clients.paced_run(args.pace) if args.pace > 0 else clients.timed_run()
        if args.slow:
            result.update(clients.drain_slow(SLOW_DRAIN_S))
        emit("result", connect_s=connect_s, **result)
    except (BenchError, OSError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        clients.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
