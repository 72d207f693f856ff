"""Connect storm (issue 16): N clients (10,000) connect to one fluxrt at once, each with its own HS256 token (a
distinct ``sub``), and each subscribes to a table channel and a presence room, then tracks its presence there.

The scenario: a scratch database with one realtime-enabled table (``storm_items``, SELECT granted to
``authenticated``, no row-level security), a fresh fluxrt per round (``python -m fluxrt_trio --config``, a real
process) and one client process (``bench/connect_clients.py``, non-blocking raw sockets on one epoll) that prepares
every request first and then, on "go", opens every connection as fast as it can (64 connects between two polls of
its epoll, so answers are read while the storm goes on). Each client, once upgraded (101), sends both subscribes in
one write (``table:public.storm_items`` first, then its room) and, once the room's subscribe is acked, tracks
``{"n": i}`` with a ``ref`` (``--no-track`` leaves this out; ``--handshake-only`` stops each client at its 101, to
measure the handshake alone). Rooms hold ``--room-size`` clients (10): one room of
10,000 would make every join a diff to 10,000 members, 10^8 frames, which measures presence fan-out rather than
connecting; with rooms of 10 the tracks cost 10 diffs each.

Per round:

- **handshakes/s**: 101 responses / time from the first ``connect()`` to the last 101's arrival;
- **all subscribed**: time from the first ``connect()`` until the last client had both acks (and **all tracked**
  until the last ``tracked`` ack);
- **connect p50/p99/max**: per client, from just before its ``connect()`` to the arrival of its 101 (TCP connect,
  upgrade request, JWT check, 101); **both acks p99**: to the later of its two subscribe acks; **tracked p99**;
- **errors by kind** (see connect_clients.py: refused connects, resets, HTTP refusals, close and error frames,
  timeouts);
- fluxrt's and PostgreSQL's CPU seconds over the storm, and the client's own; the scratch database's transactions
  over the storm (see bench/README.md for why the idle-corrected figure is rough).

Arrival times are the kernel's receive timestamps, so the client process being busy does not add to them. Rounds
(``--rounds``, 3) each start a fresh server and client process; the summary gives each round and the median
handshakes/s, and PASS when that median is at least ``--target`` (3,000/s) and no round had an error.

``--compare-tree DIR`` also runs fluxrt_trio from DIR (e.g. a ``git worktree`` of the commit before a change) in
every round, beside the one measured, alternating which goes first: the same-run baseline. Its figures are printed
with a ``was`` label and the summary gives both medians and their ratio; the verdict is the measured tree's.

``--profile DIR`` adds one more round, not counted in the verdict, with py-spy sampling fluxrt (non-blocking,
native frames) during the storm: the collapsed stacks go to DIR and the top frames by share are printed.

With 2+ CPUs fluxrt runs on the first CPU, the client process (and this driver) on the second; PostgreSQL is not
pinned. Run from the repository root with the project venv:

    .venv/bin/python bench/connect.py                 # 10,000 clients, 3 rounds: about a minute
    .venv/bin/python bench/connect.py --quick         # 1,000 clients
    .venv/bin/python bench/connect.py --profile /tmp/connect-profile --json /tmp/connect.json
    .venv/bin/python bench/connect.py --compare-tree /tmp/base-connect   # beside a worktree of an older commit
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import common
import gcprobe
import jwt
import orjson
import scratch_database
from changes import fluxrt_source, machine_info
from common import BENCH_DIR, REPO_ROOT, free_port, percentile, postgres_cpu_since, postgres_cpus, proc_cpu

TABLE = "table:public.storm_items"
TARGET_PER_S = 3000.0
# The database's transactions are counted over a few seconds of idle before the storm (fluxrt's changefeed polls)
# and read again this long after it: a PostgreSQL 15 backend reports its counts at most once a second while busy and
# within 10 s of going idle (PGSTAT_IDLE_INTERVAL).
IDLE_SAMPLE_S = 3.0
STATS_FLUSH_S = 11.0

FLUXRT_CONFIG = """\
server:
  host: {host}
  port: {port}
  path: /realtime
  # Every client connects from the same few addresses, all at once.
  max_pending_handshakes_per_address: {pending}
auth:
  jwt_secret: {secret}
  allow_anonymous: false
database:
  dsn: {dsn}
  migrate: true
realtime:
  max_connections: {max_connections}
  # Every client has its own sub, so one connection per user; fluxrt's default (10) is kept.
  max_connections_per_user: 10
