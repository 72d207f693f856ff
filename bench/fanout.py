"""Broadcast fan-out benchmark: fluxrt vs a minimal ``websockets`` server, side by side.

For each server and round: start a fresh server pinned to one CPU, read its RSS, open N
subscribers to one broadcast channel from a separate client process pinned to the other CPU,
let it settle and read the RSS again (idle memory per connection), then have one publisher
connection send M broadcasts and time until all N * M frames have arrived.

Two scenarios:

* burst (default): the publisher sends all M broadcasts at once. The server may read several
  of them per recv and coalesce their fan-out; the headline is msgs/s delivered.
* paced (``--pace MS``, or the ``--paced`` preset): one broadcast, then MS milliseconds before
  the next. Delivered msgs/s is then bounded by the offered rate, so the figures are the
  per-message fan-out latency (publisher send -> kernel receive timestamp of the last
  subscriber's copy, p50/p99 over all messages) and server CPU-seconds per million deliveries.

Rounds alternate between servers and the median is reported, since the machine is shared.

TLS (``--tls``): fluxrt plain, fluxrt over native TLS and the baseline over TLS, with a certificate of a CA made for
the run; the clients of a TLS server connect over TLS (``wsraw.TlsStream``) and verify it.

Slow consumers (``--slow S``): S more subscribers on the channel that never read. They are not counted in the
figures above; per round the bench reports how many of them the server ended (their streams end when finally read
after the run; for fluxrt also ``fluxrt_slow_consumer_closes_total`` and ``fluxrt_closes_total{code="4009"}`` from
``/metrics``) and the server's peak RSS during the run. ``--slow-compare`` runs every server both without and with
them, rounds alternating, and prints the ratio of the healthy subscribers' p99 fan-out latency with/without.

Run from the repository root with the project venv:

    .venv/bin/python bench/fanout.py                 # 5000 conns, 200 msgs, 3 rounds
    .venv/bin/python bench/fanout.py --quick         # 500 conns, 50 msgs
    .venv/bin/python bench/fanout.py --paced         # 5000 conns, 100 msgs, one every 250 ms
    .venv/bin/python bench/fanout.py --servers websockets --rounds 1
    .venv/bin/python bench/fanout.py --fluxrt-from before=/tmp/fluxrt-before   # also fluxrt from another tree
    .venv/bin/python bench/fanout.py --tls --paced   # fluxrt plain and over TLS, websockets over TLS
    .venv/bin/python bench/fanout.py --servers fluxrt --connections 1000 --rate 40 --messages 2400 \
        --slow 50 --slow-compare     # 50 clients that never read: healthy p99 with/without, 4009 closes, RSS
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
import orjson
from common import BENCH_DIR, REPO_ROOT, free_port, percentile, raise_nofile_limit, split_cpus, stop_child

SERVERS = ("fluxrt", "websockets", "floor", "fluxrt-tls", "websockets-tls")
# "floor" (bench/floor_server.c, compiled with gcc at bench time) runs only when asked for.
DEFAULT_SERVERS = ("fluxrt", "websockets")
# A server KIND + TLS_SUFFIX serves TLS (wss://) with a certificate of a CA the bench makes, and its clients connect
# over TLS; --tls runs TLS_SERVERS.
TLS_SUFFIX = "-tls"
TLS_SERVERS = ("fluxrt", "fluxrt-tls", "websockets-tls")
# The pairs (A, B) whose ratios A/B a run with TLS servers prints.
TLS_RATIOS = (("fluxrt-tls", "fluxrt"), ("fluxrt-tls", "websockets-tls"), ("websockets-tls", "websockets"))
FLOOR_SOURCE = BENCH_DIR / "floor_server.c"
# --slow-compare labels each server's rounds with the slow clients KIND + SLOW_SUFFIX.
SLOW_SUFFIX = "+slow"
TARGET_RATIO = 1.5
TARGET_KIB_PER_CONN = 16.0
CLIENT_LAG_WARN = 0.05
# --paced preset: PACED_MESSAGES broadcasts, one every PACED_MS ms. Calibrated at 5000 connections
# on a 2-core box, where one message takes either server roughly 45-80 ms to reach every subscriber
# and the slowest seen took ~100-125 ms (websockets; fluxrt's took ~200 ms before commit 2ecd34e,
# when garbage-collector pauses hit it). At 20 ms neither server kept up, and at 100-150 ms (before
# 2ecd34e) some fan-outs still overlapped the next message, which can then be coalesced; 250 ms
# leaves room.
PACED_MS = 250.0
PACED_MESSAGES = 100
# Issue 16's paced targets for fluxrt: server CPU per million deliveries and p99 fan-out latency to the last subscriber.
TARGET_PACED_CPU_S_PER_M = 6.5
TARGET_PACED_P99_MS = 50.0
# --slow-compare target: the healthy subscribers' p99 fan-out latency with the slow clients at most this many times
# the same run's without them.
TARGET_SLOW_P99_RATIO = 1.2
RSS_SAMPLE_S = 0.05

FLUXRT_CONFIG = """\
server:
  host: {host}
  port: {port}
  path: {path}
{tls}  # Every client connects from this one address, all at once.
  max_pending_handshakes_per_address: 20000
auth:
  allow_anonymous: true
