"""Row-level security at scale: 1,000 subscribers with distinct identities on one table, both ways of deciding.

Scenarios (issue 6), each measured twice in the same run, on a fresh fluxrt each time:

* teams: the policy admits a row to the 10 members of its team, ``team_id = ((SELECT auth.jwt()) ->> 'team')::int``
  (100 teams, so each change has 10 recipients);
* own rows: ``user_id = (SELECT auth.uid())``, one recipient per change;

once as written (one query per role: ``set``) and once with per-identity evaluation forced (``per identity``):
the forced table's policy wraps the same expression in ``bench.same(x)``, an IMMUTABLE SQL function that PostgreSQL
inlines (so the per-identity evaluation costs what the plain policy costs) but that the rewrite does not know, so
fluxrt decides that table one identity at a time.

Writers (2 asyncpg connections) insert rows in batched transactions every 10 ms at each offered rate of
``--rates`` for ``--step-seconds``; the subscribers (bench/changes_clients.py) record every delivery with its kernel
receive time. Each table first gets an unmeasured warm-up step (``--warmup-seconds``, 2 s at the first rate): the
first changes also pay for planning the policies and opening connections. Printed per step: offered and written
changes/s, RLS-checked deliveries/s (deliveries over the time from the first commit to the last delivery),
commit-to-client p50/p99, and deliveries missing, late (to the right subscriber, of an earlier step's change),
other (errors and frames that are no row delivery) and leaked: a change delivered to a subscriber whose identity
the policy does not admit. Any leak, in any step (the warm-up too), makes the run exit 1.

Where the CPU went in each step (from the first write to the last copy collected), as % of one CPU: fluxrt, the
PostgreSQL backends of the scratch database (the authorizer's, which run the policies, apart from the others: the
changefeed's, the writers'), every other postgres process on the machine (other work on the box shows there), the
subscriber process, and this driver (the writers).

``--compare-tree DIR`` runs every table with that tree's fluxrt_trio too (e.g. ``git worktree add /tmp/base-rls
<commit>``), on a scratch database of its own migrated by it; the two trees take turns going first, table by table
and round by round (``--rounds``), so both are one run's before and after.

    .venv/bin/python bench/rls.py               # ~3 minutes
    .venv/bin/python bench/rls.py --quick       # ~1 minute smoke run
    .venv/bin/python bench/rls.py --tables teams_set,own_set --rates 1000,3000,5000 --compare-tree /tmp/base-rls
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import changes
import fanout
import jwt
import orjson
import scratch_database
from common import percentile, postgres_cpus, proc_cpu

SUBSCRIBERS = 1000
TEAMS = 100
TICK = 0.01

SCHEMA = """
CREATE SCHEMA bench;
CREATE FUNCTION bench.same(x anyelement) RETURNS anyelement LANGUAGE sql IMMUTABLE AS 'SELECT x';
GRANT USAGE ON SCHEMA bench TO authenticated;
CREATE TABLE teams_set (id bigserial PRIMARY KEY, seq bigint NOT NULL, team_id int NOT NULL);
CREATE POLICY team ON teams_set FOR SELECT USING (team_id = ((SELECT auth.jwt()) ->> 'team')::int);
CREATE TABLE teams_forced (id bigserial PRIMARY KEY, seq bigint NOT NULL, team_id int NOT NULL);
CREATE POLICY team ON teams_forced FOR SELECT USING (team_id = bench.same(((SELECT auth.jwt()) ->> 'team')::int));
CREATE TABLE own_set (id bigserial PRIMARY KEY, seq bigint NOT NULL, user_id uuid NOT NULL);
CREATE POLICY own ON own_set FOR SELECT USING (user_id = (SELECT auth.uid()));
CREATE TABLE own_forced (id bigserial PRIMARY KEY, seq bigint NOT NULL, user_id uuid NOT NULL);
CREATE POLICY own ON own_forced FOR SELECT USING (user_id = bench.same((SELECT auth.uid())));
"""
TABLES = ("teams_set", "teams_forced", "own_set", "own_forced")


class Run:
    """One tree's fluxrt (`kind`: "fluxrt" this tree's, "was" --compare-tree's) on its own scratch database."""

    def __init__(self, args: argparse.Namespace, workdir: Path, dsn: str, database: str, kind: str) -> None:
        self.args, self.workdir, self.dsn, self.database, self.kind = args, workdir, dsn, database, kind
        self.secret = secrets.token_hex(32)
        self.users = [uuid.uuid4() for _ in range(SUBSCRIBERS)]
        now = int(time.time())
        self.tokens = [
            jwt.encode(
                {"sub": str(u), "team": i % TEAMS, "iat": now, "exp": now + 6 * 3600}, self.secret, algorithm="HS256"
            )
            for i, u in enumerate(self.users)
        ]
        self.seq = 1
        self.leaks = 0
        """deliveries to an identity the policy does not admit, over every step"""

    @property
    def label(self) -> str:
        return "this tree" if self.kind == "fluxrt" else "compared"

    async def prepare(self) -> None:
        """Migrate the scratch database with this tree's fluxrt, then create the bench's tables."""
        config = self.workdir / f"migrate-{self.kind}.yaml"
        config.write_text(changes.fluxrt_config(self.args, self.args.host, 1, self.secret, self.dsn))
        proc = await asyncio.create_subprocess_exec(
            *fanout.fluxrt_command(self.args, self.kind),
            "-m",
            "fluxrt_trio",
            "--config",
            str(config),
            "migrate",
            cwd=changes.REPO_ROOT,
        )
        assert await proc.wait() == 0
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(SCHEMA)
            for table in TABLES:
                await conn.execute(
                    f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY; GRANT SELECT ON {table} TO authenticated;"
                    f"SELECT enable_realtime('{table}')"
                )
        finally:
            await conn.close()

    def recipients(self, table: str, key: int) -> list[int]:
        """Connection indexes that must receive a row written with `key` (a team, or a user index)."""
        if table.startswith("teams"):
            return list(range(key, SUBSCRIBERS, TEAMS))
        return [key]

    def key(self, table: str, seq: int) -> int:
        """The key (team or user index) the writers gave the row numbered `seq`, in any step."""
        return seq % TEAMS if table.startswith("teams") else seq % SUBSCRIBERS

    async def table(self, table: str) -> list[dict]:
        plan = self.workdir / f"plan-{self.kind}-{table}.json"
        plan.write_bytes(
            orjson.dumps([{"channel": f"table:public.{table}", "token": t, "key": "seq"} for t in self.tokens])
        )
        server = changes.Server(self.args, self.workdir, self.dsn, self.secret, self.kind)
        clients = None
        writers: list[asyncpg.Connection] = []
        results = []
        try:
            await server.wait_ready(self.args.startup_timeout)
            clients = await changes.Clients.start(self.args, server, plan)
            ready = await clients.event(180)
            print(
                f"  {table} ({self.label}): {ready['connections']} subscribers ready in {ready['connect_s']:.1f}s",
                flush=True,
            )
            writers = [await asyncpg.connect(self.dsn) for _ in range(2)]
            if self.args.warmup_seconds > 0:
                # Steady state is what is measured: the first changes also pay for planning the policies
                # (pglast is imported then) and for opening the authorizer's connections.
                await self.step(
                    table, self.args.rate_list[0], server, clients, writers, self.args.warmup_seconds, "warm-up"
                )
            for rate in self.args.rate_list:
                results.append(await self.step(table, rate, server, clients, writers, self.args.step_seconds))
        finally:
            for conn in writers:
                await conn.close()
            if clients is not None:
                await clients.stop()
            ended = server.stop()
            if not ended.startswith("exit 0"):
                print(f"  fluxrt ended: {ended}\n{server.log_tail()}", flush=True)
        return results

    async def backends(self, conn: asyncpg.Connection) -> dict[int, str]:
        """The scratch database's backends by pid: "authorizer" for the logins that decide policies, else "db"."""
        rows = await conn.fetch(
            "SELECT pid, usename::text FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.database,
        )
        return {pid: "authorizer" if user == "fluxrt_authorizer" else "db" for pid, user in rows}

    async def step(
        self,
        table: str,
        rate: float,
        server: changes.Server,
        clients: changes.Clients,
        writers: list,
        seconds: float,
        label: str = "",
    ) -> dict:
        column = "team_id" if table.startswith("teams") else "user_id"
        seq0 = self.seq
        commit_ns: dict[int, int] = {}
        keys: dict[int, int] = {}
        pg0 = postgres_cpus()
        cpu0 = (proc_cpu(server.pid), proc_cpu(clients.proc.pid), time.process_time())
        start = time.perf_counter()
        total = int(rate * seconds)

        async def writer(w: int, conn: asyncpg.Connection) -> None:
            written = 0
            tick = 0
            while written < total // 2:
                tick += 1
                due = min(int(rate / 2 * tick * TICK), total // 2) - written
                if due > 0:
                    seqs = [seq0 + 2 * (written + i) + w for i in range(due)]
                    if column == "team_id":
                        values = [s % TEAMS for s in seqs]
                    else:
                        values = [self.users[s % SUBSCRIBERS] for s in seqs]
                    kind = "int" if column == "team_id" else "uuid"
                    await conn.execute(
                        f"INSERT INTO {table} (seq, {column}) SELECT * FROM unnest($1::bigint[], $2::{kind}[])",
                        seqs,
                        values,
                    )
                    done = time.time_ns()
                    for s in seqs:
                        commit_ns[s] = done
                        keys[s] = self.key(table, s)
                    written += due
                await asyncio.sleep(max(0.0, start + tick * TICK - time.perf_counter()))

        await clients.send(cmd="start")
        await asyncio.gather(*(writer(w, conn) for w, conn in enumerate(writers)))
        wrote_s = time.perf_counter() - start
        self.seq = seq0 + 2 * (total // 2) + 2
        expected = {(s, c) for s in commit_ns for c in self.recipients(table, keys[s])}
        path = self.workdir / f"records-{self.kind}-{table}-{rate}.bin"
        timeout = max(20.0, 4 * seconds)
        backends = await self.backends(writers[0])
        got, records = await clients.collect(path, len(expected), timeout, grace=0.5)
        wall = time.perf_counter() - start
        cpu = cpu_shares(pg0, postgres_cpus(), backends, cpu0, server, clients, wall)
        seen, latencies, last = set(), [], 0
        for i in range(0, len(records), 4):
            s, c, stamp = records[i], records[i + 1], records[i + 2]
            seen.add((s, c))
            if s in commit_ns:
                latencies.append((stamp - commit_ns[s]) / 1e6)
                last = max(last, stamp)
        first = min(commit_ns.values()) if commit_ns else 0
        # What was not expected of this step is either late (an earlier step's change, to a subscriber it was meant
        # for) or a leak: whoever wrote it, the row's key says who may see it.
        stray = seen - expected
        leaked = sum(1 for s, c in stray if c not in self.recipients(table, self.key(table, s)))
        self.leaks += leaked
        span = (last - first) / 1e9 if last > first else float("nan")
        result = {
            "tree": self.kind,
            "table": table,
            "offered": rate,
            "written_per_s": len(commit_ns) / wrote_s,
            "deliveries": len(latencies),
            "deliveries_per_s": len(latencies) / span,
            "p50_ms": percentile(latencies, 50) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None,
            "missing": len(expected - seen),
            "late": len(stray) - leaked,
            "other": sum(got["unexpected"].values()),
            "leaked": leaked,
            "cpu_pct": cpu,
        }
        print(
            f"    {label + ': ' if label else ''}{rate:>6.0f} changes/s offered, "
            f"{result['written_per_s']:>6.0f} written: "
            f"{result['deliveries_per_s']:>8.0f} deliveries/s, p50 {result['p50_ms'] or 0:7.1f} ms, "
            f"p99 {result['p99_ms'] or 0:7.1f} ms, missing {result['missing']}, late {result['late']}, "
            f"other {result['other']}, leaked {result['leaked']}\n"
            f"      cpu % of one CPU over {wall:.1f}s: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()),
            flush=True,
        )
        return result


def cpu_shares(
    pg0: dict[int, float],
    pg1: dict[int, float],
    backends: dict[int, str],
    cpu0: tuple[float | None, float | None, float],
    server: changes.Server,
    clients: changes.Clients,
    wall: float,
) -> dict[str, float]:
    """CPU seconds since the step began as % of one CPU over `wall`: fluxrt; the scratch database's authorizer
    backends and its other backends (`backends`); every other postgres process; the subscribers; this driver. A
    postgres process that started during the step counts whole (see common.postgres_cpu_since)."""
    groups = {"authorizer": 0.0, "db": 0.0, "other": 0.0}
    for pid, cpu in pg1.items():
        groups[backends.get(pid, "other")] += cpu - pg0.get(pid, 0.0)
    fluxrt0, clients0, driver0 = cpu0
    fluxrt1, clients1 = proc_cpu(server.pid), proc_cpu(clients.proc.pid)
    seconds = {
        "fluxrt": (fluxrt1 or 0.0) - (fluxrt0 or 0.0),
        "pg authorizer": groups["authorizer"],
        "pg changefeed+writers": groups["db"],
        "pg other": groups["other"],
        "subscribers": (clients1 or 0.0) - (clients0 or 0.0),
        "writers": time.process_time() - driver0,
    }
    return {k: 100 * v / wall for k, v in seconds.items()}


def best(steps: list[dict]) -> float:
    """The most deliveries/s of a step with none missing."""
    return max((r["deliveries_per_s"] for r in steps if not r["missing"]), default=0.0)


def summary(results: dict[str, dict[str, list[list[dict]]]]) -> None:
    """Per tree: set-based against per identity, and per step the median over rounds."""
    for kind, tables in results.items():
        print(f"\nsummary ({'this tree' if kind == 'fluxrt' else 'compared'}), medians over rounds:")
        for table, rounds in tables.items():
            for steps in zip(*rounds, strict=True):
                each = ", ".join(f"{s['p99_ms'] or 0:.1f}" for s in steps)
                p99 = statistics.median(s["p99_ms"] or 0.0 for s in steps)
                rate = statistics.median(s["deliveries_per_s"] for s in steps)
                missing = max(s["missing"] for s in steps)
                cpu = {k: statistics.median(s["cpu_pct"][k] for s in steps) for k in steps[0]["cpu_pct"]}
                print(
                    f"  {table:<13} {steps[0]['offered']:>6.0f}/s: {rate:>8.0f} deliveries/s, p99 {p99:7.1f} ms "
                    f"(rounds: {each}), missing <= {missing}; cpu " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
                )
        for scenario in ("teams", "own"):
            fast, slow = tables.get(f"{scenario}_set"), tables.get(f"{scenario}_forced")
            if not fast or not slow:
                continue
            best_fast, best_slow = best(fast[0]), best(slow[0])
            ratio = best_fast / best_slow if best_slow else float("inf")
            print(
                f"  {scenario}: highest complete step {best_fast:,.0f} vs {best_slow:,.0f} deliveries/s per identity "
                f"(ratio {ratio:.1f}x, first round)"
            )


async def amain(args: argparse.Namespace) -> int:
    kinds = ["fluxrt", *(["was"] if "was" in args.fluxrt_from else [])]
    sources = {
        kind: changes.tree_source(args.fluxrt_from[kind])
        if kind in args.fluxrt_from
        else changes.fluxrt_source(args.python)
        for kind in kinds
    }
    databases: list[str] = []
    results: dict[str, dict[str, list[list[dict]]]] = {kind: {} for kind in kinds}
    leaks = 0
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrt-bench-rls-") as tmp:
            runs: dict[str, Run] = {}
            for kind in kinds:
                database, version, _settings = await scratch_database.create(args.dsn, prefix="fluxrt_bench_rls")
                databases.append(database)
                dsn = scratch_database.with_database(args.dsn, database)
                runs[kind] = Run(args, Path(tmp), dsn, database, kind)
                await runs[kind].prepare()
            print(
                f"rls bench: {os.cpu_count()} CPUs, PostgreSQL {version}, load average "
                f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at start\n  "
                + "\n  ".join(f"{runs[kind].label}: {sources[kind]}" for kind in kinds),
                flush=True,
            )
            turn = 0
            for rnd in range(1, args.rounds + 1):
                for table in args.table_list:
                    # The trees take turns going first: neither always runs on a box warmed (or loaded) by the other.
                    order = kinds if turn % 2 == 0 else kinds[::-1]
                    turn += 1
                    for kind in order:
                        if args.rounds > 1:
                            print(f"  round {rnd}:", flush=True)
                        results[kind].setdefault(table, []).append(await runs[kind].table(table))
            leaks = sum(run.leaks for run in runs.values())
    finally:
        for database in databases:
            await scratch_database.drop(args.dsn, database)
    summary(results)
    print(f"load average at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if leaks:
        print(f"\nLEAK: {leaks} deliveries reached subscribers whose identity the policy does not admit", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin connection")
    parser.add_argument("--rates", default="1000,3000,5000", help="offered changes/s per step")
    parser.add_argument("--step-seconds", type=float, default=5.0)
    parser.add_argument(
        "--warmup-seconds", type=float, default=2.0, help="unmeasured step at the first rate before the steps"
    )
    parser.add_argument("--tables", default=",".join(TABLES))
    parser.add_argument("--rounds", type=int, default=1, help="times each table runs (per tree), alternating")
    parser.add_argument(
        "--fluxrt-tree",
        type=Path,
        help="run fluxrt_trio from this directory (a worktree of some commit) instead of this repository's",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also run every table with the fluxrt_trio of this directory (e.g. `git worktree add /tmp/base-rls "
        "<commit>`), on a scratch database of its own migrated by it",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s steps at 1000 changes/s")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.step_seconds = "1000", 2.0
    args.rate_list = [float(r) for r in args.rates.split(",")]
    args.table_list = args.tables.split(",")
    args.fluxrt_from = {}
    for kind, tree in (("fluxrt", args.fluxrt_tree), ("was", args.compare_tree)):
        if tree is not None:
            if not (tree / "fluxrt_trio" / "__init__.py").is_file():
                parser.error(f"--{'fluxrt' if kind == 'fluxrt' else 'compare'}-tree: no fluxrt_trio package in {tree}")
            args.fluxrt_from[kind] = tree.resolve()
    # What changes.Server and changes.Clients read: no pinning, default polling, the default authorizer login.
    args.server_cpu = args.client_cpu = None
    args.poll_interval = None
    args.authorizer_dsn = None
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