log:
  level: warning
"""

SCHEMA = """
CREATE TABLE storm_items (id bigserial PRIMARY KEY, body text);
GRANT SELECT ON storm_items TO authenticated;
SELECT enable_realtime('storm_items');
"""


def fluxrt_config(args: argparse.Namespace, port: int, secret: str, dsn: str) -> str:
    return FLUXRT_CONFIG.format(
        host=args.host,
        port=port,
        secret=secret,
        dsn=dsn,
        pending=args.clients * 2,
        max_connections=args.clients + max(1000, args.clients // 5),
    )


class Server(common.ServerProcess):
    """fluxrt as a separate process, pinned to the server CPU."""

    def __init__(
        self, args: argparse.Namespace, tree: Path | None, workdir: Path, secret: str, dsn: str, *, baseline: bool
    ) -> None:
        self.host: str = args.host
        self.port = free_port(self.host)
        config = workdir / f"fluxrt-{self.port}.yaml"
        config.write_text(fluxrt_config(args, self.port, secret, dsn))
        self.gc_record = workdir / f"gc-{self.port}.json"
        threshold = None if baseline else args.gc_threshold
        argv = fluxrt_argv(args, tree, config, probe=self.gc_record, gc_threshold=threshold)
        super().__init__(argv, workdir / f"fluxrt-{self.port}.log", args.server_cpu)

    def healthy(self) -> bool:
        answer = common.health(self.host, self.port)
        return answer is not None and answer.get("database") == "ok"

    def wait_ready(self, timeout: float) -> None:
        """Until GET /health answers 200 with "database": "ok"; RuntimeError if it exits or does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fluxrt exited with {self.proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"fluxrt not healthy after {timeout}s: {self.log_tail()}")


def fluxrt_argv(
    args: argparse.Namespace,
    tree: Path | None,
    config: Path,
    *command: str,
    probe: Path | None = None,
    gc_threshold: str | None = None,
) -> list[str]:
    """`python -m fluxrt_trio --config CONFIG COMMAND...`, run in `tree` when given (`env -C` changes directory and
    execs, so the process is still the one measured); `-m` imports fluxrt_trio from there first. With `probe`,
    through bench/gcprobe.py, which writes every garbage collection's pause there at exit."""
    where = [] if tree is None else ["env", "-C", str(tree)]
    python = [args.python]
    if probe is not None:
        python.append(str(BENCH_DIR / "gcprobe.py"))
        if gc_threshold:
            python += ["--threshold", gc_threshold]
        python.append(str(probe))
    return [*where, *python, "-m", "fluxrt_trio", "--config", str(config), *command]


def tree_source(args: argparse.Namespace, tree: Path | None) -> str:
    """Which fluxrt a server runs: the working tree (and whether fluxrt_trio/ has uncommitted changes there) or
    `tree` and its commit."""
    if tree is None:
        return fluxrt_source(args.python)
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "fluxrt_trio"], capture_output=True, text=True).stdout
    return f"{tree}/fluxrt_trio at commit {commit} ({'uncommitted changes' if dirty.strip() else 'clean'})"


def make_plan(n: int, room_size: int, secret: str, table: bool) -> dict[str, Any]:
    """N clients, each with its own token (sub: a fresh uuid) and room presence:room-<i // room_size>; all subscribe
    to TABLE too unless `table` is false."""
    now = int(time.time())
    clients = [
        {
            "token": jwt.encode({"sub": str(uuid.uuid4()), "iat": now, "exp": now + 6 * 3600}, secret, "HS256"),
            "room": f"presence:room-{i // room_size}",
        }
        for i in range(n)
    ]
    return {"table": TABLE if table else None, "clients": clients}


def read_event(proc: subprocess.Popen[str], want: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"client process ended (exit {proc.wait()}) before {want!r}")
    event = orjson.loads(line)
    if event["event"] != want:
        raise RuntimeError(f"client process: expected {want!r}, got {event}")
    return event


