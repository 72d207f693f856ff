"""Cluster benchmark: fluxrt nodes over Redis (issue 13) against one node without the cluster engine, in one run.

Three setups, each started fresh (real ``python -m fluxrt_trio`` processes, bench/fanout.py's configuration) for
every phase of every round, rounds alternating their order:

* ``single``: one node, the ``cluster`` section unset (no Redis code on any path);
* ``cluster-1``: one node with the ``cluster`` section: every broadcast goes to Redis and is delivered on its own
  node once Redis has taken it, so against ``single`` this is the Redis round trip;
* ``cluster-2``: two nodes with the ``cluster`` section, the subscribers in equal halves, the publisher on node 1:
  against ``cluster-1`` this is the cross-node cost (the second node's fan-out from the bus).

Each node has its own ``cluster.prefix`` namespace for the run (``bench-<random>-<n>``), so the shared Redis is
only written under keys of this run's own; nothing is flushed. With 2+ CPUs every node runs on the first CPU (the
cluster gets the same server CPU as the single node: the comparison is of what the cluster costs, not of two
machines against one) and the clients and this driver on the second; Redis is not ours and is not pinned.

Phases (the load generator is fanout_clients.py's, through cluster_clients.py):

1. burst: N subscribers on one broadcast channel, M broadcasts at once: delivered msgs/s (median of the rounds).
   Target: cluster-2 at least 0.7x single.
2. paced: the same N subscribers, one broadcast every ``--pace`` ms (250, fanout.py's ``--paced``: a pace at which
   one node reaches all 5,000 subscribers before the next message): fan-out latency from the publisher's send to
   the last subscriber's copy (kernel timestamp), p50/p99 pooled over the rounds. Target: the cluster adds at most
   2 ms to p50 and 10 ms to p99.
3. rate: ``--rate-subscribers`` subscribers (20), one broadcast every ``--rate-pace`` ms (0.9: about the issue's
   1,000 msgs/s, measured and printed; 5,000 subscribers at that rate would be 5M deliveries/s, which no 2-core box
   serves): the same latency and target.
4. presence storm: ``--members`` connections (1,000) subscribe to one room in equal shares over the nodes of
   ``single`` and ``cluster-2``, then each tracks once, all at once. Per node: the time from the first track until a
   fresh connection's ``sync`` shows every member (probes every ``--probe-interval`` s: the first full one and the
   last short one bracket it), when an observer subscribed before the storm held every member, and how many
   presence frames the observer and the members received per member. Target: every node agrees within 2 s.

Run from the repository root with the project venv:

    .venv/bin/python bench/cluster.py                  # 5,000 subscribers, 1,000 members, 3 rounds: ~10 minutes
    .venv/bin/python bench/cluster.py --quick          # 500 subscribers, 100 members, 1 round: under a minute
    .venv/bin/python bench/cluster.py --phases burst,presence --rounds 1 --json /tmp/cluster.json
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fanout
import orjson
import redis
from common import BENCH_DIR, REPO_ROOT, percentile, proc_cpu, raise_nofile_limit, split_cpus, stop_child

SETUPS = ("single", "cluster-1", "cluster-2")
PRESENCE_SETUPS = ("single", "cluster-2")
PHASES = ("burst", "paced", "rate", "presence")
NODES = {"single": 1, "cluster-1": 1, "cluster-2": 2, "was-1": 1, "was-2": 2}
COMPARED = ("was-1", "was-2")
"""cluster-1 and cluster-2 of --compare-tree's fluxrt_trio"""

TARGET_THROUGHPUT_RATIO = 0.7
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 10.0
TARGET_AGREEMENT_MS = 2000.0
# The rate phase's pace. The publisher (fanout_clients.py's paced loop) sends, then waits in epoll until the pace has
# passed, and Python's epoll rounds a wait up to whole milliseconds: a 1 ms pace often waits 1 ms and then 1 ms
# more (~600 msgs/s offered), a pace just under 1 ms waits 1 ms once (~1,000 msgs/s). The offered rate is measured
# and printed; CPU taken by other work on the box lengthens some gaps.
RATE_PACE_MS = 0.9