realtime:
  max_connections: 20000
  anonymous_share: 1.0
  max_anonymous_per_address: 20000
  message_rate_limit: 100000000
{write_buffer}{history}  # Server pings would land in the client's byte-counted stream; keep them out of a round, like
  # the baseline's disabled keepalive. The heartbeat is one timer heap, so this doesn't change memory.
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
    # The client process's CPU over the timed phase (over TLS it decrypts every copy).
    client_cpu_s_per_m_deliveries: float | None = None
    server_exit: str = ""
    # Paced scenario only.
    cpu_s_per_m_deliveries: float | None = None
    # Its kernel share (stime).
    sys_s_per_m_deliveries: float | None = None
    latency_last_ms: list[float] = field(default_factory=list)
    latency_first_ms: list[float] = field(default_factory=list)
    offered_msgs_per_s: float | None = None
    # With slow clients (--slow); the RSS figures and metrics are taken in every round of a --slow-compare run.
    slow: int = 0
    slow_closed: int | None = None
    rss_peak_kib: int | None = None
    rss_hwm_kib: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # With --syscalls: calls per system call during the timed phase.
    syscalls: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def read_rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or another ``Vm*`` field, such as the peak ``VmHWM``) of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class RssSampler:
    """The highest VmRSS of a process, sampled every RSS_SAMPLE_S from a thread until `stop`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = read_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_kib = max(self.peak_kib, read_rss_kib(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


# The /metrics samples a slow-consumer round reports, and their labels in the output.
SLOW_METRICS = {
    "fluxrt_slow_consumer_closes_total": "slow_consumer_closes",
    'fluxrt_closes_total{code="4009"}': "closes_4009",
}


def scrape_metrics(host: str, port: int, wanted: dict[str, str] = SLOW_METRICS) -> dict[str, float]:
    """The `wanted` samples (sample name -> label in the result; SLOW_METRICS by default) of fluxrt's GET /metrics,
    absent ones 0."""
    with socket.create_connection((host, port), timeout=10.0) as s:
        s.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise RuntimeError(f"GET /metrics: {head[:100]!r}")
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def http_health(host: str, port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether GET /health answers 200 (over TLS with the client context `tls`)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as raw:
            s = raw if tls is None else tls.wrap_socket(raw, server_hostname=host)
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            status = s.recv(64)
    except OSError:
        return False
    return status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


def fluxrt_command(args: argparse.Namespace, kind: str) -> list[str]:
    """The interpreter command that runs fluxrt: this tree's, or for a ``--fluxrt-from`` label its PATH's."""
    tree = args.fluxrt_from.get(kind.removesuffix(TLS_SUFFIX))
    if tree is None:
        return [args.python]
    pythonpath = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    # -P: `python -m` puts the working directory (this repository's root) first on sys.path, where this tree's
    # fluxrt_trio would shadow PATH's.
    return ["env", f"PYTHONPATH={pythonpath}", args.python, "-P"]


def history_setting(tree: Path) -> str:
    """The configuration line turning broadcast history off, for a tree that has it ('' for one that would refuse
    the unknown setting). With history every broadcast carries its position (`"id"`), whose digits grow with the
    count, while the load generator counts bytes of one fixed frame size; and the baseline server keeps none."""
    if "history_size" not in (tree / "fluxrt_trio" / "config.py").read_text():
        return ""
    return "  history_size: 0\n"


def fluxrt_origin(args: argparse.Namespace, kind: str) -> str:
    """Where that command imports fluxrt_trio from, and at which commit; raises if not from its tree."""
    code = "import fluxrt_trio; print(fluxrt_trio.__file__)"
    argv = [*fluxrt_command(args, kind), "-c", code]
    origin = Path(subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip())
    tree = args.fluxrt_from.get(kind, REPO_ROOT)
    if not origin.resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{kind}: fluxrt_trio imported from {origin}, not from {tree}")
    git = ["git", "--no-optional-locks", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fluxrt_trio"], capture_output=True, text=True).stdout
    return f"{origin} (commit {commit or '?'}{', uncommitted changes in fluxrt_trio/' if dirty else ''})"


class ServerProcess(common.ServerProcess):
    """One server under test, started fresh for a round. For fluxrt, `extra_config` (YAML sections, such as the
    `cluster:` of bench/cluster.py) is appended to the bench's configuration."""

    LOG_TAIL = 2000

    def __init__(self, kind: str, args: argparse.Namespace, workdir: Path, extra_config: str = "") -> None:
        self.kind = kind
        self.host: str = args.host
        self.port = free_port(args.host)
        self.path: str = args.path
        self.tls: ssl.SSLContext | None = None
        if kind.endswith(TLS_SUFFIX):
            self.tls = args.tls_ca.client_context()
        base = kind.removesuffix(TLS_SUFFIX)
        self.is_fluxrt = base == "fluxrt" or base in args.fluxrt_from
        if self.is_fluxrt:
            config = workdir / f"{kind}-{self.port}.yaml"
            # With slow clients the per-connection queue bound is what is tested, so it keeps fluxrt's default;
            # otherwise it is out of the way of a burst.
            write_buffer = "" if args.slow_mode else "  write_buffer_size: 100000\n"
            config.write_text(
                FLUXRT_CONFIG.format(
                    host=self.host,
                    port=self.port,
                    path=self.path,
                    tls=tls_settings(args) if self.tls else "",
                    write_buffer=write_buffer,
                    history=history_setting(Path(args.fluxrt_from.get(base, REPO_ROOT))),
                )
                + extra_config
            )
            argv = [*fluxrt_command(args, kind), "-m", "fluxrt_trio", "--config", str(config)]
        elif kind == "floor":
            argv = [str(args.floor_binary), "--host", self.host, "--port", str(self.port), "--path", self.path]
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
            if self.tls:
                argv += ["--tls-cert", str(args.tls_ca.server_cert), "--tls-key", str(args.tls_ca.server_key)]
        super().__init__(argv, workdir / f"{kind}-{self.port}.log", args.server_cpu)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.log_tail()}")
            if http_health(self.host, self.port, self.tls):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} not healthy after {timeout}s: {self.log_tail()}")


def tls_settings(args: argparse.Namespace) -> str:
    """fluxrt's `server:` lines serving TLS with the run's server certificate."""
    return f"  tls_cert_file: {args.tls_ca.server_cert}\n  tls_key_file: {args.tls_ca.server_key}\n"