def start_profiler(args: argparse.Namespace, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling fluxrt with native frames (so C calls show), as collapsed stacks; it pauses the server for
    each sample (native frames need that), so the profiled round's figures are not comparable with the others."""
    py_spy = Path(args.python).parent / "py-spy"
    argv = [str(py_spy), "record", "--native", "--format", "raw", "--rate", "200"]
    profiler = subprocess.Popen(
        [*argv, "--pid", str(pid), "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(1.0)  # attaching takes a moment; the storm should be sampled from its start
    if profiler.poll() is not None:
        assert profiler.stderr is not None
        raise RuntimeError(f"py-spy exited with {profiler.returncode}: {profiler.stderr.read().decode()[-500:]}")
    return profiler


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def top_frames(collapsed: Path, limit: int) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: the frames with the largest share of samples on top of the stack (self) and
    anywhere in it (inclusive, each frame counted once per stack), as (frame, percent of samples)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):  # the first is the thread
            inclusive[frame] += n
    if not total:
        return {"self": [], "inclusive": [], "samples": []}
    return {
        "samples": [("total", total)],
        "self": [(f, 100 * n / total) for f, n in own.most_common(limit)],
        "inclusive": [(f, 100 * n / total) for f, n in inclusive.most_common(limit)],
    }


def sysctl(name: str) -> str:
    """A kernel setting from /proc/sys (`net/core/somaxconn`), or "?" where it cannot be read."""
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


def ms(ns: int) -> float:
    return ns / 1e6


def measure(times: dict[str, list[int]], clients: int, tracking: bool, table: bool) -> dict[str, Any]:
    """A round's figures from the per-client times (ns; 0 = did not happen); without `table` "both acks" is the
    presence ack alone."""
    start = [t for t in times["start"] if t]
    t0 = min(start)
    upgraded = [(u, s) for u, s in zip(times["upgraded"], times["start"], strict=True) if u]
    acked = [
        (max(a, b), s)
        for a, b, s in zip(times["table_ack"], times["presence_ack"], times["start"], strict=True)
        if (a or not table) and b
    ]
    tracked = [(t, s) for t, s in zip(times["tracked"], times["start"], strict=True) if t]
    opened = [o - s for o, s in zip(times["open"], times["start"], strict=True) if o]

    def spread(pairs: list[tuple[int, int]]) -> dict[str, float | None]:
        values = [ms(t - s) for t, s in pairs]
        if not values:
            return {"p50": None, "p99": None, "max": None}
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}

    last_upgrade = max((u for u, _ in upgraded), default=t0)
    return {
        "clients": clients,
        "upgraded": len(upgraded),
        "subscribed": len(acked),
        "tracked": len(tracked),
        "issue_ms": ms(max(start) - t0),
        "handshakes_per_s": len(upgraded) / ((last_upgrade - t0) / 1e9) if upgraded else 0.0,
        "all_upgraded_ms": ms(last_upgrade - t0),
        "all_subscribed_ms": ms(max(t for t, _ in acked) - t0) if acked else None,
        "all_tracked_ms": ms(max(t for t, _ in tracked) - t0) if tracked and tracking else None,
        "tcp_open_p99_ms": percentile([ms(v) for v in opened], 99) if opened else None,
        "connect_ms": spread(upgraded),
        "both_acks_ms": spread(acked),
        "tracked_ms": spread(tracked),
    }


def transactions(admin_dsn: str, database: str) -> int:
    """Transactions committed and rolled back in `database` so far (pg_stat_database, as the backends last
    reported them)."""

    async def ask() -> int:
        conn = await asyncpg.connect(admin_dsn)
        try:
            return int(
                await conn.fetchval(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", database
                )
            )
        finally:
            await conn.close()

    return asyncio.run(ask())


def run_round(
    args: argparse.Namespace,
    tree: Path | None,
    workdir: Path,
    secret: str,
    dsn: str,
    database: str,
    plan_path: Path,
    label: str,
) -> dict[str, Any]:
    server = Server(args, tree, workdir, secret, dsn, baseline=label.startswith("was"))
    clients: subprocess.Popen[str] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    out = workdir / f"times-{label}.json"
    try:
        server.wait_ready(args.startup_timeout)
        argv = [args.python, str(BENCH_DIR / "connect_clients.py"), "--host", args.host, "--port", str(server.port)]
        argv += ["--plan", str(plan_path), "--out", str(out), "--sources", str(args.sources)]
        argv += ["--timeout", str(args.timeout), "--connect-batch", str(args.connect_batch)]
        if args.track:
            argv.append("--track")
        if args.handshake_only:
            argv.append("--handshake-only")
        if args.client_cpu is not None:
            argv += ["--cpu", str(args.client_cpu)]
        clients = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        read_event(clients, "prepared")
        if label.startswith("profiled"):
            profiler = start_profiler(args, server.pid, args.profile / "connect-storm.txt")
        time.sleep(0.5)  # let the server settle after start-up
        idle0 = (time.monotonic(), transactions(args.dsn, database))
        time.sleep(IDLE_SAMPLE_S)
        idle1 = (time.monotonic(), transactions(args.dsn, database))
        server_cpu0 = proc_cpu(server.pid)
        storm0 = time.monotonic()
        pg0 = postgres_cpus()
        assert clients.stdin is not None
        clients.stdin.write("go\n")
        clients.stdin.flush()
        done = read_event(clients, "done")
        server_cpu = (proc_cpu(server.pid) or 0.0) - (server_cpu0 or 0.0)
        pg_cpu = postgres_cpu_since(pg0)
        storm_end = time.monotonic()
        storm_s = storm_end - storm0
        time.sleep(STATS_FLUSH_S)
        storm_xacts = transactions(args.dsn, database) - idle1[1]
        idle_rate = (idle1[1] - idle0[1]) / (idle1[0] - idle0[0])
        if profiler is not None:
            stop_profiler(profiler)
            profiler = None
        result = measure(orjson.loads(out.read_bytes()), args.clients, args.track, args.table)
        result.update(
            label=label,
            errors=done["errors"],
            error_samples=done["samples"],
            presence_frames=done["presence_frames"],
            open_connections=done["open_connections"],
            storm_wall_s=done["wall_s"],
            client_cpu_s=done["cpu_s"],
            server_cpu_s=server_cpu,
            server_cpu_ms_per_client=1000 * server_cpu / args.clients,
            postgres_cpu_s=pg_cpu,
            db_transactions=storm_xacts,
            db_transactions_idle_per_s=idle_rate,
            db_transactions_beyond_idle=storm_xacts - idle_rate * (storm_s + STATS_FLUSH_S),
            server_alive=server.proc.poll() is None,
        )
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        if clients is not None:
            common.stop_child(clients)
        result_stop = server.stop()
        if "killed" in result_stop:
            print(f"  warning: fluxrt {result_stop}", flush=True)
    if server.gc_record.is_file():
        result["gc"] = gcprobe.summary(str(server.gc_record), storm0, storm_end)
    return result


def median_cpu(rounds: list[dict[str, Any]]) -> float:
    return statistics.median(r["server_cpu_ms_per_client"] for r in rounds)


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    """The median of a figure that a round may lack (None): infinity when any round lacks it."""
    values = [r[key] for r in rounds]
    return math.inf if None in values else statistics.median(values)


def fmt_round(r: dict[str, Any]) -> str:
    def f(v: float | None, unit: str = " ms") -> str:
        return "-" if v is None else f"{v:,.1f}{unit}"

    errors = ", ".join(f"{n} {k}" for k, n in sorted(r["errors"].items())) or "none"
    connect, acks = r["connect_ms"], r["both_acks_ms"]
    return (
        f"  {r['label']:>12}: {r['handshakes_per_s']:,.0f} handshakes/s "
        f"({r['upgraded']:,}/{r['clients']:,} upgraded in "
        f"{f(r['all_upgraded_ms'])}; connects issued over {f(r['issue_ms'])}); "
        f"all subscribed {f(r['all_subscribed_ms'])}, all tracked {f(r['all_tracked_ms'])}\n"
        f"            connect p50/p99/max {f(connect['p50'], '')}/{f(connect['p99'], '')}/"
        f"{f(connect['max'])} (TCP open p99 {f(r['tcp_open_p99_ms'])}); both acks p50/p99/max "
        f"{f(acks['p50'], '')}/{f(acks['p99'], '')}/{f(acks['max'])}; tracked p99 "
        f"{f(r['tracked_ms']['p99'])}\n"
        f"            CPU s: fluxrt {r['server_cpu_s']:.2f} ({r['server_cpu_ms_per_client']:.2f} ms/client), "
        f"PostgreSQL {r['postgres_cpu_s']:.2f}, clients "
        f"{r['client_cpu_s']:.2f}; database transactions {r['db_transactions']:,} "
        f"({r['db_transactions_beyond_idle']:,.0f} beyond the idle rate of {r['db_transactions_idle_per_s']:,.0f}/s)\n"
        f"            presence frames received {r['presence_frames']:,}; errors: {errors}"
        + (f"\n            {fmt_gc(r['gc'])}" if "gc" in r else "")
    )


def fmt_gc(gc: dict[str, Any], during: str = "the storm") -> str:
    per = ", ".join(
        f"gen {g}: {v['count']:,} taking {v['total_ms']:,.1f} ms (longest {v['max_ms']:.1f})"
        for g, v in gc["by_generation"].items()
    )
    return f"garbage collections during {during}: {gc['total_ms']:,.1f} ms in all, longest {gc['max_ms']:.1f} ms; {per}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin connection")
    parser.add_argument("--clients", type=int, default=10000, help="clients per round (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh server (default 3)")
    parser.add_argument("--room-size", type=int, default=10, help="clients per presence room (default 10)")
    parser.add_argument("--no-track", dest="track", action="store_false", help="subscribe only, no presence track")
    parser.add_argument(
        "--handshake-only",
        action="store_true",
        help="clients stop at the 101 (no subscribe, no track): what the handshake alone costs",
    )
    parser.add_argument(
        "--no-table", dest="table", action="store_false", help="presence room only: what the table subscribe costs"
    )
    parser.add_argument("--sources", type=int, help="loopback source addresses (default: one per 20,000 clients)")
    parser.add_argument("--connect-batch", type=int, default=64, help="connects between two client polls")
    parser.add_argument("--target", type=float, default=TARGET_PER_S, help="handshakes/s to pass (default 3,000)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a storm may take (default 60)")
    parser.add_argument("--quick", action="store_true", help="1,000 clients")
    parser.add_argument("--profile", type=Path, help="one more round, profiled with py-spy, stacks into this folder")
    parser.add_argument(
        "--fluxrt-tree",
        type=Path,
        help="run fluxrt_trio from this source tree (e.g. a `git worktree` of a commit) instead of the working tree",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also run fluxrt_trio from this tree in every round (labelled `was`), alternating which goes first: "
        "the same-run baseline of a change",
    )
    parser.add_argument(
        "--gc-threshold",
        help="A,B,C: gc.set_threshold(A, B, C) in the measured fluxrt before it starts (not in --compare-tree's): "
        "a policy tried against the same tree, `--compare-tree .`",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--python", default=sys.executable, help="interpreter for fluxrt and the clients")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin fluxrt and the clients to CPUs")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients = 1000
    if args.fluxrt_tree is not None:
        args.fluxrt_tree = args.fluxrt_tree.resolve()
        if not (args.fluxrt_tree / "fluxrt_trio" / "__init__.py").is_file():
            parser.error(f"--fluxrt-tree: no fluxrt_trio package in {args.fluxrt_tree}")
    if args.compare_tree is not None:
        args.compare_tree = args.compare_tree.resolve()
        if not (args.compare_tree / "fluxrt_trio" / "__init__.py").is_file():
            parser.error(f"--compare-tree: no fluxrt_trio package in {args.compare_tree}")
    if args.sources is None:
        args.sources = max(1, math.ceil(args.clients / 20000))
    args.server_cpu, args.client_cpu = common.split_cpus(args.no_pin)
    return args


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.raise_nofile_limit()
    info = machine_info()
    info["fluxrt"] = tree_source(args, args.fluxrt_tree)
    if args.compare_tree is not None:
        info["was"] = tree_source(args, args.compare_tree)
    info["uptime_start"] = uptime()
    # They decide whether a storm waits for SYNs sent again after 1 s and 3 s (fluxrt asks for a backlog of 65,535).
    info["somaxconn"], info["tcp_max_syn_backlog"] = (
        sysctl("net/core/somaxconn"),
        sysctl("net/ipv4/tcp_max_syn_backlog"),
    )
    database, pg_version, _ = asyncio.run(scratch_database.create(args.dsn))
    if args.server_cpu is None:
        where = "unpinned (fluxrt, clients and PostgreSQL share every CPU)"
    else:
        where = (
            f"fluxrt on CPU {args.server_cpu}; clients and this driver on CPU {args.client_cpu}; PostgreSQL unpinned"
        )
        os.sched_setaffinity(0, {args.client_cpu})
    print(
        f"connect bench: {args.clients:,} clients x {args.rounds} rounds, rooms of {args.room_size}, "
        + (
            "handshake only, "
            if args.handshake_only
            else f"{'track' if args.track else 'no track'}, {TABLE if args.table else 'no table channel'}, "
        )
        + f"{args.sources} source address(es)\n"
        f"  {info['nproc']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, Python {info['python']}, "
        f"PostgreSQL {pg_version}; scratch database {database}\n  fluxrt: {info['fluxrt']}\n"
        + (f"  was (same-run baseline): {info['was']}\n" if args.compare_tree is not None else "")
        + f"  kernel queues: net.core.somaxconn {info['somaxconn']}, "
        f"net.ipv4.tcp_max_syn_backlog {info['tcp_max_syn_backlog']}\n"
        f"  {where}\n"
        f"  uptime at start: {info['uptime_start']}",
        flush=True,
    )
    dsn = scratch_database.with_database(args.dsn, database)
    secret = secrets.token_hex(32)
    rounds: list[dict[str, Any]] = []
    was_rounds: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrt-bench-connect-") as tmp:
            workdir = Path(tmp)
            migrate = workdir / "migrate.yaml"
            migrate.write_text(fluxrt_config(args, 1, secret, dsn))
            subprocess.run(
                fluxrt_argv(args, args.fluxrt_tree, migrate, "migrate"),
                cwd=REPO_ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
            )

            async def schema() -> None:
                conn = await asyncpg.connect(dsn)
                try:
                    await conn.execute(SCHEMA)
                finally:
                    await conn.close()

            asyncio.run(schema())
            plan_path = workdir / "plan.json"
            plan_path.write_bytes(orjson.dumps(make_plan(args.clients, args.room_size, secret, args.table)))
            runs: list[tuple[str, Path | None, list[dict[str, Any]]]] = []
            for i in range(args.rounds):
                now = (f"round {i + 1}", args.fluxrt_tree, rounds)
                was = (f"was round {i + 1}", args.compare_tree, was_rounds)
                # Alternate which tree goes first, so slow drift on a shared box hits both alike.
                runs += [now] if args.compare_tree is None else [now, was] if i % 2 == 0 else [was, now]
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                runs.append(("profiled", args.fluxrt_tree, []))
            for label, tree, into in runs:
                r = run_round(args, tree, workdir, secret, dsn, database, plan_path, label)
                print(fmt_round(r), flush=True)
                if label == "profiled":
                    profile = {"round": r, "top": top_frames(args.profile / "connect-storm.txt", 15)}
                into.append(r)
    finally:
        asyncio.run(scratch_database.drop(args.dsn, database))
    rates = [r["handshakes_per_s"] for r in rounds]
    median_rate = statistics.median(rates)
    errors = sum(sum(r["errors"].values()) for r in rounds)
    passed = median_rate >= args.target and errors == 0
    info["uptime_end"] = uptime()
    if profile is not None:
        samples = profile["top"]["samples"][0][1] if profile["top"]["samples"] else 0
        print(f"  py-spy profile of fluxrt ({samples} samples, {args.profile / 'connect-storm.txt'}):")
        for kind in ("self", "inclusive"):
            print(f"    top frames, {kind}:")
            for frame, pct in profile["top"][kind]:
                print(f"      {pct:5.1f}%  {frame}")
    print(
        f"  median {median_rate:,.0f} handshakes/s (rounds {', '.join(f'{x:,.0f}' for x in rates)}), "
        f"{errors} errors; median fluxrt CPU {median_cpu(rounds):.2f} ms/client"
    )
    was_median: float | None = None
    if was_rounds:
        was_rates = [r["handshakes_per_s"] for r in was_rounds]
        was_median = statistics.median(was_rates)
        was_errors = sum(sum(r["errors"].values()) for r in was_rounds)
        print(
            f"  was: median {was_median:,.0f} handshakes/s (rounds {', '.join(f'{x:,.0f}' for x in was_rates)}), "
            f"{was_errors} errors; median fluxrt CPU {median_cpu(was_rounds):.2f} ms/client\n"
            f"  now / was: handshakes/s x{median_rate / was_median:.2f}, all subscribed "
            f"x{median_of(rounds, 'all_subscribed_ms') / median_of(was_rounds, 'all_subscribed_ms'):.2f}, "
            f"fluxrt CPU per client x{median_cpu(rounds) / median_cpu(was_rounds):.2f}"
        )
    print(f"  uptime at end: {info['uptime_end']}")
    print(
        f"{'PASS' if passed else 'FAIL'}: {median_rate:,.0f} handshakes/s (target {args.target:,.0f}), {errors} errors"
    )
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "machine": info,
            "where": where,
            "rounds": rounds,
            "was_rounds": was_rounds,
            "was_median_handshakes_per_s": was_median,
            "profile": profile,
            "median_handshakes_per_s": median_rate,
            "errors": errors,
            "passed": passed,
        }
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
