"""Publish benchmark (issue 15): `realtime.send` from SQL, and `POST /api/broadcast`, to 1,000 subscribers.

The scenario (fixed, so runs compare): a scratch database with fluxrt's migrations, 100 channels
``broadcast:pub-0`` .. ``broadcast:pub-99`` with 10 WebSocket subscribers each (1,000 connections, one process,
kernel receive timestamps), and fluxrt started as a real process (``python -m fluxrt_trio --config``).

Phases (``--phases``, default ``sql,http``):

1. ``sql``: 4 writer connections (asyncpg, as the database owner, which may call ``realtime.send`` without a grant)
   each call ``SELECT realtime.send(channel, '{"s": N}')`` in a transaction of its own, at a steady total rate,
   send N going to channel N mod 100, writer w taking sends w, w + 4, ...; steps ``sql-500`` and then ``sql-1000``
   sends/s (``--rates``: 5,000 and 10,000 deliveries/s) for ``--duration`` s each, after a 2 s warm-up, in each of
   ``--rounds`` rounds (a fresh server and subscribers per round). Per step: deliveries/s achieved (copies received
   / time from the first send to the last copy's arrival) and commit-to-client latency p50/p99/max (from the moment
   the writer's statement returned, ``time.time_ns()``, to the kernel receive timestamp of each copy, the same
   CLOCK_REALTIME), p50 of the first and last fifth of the sends (a queue building up shows as the last fifth being
   slower), and the CPU split (fluxrt, PostgreSQL, the subscriber process, the writers).
2. ``http``: ``POST /api/broadcast`` with a service role's token, as fast as ``--http-concurrency`` (4) loops
   can post for ``--http-seconds`` s: ``http-single`` (one message per request) and ``http-batch100`` (100 messages
   per request, one to each channel). fluxrt does not keep an HTTP connection alive (every response closes it), so
   every request is a connection of its own: connect, request, read to the end. Requests/s and messages/s counted
   from the 202 answers; the messages reach the same 1,000 subscribers and are checked the same way; the latency is
   from the start of the request (before the connect) to each copy. The API's per-token rate limit is raised out of
   the way (``api.rate_limit`` 1,000,000/s), so the figure is what the server can take, not the limit.

Correctness, in every step: each message must reach exactly the 10 subscribers of its channel, each once. Missing
and duplicate copies, copies on the wrong channel, copies of another step's messages, any other frame (an error such
as ``CHANGES_MISSED``, a broadcast without ``id``) and lost connections are counted; a step with any is invalid.

Target (issue 15), printed PASS/FAIL: 10,000 deliveries/s sustained (the 1,000 sends/s step) at commit-to-client
p99 under 100 ms, database, server and clients sharing the machine's 2 cores: every such step valid, the writers
achieving >= 95% of the offered rate, deliveries/s >= 95% of 10,000, and p99 < 100 ms over all copies pooled over the
rounds, and over the last fifth of each step (a queue still building up is not sustained).

With 2+ CPUs fluxrt runs on the first, the subscriber process and this driver (writers, HTTP posters) on the
second; PostgreSQL is not pinned and shares both. Run from the repository root with the project venv:

    .venv/bin/python bench/publish.py                  # 3 rounds: ~3 minutes
    .venv/bin/python bench/publish.py --quick          # ~30 s smoke run
    .venv/bin/python bench/publish.py --phases sql --rounds 5 --json /tmp/publish.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import changes
import common
import connect
import fanout
import gcprobe
import jwt
import orjson
import scratch_database
from common import Copies, counted, free_port, percentile, split_cpus

CHANNELS = 100
SUBSCRIBERS_PER_CHANNEL = 10
WRITERS = 4
DEFAULT_RATES = "500,1000"
TARGET_DELIVERIES = 10_000.0
TARGET_P99_MS = 100.0
SUSTAIN_OFFERED = 0.95
BATCH = 100
# Warm-up before the measured steps of each round: the first sends after start-up are slower (plans, caches).
WARMUP_S = 2.0
WARMUP_RATE = 500.0
SEND = "SELECT realtime.send($1, jsonb_build_object('s', $2::bigint))"

FLUXRT_CONFIG = """\
server:
  host: {host}
  port: {port}
  path: /realtime
  # Every client connects from this one address, all at once.
  max_pending_handshakes_per_address: 20000