CLUSTER_CONFIG = """\
cluster:
  redis_url: {redis_url}
  node_id: {node_id}
  prefix: {prefix}
"""

CLUSTER_METRICS = {
    "fluxrt_cluster_engine_up": "engine_up",
    "fluxrt_cluster_nodes": "nodes",
    "fluxrt_cluster_batches_out_total": "batches_out",
    "fluxrt_cluster_messages_out_total": "ops_out",
    "fluxrt_cluster_batches_in_total": "batches_in",
    "fluxrt_cluster_messages_in_total": "ops_in",
    "fluxrt_cluster_unavailable_total": "unavailable",
    "fluxrt_cluster_publish_seconds_sum": "publish_s_sum",
    "fluxrt_cluster_publish_seconds_count": "publish_s_count",
}


@dataclass
class PhaseResult:
    setup: str
    phase: str
    round: int
    ok: bool = False
    error: str | None = None
    connect_s: float = 0.0
    wall_s: float = 0.0
    node_cpu_s: list[float] = field(default_factory=list)
    redis_cpu_s: float | None = None
    client_cpu_pct: float | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)
    """per node, the change of the cluster metrics over the timed part"""
    result: dict[str, Any] = field(default_factory=dict)
    """what the load generator reported"""


class Cluster:
    """The fluxrt nodes of one setup, started and stopped together."""

    def __init__(self, setup: str, args: argparse.Namespace, workdir: Path, serial: int) -> None:
        self.setup = setup
        self.args = args
        self.prefix = f"{args.prefix}-{serial}" if setup != "single" else None
        self.nodes: list[fanout.ServerProcess] = []
        kind = "was" if setup in COMPARED else "fluxrt"
        try:
            for i in range(NODES[setup]):
                extra = ""
                if self.prefix is not None:
                    extra = CLUSTER_CONFIG.format(redis_url=args.redis_url, node_id=f"node{i + 1}", prefix=self.prefix)
                self.nodes.append(fanout.ServerProcess(kind, args, workdir, extra_config=extra))
        except OSError:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def wait_ready(self) -> None:
        """Every node healthy and, in a cluster, its engine up and hearing every node (which also has the first
        /metrics scrape, that imports prometheus_client, done before anything is timed)."""
        for node in self.nodes:
            node.wait_ready(self.args.startup_timeout)
        if self.prefix is None:
            return
        deadline = time.monotonic() + self.args.startup_timeout
        for node in self.nodes:
            while True:
                m = fanout.scrape_metrics(node.host, node.port, CLUSTER_METRICS)
                if m["engine_up"] == 1 and m["nodes"] == len(self.nodes):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not formed: {node.port} sees {m}: {node.log_tail()}")
                time.sleep(0.1)

    def metrics(self) -> list[dict[str, float]]:
        if self.prefix is None:
            return []
        return [fanout.scrape_metrics(node.host, node.port, CLUSTER_METRICS) for node in self.nodes]

    def cpu(self) -> list[float]:
        return [proc_cpu(node.pid) or 0.0 for node in self.nodes]

    def stop(self) -> list[str]:
        return [node.stop() for node in self.nodes]

    def log_tails(self) -> str:
        return "\n".join(f"--- node {i + 1}\n{node.log_tail()}" for i, node in enumerate(self.nodes))