def make_tls_ca(directory: Path) -> Any:
    """The test suite's throwaway CA (tests/support/tls.py: a CA and a server certificate for 127.0.0.1, EC P-256),
    made in `directory`: one copy of that code for tests and bench. It needs only cryptography and attrs."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    from tests.support.tls import make_ca

    return make_ca(directory, "fluxrt bench CA")


def start_clients(args: argparse.Namespace, server: ServerProcess, slow: int) -> subprocess.Popen[str]:
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
        "--pace",
        str(args.pace),
        "--slow",
        str(slow),
        "--slow-rcvbuf",
        str(args.slow_rcvbuf),
    ]
    if args.client_cpu is not None:
        argv += ["--cpu", str(args.client_cpu)]
    if server.tls is not None:
        argv += ["--tls-ca", str(args.tls_ca.ca_cert)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def start_profiler(args: argparse.Namespace, server: ServerProcess, name: str) -> subprocess.Popen[bytes]:
    """py-spy sampling `server` (with native frames, so C calls such as `sendmsg` and the collector show) for the
    timed phase only, writing collapsed stacks to ``<--profile>/<name>.txt``. The sampler pauses the server for
    each sample, so a profiled round's CPU and latency figures are not comparable with an unprofiled one's."""
    py_spy = Path(args.python).parent / "py-spy"
    out = args.profile / f"{name}.txt"
    argv = [str(py_spy), "record", "--native", "--format", "raw", "--rate", str(args.profile_rate)]
    argv += ["--pid", str(server.pid), "--output", str(out)]
    # What py-spy samples before "go" is the idle loop (epoll_wait), which bench/profiles/flamegraph.py leaves out.
    return attached(argv, "py-spy")


def attached(argv: list[str], tool: str) -> subprocess.Popen[bytes]:
    """Start `argv`, a tool that attaches to the server, and give it a second to attach (or the first fan-outs
    would go unobserved). Raises RuntimeError with the tool's last words when it exits meanwhile."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    if process.poll() is not None:
        assert process.stderr is not None
        raise RuntimeError(f"{tool} exited with {process.returncode}: {process.stderr.read().decode()[-500:]}")
    return process


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Stop py-spy the way it writes its output: SIGINT."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def start_syscall_counter(args: argparse.Namespace, server: ServerProcess, name: str) -> subprocess.Popen[bytes]:
    """`perf trace -s` counting `server`'s system calls (every thread) for the timed phase, its summary to
    ``<--syscalls>/<name>.txt``. Tracing slows each call, so such a round's CPU and latency figures are not
    comparable with an untraced one's; the counts are exact."""
    out = args.syscalls / f"{name}.txt"
    argv = ["perf", "trace", "-s", "-o", str(out), "-p", str(server.pid)]
    return attached(argv, "perf trace")


def start_perf_record(args: argparse.Namespace, server: ServerProcess, name: str) -> subprocess.Popen[bytes]:
    """`perf record -g` sampling `server` (kernel and user, native frames: OpenSSL's functions show by name,
    Python's as the interpreter's) for the timed phase, to ``<--perf>/<name>.data`` (`perf report -i` reads it)."""
    out = args.perf / f"{name}.data"
    argv = ["perf", "record", "-g", "-F", str(args.profile_rate), "-o", str(out), "-p", str(server.pid)]
    return attached(argv, "perf record")


def syscall_counts(path: Path) -> dict[str, int]:
    """Calls per system call in a `perf trace -s` summary, summed over its threads."""
    counts: dict[str, int] = collections.Counter()
    for line in path.read_text().splitlines():
        match = re.match(r"\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+\d", line)
        if match:
            counts[match[1]] += int(match[2])
    return dict(counts)


def read_event(clients: subprocess.Popen[str]) -> dict[str, Any]:
    assert clients.stdout is not None
    line = clients.stdout.readline()
    if not line:
        raise RuntimeError(f"client process exited ({clients.wait()}) without reporting")
    event = orjson.loads(line)
    if event["event"] == "error":
        raise RuntimeError(f"client: {event['message']}")
    return event


def build_floor(workdir: Path) -> Path:
    """Compile bench/floor_server.c into `workdir` with gcc -O2; print the compiler's version."""
    binary = workdir / "floor_server"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(FLOOR_SOURCE), "-lcrypto"], check=True)
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.partition("\n")[0]
    print(f"  floor: {FLOOR_SOURCE.relative_to(REPO_ROOT)} built with {version} -O2", flush=True)
    return binary


