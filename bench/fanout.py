"""Broadcast fan-out benchmark: fluxrt vs a minimal ``websockets`` server, side by side.

For each server and round: start a fresh server pinned to one CPU, read its RSS, open N
subscribers to one broadcast channel from a separate client process pinned to the other CPU,
let it settle and read the RSS again (idle memory per connection), then have one publisher
connection send M broadcasts and time until all N * M frames have arrived.

Rounds alternate between servers and the median is reported, since the machine is shared.

Run from the repository root with the project venv:

    .venv/bin/python bench/fanout.py                 # 5000 conns, 200 msgs, 3 rounds
    .venv/bin/python bench/fanout.py --quick         # 500 conns, 50 msgs
    .venv/bin/python bench/fanout.py --servers websockets --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SERVERS = ("fluxrt", "websockets")
TARGET_RATIO = 1.5
TARGET_KIB_PER_CONN = 16.0
CLIENT_LAG_WARN = 0.05

FLUXRT_CONFIG = """\
server:
  host: {host}
  port: {port}
  path: {path}
auth:
  allow_anonymous: true
realtime:
  max_connections: 20000
  message_rate_limit: 100000000
  write_buffer_size: 100000
  # Server pings would land in the client's byte-counted stream; keep them out of a round, like the
  # baseline's disabled keepalive. The heartbeat is one timer heap, so this doesn't change memory.
  heartbeat_interval: 300s
  connection_timeout: 600s
log:
  level: warning