def redis_pid(url: str) -> int | None:
    """The pid of the Redis server, when it runs on this machine (its CPU is reported, whoever else uses it)."""
    try:
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def leftover_keys(url: str, prefix: str) -> int:
    """Remove what this run's nodes left in Redis under its own prefix (they remove their state when stopped, so
    normally nothing) and count it."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}-*", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)


def history_off(tree: Path) -> str:
    """Turn broadcast history off on every node (through the environment the nodes inherit) where the tree has it;
    returns what was done, for the output ('' for a tree without it, which would refuse the unknown setting).

    With history a broadcast carries its position (`"id"`), whose digits grow with the count, while the load
    generator counts bytes of one fixed frame size; and the cluster engine keeps no history, so a single node with
    it would do work that the cluster nodes do not."""
    if "history_size" not in (tree / "fluxrt_trio" / "config.py").read_text():
        return ""
    os.environ["FLUXRT_REALTIME_HISTORY_SIZE"] = "0"
    return "broadcast history off on every node (FLUXRT_REALTIME_HISTORY_SIZE=0)"


def start_clients(args: argparse.Namespace, mode: str, ports: list[int], phase: str) -> subprocess.Popen[str]:
    argv = [args.python, str(BENCH_DIR / "cluster_clients.py"), mode, "--ports", ",".join(map(str, ports))]
    argv += ["--host", args.host, "--path", args.path, "--timeout", str(args.timeout)]
    if mode == "fanout":
        connections, messages, pace = {
            "burst": (args.connections, args.burst_messages, 0.0),
            "paced": (args.connections, args.paced_messages, args.pace),
            "rate": (args.rate_subscribers, args.rate_messages, args.rate_pace),
        }[phase]
        argv += ["--connections", str(connections), "--messages", str(messages), "--pace", str(pace)]
        argv += ["--payload-bytes", str(args.payload_bytes)]
    else:
        argv += ["--members", str(args.members), "--probe-interval", str(args.probe_interval)]
        argv += ["--room", f"storm-{secrets.token_hex(4)}"]
    if args.client_cpu is not None:
        argv += ["--cpu", str(args.client_cpu)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def run_phase(setup: str, phase: str, rnd: int, args: argparse.Namespace, workdir: Path) -> PhaseResult:
    """One phase of one setup on freshly started nodes."""
    result = PhaseResult(setup=setup, phase=phase, round=rnd)
    args.serial += 1
    try:
        cluster = Cluster(setup, args, workdir, args.serial)
    except OSError as exc:
        result.error = f"cannot start {setup}: {exc}"
        return result
    clients: subprocess.Popen[str] | None = None
    try:
        cluster.wait_ready()
        clients = start_clients(args, "presence" if phase == "presence" else "fanout", cluster.ports, phase)
        result.connect_s = fanout.read_event(clients)["connect_s"]
        time.sleep(args.settle)
        before = cluster.metrics()
        cpu0, redis0, t0 = cluster.cpu(), proc_cpu(args.redis_pid), time.perf_counter()
        assert clients.stdin is not None
        clients.stdin.write("go\n")
        clients.stdin.flush()
        res = fanout.read_event(clients)
        cpu1, redis1, t1 = cluster.cpu(), proc_cpu(args.redis_pid), time.perf_counter()
        after = cluster.metrics()
        result.wall_s = t1 - t0
        result.node_cpu_s = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        if redis0 is not None and redis1 is not None:
            result.redis_cpu_s = redis1 - redis0
        result.metrics = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
        result.client_cpu_pct = res.get("client_cpu_pct")
        res.pop("event", None)
        result.result = res
        result.error = problems(phase, res, result.metrics) or None
        result.ok = result.error is None
    except Exception as exc:
        result.error = str(exc)
    finally:
        if clients is not None:
            stop_child(clients)
        if not result.ok:
            result.result["log_tail"] = cluster.log_tails()
        exits = cluster.stop()
        if any(not e.startswith("exit") for e in exits):
            result.result["node_exits"] = exits
    return result


def problems(phase: str, res: dict[str, Any], metrics: list[dict[str, float]]) -> str:
    """Why a phase's figures cannot be trusted ('' when they can)."""
    found = []
    if phase == "presence":
        if any(a is None for a in res["agreed_ms"]) or any(o is None for o in res["observer_complete_ms"]):
            found.append("some node never showed every member")
        if res["error_count"]:
            found.append(f"{res['error_count']} unexpected frames, e.g. {res['errors'][:2]}")
    else:
        found += fanout.delivery_problems(res)
    refused = sum(m.get("unavailable", 0) for m in metrics)
    if refused:
        found.append(f"{refused:g} broadcasts or presence changes refused UNAVAILABLE")
    return "; ".join(found)