def run_round(label: str, kind: str, slow: int, rnd: int, args: argparse.Namespace, workdir: Path) -> RoundResult:
    """One round of server `kind` with `slow` slow clients, reported as `label`."""
    result = RoundResult(server=label, round=rnd, ok=False, slow=slow)
    try:
        server = ServerProcess(kind, args, workdir)
    except OSError as exc:
        result.error = f"cannot start {kind}: {exc}"
        return result
    clients: subprocess.Popen[str] | None = None
    sampler: RssSampler | None = None
    profiler: subprocess.Popen[bytes] | None = None
    counter: subprocess.Popen[bytes] | None = None
    recorder: subprocess.Popen[bytes] | None = None
    try:
        server.wait_ready(args.startup_timeout)
        time.sleep(0.5)
        result.rss_before_kib = read_rss_kib(server.pid)
        clients = start_clients(args, server, slow)
        ready = read_event(clients)
        result.connect_s = ready["connect_s"]
        # Idle memory: give the server time to finish per-connection setup and the allocator
        # to settle before sampling.
        time.sleep(args.settle)
        result.rss_after_kib = read_rss_kib(server.pid)
        result.kib_per_conn = (result.rss_after_kib - result.rss_before_kib) / (args.connections + slow)
        scrape = args.slow_mode and server.is_fluxrt
        if scrape:
            # The first scrape imports prometheus_client; have that done before the timed run, with or without slow
            # clients alike.
            scrape_metrics(server.host, server.port)
        if args.slow_mode:
            sampler = RssSampler(server.pid)
        if args.profile is not None and server.is_fluxrt:
            profiler = start_profiler(args, server, f"{label}-round{rnd}")
        if args.syscalls is not None:
            counter = start_syscall_counter(args, server, f"{label}-round{rnd}")
        if args.perf is not None:
            recorder = start_perf_record(args, server, f"{label}-round{rnd}")
        assert clients.stdin is not None
        clients.stdin.write("go\n")
        clients.stdin.flush()
        res = read_event(clients)
        if profiler is not None:
            stop_profiler(profiler)
            profiler = None
        if recorder is not None:
            stop_profiler(recorder)
            recorder = None
        if counter is not None:
            stop_profiler(counter)
            counter = None
            result.syscalls = syscall_counts(args.syscalls / f"{label}-round{rnd}.txt")
        if sampler is not None:
            result.rss_peak_kib = sampler.stop()
            sampler = None
            result.rss_hwm_kib = read_rss_kib(server.pid, "VmHWM")
        if scrape:
            result.metrics = scrape_metrics(server.host, server.port)
        result.msgs_per_s = res["msgs_per_s"]
        result.frames_expected = res["frames_expected"]
        result.frames_delivered = res["frames_delivered"]
        result.elapsed_s = res["elapsed_s"]
        result.frame_size = res["frame_size"]
        result.server_cpu_pct = res["server_cpu_pct"]
        if res["server_cpu_s"]:
            result.msgs_per_cpu_s = res["frames_delivered"] / res["server_cpu_s"]
        if res["server_cpu_s"] is not None and res["frames_delivered"]:
            result.cpu_s_per_m_deliveries = res["server_cpu_s"] / res["frames_delivered"] * 1e6
            result.sys_s_per_m_deliveries = res["server_sys_s"] / res["frames_delivered"] * 1e6
        result.client_cpu_pct = res["client_cpu_pct"]
        if res["frames_delivered"]:
            result.client_cpu_s_per_m_deliveries = res["client_cpu_s"] / res["frames_delivered"] * 1e6
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
        if ready.get("tls"):
            result.details["tls"] = ready["tls"]
        if args.pace:
            result.latency_last_ms = res["latency_last_ms"]
            result.latency_first_ms = res["latency_first_ms"]
            result.offered_msgs_per_s = res["offered_msgs_per_s"]
            for k in (
                "latency_mean_delivery_ms",
                "overlapped_messages",
                "late_completions",
                "untimestamped_reads",
                "send_gap_ms_min",
                "send_gap_ms_max",
            ):
                result.details[k] = res[k]
        if slow:
            result.slow_closed = res["slow_closed"]
            for k in ("slow_resets", "slow_close_frames", "slow_frames_min", "slow_frames_max"):
                result.details[k] = res[k]
        problems = delivery_problems(res)
        result.error = "; ".join(problems) or None
        result.ok = not problems
    except Exception as exc:
        result.error = str(exc)
    finally:
        if sampler is not None:
            sampler.stop()
        if profiler is not None:
            stop_profiler(profiler)
        if counter is not None:
            stop_profiler(counter)
        if recorder is not None:
            stop_profiler(recorder)
        if clients is not None:
            stop_child(clients)
        result.server_exit = server.stop()
        if not result.ok:
            result.details["server_log_tail"] = server.log_tail()
    return result


def delivery_problems(res: dict[str, Any]) -> list[str]:
    """Why a load generator's fan-out result cannot be trusted (none when it can): frames missing, bytes beyond
    the expected frames, or bytes sent to the publisher."""
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
    return problems


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
    if r.latency_last_ms:
        lat = r.latency_last_ms
        d = r.details
        line += (
            f"\n    paced: offered {r.offered_msgs_per_s or 0:.2f} msg/s (send gaps "
            f"{d['send_gap_ms_min']:.1f}-{d['send_gap_ms_max']:.1f} ms); fan-out latency to last subscriber "
            f"p50 {percentile(lat, 50):.1f} / p99 {percentile(lat, 99):.1f} / max {max(lat):.1f} ms, "
            f"to first p50 {percentile(r.latency_first_ms, 50):.1f} ms, mean delivery "
            f"{d['latency_mean_delivery_ms']:.1f} ms; "
            f"server CPU {r.cpu_s_per_m_deliveries or 0:.2f} s per 1M deliveries "
            f"(kernel {r.sys_s_per_m_deliveries or 0:.2f}), client {r.client_cpu_s_per_m_deliveries or 0:.2f}"
        )
        if d["overlapped_messages"]:
            line += (
                f"\n    WARNING: {d['overlapped_messages']} message(s) still fanning out when the next was sent: "
                "the pace is too fast for this server, latencies include queueing"
            )
        if d["late_completions"] or d["untimestamped_reads"]:
            line += (
                f"\n    WARNING: {d['late_completions']} deliveries read after the next message was sent, "
                f"{d['untimestamped_reads']} reads without a kernel timestamp: latency may be overstated"
            )
    if r.rss_peak_kib is not None:
        hwm = (r.rss_hwm_kib or 0) / 1024
        line += f"\n    server RSS peak during the run {r.rss_peak_kib / 1024:.1f} MiB (VmHWM {hwm:.1f} MiB)"
        if r.slow and r.slow_closed is not None:
            d = r.details
            frames = ", ".join(f"{code}: {n}" for code, n in sorted(d["slow_close_frames"].items())) or "none"
            line += (
                f"; slow clients {r.slow}, streams ended {r.slow_closed} ({d['slow_resets']} by reset), "
                f"close frames read {frames}, broadcasts read {d['slow_frames_min']}-{d['slow_frames_max']} each"
            )
        if r.metrics:
            line += "; /metrics " + ", ".join(f"{k} {v:g}" for k, v in r.metrics.items())
    if r.syscalls and r.frames_delivered:
        top = sorted(r.syscalls.items(), key=lambda item: -item[1])
        n_all = sum(r.syscalls.values()) / r.frames_delivered
        per = ", ".join(f"{name} {n / r.frames_delivered:.3f}" for name, n in top if n / r.frames_delivered >= 0.001)
        line += f"\n    system calls per delivery (perf trace): {per}; all {n_all:.3f}"
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


def this_tree(label: str) -> str:
    """The server of this tree that a --fluxrt-from LABEL (or LABEL-tls) is compared with."""
    return "fluxrt" + TLS_SUFFIX if label.endswith(TLS_SUFFIX) else "fluxrt"