"""


@dataclass
class RoundResult:
    server: str
    round: int
    ok: bool
    error: str | None = None
    msgs_per_s: float = 0.0
    msgs_per_cpu_s: float | None = None
    frames_expected: int = 0
    frames_delivered: int = 0
    elapsed_s: float = 0.0
    frame_size: int = 0
    connect_s: float = 0.0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    kib_per_conn: float = 0.0
    server_cpu_pct: float | None = None
    client_cpu_pct: float | None = None
    server_exit: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def http_health(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            status = s.recv(64)
    except OSError:
        return False
    return status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


class ServerProcess:
    """One server under test, started fresh for a round."""

    def __init__(self, kind: str, args: argparse.Namespace, workdir: Path) -> None:
        self.kind = kind
        self.host: str = args.host
        self.port = free_port(args.host)
        self.path: str = args.path
        self.log_path = workdir / f"{kind}-{self.port}.log"
        if kind == "fluxrt":
            config = workdir / f"fluxrt-{self.port}.yaml"
            config.write_text(FLUXRT_CONFIG.format(host=self.host, port=self.port, path=self.path))
            argv = [args.python, "-m", "fluxrt_trio", "--config", str(config)]
        else:
            argv = [
                args.python,
                str(BENCH_DIR / "ws_baseline_server.py"),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--path",
                self.path,
            ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        if args.server_cpu is not None:
            os.sched_setaffinity(self.proc.pid, {args.server_cpu})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.log_tail()}")
            if http_health(self.host, self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} not healthy after {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM, then SIGKILL if it hangs; returns how it ended."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    return f"killed: no exit {timeout}s after SIGTERM"
            return f"exit {self.proc.returncode}"
        finally:
            self._log.close()

    def log_tail(self, limit: int = 2000) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def start_clients(args: argparse.Namespace, server: ServerProcess) -> subprocess.Popen[str]:
    argv = [
        args.python,
        str(BENCH_DIR / "fanout_clients.py"),
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--path",
        server.path,
        "--connections",
        str(args.connections),
        "--messages",
        str(args.messages),
        "--payload-bytes",
        str(args.payload_bytes),
        "--server-pid",
        str(server.pid),
        "--timeout",
        str(args.timeout),
    ]
    if args.client_cpu is not None:
        argv += ["--cpu", str(args.client_cpu)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_event(clients: subprocess.Popen[str]) -> dict[str, Any]:
    assert clients.stdout is not None
    line = clients.stdout.readline()
    if not line:
        raise RuntimeError(f"client process exited ({clients.wait()}) without reporting")
    event = orjson.loads(line)
    if event["event"] == "error":
        raise RuntimeError(f"client: {event['message']}")
    return event


def run_round(kind: str, rnd: int, args: argparse.Namespace, workdir: Path) -> RoundResult:
    result = RoundResult(server=kind, round=rnd, ok=False)
    try:
        server = ServerProcess(kind, args, workdir)
    except OSError as exc:
        result.error = f"cannot start {kind}: {exc}"
        return result
    clients: subprocess.Popen[str] | None = None
    try:
        server.wait_ready(args.startup_timeout)
        time.sleep(0.5)
        result.rss_before_kib = read_rss_kib(server.pid)
        clients = start_clients(args, server)
        ready = read_event(clients)
        result.connect_s = ready["connect_s"]
        # Idle memory: give the server time to finish per-connection setup and the allocator
        # to settle before sampling.
        time.sleep(args.settle)
        result.rss_after_kib = read_rss_kib(server.pid)
        result.kib_per_conn = (result.rss_after_kib - result.rss_before_kib) / args.connections
        assert clients.stdin is not None
        clients.stdin.write("go\n")
        clients.stdin.flush()
        res = read_event(clients)
        result.msgs_per_s = res["msgs_per_s"]
        result.frames_expected = res["frames_expected"]
        result.frames_delivered = res["frames_delivered"]
        result.elapsed_s = res["elapsed_s"]
        result.frame_size = res["frame_size"]
        result.server_cpu_pct = res["server_cpu_pct"]
        if res["server_cpu_s"]:
            result.msgs_per_cpu_s = res["frames_delivered"] / res["server_cpu_s"]
        result.client_cpu_pct = res["client_cpu_pct"]
        result.details = {
            k: res[k]
            for k in (
                "incomplete_connections",
                "overshoot_connections",
                "publisher_rx_bytes",
                "elapsed_read_s",
                "untimestamped_connections",
                "polls",
                "recv_calls",
            )
        }
        problems = []
        if res["frames_delivered"] != res["frames_expected"]:
            problems.append(
                f"{res['incomplete_connections']} connections incomplete "
                f"({res['frames_delivered']}/{res['frames_expected']} frames)"
            )
        if res["overshoot_connections"]:
            problems.append(f"{res['overshoot_connections']} connections got extra bytes")
        if res["publisher_rx_bytes"]:
            problems.append(f"publisher received {res['publisher_rx_bytes']} bytes")
        result.error = "; ".join(problems) or None
        result.ok = not problems
    except Exception as exc:
        result.error = str(exc)
    finally:
        if clients is not None:
            with contextlib.suppress(OSError):
                clients.stdin.close()  # type: ignore[union-attr]
            try:
                clients.wait(30)
            except subprocess.TimeoutExpired:
                clients.kill()
                clients.wait()
        result.server_exit = server.stop()
        if not result.ok:
            result.details["server_log_tail"] = server.log_tail()
    return result


def fmt_round(r: RoundResult) -> str:
    if not r.ok and not r.frames_delivered:
        return f"  round {r.round} {r.server:<10} FAILED: {r.error}"
    cpu = ""
    if r.server_cpu_pct is not None and r.client_cpu_pct is not None:
        cpu = f"  cpu server {r.server_cpu_pct:3.0f}% client {r.client_cpu_pct:3.0f}%"
    line = (
        f"  round {r.round} {r.server:<10} {r.msgs_per_s:>10,.0f} msgs/s  "
        f"({r.frames_delivered:,} frames of {r.frame_size} B in {r.elapsed_s:.2f}s){cpu}  "
        f"idle {r.kib_per_conn:5.1f} KiB/conn (RSS {r.rss_before_kib / 1024:.0f}->{r.rss_after_kib / 1024:.0f} MiB)  "
        f"connect {r.connect_s:.1f}s  [{r.server_exit}]"
    )
    if r.error:
        line += f"\n    WARNING: {r.error}"
    # End times come from kernel receive timestamps, so a busy client only matters once it
    # falls so far behind that it finishes connections from reads it didn't timestamp.
    lag = r.details.get("elapsed_read_s", r.elapsed_s) - r.elapsed_s
    if r.details.get("untimestamped_connections") or lag > CLIENT_LAG_WARN * r.elapsed_s:
        line += (
            f"\n    WARNING: client lagged {lag:.2f}s behind delivery "
            f"({r.details.get('untimestamped_connections')} connections timed by read); it may limit the rate"
        )
    return line


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: list[RoundResult], servers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in servers:
        ok = [r for r in results if r.server == kind and r.ok]
        summary[kind] = {
            "msgs_per_s": median_or_none([r.msgs_per_s for r in ok]),
            "msgs_per_cpu_s": median_or_none([r.msgs_per_cpu_s for r in ok if r.msgs_per_cpu_s]),
            "kib_per_conn": median_or_none([r.kib_per_conn for r in ok]),
            "rounds_ok": len(ok),
            "rounds": sum(r.server == kind for r in results),
        }
    flux = summary.get("fluxrt", {}).get("msgs_per_s")
    base = summary.get("websockets", {}).get("msgs_per_s")
    summary["ratio"] = flux / base if flux and base else None
    flux = summary.get("fluxrt", {}).get("msgs_per_cpu_s")
    base = summary.get("websockets", {}).get("msgs_per_cpu_s")
    summary["ratio_per_cpu_s"] = flux / base if flux and base else None
    return summary


def print_summary(summary: dict[str, Any], servers: list[str], args: argparse.Namespace) -> None:
    def row(label: str, cells: list[str]) -> None:
        print(f"  {label:<28}" + "".join(f"{c:>14}" for c in cells))

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print()
    print(
        f"Fan-out: {args.connections} subscribers x {args.messages} broadcasts, "
        f"payload {args.payload_bytes} B, median of {args.rounds} round(s)"
    )
    row("", servers)
    row("msgs/s delivered", [num(summary[k]["msgs_per_s"], ",.0f") for k in servers])
    # Less sensitive to other load on the server's CPU than wall-clock rate.
    row("msgs per server CPU-second", [num(summary[k]["msgs_per_cpu_s"], ",.0f") for k in servers])
    row("idle KiB/conn", [num(summary[k]["kib_per_conn"], ".1f") for k in servers])
    row("valid rounds", [f"{summary[k]['rounds_ok']}/{summary[k]['rounds']}" for k in servers])
    ratio = summary["ratio"]
    if ratio is not None:
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        per_cpu = summary["ratio_per_cpu_s"]
        extra = f"; per server CPU-second {per_cpu:.2f}x" if per_cpu is not None else ""
        print(f"  ratio fluxrt/websockets: {ratio:.2f}x (target >= {TARGET_RATIO}) {verdict}{extra}")
    if "fluxrt" in servers and summary["fluxrt"]["kib_per_conn"] is not None:
        kib = summary["fluxrt"]["kib_per_conn"]
        verdict = "PASS" if kib <= TARGET_KIB_PER_CONN else "FAIL"
        print(f"  fluxrt idle memory: {kib:.1f} KiB/conn (target <= {TARGET_KIB_PER_CONN:g}) {verdict}")


def targets_met(summary: dict[str, Any], servers: list[str]) -> bool:
    ok = all(summary[k]["rounds_ok"] == summary[k]["rounds"] for k in servers)
    if summary["ratio"] is not None:
        ok = ok and summary["ratio"] >= TARGET_RATIO
    if "fluxrt" in servers:
        kib = summary["fluxrt"]["kib_per_conn"]
        ok = ok and kib is not None and kib <= TARGET_KIB_PER_CONN
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="subscribers (default 5000)")
    parser.add_argument("--messages", type=int, default=200, help="broadcasts published (default 200)")
    parser.add_argument("--payload-bytes", type=int, default=100, help="payload data size (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3)")
    parser.add_argument("--quick", action="store_true", help="500 connections, 50 messages")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: fluxrt,websockets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers and clients")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before the RSS sample")
    parser.add_argument("--timeout", type=float, default=60.0, help="client per-phase stall timeout (s)")
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin server/clients to CPUs")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 unless all targets are met")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.messages = 500, 50
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_list) - set(SERVERS)
    if unknown or not args.server_list:
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {SERVERS}")
    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cpus) < 2:
        args.server_cpu = args.client_cpu = None
    else:
        args.server_cpu, args.client_cpu = cpus[0], cpus[1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    if args.client_cpu is not None:
        # The driver mostly sleeps; keep it off the server's CPU.
        os.sched_setaffinity(0, {args.client_cpu})
    servers: list[str] = args.server_list
    pin = (
        "unpinned" if args.server_cpu is None else f"server on CPU {args.server_cpu}, clients on CPU {args.client_cpu}"
    )
    print(
        f"fan-out bench: {args.connections} conns, {args.messages} msgs, {args.rounds} round(s), "
        f"servers {', '.join(servers)}; {pin}",
        flush=True,
    )
    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory(prefix="fluxrt-bench-") as tmp:
        for rnd in range(1, args.rounds + 1):
            # Alternate which server goes first so slow drift on a shared box hits both alike.
            order = servers if rnd % 2 else list(reversed(servers))
            for kind in order:
                r = run_round(kind, rnd, args, Path(tmp))
                results.append(r)
                print(fmt_round(r), flush=True)
                if "server_log_tail" in r.details:
                    print("    server log tail:\n" + r.details["server_log_tail"], flush=True)
    summary = summarize(results, servers)
    print_summary(summary, servers, args)
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "summary": summary}
        payload["rounds"] = [asdict(r) for r in results]
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str))
    if args.check and not targets_met(summary, servers):
        return 1
    return 0 if all(r.ok for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
