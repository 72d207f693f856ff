"""Soak: many connections for a long time, with churn, broadcasts, presence and table changes; does anything grow?

A fluxrt process (started here, on a database of its own) serves N clients driven from this process on one asyncio
loop with raw sockets (bench/wsraw.py). Each client subscribes to a broadcast topic and a presence room (and tracks
itself there); one in ten also subscribes to a table. Every `--churn-every` seconds a `--churn` fraction of the
clients disconnects and as many new ones connect. Meanwhile a few clients publish broadcasts and a writer inserts
rows. A slot whose client the server closed is filled again at the next churn, like a client that reconnects.

The server's RSS, open file descriptors, Trio task count (`fluxrt_tasks`) and its `/metrics` gauges are sampled at
the end of a quiet period, right before a churn starts, once `--sample-every` seconds have passed since the last
sample, and once every client is connected and has the acks of all its subscribes (or after SETTLE_TIMEOUT; the
sample says how many were not): every sample then sees the same phase of the cycle. (Sampled at any moment, a
sample that fell while a churn's clients were still connecting counted them missing from the subscription gauges.)

Verdict (`--check` makes it the exit status): every series ends within 5% (or a small absolute slack) of its value
at the reference minute (`--reference`, default 5), and once every client has left, every gauge is back to zero
(and the task count to what it was before the first client).

    .venv/bin/python bench/soak.py                       # 10,000 connections, 30 minutes
    .venv/bin/python bench/soak.py --quick --check       # 1,000 connections, 3 minutes (what make test runs)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scratch_database
from common import ServerProcess, free_port, raise_nofile_limit
from wsraw import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, masked_frame, parse_frame

from fluxrt_trio.auth import mint

CONFIG = """\
server:
  host: 127.0.0.1
  port: {port}
auth:
  jwt_secret: {secret}
  allow_anonymous: false
database:
  dsn: {dsn}
  poll_interval: 50ms
realtime:
  max_connections: {max_connections}
  max_connections_per_user: 10
  message_rate_limit: 6000/min
log:
  level: warning