# ---- output ------------------------------------------------------------------------------------------------------


def cpu_text(r: PhaseResult) -> str:
    nodes = "+".join(f"{c:.2f}" for c in r.node_cpu_s)
    redis_part = f", Redis {r.redis_cpu_s:.2f}" if r.redis_cpu_s is not None else ""
    client = f", client {r.client_cpu_pct:.0f}%" if r.client_cpu_pct is not None else ""
    return f"cpu-s nodes {nodes}{redis_part} in {r.wall_s:.2f}s{client}"


def bus_text(r: PhaseResult) -> str:
    if not r.metrics:
        return ""
    m = r.metrics[0]
    rtt = (
        f", mean publish round trip {m['publish_s_sum'] / m['publish_s_count'] * 1000:.2f} ms"
        if m["publish_s_count"]
        else ""
    )
    inbound = ""
    if len(r.metrics) > 1:
        inbound = f"; node 2 took {r.metrics[1]['ops_in']:g} ops in {r.metrics[1]['batches_in']:g} batches"
    return f"\n    bus: node 1 published {m['ops_out']:g} ops in {m['batches_out']:g} batches{rtt}{inbound}"


def fmt_phase(r: PhaseResult) -> str:
    head = f"  round {r.round} {r.phase:<8} {r.setup:<10}"
    if not r.result or ("frames_delivered" not in r.result and "agreed_ms" not in r.result):
        return f"{head} FAILED: {r.error}"
    res = r.result
    if r.phase == "presence":
        parts = []
        for i, port in enumerate(res["ports"]):
            agreed = res["agreed_ms"][i]
            short = res["last_short_ms"][i]
            bracket = f" (last short probe {short:.0f} ms: {res['last_short_keys'][i]} keys)" if short else ""
            observed = res["observer_complete_ms"][i]
            parts.append(
                f"\n    node {i + 1} (:{port}): fresh sync shows all {res['members']} at "
                f"{agreed if agreed is not None else float('nan'):.0f} ms{bracket}, {res['probes'][i]} probes; "
                f"observer complete at {observed if observed is not None else float('nan'):.0f} ms after "
                f"{res['observer_frames'][i]} frames ({res['observer_frames'][i] / res['members']:.2f} per member; "
                f"10%/50%/90% of members at {'/'.join(f'{x:.0f}' for x in res['observer_progress_ms'][i][0:9:4])} ms); "
                f"its {res['member_counts'][i]} members got {res['member_bytes'][i] / 1e6:.1f} MB "
                f"({res['member_bytes'][i] / max(res['member_counts'][i], 1) / res['members']:.0f} B per member each)"
            )
        line = f"{head} tracks sent in {res['send_tracks_ms']:.0f} ms; {cpu_text(r)}{''.join(parts)}{bus_text(r)}"
    else:
        line = (
            f"{head} {res['msgs_per_s']:>10,.0f} msgs/s ({res['frames_delivered']:,} frames of {res['frame_size']} B "
            f"in {res['elapsed_s']:.2f}s); {cpu_text(r)}; connect {r.connect_s:.1f}s"
        )
        if r.phase != "burst":
            lat, first = res["latency_last_ms"], res["latency_first_ms"]
            if lat:
                line += (
                    f"\n    offered {res['offered_msgs_per_s'] or 0:.1f} msg/s (send gaps {res['send_gap_ms_min']:.2f}-"
                    f"{res['send_gap_ms_max']:.2f} ms); latency to last subscriber p50 {percentile(lat, 50):.2f} / "
                    f"p99 {percentile(lat, 99):.2f} / max {max(lat):.2f} ms, to first p50 {percentile(first, 50):.2f}"
                    f" ms; {res['overlapped_messages']} overlapped, {res['late_completions']} late reads"
                )
        line += bus_text(r)
    if r.error:
        line += f"\n    WARNING: {r.error}"
    return line