def summarize(results: list[RoundResult], servers: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in servers:
        ok = [r for r in results if r.server == kind and r.ok]
        summary[kind] = {
            "msgs_per_s": median_or_none([r.msgs_per_s for r in ok]),
            "msgs_per_cpu_s": median_or_none([r.msgs_per_cpu_s for r in ok if r.msgs_per_cpu_s]),
            "kib_per_conn": median_or_none([r.kib_per_conn for r in ok]),
            "cpu_s_per_m_deliveries": median_or_none(
                [r.cpu_s_per_m_deliveries for r in ok if r.cpu_s_per_m_deliveries is not None]
            ),
            "sys_s_per_m_deliveries": median_or_none(
                [r.sys_s_per_m_deliveries for r in ok if r.sys_s_per_m_deliveries is not None]
            ),
            "client_cpu_s_per_m_deliveries": median_or_none(
                [r.client_cpu_s_per_m_deliveries for r in ok if r.client_cpu_s_per_m_deliveries is not None]
            ),
            "tls": next((r.details["tls"] for r in ok if r.details.get("tls")), None),
            "rounds_ok": len(ok),
            "rounds": sum(r.server == kind for r in results),
        }
        # Latencies are pooled over every message of every valid round (p99 of ~100 messages
        # per round would just be each round's maximum).
        last = [x for r in ok for x in r.latency_last_ms]
        if last:
            first = [x for r in ok for x in r.latency_first_ms]
            summary[kind].update(
                latency_messages=len(last),
                latency_last_p50_ms=percentile(last, 50),
                latency_last_p99_ms=percentile(last, 99),
                latency_last_max_ms=max(last),
                latency_first_p50_ms=percentile(first, 50),
                offered_msgs_per_s=median_or_none([r.offered_msgs_per_s for r in ok if r.offered_msgs_per_s]),
                overlapped_messages=sum(r.details.get("overlapped_messages", 0) for r in ok),
            )
        peaks = [r.rss_peak_kib for r in ok if r.rss_peak_kib is not None]
        if peaks:
            summary[kind].update(
                rss_peak_kib_median=statistics.median(peaks),
                rss_peak_kib_max=max(peaks),
                rss_hwm_kib_max=max(r.rss_hwm_kib or 0 for r in ok),
            )
        slow_rounds = [r for r in ok if r.slow]
        if slow_rounds:
            summary[kind].update(
                slow_clients=sum(r.slow for r in slow_rounds),
                slow_closed=sum(r.slow_closed or 0 for r in slow_rounds),
            )
            for name in SLOW_METRICS.values():
                if all(name in r.metrics for r in slow_rounds):
                    summary[kind][name] = sum(r.metrics[name] for r in slow_rounds)
    flux = summary.get("fluxrt", {}).get("msgs_per_s")
    base = summary.get("websockets", {}).get("msgs_per_s")
    summary["ratio"] = flux / base if flux and base else None
    flux = summary.get("fluxrt", {}).get("msgs_per_cpu_s")
    base = summary.get("websockets", {}).get("msgs_per_cpu_s")
    summary["ratio_per_cpu_s"] = flux / base if flux and base else None
    flux = summary.get("fluxrt", {}).get("cpu_s_per_m_deliveries")
    base = summary.get("websockets", {}).get("cpu_s_per_m_deliveries")
    summary["ratio_cpu_per_delivery"] = flux / base if flux and base else None
    flux = summary.get("fluxrt", {}).get("cpu_s_per_m_deliveries")
    base = summary.get("floor", {}).get("cpu_s_per_m_deliveries")
    summary["ratio_cpu_per_delivery_floor"] = flux / base if flux and base else None
    for key in ("latency_last_p50_ms", "latency_last_p99_ms"):
        flux = summary.get("fluxrt", {}).get(key)
        base = summary.get("websockets", {}).get(key)
        summary[f"ratio_{key}"] = flux / base if flux and base else None
    # fluxrt (this tree) against each --fluxrt-from server, over TLS for a LABEL-tls.
    for other in servers:
        if other in SERVERS or other.endswith(SLOW_SUFFIX):
            continue
        ratios = {}
        for key in ("msgs_per_s", "msgs_per_cpu_s", "latency_last_p50_ms", "latency_last_p99_ms"):
            flux = summary.get(this_tree(other), {}).get(key)
            base = summary[other].get(key)
            ratios[key] = flux / base if flux and base else None
        summary[f"ratio_fluxrt_{other}"] = ratios
    for a, b in TLS_RATIOS:
        if a in summary and b in summary:
            ratios = {}
            for key in (
                "cpu_s_per_m_deliveries",
                "msgs_per_s",
                "latency_last_p50_ms",
                "latency_last_p99_ms",
                "client_cpu_s_per_m_deliveries",
            ):
                x, y = summary[a].get(key), summary[b].get(key)
                ratios[key] = x / y if x and y else None
            summary[f"ratio_{a}/{b}"] = ratios
    # Each server with its slow clients against itself without them (--slow-compare).
    for label in servers:
        base = label.removesuffix(SLOW_SUFFIX)
        if label == base or base not in summary:
            continue
        ratios = {}
        for key in ("latency_last_p50_ms", "latency_last_p99_ms", "rss_peak_kib_median"):
            with_slow = summary[label].get(key)
            without = summary[base].get(key)
            ratios[key] = with_slow / without if with_slow and without else None
        summary[f"ratio_slow_{base}"] = ratios
    return summary


def print_summary(summary: dict[str, Any], servers: list[str], args: argparse.Namespace) -> None:
    width = max(14, *(len(k) + 2 for k in servers))

    def row(label: str, cells: list[str]) -> None:
        print(f"  {label:<32}" + "".join(f"{c:>{width}}" for c in cells))

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio_line(label: str, key: str, note: str) -> None:
        value = summary.get(key)
        if value is not None:
            print(f"  {label}: {value:.2f}x {note}")

    print()
    if args.pace:
        print(
            f"Scenario: PACED, one broadcast every {args.pace:g} ms "
            f"(nominal {1000 / args.pace:.1f} msg/s; no two messages to coalesce)"
        )
    else:
        print(f"Scenario: BURST, all {args.messages} broadcasts sent at once (the server may coalesce them)")
    print(
        f"Fan-out: {args.connections} subscribers x {args.messages} broadcasts, "
        f"payload {args.payload_bytes} B, median of {args.rounds} round(s)"
        + (f"; {args.slow} slow clients besides (columns {SLOW_SUFFIX})" if args.slow_compare else "")
        + (f"; {args.slow} slow clients besides" if args.slow and not args.slow_compare else "")
    )
    row("", servers)
    if args.pace:
        row("offered msgs/s (publisher)", [num(summary[k].get("offered_msgs_per_s"), ".2f") for k in servers])
        row("msgs/s delivered (bounded)", [num(summary[k]["msgs_per_s"], ",.0f") for k in servers])
        row("fan-out latency p50, ms", [num(summary[k].get("latency_last_p50_ms"), ".1f") for k in servers])
        row("fan-out latency p99, ms", [num(summary[k].get("latency_last_p99_ms"), ".1f") for k in servers])
        row("fan-out latency max, ms", [num(summary[k].get("latency_last_max_ms"), ".1f") for k in servers])
        row("first copy latency p50, ms", [num(summary[k].get("latency_first_p50_ms"), ".1f") for k in servers])
        row("server CPU-s per 1M deliveries", [num(summary[k]["cpu_s_per_m_deliveries"], ".2f") for k in servers])
        row("  of which kernel (stime)", [num(summary[k]["sys_s_per_m_deliveries"], ".2f") for k in servers])
        row("msgs per server CPU-second", [num(summary[k]["msgs_per_cpu_s"], ",.0f") for k in servers])
    else:
        row("msgs/s delivered", [num(summary[k]["msgs_per_s"], ",.0f") for k in servers])
        # Less sensitive to other load on the server's CPU than wall-clock rate.
        row("msgs per server CPU-second", [num(summary[k]["msgs_per_cpu_s"], ",.0f") for k in servers])
        row("server CPU-s per 1M deliveries", [num(summary[k]["cpu_s_per_m_deliveries"], ".2f") for k in servers])
        row("  of which kernel (stime)", [num(summary[k]["sys_s_per_m_deliveries"], ".2f") for k in servers])
    row("client CPU-s per 1M deliveries", [num(summary[k]["client_cpu_s_per_m_deliveries"], ".2f") for k in servers])
    row("idle KiB/conn", [num(summary[k]["kib_per_conn"], ".1f") for k in servers])
    if args.slow_mode:
        mib = [summary[k].get("rss_peak_kib_median") for k in servers]
        row("server RSS peak in run, MiB", [num(v / 1024 if v else None, ".1f") for v in mib])
        mib = [summary[k].get("rss_peak_kib_max") for k in servers]
        row("  highest of the rounds, MiB", [num(v / 1024 if v else None, ".1f") for v in mib])
        row("slow clients (all rounds)", [str(summary[k].get("slow_clients", 0)) for k in servers])
        row("  their streams ended", [num(summary[k].get("slow_closed"), "d") for k in servers])
        for name in SLOW_METRICS.values():
            row(f"  /metrics {name}", [num(summary[k].get(name), "g") for k in servers])
    row("valid rounds", [f"{summary[k]['rounds_ok']}/{summary[k]['rounds']}" for k in servers])
    for k in servers:
        if summary[k].get("tls"):
            print(f"  {k}: {summary[k]['tls']}, as the clients negotiated it")
    for a, b in TLS_RATIOS:
        ratios = summary.get(f"ratio_{a}/{b}")
        if ratios:
            cells = [
                f"{label} {ratios[key]:.2f}x"
                for label, key in (
                    ("server CPU per delivery", "cpu_s_per_m_deliveries"),
                    ("msgs/s", "msgs_per_s"),
                    ("fan-out latency p50", "latency_last_p50_ms"),
                    ("p99", "latency_last_p99_ms"),
                    ("client CPU per delivery", "client_cpu_s_per_m_deliveries"),
                )
                if ratios[key] is not None and (key != "msgs_per_s" or not args.pace)
            ]
            print(f"  {a}/{b}: " + ", ".join(cells))
    if args.pace:
        counts = {summary[k].get("latency_messages") for k in servers}
        n_msgs = "/".join(str(c) for c in sorted(counts, key=str))
        print(
            "  fan-out latency: publisher send() -> kernel receive timestamp (SO_TIMESTAMPNS) of the last "
            f"subscriber's copy; p50/p99 nearest-rank over all {n_msgs} messages of the valid rounds"
        )
        ratio_line(
            "server CPU per delivery fluxrt/websockets", "ratio_cpu_per_delivery", "(lower is better for fluxrt)"
        )
        ratio_line(
            "server CPU per delivery fluxrt/floor", "ratio_cpu_per_delivery_floor", "(one send() per delivery, in C)"
        )
        ratio_line("fan-out latency p50 fluxrt/websockets", "ratio_latency_last_p50_ms", "(lower is better for fluxrt)")
        ratio_line("fan-out latency p99 fluxrt/websockets", "ratio_latency_last_p99_ms", "(lower is better for fluxrt)")
        flux = summary.get("fluxrt", {})
        if not args.slow_mode and flux.get("cpu_s_per_m_deliveries") is not None:
            cpu, p99 = flux["cpu_s_per_m_deliveries"], flux.get("latency_last_p99_ms")
            print(
                f"  fluxrt paced targets: server CPU {cpu:.2f} s per 1M deliveries (target <= "
                f"{TARGET_PACED_CPU_S_PER_M:g}) {'PASS' if cpu <= TARGET_PACED_CPU_S_PER_M else 'FAIL'}; p99 "
                f"{num(p99, '.1f')} ms (target < {TARGET_PACED_P99_MS:g}) "
                f"{'PASS' if p99 is not None and p99 < TARGET_PACED_P99_MS else 'FAIL'}"
            )
        for k in servers:
            if summary[k].get("overlapped_messages"):
                print(
                    f"  WARNING: {k}: {summary[k]['overlapped_messages']} message(s) still fanning out when the "
                    "next was sent; the pace is too fast for it"
                )
        if summary["ratio"] is not None:
            print(
                f"  throughput ratio {summary['ratio']:.2f}x is bounded by the offered rate; "
                f"the >= {TARGET_RATIO}x target is judged on the burst scenario"
            )
    else:
        ratio = summary["ratio"]
        if ratio is not None:
            verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
            per_cpu = summary["ratio_per_cpu_s"]
            extra = f"; per server CPU-second {per_cpu:.2f}x" if per_cpu is not None else ""
            print(f"  ratio fluxrt/websockets: {ratio:.2f}x (target >= {TARGET_RATIO}) {verdict}{extra}")
    for other in servers:
        ratios = summary.get(f"ratio_fluxrt_{other}")
        if ratios and ratios["msgs_per_s"] is not None:
            line = f"  ratio {this_tree(other)}/{other}: msgs/s {ratios['msgs_per_s']:.2f}x"
            if ratios["msgs_per_cpu_s"] is not None:
                line += f", per server CPU-second {ratios['msgs_per_cpu_s']:.2f}x"
            line += " (higher is better for fluxrt)"
            if ratios["latency_last_p50_ms"] is not None and ratios["latency_last_p99_ms"] is not None:
                line += (
                    f"; fan-out latency p50 {ratios['latency_last_p50_ms']:.2f}x, "
                    f"p99 {ratios['latency_last_p99_ms']:.2f}x (lower is better)"
                )
            print(line)
    for label in servers:
        base = label.removesuffix(SLOW_SUFFIX)
        ratios = summary.get(f"ratio_slow_{base}")
        if label == base or not ratios:
            continue
        p99 = ratios["latency_last_p99_ms"]
        if p99 is not None:
            verdict = "PASS" if p99 <= TARGET_SLOW_P99_RATIO else "FAIL"
            print(
                f"  {base} healthy fan-out latency p99 with/without slow clients: {p99:.2f}x "
                f"(target <= {TARGET_SLOW_P99_RATIO}) {verdict}; p50 {ratios['latency_last_p50_ms'] or 0:.2f}x"
            )
    for label in servers:
        entry = summary[label]
        if entry.get("slow_clients"):
            closed = entry.get("closes_4009")
            metrics = f", {closed:g} closed 4009 by the server's count" if closed is not None else ""
            verdict = "PASS" if slow_closes_met(entry) else "FAIL"
            print(
                f"  {label}: of {entry['slow_clients']} slow clients, {entry['slow_closed']} had their stream "
                f"ended by the server{metrics} {verdict}"
            )
    if "fluxrt" in servers and summary["fluxrt"]["kib_per_conn"] is not None:
        kib = summary["fluxrt"]["kib_per_conn"]
        verdict = "PASS" if kib <= TARGET_KIB_PER_CONN else "FAIL"
        print(f"  fluxrt idle memory: {kib:.1f} KiB/conn (target <= {TARGET_KIB_PER_CONN:g}) {verdict}")


def slow_closes_met(entry: dict[str, Any]) -> bool:
    """Every slow client's stream ended and, where /metrics was read, each was counted a 4009 close."""
    ended = entry.get("slow_closed") == entry["slow_clients"]
    closes = entry.get("closes_4009")
    return ended and (closes is None or closes == entry["slow_clients"])


def targets_met(summary: dict[str, Any], servers: list[str], paced: bool) -> bool:
    ok = all(summary[k]["rounds_ok"] == summary[k]["rounds"] for k in servers)
    for label in servers:
        if summary[label].get("slow_clients"):
            ok = ok and slow_closes_met(summary[label])
        ratios = summary.get(f"ratio_slow_{label.removesuffix(SLOW_SUFFIX)}")
        if label.endswith(SLOW_SUFFIX) and ratios:
            p99 = ratios["latency_last_p99_ms"]
            ok = ok and p99 is not None and p99 <= TARGET_SLOW_P99_RATIO
    # Paced throughput is the offered rate for any server that keeps up; the ratio target is
    # about the burst scenario.
    if summary["ratio"] is not None and not paced:
        ok = ok and summary["ratio"] >= TARGET_RATIO
    if "fluxrt" in servers:
        kib = summary["fluxrt"]["kib_per_conn"]
        ok = ok and kib is not None and kib <= TARGET_KIB_PER_CONN
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="subscribers (default 5000)")
    parser.add_argument(
        "--messages", type=int, default=None, help=f"broadcasts published (default 200; {PACED_MESSAGES} with --paced)"
    )
    parser.add_argument("--payload-bytes", type=int, default=100, help="payload data size (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3)")
    parser.add_argument("--quick", action="store_true", help="500 connections, 50 messages")
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        metavar="MS",
        help="send one broadcast, then wait MS ms before the next (default 0: all at once, the burst scenario)",
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help=f"paced preset: --pace {PACED_MS:g} --messages {PACED_MESSAGES} (either can still be overridden)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="MSGS_PER_S",
        help="paced at this many broadcasts per second: the same as --pace 1000/MSGS_PER_S",
    )
    parser.add_argument(
        "--slow",
        type=int,
        default=0,
        metavar="S",
        help="also subscribe S clients that never read (not counted in the figures); report whether they were closed",
    )
    parser.add_argument(
        "--slow-compare",
        action="store_true",
        help=f"run every server without and with the --slow clients, rounds alternating (columns KIND, "
        f"KIND{SLOW_SUFFIX}), and report the healthy p99 ratio (target <= {TARGET_SLOW_P99_RATIO}x)",
    )
    parser.add_argument(
        "--slow-rcvbuf", type=int, default=4096, help="SO_RCVBUF of the slow clients, so they fill fast (default 4096)"
    )
    parser.add_argument(
        "--servers",
        default=None,
        help=f"comma-separated subset of: {','.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)}); floor is "
        "bench/floor_server.c, one send() per subscriber per broadcast, compiled with gcc for the run; KIND-tls serves "
        "TLS with a certificate of a CA the bench makes, and its clients connect over TLS",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help=f"TLS fan-out: the same as --servers {','.join(TLS_SERVERS)}",
    )
    parser.add_argument(
        "--fluxrt-from",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run fluxrt with the fluxrt_trio package of the source tree PATH, as server LABEL (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", default="/realtime")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers and clients")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before the RSS sample")
    parser.add_argument("--timeout", type=float, default=60.0, help="client per-phase stall timeout (s)")
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument("--no-pin", action="store_true", help="don't pin server/clients to CPUs")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample every fluxrt server with py-spy (native frames) during its timed phase, collapsed stacks to "
        "DIR/LABEL-roundN.txt (bench/profiles/flamegraph.py draws them); figures of profiled rounds are not "
        "comparable with unprofiled ones",
    )
    parser.add_argument(
        "--syscalls",
        type=Path,
        metavar="DIR",
        help="count every server's system calls with `perf trace -s` during its timed phase (summaries in DIR) and "
        "print them per delivery; figures of traced rounds are not comparable with untraced ones",
    )
    parser.add_argument(
        "--perf",
        type=Path,
        metavar="DIR",
        help="sample every server with `perf record -g` during its timed phase, to DIR/LABEL-roundN.data; figures of "
        "sampled rounds are not comparable with unsampled ones",
    )
    parser.add_argument(
        "--profile-rate", type=int, default=250, help="py-spy's (and --perf's) samples per second (default 250)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless all targets are met")
    args = parser.parse_args(argv)
    if args.rate is not None:
        if args.pace is not None or args.paced:
            parser.error("--rate is another way to give --pace; give one")
        if args.rate <= 0:
            parser.error("--rate must be > 0")
        args.pace = 1000.0 / args.rate
    if args.slow < 0:
        parser.error("--slow must be >= 0")
    if args.slow_compare and not args.slow:
        parser.error("--slow-compare needs --slow S, the number of slow clients")
    args.slow_mode = bool(args.slow)
    if args.pace is None:
        args.pace = PACED_MS if args.paced else 0.0
    if args.pace < 0:
        parser.error("--pace must be >= 0")
    if args.messages is None:
        args.messages = PACED_MESSAGES if args.pace else 200
    if args.quick:
        args.connections, args.messages = 500, 50
    if args.tls:
        if args.servers is not None:
            parser.error("--tls is a choice of --servers; give one")
        args.servers = ",".join(TLS_SERVERS)
    elif args.servers is None:
        args.servers = ",".join(DEFAULT_SERVERS)
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    trees: dict[str, Path] = {}
    for spec in args.fluxrt_from:
        label, sep, path = spec.partition("=")
        if not sep or not label or label in SERVERS or label in trees:
            parser.error(f"--fluxrt-from {spec}: want LABEL=PATH, LABEL unique and not one of {SERVERS}")
        if not (Path(path) / "fluxrt_trio" / "__init__.py").is_file():
            parser.error(f"--fluxrt-from {spec}: no fluxrt_trio package in {path}")
        trees[label] = Path(path).resolve()
    args.fluxrt_from = trees
    # A --fluxrt-from LABEL can also be named in --servers as LABEL-tls, to serve TLS; it runs once either way.
    args.server_list += [label for label in trees if not {label, label + TLS_SUFFIX} & set(args.server_list)]
    known = {*SERVERS, *trees, *(label + TLS_SUFFIX for label in trees)}
    unknown = set(args.server_list) - known
    if unknown or not args.server_list:
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {SERVERS} or a --fluxrt-from LABEL[-tls]")
    if args.slow and any(s.endswith(TLS_SUFFIX) for s in args.server_list):
        parser.error("--slow is not supported with TLS servers")
    args.server_cpu, args.client_cpu = split_cpus(args.no_pin)
    for directory in (args.profile, args.syscalls, args.perf):
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    if args.client_cpu is not None:
        # The driver mostly sleeps; keep it off the server's CPU.
        os.sched_setaffinity(0, {args.client_cpu})
    variants: list[tuple[str, str, int]] = []
    for kind in args.server_list:
        if args.slow_compare:
            variants += [(kind, kind, 0), (kind + SLOW_SUFFIX, kind, args.slow)]
        else:
            variants.append((kind, kind, args.slow))
    servers = [label for label, _kind, _slow in variants]
    pin = (
        "unpinned" if args.server_cpu is None else f"server on CPU {args.server_cpu}, clients on CPU {args.client_cpu}"
    )
    scenario = f"paced, one msg every {args.pace:g} ms" if args.pace else "burst"
    print(
        f"fan-out bench ({scenario}): {args.connections} conns, {args.messages} msgs, {args.rounds} round(s), "
        f"servers {', '.join(servers)}; {pin}",
        flush=True,
    )
    if args.slow:
        where = f"in the {SLOW_SUFFIX} rounds" if args.slow_compare else "in every round"
        print(
            f"  slow clients: {args.slow} {where}, SO_RCVBUF {args.slow_rcvbuf}, never reading; fluxrt with its "
            "default realtime.write_buffer_size",
            flush=True,
        )
    if args.fluxrt_from:
        for kind in ["fluxrt", *args.fluxrt_from]:
            if kind in servers or kind + TLS_SUFFIX in servers:
                print(f"  {kind}: fluxrt_trio from {fluxrt_origin(args, kind)}", flush=True)
    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory(prefix="fluxrt-bench-") as tmp:
        args.tls_ca = None
        if any(kind.endswith(TLS_SUFFIX) for kind in args.server_list):
            args.tls_ca = make_tls_ca(Path(tmp) / "tls")
            print(f"  TLS: servers use a certificate of a CA made for the run ({args.tls_ca.ca_cert})", flush=True)
        if "floor" in args.server_list:
            args.floor_binary = build_floor(Path(tmp))
        for rnd in range(1, args.rounds + 1):
            # Alternate which server goes first so slow drift on a shared box hits both alike.
            order = variants if rnd % 2 else list(reversed(variants))
            for label, kind, slow in order:
                r = run_round(label, kind, slow, rnd, args, Path(tmp))
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
    if args.check and not targets_met(summary, servers, bool(args.pace)):
        return 1
    return 0 if all(r.ok for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