"""

TOPICS = 20
ROOMS = 50
HANDSHAKES_IN_FLIGHT = 16
STAYING = 1 + 4
"""tasks that stay once made: the table's delivery lane (tables.py), and trio-asyncio's watcher of each pooled
authorizer connection (at most 4, postgres/bridge.py)"""
TABLE_EVERY = 10
"""one client in this many subscribes to the table"""
GAUGES = ("fluxrt_connections", "fluxrt_presence_rooms", "fluxrt_tasks")
SUBSCRIPTION_KINDS = ("table", "presence", "broadcast")
SETTLE_TIMEOUT = 60.0
"""seconds a sample waits at most for every client to be upgraded and acknowledged"""
SLACK = {"rss_mib": 8.0, "fds": 20.0, "fluxrt_tasks": 20.0}
"""absolute slack on top of 5%, for series whose reference is small or noisy by a few units"""


class Client(asyncio.Protocol):
    """One WebSocket client: upgrades, subscribes, answers pings, counts what it receives."""

    def __init__(self, soak: Soak, n: int) -> None:
        self.soak = soak
        self.n = n
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.closed = False
        self.received = 0
        self.awaiting = 0
        """acks still due for this client's subscribes"""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.soak.handshaking += 1
        token = mint(self.soak.secret, f"user-{self.n % (self.soak.connections // 5 + 1)}", ttl=86400)
        transport.write(
            (
                f"GET /realtime?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: c29hay1iZW5jaC1rZXkwMQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self, **message: Any) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(masked_frame(orjson.dumps(message)))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.soak.refused += 1
                self.close()
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.soak.handshaking -= 1
            self.subscribe()
        while (frame := parse_frame(self.buf, strict=False)) is not None:
            opcode, payload, length = frame
            del self.buf[:length]
            if opcode == OP_TEXT:
                self.received += 1
                self.soak.received += 1
                if self.awaiting and b'"type":"ack"' in payload:
                    self.awaiting -= 1
            elif opcode == OP_PING and self.transport is not None:
                self.transport.write(masked_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.soak.closed_by_server[int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005] += 1
                self.close()
                return

    def subscribe(self) -> None:
        room = f"presence:room-{self.n % ROOMS}"
        self.awaiting = 2
        self.send(type="subscribe", channel=f"broadcast:topic-{self.n % TOPICS}")
        self.send(type="subscribe", channel=room)
        self.send(type="presence", channel=room, event="track", payload={"n": self.n})
        if self.n % TABLE_EVERY == 0:
            self.awaiting += 1
            self.send(type="subscribe", channel="table:public.soak_items")

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(masked_frame(b"\x03\xe8", OP_CLOSE))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and not self.upgraded:
            self.soak.handshaking -= 1
        self.closed = True
        # Its replacement may already hold the slot.
        if self.soak.clients.get(self.n) is self:
            del self.soak.clients[self.n]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.connections: int = args.connections
        self.secret = secrets.token_hex(32)
        self.port = free_port("127.0.0.1")
        self.clients: dict[int, Client] = {}
        self.received = 0
        self.refused = 0
        self.handshaking = 0
        self.closed_by_server: collections.Counter[int] = collections.Counter()
        """close codes of the closes the server started"""
        self.published = 0
        self.inserted = 0
        self.samples: list[dict[str, float]] = []

    async def connect(self, slots: list[int]) -> None:
        """Connect a client in each slot; a slot decides the client's user and channels, so replacing a client by
        one in the same slot keeps what the server should hold the same."""
        loop = asyncio.get_running_loop()
        for n in slots:
            # Like clients that back off and reconnect, not all at once: a node caps pending handshakes per address.
            while self.handshaking >= HANDSHAKES_IN_FLIGHT:
                await asyncio.sleep(0.005)
            client = Client(self, n)
            self.clients[n] = client
            try:
                await loop.create_connection(lambda c=client: c, "127.0.0.1", self.port)
            except OSError:
                self.clients.pop(n, None)
                self.refused += 1

    async def churn(self) -> None:
        """Replace a `--churn` fraction of the clients, and fill the slots whose client the server closed."""
        leaving = random.sample(list(self.clients.values()), int(len(self.clients) * self.args.churn))
        for client in leaving:
            client.close()
        vacant = [n for n in range(self.connections) if n not in self.clients]
        await self.connect(sorted({client.n for client in leaving} | set(vacant)))

    def unsettled(self) -> int:
        """Clients not yet upgraded, or whose subscribes are not all acknowledged."""
        return sum(1 for c in self.clients.values() if not c.upgraded or c.awaiting)

    async def settle(self, timeout: float) -> int:
        """Wait (at most `timeout`) until every client is upgraded and its subscribes acknowledged; returns how many
        are still not."""
        deadline = time.monotonic() + timeout
        while (unsettled := self.unsettled()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return unsettled

    async def publish(self, until: float) -> None:
        interval = 1.0 / self.args.broadcasts
        while time.monotonic() < until:
            await asyncio.sleep(interval)
            live = [c for c in list(self.clients.values())[:50] if c.upgraded and not c.closed]
            if live:
                random.choice(live).send(
                    type="broadcast",
                    channel=f"broadcast:topic-{self.published % TOPICS}",
                    payload={"i": self.published},
                )
                self.published += 1

    async def write_rows(self, dsn: str, until: float) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            interval = 1.0 / self.args.rows
            while time.monotonic() < until:
                await asyncio.sleep(interval)
                await conn.execute("INSERT INTO soak_items (body) VALUES ($1)", f"row {self.inserted}")
                self.inserted += 1
        finally:
            await conn.close()

    async def scrape(self) -> dict[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).decode()
        writer.close()
        values: dict[str, float] = {}
        for line in body.splitlines():
            match = re.match(r'^(fluxrt_[a-z_]+)(\{kind="([a-z]+)"\})? ([0-9.e+-]+)$', line)
            if match:
                name = match.group(1) if match.group(3) is None else f"subscriptions_{match.group(3)}"
                values[name] = float(match.group(4))
        return values

    async def sample(
        self, pid: int, started: float, quiet_since: float | None = None, unsettled: int | None = None
    ) -> dict[str, float]:
        """The server's figures now; `quiet_since` is when the last churn finished connecting its clients, and
        `unsettled` how many clients were still waiting for their handshake or an ack."""
        gauges = await self.scrape()
        with open(f"/proc/{pid}/status") as f:
            rss_kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]
        now = time.monotonic()
        point = {
            "minute": round((now - started) / 60, 2),
            **({"quiet_s": round(now - quiet_since, 1)} if quiet_since is not None else {}),
            **({"unsettled": float(unsettled)} if unsettled is not None else {}),
            "clients": float(len(self.clients)),
            "rss_mib": round(rss_kib / 1024, 1),
            "fds": float(len(os.listdir(f"/proc/{pid}/fd"))),
            **{name: gauges.get(name, 0.0) for name in GAUGES},
            **{f"subscriptions_{kind}": gauges.get(f"subscriptions_{kind}", 0.0) for kind in SUBSCRIPTION_KINDS},
        }
        return point


async def wait_ready(soak: Soak, server: ServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"fluxrt exited: {server.log_tail()}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", soak.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            body = await reader.read()
            writer.close()
            if b'"database":"ok"' in body:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"fluxrt not ready after {timeout}s: {server.log_tail()}")


async def run(args: argparse.Namespace) -> int:
    raise_nofile_limit()
    soak = Soak(args)
    name, _version, _settings = await scratch_database.create(args.dsn, prefix="fluxrt_soak")
    dsn = scratch_database.with_database(args.dsn, name)
    workdir = Path(tempfile.mkdtemp(prefix="fluxrt-soak-"))
    config = workdir / "fluxrt.yaml"
    config.write_text(
        CONFIG.format(port=soak.port, secret=soak.secret, dsn=dsn, max_connections=2 * args.connections + 100)
    )
    fluxrt = [args.python, "-m", "fluxrt_trio"]
    if args.probe:
        probe = ["--every", str(args.sample_every), *(["--trim"] if args.probe_trim else [])]
        fluxrt = [args.python, str(Path(__file__).resolve().parent / "memprobe.py"), args.probe, *probe, "--"]
    server = ServerProcess([*fluxrt, "--config", str(config)], workdir / "fluxrt.log", None)
    try:
        await wait_ready(soak, server)
        setup = await asyncpg.connect(dsn)
        try:
            await setup.execute(
                "CREATE TABLE soak_items (id bigserial PRIMARY KEY, body text);"
                "GRANT SELECT ON soak_items TO authenticated; SELECT enable_realtime('soak_items')"
            )
        finally:
            await setup.close()
        idle = await soak.sample(server.pid, time.monotonic())
        print(
            f"soak: {args.connections} connections, {args.minutes} min, churn {args.churn:.0%} every "
            f"{args.churn_every}s, {args.broadcasts} broadcasts/s, {args.rows} rows/s; fluxrt pid {server.pid}"
        )
        started = time.monotonic()
        until = started + args.minutes * 60
        await soak.connect(list(range(args.connections)))
        tasks = [
            asyncio.create_task(soak.publish(until)),
            asyncio.create_task(soak.write_rows(dsn, until)),
        ]
        next_sample = started + args.sample_every
        while True:
            # The quiet part of the cycle: the last churn's clients connect, subscribe and track.
            quiet_since = time.monotonic()
            await asyncio.sleep(args.churn_every)
            now = time.monotonic()
            if now >= next_sample or now >= until:
                unsettled = await soak.settle(SETTLE_TIMEOUT)
                point = await soak.sample(server.pid, started, quiet_since, unsettled)
                soak.samples.append(point)
                print("  " + "  ".join(f"{k} {v:g}" for k, v in point.items()), flush=True)
                next_sample += args.sample_every * max(1, math.ceil((now - next_sample) / args.sample_every))
            if now >= until:
                break
            await soak.churn()
        await asyncio.gather(*tasks)
        for client in list(soak.clients.values()):
            client.close()
        drained: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            drained = await soak.sample(server.pid, started)
            if (
                all(drained[k] == 0 for k in ("fluxrt_connections", "fluxrt_presence_rooms"))
                and all(drained[f"subscriptions_{kind}"] == 0 for kind in SUBSCRIPTION_KINDS)
                and drained["fluxrt_tasks"] <= idle["fluxrt_tasks"] + STAYING
            ):
                break
        return report(args, soak, idle, drained)
    finally:
        print(f"fluxrt: {server.stop()}")
        await scratch_database.drop(args.dsn, name)


def report(args: argparse.Namespace, soak: Soak, idle: dict[str, float], drained: dict[str, float]) -> int:
    problems: list[str] = []
    reference = next((p for p in soak.samples if p["minute"] >= args.reference), None)
    last = soak.samples[-1] if soak.samples else None
    print(
        f"\ntraffic: {soak.received:,} frames received, {soak.published:,} broadcasts, {soak.inserted:,} rows; "
        f"{soak.refused} refused, {soak.closed_by_server.total()} closed by the server"
        + (
            " (codes " + ", ".join(f"{code}: {n}" for code, n in sorted(soak.closed_by_server.items())) + ")"
            if soak.closed_by_server
            else ""
        )
    )
    if reference is None or last is None:
        problems.append(f"the run is shorter than the reference minute {args.reference}")
    else:
        print(
            f"both samples taken right before a churn, {reference['quiet_s']:g} s and {last['quiet_s']:g} s after the "
            f"previous churn's clients had connected, with {reference['unsettled']:g} and {last['unsettled']:g} "
            "clients not yet acknowledged"
        )
        print(f"{'series':<26}{'minute ' + str(reference['minute']):>14}{'last':>14}{'change':>10}")
        for key in ("rss_mib", "fds", *GAUGES, *(f"subscriptions_{k}" for k in SUBSCRIPTION_KINDS)):
            ref, end = reference[key], last[key]
            change = (end - ref) / ref if ref else 0.0
            allowed = 0.05 * ref + SLACK.get(key, 0.0)
            verdict = "ok" if abs(end - ref) <= allowed else "GREW" if end > ref else "FELL"
            print(f"{key:<26}{ref:>14g}{end:>14g}{change:>+10.1%}  {verdict}")
            if verdict != "ok":
                problems.append(f"{key} went from {ref:g} to {end:g}")
    print("after every client left: " + ", ".join(f"{k} {v:g}" for k, v in drained.items() if k != "minute"))
    for key in ("fluxrt_connections", "fluxrt_presence_rooms", *(f"subscriptions_{k}" for k in SUBSCRIPTION_KINDS)):
        if drained.get(key, 0) != 0:
            problems.append(f"{key} is {drained[key]:g} after every client left")
    if drained.get("fluxrt_tasks", 0) > idle.get("fluxrt_tasks", 0) + STAYING:
        problems.append(
            f"fluxrt_tasks is {drained['fluxrt_tasks']:g} after every client left, {idle['fluxrt_tasks']:g} before "
            f"the first (plus at most {STAYING} that stay: the table's lane, the pool's connection watchers)"
        )
    if soak.refused:
        problems.append(f"{soak.refused} connections were refused")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems and args.check else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--churn", type=float, default=0.10, help="fraction of clients replaced at each churn")
    parser.add_argument("--churn-every", type=float, default=10.0, help="seconds between churns")
    parser.add_argument("--broadcasts", type=float, default=50.0, help="broadcasts per second")
    parser.add_argument("--rows", type=float, default=20.0, help="rows inserted per second")
    parser.add_argument(
        "--sample-every",
        type=float,
        default=10.0,
        help="seconds between samples at least; each is taken right before the churn that follows",
    )
    parser.add_argument("--reference", type=float, default=5.0, help="the minute whose values the last must match")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("FLUXRT_SOAK_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a superuser DSN; the soak creates and drops a database of its own",
    )
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--probe",
        metavar="FILE",
        help="run fluxrt under bench/memprobe.py, which appends what its memory holds to FILE every --sample-every s",
    )
    parser.add_argument("--probe-trim", action="store_true", help="with --probe: malloc_trim(0) at each probe line")
    parser.add_argument("--quick", action="store_true", help="1,000 connections for 3 minutes, reference minute 1")
    parser.add_argument("--check", action="store_true", help="exit 1 unless everything stayed flat and drained")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.minutes, args.reference = 1000, 3.0, 1.0
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