def pooled(results: list[PhaseResult], setup: str, phase: str, key: str) -> list[float]:
    return [x for r in results if r.setup == setup and r.phase == phase and r.ok for x in r.result.get(key, [])]


def median_of(results: list[PhaseResult], setup: str, phase: str, value: Any) -> float | None:
    values = [value(r) for r in results if r.setup == setup and r.phase == phase and r.ok]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cpu_per_m(r: PhaseResult) -> float | None:
    delivered = r.result.get("frames_delivered")
    return sum(r.node_cpu_s) / delivered * 1e6 if delivered else None


def summarize(results: list[PhaseResult], args: argparse.Namespace) -> dict[str, Any]:
    """Medians and pooled percentiles per setup and phase, the ratios and the verdicts."""
    s: dict[str, Any] = {"setups": {}, "verdicts": []}
    for setup in args.setups:
        entry: dict[str, Any] = {}
        for phase in ("burst", "paced", "rate"):
            if phase not in args.phase_list:
                continue
            e = {
                "rounds_ok": sum(r.ok for r in results if r.setup == setup and r.phase == phase),
                "rounds": sum(r.setup == setup and r.phase == phase for r in results),
                "msgs_per_s": median_of(results, setup, phase, lambda r: r.result["msgs_per_s"]),
                "node_cpu_s_per_m": median_of(results, setup, phase, cpu_per_m),
                "redis_cpu_s": median_of(results, setup, phase, lambda r: r.redis_cpu_s),
            }
            last = pooled(results, setup, phase, "latency_last_ms")
            if last:
                first = pooled(results, setup, phase, "latency_first_ms")
                e.update(
                    messages=len(last),
                    p50_ms=percentile(last, 50),
                    p99_ms=percentile(last, 99),
                    max_ms=max(last),
                    first_p50_ms=percentile(first, 50),
                    first_p99_ms=percentile(first, 99),
                    offered=median_of(results, setup, phase, lambda r: r.result["offered_msgs_per_s"]),
                    overlapped=sum(
                        r.result["overlapped_messages"]
                        for r in results
                        if r.setup == setup and r.phase == phase and r.ok
                    ),
                )
            entry[phase] = e
        if "presence" in args.phase_list and setup in PRESENCE_SETUPS:
            ok = [r for r in results if r.setup == setup and r.phase == "presence" and r.ok]
            entry["presence"] = {
                "rounds_ok": len(ok),
                "rounds": sum(r.setup == setup and r.phase == "presence" for r in results),
                # The slowest node of a round is when the cluster agrees.
                "agreed_ms": statistics.median([max(r.result["agreed_ms"]) for r in ok]) if ok else None,
                "agreed_ms_worst": max((max(r.result["agreed_ms"]) for r in ok), default=None),
                "observer_ms": statistics.median([max(r.result["observer_complete_ms"]) for r in ok]) if ok else None,
                "observer_frames_per_member": statistics.median(
                    [f / r.result["members"] for r in ok for f in r.result["observer_frames"]]
                )
                if ok
                else None,
                "node_cpu_s": statistics.median([sum(r.node_cpu_s) for r in ok]) if ok else None,
            }
        s["setups"][setup] = entry
    single = s["setups"]["single"]

    def verdict(name: str, ok: bool | None, text: str) -> None:
        word = "PASS" if ok else ("FAIL" if ok is not None else "NO DATA")
        s["verdicts"].append({"target": name, "verdict": word, "text": text})

    if "burst" in args.phase_list:
        base = single["burst"]["msgs_per_s"]
        for setup in args.setups[1:]:
            value = s["setups"][setup]["burst"]["msgs_per_s"]
            ratio = value / base if value and base else None
            s["setups"][setup]["burst"]["ratio"] = ratio
        ratio = s["setups"]["cluster-2"]["burst"]["ratio"]
        verdict(
            "throughput",
            None if ratio is None else ratio >= TARGET_THROUGHPUT_RATIO,
            f"burst throughput cluster-2/single {fmt(ratio, '.2f')}x (target >= {TARGET_THROUGHPUT_RATIO}); "
            f"cluster-1/single {fmt(s['setups']['cluster-1']['burst']['ratio'], '.2f')}x",
        )
    for phase in ("paced", "rate"):
        if phase not in args.phase_list:
            continue
        for setup in args.setups[1:]:
            e, b = s["setups"][setup][phase], single[phase]
            for q in ("p50", "p99", "first_p50", "first_p99"):
                have = e.get(f"{q}_ms") is not None and b.get(f"{q}_ms") is not None
                e[f"added_{q}_ms"] = e[f"{q}_ms"] - b[f"{q}_ms"] if have else None
        c2, c1 = s["setups"]["cluster-2"][phase], s["setups"]["cluster-1"][phase]
        where = (
            f"{args.connections} subscribers at {fmt(single[phase].get('offered'), '.1f')} msgs/s"
            if phase == "paced"
            else f"{args.rate_subscribers} subscribers at {fmt(single[phase].get('offered'), '.0f')} msgs/s"
        )
        # To the last copy is the whole fan-out, the issue's figure; to the first copy leaves out the time spent
        # writing to every subscriber, which varies by tens of ms at 5,000 subscribers on a shared box.
        for copy, prefix in (("last", ""), ("first", "first_")):
            p50, p99 = c2[f"added_{prefix}p50_ms"], c2[f"added_{prefix}p99_ms"]
            ok = None if p50 is None or p99 is None else p50 <= TARGET_ADDED_P50_MS and p99 <= TARGET_ADDED_P99_MS
            compared = ""
            if "was-2" in s["setups"]:
                w2, w1 = s["setups"]["was-2"][phase], s["setups"]["was-1"][phase]
                compared = (
                    f"; --compare-tree's was-2 {fmt(w2[f'added_{prefix}p50_ms'], '+.2f')} / "
                    f"{fmt(w2[f'added_{prefix}p99_ms'], '+.2f')} ms, was-1 "
                    f"{fmt(w1[f'added_{prefix}p50_ms'], '+.2f')} / {fmt(w1[f'added_{prefix}p99_ms'], '+.2f')} ms"
                )
            verdict(
                f"latency to {copy} copy ({phase})",
                ok,
                f"{phase} ({where}), latency to the {copy} copy: cluster-2 adds p50 {fmt(p50, '+.2f')} ms, p99 "
                f"{fmt(p99, '+.2f')} ms to single (target <= {TARGET_ADDED_P50_MS:g} / {TARGET_ADDED_P99_MS:g}); "
                f"cluster-1 adds {fmt(c1[f'added_{prefix}p50_ms'], '+.2f')} / "
                f"{fmt(c1[f'added_{prefix}p99_ms'], '+.2f')} ms{compared}",
            )
    if "presence" in args.phase_list:
        p = s["setups"]["cluster-2"]["presence"]
        worst = p["agreed_ms_worst"]
        verdict(
            "presence agreement",
            None if worst is None or p["rounds_ok"] != p["rounds"] else worst <= TARGET_AGREEMENT_MS,
            f"presence storm, {args.members} members over 2 nodes: every node's fresh sync shows all after "
            f"{fmt(p['agreed_ms'], '.0f')} ms (median of rounds; worst round {fmt(worst, '.0f')} ms; target <= "
            f"{TARGET_AGREEMENT_MS:.0f})",
        )
    return s


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    width = 14

    def row(label: str, values: list[str]) -> None:
        print(f"  {label:<40}" + "".join(f"{v:>{width}}" for v in values))

    print()
    print(f"Summary: median of {args.rounds} round(s); latencies pooled over every message of the valid rounds")
    row("", list(args.setups))
    setups = s["setups"]
    for phase in ("burst", "paced", "rate"):
        if phase not in args.phase_list:
            continue
        es = [setups[k][phase] for k in args.setups]
        n = args.connections if phase != "rate" else args.rate_subscribers
        print(f"  {phase}: {n} subscribers")
        if phase == "burst":
            row(f"msgs/s delivered ({args.burst_messages} msgs at once)", [fmt(e["msgs_per_s"], ",.0f") for e in es])
            row("  ratio to single", ["1.00", *[fmt(e.get("ratio"), ".2f") for e in es[1:]]])
        else:
            row("offered msgs/s", [fmt(e.get("offered"), ".1f") for e in es])
            row("latency to last copy p50, ms", [fmt(e.get("p50_ms"), ".2f") for e in es])
            row("latency to last copy p99, ms", [fmt(e.get("p99_ms"), ".2f") for e in es])
            row("latency to last copy max, ms", [fmt(e.get("max_ms"), ".2f") for e in es])
            row("  p50 added to single's, ms", ["", *[fmt(e.get("added_p50_ms"), "+.2f") for e in es[1:]]])
            row("  p99 added to single's, ms", ["", *[fmt(e.get("added_p99_ms"), "+.2f") for e in es[1:]]])
            row("latency to first copy p50, ms", [fmt(e.get("first_p50_ms"), ".2f") for e in es])
            row("latency to first copy p99, ms", [fmt(e.get("first_p99_ms"), ".2f") for e in es])
            row("  p50 added to single's, ms", ["", *[fmt(e.get("added_first_p50_ms"), "+.2f") for e in es[1:]]])
            row("  p99 added to single's, ms", ["", *[fmt(e.get("added_first_p99_ms"), "+.2f") for e in es[1:]]])
            row("messages overlapping the next", [str(e.get("overlapped", "-")) for e in es])
        row("node CPU-s per 1M deliveries (all nodes)", [fmt(e["node_cpu_s_per_m"], ".2f") for e in es])
        row("Redis CPU-s in the phase (whole server)", [fmt(e["redis_cpu_s"], ".2f") for e in es])
        row("valid rounds", [f"{e['rounds_ok']}/{e['rounds']}" for e in es])
    if "presence" in args.phase_list:
        print(f"  presence storm: {args.members} members tracking once, all at once")
        es = [setups[k].get("presence") for k in args.setups]
        row("every node's fresh sync complete, ms", [fmt(e and e["agreed_ms"], ".0f") for e in es])
        row("every observer complete, ms", [fmt(e and e["observer_ms"], ".0f") for e in es])
        row("frames per member, each observer", [fmt(e and e["observer_frames_per_member"], ".2f") for e in es])
        row("node CPU-s in the storm (all nodes)", [fmt(e and e["node_cpu_s"], ".2f") for e in es])
        row("valid rounds", [f"{e['rounds_ok']}/{e['rounds']}" if e else "" for e in es])
    print()
    for v in s["verdicts"]:
        print(f"  {v['verdict']}: {v['text']}")