auth:
  jwt_secret: {secret}
  allow_anonymous: false
database:
  dsn: {dsn}
  migrate: true
realtime:
  max_connections: 2000
  max_connections_per_user: 1000
  # The subscriber process shares a CPU with the writers and PostgreSQL; if it falls behind, the server should
  # buffer rather than close it as a slow consumer (4009), which would end the run instead of measuring it.
  write_buffer_size: 100000
api:
  # Out of the way: the HTTP phase measures what the server takes, not the per-token limit (100/s by default).
  rate_limit: 1000000/s
  rate_burst: 100000
log:
  level: warning
"""


def channel_name(c: int) -> str:
    return f"broadcast:pub-{c}"


# ---- the server and the subscribers -------------------------------------------------------------------------------


class Server(changes.Server):
    """fluxrt as a separate process with this bench's configuration, pinned to the server CPU; `health()` and
    `wait_ready()` are changes.py's."""

    def __init__(self, args: argparse.Namespace, workdir: Path, dsn: str, secret: str) -> None:
        self.host = args.host
        self.port = free_port(self.host)
        self.config = workdir / f"fluxrt-{self.port}.yaml"
        self.config.write_text(FLUXRT_CONFIG.format(host=self.host, port=self.port, secret=secret, dsn=dsn))
        self.gc_record = workdir / f"gc-{self.port}.json" if args.gc_record else None
        probe = [str(common.BENCH_DIR / "gcprobe.py"), str(self.gc_record)] if self.gc_record else []
        argv = [*fanout.fluxrt_command(args, "fluxrt"), *probe, "-m", "fluxrt_trio", "--config", str(self.config)]
        common.ServerProcess.__init__(self, argv, workdir / f"fluxrt-{self.port}.log", args.server_cpu)


class Clients(changes.Clients):
    """The subscriber process (bench/publish_clients.py), pinned to the client CPU; commands as changes.py's."""

    SCRIPT = "publish_clients.py"