# ---- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="subscribers in burst and paced (5000)")
    parser.add_argument("--burst-messages", type=int, default=200, help="broadcasts in a burst (200)")
    parser.add_argument("--paced-messages", type=int, default=100, help="broadcasts in the paced phase (100)")
    parser.add_argument(
        "--pace", type=float, default=fanout.PACED_MS, help=f"ms between paced broadcasts ({fanout.PACED_MS:g})"
    )
    parser.add_argument(
        "--rate-pace",
        type=float,
        default=RATE_PACE_MS,
        help=f"ms between broadcasts in the rate phase ({RATE_PACE_MS:g}: about 1,000 msgs/s, see RATE_PACE_MS)",
    )
    parser.add_argument("--rate-subscribers", type=int, default=20, help="subscribers in the rate phase (20)")
    parser.add_argument("--rate-messages", type=int, default=3000, help="broadcasts in the rate phase (3000)")
    parser.add_argument("--members", type=int, default=1000, help="presence storm members (1000)")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="s between sync probes per node (0.02)")
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument(
        "--quick", action="store_true", help="500 subscribers, 50/20/1000 msgs, 100 members, 1 round, paced 50 ms"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--python", default=sys.executable, help="interpreter for nodes and clients")
    parser.add_argument(
        "--fluxrt-tree",
        type=Path,
        help="run fluxrt_trio from this source tree (e.g. a `git worktree` of the commit to measure) instead of this "
        "repository's, as fanout.py --fluxrt-from does",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also run cluster-1 and cluster-2 with fluxrt_trio from this tree (setups was-1 and was-2, in the same "
        "rounds and order): a change measured against the code before it, side by side",
    )
    parser.add_argument("--settle", type=float, default=0.5, help="s idle between connecting and the timed part")
    parser.add_argument("--timeout", type=float, default=60.0, help="client per-phase stall timeout (s)")
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin nodes and clients to CPUs")
    parser.add_argument("--json", type=Path, help="also write every phase's results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.burst_messages, args.paced_messages, args.pace = 500, 50, 20, 50.0
        args.rate_messages, args.members, args.rounds = 1000, 100, 1
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phase_list or set(args.phase_list) - set(PHASES):
        parser.error(f"--phases: choose from {PHASES}")
    if args.members % 2 or args.connections % 2:
        parser.error("--members and --connections must be even (halves on two nodes)")
    if args.fluxrt_tree is not None and not (args.fluxrt_tree / "fluxrt_trio" / "__init__.py").is_file():
        parser.error(f"--fluxrt-tree: no fluxrt_trio package in {args.fluxrt_tree}")
    if args.compare_tree is not None and not (args.compare_tree / "fluxrt_trio" / "__init__.py").is_file():
        parser.error(f"--compare-tree: no fluxrt_trio package in {args.compare_tree}")
    # What fanout.ServerProcess reads.
    args.fluxrt_from = {} if args.fluxrt_tree is None else {"fluxrt": args.fluxrt_tree.resolve()}
    args.setups = list(SETUPS)
    if args.compare_tree is not None:
        args.fluxrt_from["was"] = args.compare_tree.resolve()
        args.setups += COMPARED
    args.slow_mode = False
    args.server_cpu, args.client_cpu = split_cpus(args.no_pin)
    args.prefix = f"bench-{secrets.token_hex(4)}"
    args.serial = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    args.redis_pid = redis_pid(args.redis_url)
    history = history_off(args.fluxrt_tree or REPO_ROOT)
    pin = "unpinned" if args.server_cpu is None else f"nodes on CPU {args.server_cpu}, clients on CPU {args.client_cpu}"
    print(
        f"cluster bench: phases {','.join(args.phase_list)}, {args.rounds} round(s); {pin}; Redis {args.redis_url} "
        f"(pid {args.redis_pid}, shared, not pinned), prefix {args.prefix}-N",
        flush=True,
    )
    print(f"  fluxrt_trio from {fanout.fluxrt_origin(args, 'fluxrt')}", flush=True)
    if args.compare_tree is not None:
        print(f"  was-1 and was-2: fluxrt_trio from {fanout.fluxrt_origin(args, 'was')}", flush=True)
    if history:
        print(f"  {history}", flush=True)
    print(
        f"  started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="fluxrt-cluster-bench-") as tmp:
        for rnd in range(1, args.rounds + 1):
            for phase in args.phase_list:
                setups = list(PRESENCE_SETUPS if phase == "presence" else args.setups)
                # Alternate which setup goes first so slow drift on a shared box hits all alike.
                for setup in setups if rnd % 2 else reversed(setups):
                    r = run_phase(setup, phase, rnd, args, Path(tmp))
                    results.append(r)
                    print(fmt_phase(r), flush=True)
                    if not r.ok and r.result.get("log_tail"):
                        print("    node log tails:\n" + r.result["log_tail"][-3000:], flush=True)
    leftovers = leftover_keys(args.redis_url, args.prefix)
    print(
        f"  ended {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}; {leftovers} keys left in Redis under {args.prefix}-*",
        flush=True,
    )
    summary = summarize(results, args)
    print_summary(summary, args)
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "summary": summary,
            "phases": [asdict(r) for r in results],
        }
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str))
    if not all(r.ok for r in results):
        return 2
    if args.check and any(v["verdict"] != "PASS" for v in summary["verdicts"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