def plan_entries(secret: str) -> list[dict[str, str]]:
    """Connection j subscribes to channel j // 10, with a token of a user of that channel's own (any authenticated
    user may subscribe to a broadcast channel; one user per channel keeps the per-user count small)."""
    now = int(time.time())
    tokens = [
        jwt.encode({"sub": f"pub-sub-{c}", "iat": now, "exp": now + 6 * 3600}, secret, algorithm="HS256")
        for c in range(CHANNELS)
    ]
    return [
        {"channel": channel_name(j // SUBSCRIBERS_PER_CHANNEL), "token": tokens[j // SUBSCRIBERS_PER_CHANNEL]}
        for j in range(CHANNELS * SUBSCRIBERS_PER_CHANNEL)
    ]


# ---- the publishers -----------------------------------------------------------------------------------------------


@dataclass
class Sends(changes.Writes):
    """One step's messages: index i is sequence number seq0 + i, sent to channel (seq0 + i) % CHANNELS. `start_ns`
    is when its send began, `done_ns` when it was known published (the commit returned; the 202 was read), 0 when it
    failed."""

    requests: int = 0
    elapsed_s: float = 0.0

    def achieved_rate(self) -> float:
        """Messages per second from the first send to the last one known published."""
        done = [i for i in range(self.n) if self.done_ns[i]]
        if len(done) < 2:
            return 0.0
        return len(done) / ((max(self.done_ns[i] for i in done) - min(self.start_ns)) / 1e9)


class Writers(changes.PacedWriters):
    """WRITERS asyncpg connections calling realtime.send, one send per transaction, at a steady total rate."""

    @classmethod
    async def open(cls, dsn: str) -> Writers:
        return cls([await asyncpg.connect(dsn) for _ in range(WRITERS)])

    async def run(self, rate: float, duration: float, seq0: int) -> Sends:
        """`rate` sends/s for `duration` s, paced (`PacedWriters.paced`); send i carries sequence number seq0 + i
        to channel (seq0 + i) % CHANNELS."""
        n = max(2, round(rate * duration))
        sends = Sends(seq0, rate, [0] * n, [0] * n, [])
        channels = [channel_name(c) for c in range(CHANNELS)]

        def send(conn: asyncpg.Connection, i: int) -> Awaitable[object]:
            seq = seq0 + i
            return conn.execute(SEND, channels[seq % CHANNELS], seq)

        t0 = time.perf_counter()
        await self.paced(sends, "send", send)
        sends.elapsed_s = time.perf_counter() - t0
        sends.requests = n
        return sends


async def post(host: str, port: int, token: str, body: bytes) -> tuple[int, bytes]:
    """One `POST /api/broadcast` on a connection of its own (fluxrt closes every API connection after answering);
    returns the status and the body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /api/broadcast HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (host.encode(), port, token.encode(), len(body), body)
        )
        response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, rest = response.partition(b"\r\n\r\n")
    try:
        return int(head[9:12]), rest
    except ValueError:
        return 0, response[:200]


async def run_http(host: str, port: int, token: str, batch: int, concurrency: int, seconds: float, seq0: int) -> Sends:
    """`concurrency` loops posting requests of `batch` messages (a batch: one message to each channel, so `batch`
    is CHANNELS) back to back for `seconds`. A request's messages get its start time and the time its 202 was read;
    a refused request's get 0 (and its error is kept)."""
    start_ns: list[int] = []
    done_ns: list[int] = []
    sends = Sends(seq0, 0.0, start_ns, done_ns, [])
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds

    def body(first: int) -> bytes:
        if batch == 1:
            return orjson.dumps({"channel": channel_name(first % CHANNELS), "payload": {"s": first}})
        messages = [{"channel": channel_name(s % CHANNELS), "payload": {"s": s}} for s in range(first, first + batch)]
        return orjson.dumps({"messages": messages})

    async def poster() -> None:
        while loop.time() < until:
            first = seq0 + len(done_ns)
            # Reserved before the request: the loops share the sequence, and each request owns its numbers.
            start_ns.extend([0] * batch)
            done_ns.extend([0] * batch)
            data = body(first)
            began = time.time_ns()
            try:
                status, answer = await post(host, port, token, data)
            except OSError as exc:
                sends.errors.append(f"request at {first}: {exc}")
                continue
            sends.requests += 1
            if status != 202:
                sends.errors.append(f"request at {first}: {status} {answer[:200]!r}")
                continue
            ended = time.time_ns()
            for i in range(first - seq0, first - seq0 + batch):
                start_ns[i], done_ns[i] = began, ended

    t0 = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    sends.elapsed_s = time.perf_counter() - t0
    return sends


# ---- one step: publish, collect, judge ------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    kind: str
    """"sql" or "http" """
    rate: float
    duration_s: float
    batch: int = 1
    ok: bool = False
    error: str | None = None
    messages: int = 0
    requests: int = 0
    requests_per_s: float = 0.0
    messages_per_s: float = 0.0
    achieved_rate: float = 0.0
    expected: int = 0
    delivered: int = 0
    deliveries_per_s: float = 0.0
    missing: int = 0
    duplicates: int = 0
    wrong_channel: int = 0
    foreign: int = 0
    unexpected: int = 0
    lost_connections: int = 0
    timed_out: bool = False
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    publish_p50_ms: float | None = None
    publish_p99_ms: float | None = None
    client_lag_p99_ms: float | None = None
    first_fifth_p50_ms: float | None = None
    last_fifth_p50_ms: float | None = None
    last_fifth_p99_ms: float | None = None
    windows: int | None = None
    worst_second: str = ""
    timeline: list[tuple[float, int, float, float]] = field(default_factory=list)
    """per second of the step (by publication time): (second, copies, p50 ms, p99 ms)"""
    cpu_pct: dict[str, float | None] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def correctness_problems(self) -> list[str]:
        return counted(
            (
                ("missing", self.missing),
                ("duplicate", self.duplicates),
                ("on the wrong channel", self.wrong_channel),
                ("from another step", self.foreign),
                ("unexpected frames", self.unexpected),
                ("connections lost", self.lost_connections),
            )
        )


def judge(step: Step, sends: Sends, records: array) -> None:
    """Match each copy received to its message: latency from that message's publication (`done_ns` for SQL, the
    request's start for HTTP), and whether the connection is one of its channel's subscribers."""
    seq0, n = sends.seq0, sends.n
    nconn = CHANNELS * SUBSCRIBERS_PER_CHANNEL
    origin = sends.done_ns if step.kind == "sql" else sends.start_ns
    done = sends.done_ns
    lat: list[float] = []
    lags: list[float] = []
    early: list[float] = []
    late: list[float] = []
    first_cut, last_cut = n // 5, n - n // 5
    t0 = min((sends.start_ns[i] for i in range(n) if done[i]), default=0)
    seconds: dict[int, list[float]] = {}
    last_stamp = 0
    wrong = 0
    copies = Copies(records, seq0, done, nconn)
    for i, conn, stamp, read in copies:
        if conn // SUBSCRIBERS_PER_CHANNEL != (seq0 + i) % CHANNELS:
            wrong += 1
            continue
        ms = (stamp - origin[i]) / 1e6
        lat.append(ms)
        lags.append((read - stamp) / 1e6)
        last_stamp = max(last_stamp, stamp)
        seconds.setdefault((origin[i] - t0) // 1_000_000_000, []).append(ms)
        if i < first_cut:
            early.append(ms)
        elif i >= last_cut:
            late.append(ms)
    published = [i for i in range(n) if done[i]]
    step.messages = len(published)
    step.requests = sends.requests
    step.expected = len(published) * SUBSCRIBERS_PER_CHANNEL
    step.delivered = len(lat)
    step.missing = step.expected - step.delivered
    step.duplicates, step.wrong_channel, step.foreign = copies.duplicates, wrong, copies.foreign
    step.latencies_ms = lat
    if lat:
        step.p50_ms, step.p99_ms, step.max_ms = percentile(lat, 50), percentile(lat, 99), max(lat)
        step.client_lag_p99_ms = percentile(lags, 99)
        first_ns = min(sends.start_ns[i] for i in published)
        step.deliveries_per_s = step.delivered / ((last_stamp - first_ns) / 1e9)
    # When in the step the slow copies were: a spike (a checkpoint, another process) or a queue building up.
    step.timeline = [(sec, len(v), percentile(v, 50), percentile(v, 99)) for sec, v in sorted(seconds.items())]
    if step.timeline:
        worst = max(step.timeline, key=lambda t: t[3])
        step.worst_second = f"second {worst[0]} p99 {worst[3]:.1f} ms"
    if early and late:
        step.first_fifth_p50_ms, step.last_fifth_p50_ms = percentile(early, 50), percentile(late, 50)
        step.last_fifth_p99_ms = percentile(late, 99)
    publish_ms = [(done[i] - sends.start_ns[i]) / 1e6 for i in published]
    if publish_ms:
        step.publish_p50_ms, step.publish_p99_ms = percentile(publish_ms, 50), percentile(publish_ms, 99)
    step.achieved_rate = sends.achieved_rate()
    if sends.elapsed_s:
        step.requests_per_s = (sends.requests - len(sends.errors)) / sends.elapsed_s
        step.messages_per_s = step.messages / sends.elapsed_s


@dataclass
class Session:
    server: Server
    clients: Clients
    writers: Writers
    workdir: Path


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, dsn: str) -> None:
        self.args = args
        self.workdir = workdir
        self.dsn = dsn
        self.secret = secrets.token_hex(32)
        self.plan_path = workdir / "plan.json"
        self.plan_path.write_bytes(orjson.dumps(plan_entries(self.secret)))
        now = int(time.time())
        self.service_token = jwt.encode(
            {"sub": "pub-backend", "role": "service_role", "iat": now, "exp": now + 6 * 3600},
            self.secret,
            algorithm="HS256",
        )
        self.next_seq = 1
        self.steps: list[Step] = []
        self.step_times: dict[str, tuple[float, float]] = {}
        """each step's start and end, time.monotonic(), for --gc-record"""

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A fresh fluxrt, all subscribers connected and subscribed, and the writers' connections."""
        server = Server(self.args, self.workdir, self.dsn, self.secret)
        serving = changes.serving(self.args, server, Clients, self.plan_path, lambda: Writers.open(self.dsn))
        async with serving as (clients, writers):
            yield Session(server, clients, writers, self.workdir)

    async def step(self, session: Session, step: Step, publish: Callable[[int], Any], collect_timeout: float) -> Step:
        """Publish (`publish(seq0)` returns the Sends), wait for every copy, and judge."""
        try:
            measurement = await changes.Measurement.start(session.server, session.clients)
            sends: Sends = await publish(self.next_seq)
            self.next_seq += sends.n
            if sends.errors:
                step.error = f"{len(sends.errors)} publications failed, first: {sends.errors[0]}"
            expected = sum(1 for t in sends.done_ns if t) * SUBSCRIBERS_PER_CHANNEL
            path = session.workdir / f"records-{step.name.replace('/', '-')}.bin"
            await measurement.collect(path, expected, collect_timeout)
            step.windows = measurement.windows
            step.cpu_pct = measurement.cpu_pct("publishers", ("fluxrt", "postgres", "subscribers", "publishers"))
            judge(step, sends, measurement.records)
            measurement.outcome(step)
        except Exception as exc:
            step.error = f"{type(exc).__name__}: {exc}"
        step.ok = step.error is None and not step.correctness_problems() and not step.timed_out
        self.steps.append(step)
        return step

    async def sql_step(self, session: Session, name: str, rate: float, duration: float) -> Step:
        step = Step(name, "sql", rate, duration)
        started = time.monotonic()
        done = await self.step(
            session, step, lambda seq0: session.writers.run(rate, duration, seq0), max(15.0, 2 * duration)
        )
        self.step_times[name] = (started, time.monotonic())
        return done

    async def http_step(self, session: Session, name: str, batch: int) -> Step:
        args = self.args
        step = Step(name, "http", 0.0, args.http_seconds, batch=batch)
        server = session.server

        def publish(seq0: int) -> Any:
            return run_http(
                server.host, server.port, self.service_token, batch, args.http_concurrency, args.http_seconds, seq0
            )

        # Requests are taken faster than their copies go out at first: give the queue time to drain.
        return await self.step(session, step, publish, max(30.0, 6 * args.http_seconds))

    async def round(self, rnd: int) -> list[Step]:
        args = self.args
        steps: list[Step] = []
        print(f"round {rnd}/{args.rounds}", flush=True)
        async with self.session() as s:
            server = s.server
            if "sql" in args.phase_list:
                warm = await self.sql_step(s, f"warmup-{rnd}", WARMUP_RATE, WARMUP_S)
                print(fmt_step(warm), flush=True)
                if not warm.delivered:
                    raise RuntimeError(f"no send reached a subscriber in the warm-up: {s.server.log_tail()}")
                for rate in args.rate_list:
                    step = await self.sql_step(s, f"sql-{rate:g}/{rnd}", rate, args.duration)
                    print(fmt_step(step), flush=True)
                    steps.append(step)
            if "http" in args.phase_list:
                for name, batch in (("http-single", 1), (f"http-batch{BATCH}", BATCH)):
                    step = await self.http_step(s, f"{name}/{rnd}", batch)
                    print(fmt_step(step), flush=True)
                    steps.append(step)
        if server.gc_record is not None and server.gc_record.is_file():
            for step in steps:
                if step.name in self.step_times:
                    gc = gcprobe.summary(str(server.gc_record), *self.step_times[step.name])
                    print(f"    {connect.fmt_gc(gc, step.name)}", flush=True)
        return steps


# ---- output -------------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_step(p: Step) -> str:
    if p.error and not p.delivered:
        return f"  {p.name:<18} FAILED: {p.error}"
    cpu = "  ".join(f"{k} {v:.0f}%" for k, v in p.cpu_pct.items() if v is not None)
    problems = p.correctness_problems()
    if p.kind == "sql":
        head = (
            f"  {p.name:<18} offered {p.rate:>5,.0f} sends/s achieved {p.achieved_rate:>5,.0f}/s  {p.messages:,} sends "
            f"-> {p.delivered:,}/{p.expected:,} copies, {p.deliveries_per_s:,.0f} deliveries/s  commit->client "
        )
        publish = f"send p50 {_ms(p.publish_p50_ms)} p99 {_ms(p.publish_p99_ms)} ms"
    else:
        head = (
            f"  {p.name:<18} {p.requests_per_s:,.0f} requests/s ({p.messages_per_s:,.0f} messages/s, batch {p.batch}) "
            f"-> {p.delivered:,}/{p.expected:,} copies, {p.deliveries_per_s:,.0f} deliveries/s  request->client "
        )
        publish = f"request p50 {_ms(p.publish_p50_ms)} p99 {_ms(p.publish_p99_ms)} ms"
    line = (
        f"{head}p50 {_ms(p.p50_ms)} p99 {_ms(p.p99_ms)} max {_ms(p.max_ms)} ms\n"
        f"  {'':<18} first/last fifth p50 {_ms(p.first_fifth_p50_ms)}/{_ms(p.last_fifth_p50_ms)} ms, last fifth p99 "
        f"{_ms(p.last_fifth_p99_ms)} ms; {publish}; client read lag p99 {_ms(p.client_lag_p99_ms)} ms; "
        f"{p.windows if p.windows is not None else '-'} changefeed windows; worst {p.worst_second or '-'}\n"
        f"  {'':<18} CPU: {cpu}; correctness: {', '.join(problems) or 'exact'}"
        f"{'; TIMED OUT waiting for copies' if p.timed_out else ''}  [{'valid' if p.ok else 'INVALID'}]"
    )
    if p.error:
        line += f"\n    ERROR: {p.error}"
    for sample in p.samples:
        line += f"\n    sample: {sample}"
    return line


def target_verdict(args: argparse.Namespace, steps: list[Step]) -> dict[str, Any]:
    """The issue's target, judged on the steps at TARGET_DELIVERIES / SUBSCRIBERS_PER_CHANNEL sends/s."""
    rate = TARGET_DELIVERIES / SUBSCRIBERS_PER_CHANNEL
    at = [p for p in steps if p.kind == "sql" and p.rate == rate]
    if not at:
        return {"verdict": "NOT RUN", "reasons": [f"no step at {rate:g} sends/s (--rates)"]}
    reasons = []
    for p in at:
        if not p.ok:
            reasons.append(f"{p.name} invalid: {p.error or ', '.join(p.correctness_problems()) or 'timed out'}")
        if p.achieved_rate < SUSTAIN_OFFERED * p.rate:
            reasons.append(f"{p.name}: writers achieved only {p.achieved_rate:,.0f} sends/s")
        if p.deliveries_per_s < SUSTAIN_OFFERED * TARGET_DELIVERIES:
            reasons.append(f"{p.name}: {p.deliveries_per_s:,.0f} deliveries/s")
        if p.last_fifth_p99_ms is None or p.last_fifth_p99_ms >= TARGET_P99_MS:
            reasons.append(f"{p.name}: last fifth p99 {_ms(p.last_fifth_p99_ms)} ms")
    pooled = [x for p in at if p.ok for x in p.latencies_ms]
    p99 = percentile(pooled, 99) if pooled else None
    if p99 is None or p99 >= TARGET_P99_MS:
        reasons.append(f"pooled p99 {_ms(p99)} ms")
    return {
        "verdict": "FAIL" if reasons else "PASS",
        "reasons": reasons,
        "rounds": len(at),
        "p50_ms": percentile(pooled, 50) if pooled else None,
        "p99_ms": p99,
        "max_ms": max(pooled) if pooled else None,
        "deliveries_per_s_median": statistics.median(p.deliveries_per_s for p in at),
        "round_p99_ms": [p.p99_ms for p in at],
    }


def print_summary(args: argparse.Namespace, where: str, steps: list[Step]) -> dict[str, Any]:
    summary: dict[str, Any] = {"steps": {}}
    print()
    print(
        f"Summary: {CHANNELS} broadcast channels x {SUBSCRIBERS_PER_CHANNEL} subscribers "
        f"({CHANNELS * SUBSCRIBERS_PER_CHANNEL} connections), {args.rounds} round(s)"
    )
    print(f"  where: {where}")
    names = sorted({p.name.split("/")[0] for p in steps if not p.name.startswith("warmup")}, key=_step_order)
    for name in names:
        mine = [p for p in steps if p.name.split("/")[0] == name]
        ok = [p for p in mine if p.ok]
        pooled = [x for p in ok for x in p.latencies_ms]
        entry: dict[str, Any] = {"rounds": len(mine), "valid": len(ok)}
        if ok and pooled:
            entry.update(
                p50_ms=percentile(pooled, 50),
                p99_ms=percentile(pooled, 99),
                max_ms=max(pooled),
                deliveries_per_s=statistics.median(p.deliveries_per_s for p in ok),
                requests_per_s=statistics.median(p.requests_per_s for p in ok),
                messages_per_s=statistics.median(p.messages_per_s for p in ok),
                achieved_rate=statistics.median(p.achieved_rate for p in ok),
                cpu_pct={
                    k: statistics.median(p.cpu_pct[k] for p in ok if p.cpu_pct.get(k) is not None)
                    for k in ok[0].cpu_pct
                    if any(p.cpu_pct.get(k) is not None for p in ok)
                },
            )
            cpu = ", ".join(f"{k} {v:.0f}%" for k, v in entry["cpu_pct"].items())
            if mine[0].kind == "sql":
                what = (
                    f"{mine[0].rate:,.0f} sends/s offered, {entry['achieved_rate']:,.0f} achieved; "
                    f"{entry['deliveries_per_s']:,.0f} deliveries/s; commit->client"
                )
            else:
                what = (
                    f"{entry['requests_per_s']:,.0f} requests/s ({entry['messages_per_s']:,.0f} messages/s); "
                    f"{entry['deliveries_per_s']:,.0f} deliveries/s; request->client"
                )
            print(
                f"  {name:<16} {len(ok)}/{len(mine)} valid: {what} p50 {entry['p50_ms']:.1f} p99 "
                f"{entry['p99_ms']:.1f} max {entry['max_ms']:.1f} ms (pooled; rates are medians); CPU (median) {cpu}"
            )
        else:
            print(f"  {name:<16} 0/{len(mine)} valid")
        summary["steps"][name] = entry
    if "http" in args.phase_list:
        print(
            "  HTTP: every request is a connection of its own (fluxrt answers `Connection: close`; no keep-alive), "
            f"{args.http_concurrency} posting loops"
        )
    totals = {
        key: sum(getattr(p, key) for p in steps)
        for key in ("missing", "duplicates", "wrong_channel", "foreign", "unexpected", "lost_connections")
    }
    summary["correctness"] = totals
    copies = sum(p.delivered for p in steps)
    print(
        f"  correctness over {len(steps)} steps (warm-ups included; {sum(p.messages for p in steps):,} messages, "
        f"{copies:,} copies): "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items())
        + (" PASS" if not any(totals.values()) and all(p.ok for p in steps) else " FAIL")
    )
    if "sql" in args.phase_list:
        target = target_verdict(args, steps)
        summary["target"] = target
        print(
            f"  target: {TARGET_DELIVERIES:,.0f} deliveries/s sustained at commit->client p99 < {TARGET_P99_MS:g} ms "
            f"(database, server and clients on {len(args.all_cpus)} CPUs): {target['verdict']}"
            + (
                f" (p99 {_ms(target.get('p99_ms'))} ms pooled; each round's: "
                f"{', '.join(_ms(x) for x in target['round_p99_ms'])} ms)"
                if target.get("p99_ms") is not None
                else ""
            )
            + (f": {'; '.join(target['reasons'])}" if target["reasons"] else "")
        )
    return summary


def _step_order(name: str) -> tuple[int, float, str]:
    kind, _, rest = name.partition("-")
    try:
        return (0 if kind == "sql" else 1, float(rest), name)
    except ValueError:
        return (0 if kind == "sql" else 1, 0.0, name)


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin connection")
    parser.add_argument("--phases", default="sql,http", help="comma-separated subset of sql,http")
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"sends/s of the sql steps (default {DEFAULT_RATES})")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per sql step (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with a fresh server (default 3)")
    parser.add_argument("--http-seconds", type=float, default=5.0, help="seconds per http step (default 5)")
    parser.add_argument("--http-concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 4 s sql steps, 2 s http steps")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--python", default=sys.executable, help="interpreter for fluxrt and the subscribers")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin fluxrt and the clients to CPUs")
    parser.add_argument("--keep-db", action="store_true", help="don't drop the scratch database at the end")
    parser.add_argument(
        "--fluxrt-tree",
        type=Path,
        help="run fluxrt_trio from this source tree (e.g. a `git worktree` of the commit to measure while the working "
        "tree changes) instead of the repository's",
    )
    parser.add_argument(
        "--gc-record", action="store_true", help="time fluxrt's garbage collections (bench/gcprobe.py) per sql step"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the target and correctness hold")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.http_seconds = 1, 4.0, 2.0
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phase_list) - {"sql", "http"}
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}")
    args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    if args.fluxrt_tree is not None and not (args.fluxrt_tree / "fluxrt_trio" / "__init__.py").is_file():
        parser.error(f"--fluxrt-tree: no fluxrt_trio package in {args.fluxrt_tree}")
    args.fluxrt_from = {} if args.fluxrt_tree is None else {"fluxrt": args.fluxrt_tree.resolve()}
    args.all_cpus = sorted(os.sched_getaffinity(0))
    args.server_cpu, args.client_cpu = split_cpus(args.no_pin)
    return args


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def amain(args: argparse.Namespace) -> int:
    info = changes.machine_info()
    database, pg_version, settings = await scratch_database.create(args.dsn, ("synchronous_commit", "fsync"))
    info.update(postgres=pg_version, postgres_settings=settings, database=database, uptime_start=uptime())
    info["fluxrt"] = fanout.fluxrt_origin(args, "fluxrt")
    if args.server_cpu is None:
        where = "unpinned (fluxrt, subscribers, publishers and PostgreSQL share every CPU)"
    else:
        where = (
            f"fluxrt on CPU {args.server_cpu}; subscriber process and publishers (this driver) on CPU "
            f"{args.client_cpu}; PostgreSQL {pg_version} unpinned (shares both CPUs)"
        )
        os.sched_setaffinity(0, {args.client_cpu})
    print(
        f"publish bench: {info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, Python "
        f"{info['python']}, PostgreSQL {pg_version} (fsync={settings.get('fsync')}, synchronous_commit="
        f"{settings.get('synchronous_commit')}); scratch database {database}\n  uptime at start: "
        f"{info['uptime_start']}\n  fluxrt: {info['fluxrt']}\n  {where}",
        flush=True,
    )
    dsn = scratch_database.with_database(args.dsn, database)
    bench: Bench | None = None
    summary: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrt-bench-publish-") as tmp:
            bench = Bench(args, Path(tmp), dsn)
            for rnd in range(1, args.rounds + 1):
                try:
                    await bench.round(rnd)
                except Exception as exc:
                    print(f"  round {rnd} aborted: {type(exc).__name__}: {exc}", flush=True)
                    bench.steps.append(Step(f"round-{rnd}", "sql", 0.0, 0.0, error=f"{type(exc).__name__}: {exc}"))
            summary = print_summary(args, where, bench.steps)
            info["uptime_end"] = uptime()
            # Other work on the box (a test suite, another benchmark) shows here; the run does not stop it.
            print(f"  uptime at the end: {info['uptime_end']}")
    finally:
        if not args.keep_db:
            await scratch_database.drop(args.dsn, database)
    if args.json and bench is not None:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "fluxrt_from")},
            "machine": info,
            "where": where,
            "summary": summary,
            "steps": [{k: v for k, v in asdict(p).items() if k != "latencies_ms"} for p in bench.steps],
        }
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str))
    correct = bench is not None and all(p.ok for p in bench.steps)
    if not correct:
        return 2
    if args.check and summary.get("target", {}).get("verdict") != "PASS":
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.run_driver(amain, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
