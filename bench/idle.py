"""Idle-memory benchmark: what one open, idle WebSocket connection costs fluxrt, in its process and in the kernel.

For each connection count N and each mode, start a fresh fluxrt, read its RSS, open N connections from a client
process (bench/idle_clients.py, spread over loopback source addresses 127.0.0.1..K), let them settle, and read:

- **RSS KiB/conn**: fluxrt's VmRSS after minus before, over N: what the process holds per connection (the
  Python heap, the allocators' slack, and whatever else grew). The target (issue 16) is at most 8 KiB.
- **skmem KiB/conn**: the kernel's socket buffers of fluxrt's own sockets (`ss -tm`, each socket's
  r + t + f + w + o + bl: receive queue, send queue in flight, forward allocation, queued writes, options,
  backlog), over N. Kernel memory, not in the RSS.
- **sockstat KiB/conn**: the growth of TCP's memory in pages (`/proc/net/sockstat` `mem`) over N, both ends of
  each connection (client and server sockets are on this machine) and every other TCP socket of the machine.
- **slab KiB/conn**: the growth of the kernel's slab (`/proc/meminfo` Slab) over N: the socket, file, inode and
  epoll structures of BOTH ends of each connection (two sockets), plus anything else the machine did meanwhile.
- **kobj KiB/socket**: the same structures counted one by one, from `/proc/slabinfo` (root only): the growth of the
  active objects of the caches a TCP socket takes (SOCKET_CACHES) times their size, over 2N (both ends are alike):
  what the kernel holds for one end of an idle connection beside its buffers.

Modes: `bare` (connected and authenticated, subscribed to nothing) and `joined` (also subscribed to one broadcast
channel, as a realistic idle client is). `--heap N` adds a run under bench/idle_probe.py: tracemalloc's view of the
Python heap per connection (bytes still allocated since before the first connection, over N) with the source lines
and tracebacks that hold it, and the gc-tracked objects per connection by type (e.g. Trio tasks).

`--tree PATH` measures fluxrt_trio of another source tree instead of this one (a clean `git worktree` of a commit,
when the working tree holds edits not to be measured). `--compare-tree PATH` runs the same steps on fluxrt_trio of
another source tree (a `git worktree` of an older commit), rounds alternating, and prints the ratio. Run from the
repository root:

    .venv/bin/python bench/idle.py                                  # 5,000 and 50,000, bare and joined
    .venv/bin/python bench/idle.py --connections 5000 --modes joined --heap 5000
    git worktree add /tmp/base-idle <commit> && .venv/bin/python bench/idle.py --compare-tree /tmp/base-idle

The bench raises RLIMIT_NOFILE (soft, and hard when allowed) for both sides and spreads the clients over as many
processes as that limit asks for; fluxrt holds every connection in one process, so 50,000 needs a hard limit above
50,256 (root with CAP_SYS_RESOURCE). Exit status: 0 when
this tree's RSS per connection is within the target at every count, 1 when not, 2 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO_ROOT, free_port, health

TARGET_KIB = 8.0
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CHANNEL = "broadcast:idle"
SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq")
"""the slab caches an accepted (or connected) TCP socket in an epoll set takes an object of"""
SKMEM_FIELDS = ("r", "t", "f", "w", "o", "bl")
"""the fields of `ss -m` that are memory the socket holds (rb and tb are limits, d drops)"""

FLUXRT_CONFIG = """\
server:
  host: 127.0.0.1
  port: {port}
  path: /ws
  max_pending_handshakes_per_address: {n}
auth:
  allow_anonymous: true
realtime:
  max_connections: {n}
  anonymous_share: 1.0
  max_anonymous_per_address: {n}
  # Idle means idle: no server ping in the run (the heartbeat is one timer heap, not per-connection memory).
  heartbeat_interval: 600s
  connection_timeout: 1200s
log:
  level: warning
"""


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def raise_nofile(n: int) -> int:
    """Room for `n` sockets in each process, this one's children included: the soft limit to the hard one, and the
    hard one too when allowed (root with CAP_SYS_RESOURCE); returns the soft limit now. Exits when fluxrt, which
    holds every connection in one process, cannot have `n`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(n, soft), max(n, hard)))
        return max(n, soft)
    except (ValueError, OSError) as exc:
        if hard >= n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        sys.exit(
            f"cannot raise RLIMIT_NOFILE to {n} ({exc}; the hard limit is {hard}): fluxrt holds every connection in "
            "one process, so run as root with CAP_SYS_RESOURCE (a container may drop it), or with fewer --connections"
        )


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]


def slab_kib() -> int:
    return int(re.search(r"Slab:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]


def socket_slab_bytes() -> int | None:
    """Bytes of the active objects of SOCKET_CACHES, or None when /proc/slabinfo cannot be read (not root)."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in SOCKET_CACHES:
            total += int(fields[1]) * int(fields[3])
    return total


def sockstat_tcp_pages() -> int:
    return int(re.search(r"TCP: .* mem (\d+)", Path("/proc/net/sockstat").read_text()).group(1))  # type: ignore[union-attr]


def skmem(port: int) -> tuple[int, int]:
    """(sockets, bytes their buffers hold) of the established sockets on local port `port` (the server's)."""
    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    sockets = total = 0
    for match in re.finditer(r"skmem:\(([^)]*)\)", out):
        fields = dict(re.match(r"([a-z]+)(\d+)", kv).groups() for kv in match.group(1).split(","))  # type: ignore[union-attr]
        sockets += 1
        total += sum(int(fields.get(name, 0)) for name in SKMEM_FIELDS)
    return sockets, total


def tree_commit(tree: Path) -> str:
    git = ["git", "--no-optional-locks", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fluxrt_trio"], capture_output=True, text=True).stdout
    return f"{commit or '?'}{' + uncommitted changes in fluxrt_trio/' if dirty else ''}"


class Server:
    """fluxrt from `tree`, run with that tree as its working directory so that `-m fluxrt_trio` imports its
    package; under bench/idle_probe.py when `probe` names the probe's control directory."""

    def __init__(self, tree: Path, n: int, workdir: Path, probe: Path | None) -> None:
        self.port = free_port("127.0.0.1")
        config = workdir / f"fluxrt-{self.port}.yaml"
        config.write_text(FLUXRT_CONFIG.format(port=self.port, n=n + 100))
        if probe is not None:
            argv = [sys.executable, str(BENCH_DIR / "idle_probe.py"), str(probe), "--", "--config", str(config)]
        else:
            argv = [sys.executable, "-m", "fluxrt_trio", "--config", str(config)]
        self.log_path = workdir / f"fluxrt-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=tree, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while health("127.0.0.1", self.port) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fluxrt did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def open_clients(args: argparse.Namespace, port: int, n: int, mode: str) -> tuple[list[subprocess.Popen[str]], float]:
    """The client processes holding `n` connections (as many as the open-file limit asks for, each from source
    addresses of its own), once all are ready, and the seconds the slowest took."""
    per_process = args.nofile - 256
    shares = [min(per_process, n - start) for start in range(0, n, per_process)]
    clients = []
    for i, share in enumerate(shares):
        argv = [
            sys.executable,
            str(BENCH_DIR / "idle_clients.py"),
            "--port",
            str(port),
            "--connections",
            str(share),
            "--sources",
            str(args.sources),
            "--first-source",
            str(1 + i * args.sources),
        ]
        if mode == "joined":
            argv += ["--join", CHANNEL]
        clients.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    connect_s = 0.0
    for proc in clients:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        event = json.loads(line) if line else {"event": "error", "error": "the client process exited"}
        if event["event"] != "ready":
            close_clients(clients)
            raise RuntimeError(f"clients: {event.get('error')}")
        connect_s = max(connect_s, event["connect_s"])
    return clients, connect_s


def close_clients(clients: list[subprocess.Popen[str]]) -> None:
    for proc in clients:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in clients:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_once(args: argparse.Namespace, label: str, tree: Path, n: int, mode: str, workdir: Path) -> dict[str, Any]:
    """One fresh server, N idle connections, the figures per connection."""
    result: dict[str, Any] = {"tree": label, "n": n, "mode": mode}
    server = Server(tree, n, workdir, None)
    try:
        time.sleep(args.settle)
        rss0, slab0, pages0, objs0 = rss_kib(server.proc.pid), slab_kib(), sockstat_tcp_pages(), socket_slab_bytes()
        clients, result["connect_s"] = open_clients(args, server.port, n, mode)
        try:
            time.sleep(args.settle)
            rss1, slab1, pages1, objs1 = rss_kib(server.proc.pid), slab_kib(), sockstat_tcp_pages(), socket_slab_bytes()
            sockets, held = skmem(server.port)
            if sockets != n:
                raise RuntimeError(f"ss saw {sockets} established server sockets, not {n}")
            if server.proc.poll() is not None:
                raise RuntimeError("fluxrt exited")
        finally:
            close_clients(clients)
    finally:
        server.stop()
    result |= {
        "rss_mib": [round(rss0 / 1024, 1), round(rss1 / 1024, 1)],
        "rss_kib": (rss1 - rss0) / n,
        "skmem_kib": held / 1024 / n,
        "sockstat_kib": (pages1 - pages0) * PAGE_KIB / n,
        "slab_kib": (slab1 - slab0) / n,
        "kobj_kib": (objs1 - objs0) / 1024 / (2 * n) if objs0 is not None and objs1 is not None else float("nan"),
    }
    return result


def run_heap(args: argparse.Namespace, label: str, tree: Path, workdir: Path) -> dict[str, Any]:
    """A run under the heap probe: tracemalloc's bytes and the new gc objects per connection (joined mode)."""
    n = args.heap
    control = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    server = Server(tree, n, workdir, control)
    try:
        (control / "start").write_text("")
        while not (control / "started").exists():
            time.sleep(0.1)
        clients, connect_s = open_clients(args, server.port, n, "joined")
        try:
            time.sleep(args.settle)
            (control / "stop").write_text("")
            deadline = time.monotonic() + 120
            while not (control / "heap.json").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("the heap probe wrote nothing in 120 s")
                time.sleep(0.2)
            time.sleep(0.2)
            heap = json.loads((control / "heap.json").read_text())
        finally:
            close_clients(clients)
    finally:
        server.stop()
    return {"tree": label, "n": n, "connect_s": connect_s, **heap}


def print_heap(h: dict[str, Any]) -> None:
    n = h["n"]
    print(f"\n{h['tree']}: Python heap (tracemalloc) {h['traced_bytes'] / n:.0f} B/conn at {n} joined connections")
    print("  by package: " + ", ".join(f"{name} {size / n:.0f} B" for name, size in h["by_package"]))
    print("  by source line (bytes per connection, blocks per connection):")
    for where, size, count in h["by_line"][:20]:
        print(f"    {size / n:8.1f} B {count / n:6.2f}  {where}")
    print("  new gc-tracked objects per connection:")
    for name, count in h["objects"][:20]:
        print(f"    {count / n:6.2f}  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="5000,50000", help="comma-separated connection counts")
    parser.add_argument("--modes", default="bare,joined", help="comma-separated: bare, joined")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each count and mode per tree (median)")
    parser.add_argument("--sources", type=int, default=8, help="loopback source addresses the clients use")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS sample")
    parser.add_argument("--heap", type=int, default=0, help="also a tracemalloc run with this many connections")
    parser.add_argument(
        "--tree", type=Path, default=REPO_ROOT, help="fluxrt source tree to measure (default this repository)"
    )
    parser.add_argument("--compare-tree", type=Path, default=None, help="fluxrt source tree to run beside this one")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.connections.split(",")]
    args.mode_list = args.modes.split(",")
    if set(args.mode_list) - {"bare", "joined"}:
        parser.error("--modes takes bare and joined")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.nofile = raise_nofile(max([*args.counts, args.heap]) + 256)
    trees = [("this", args.tree.resolve())]
    if args.compare_tree is not None:
        trees.append(("base", args.compare_tree.resolve()))
    print(f"load average at start: {uptime()}")
    for label, tree in trees:
        print(f"{label}: fluxrt_trio of {tree} (commit {tree_commit(tree)})")
    runs: list[dict[str, Any]] = []
    heaps: list[dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="fluxrt-bench-idle-") as tmp:
        workdir = Path(tmp)
        for n in args.counts:
            for mode in args.mode_list:
                for rnd in range(args.rounds):
                    # Alternate which tree goes first, so that neither always meets the machine in the same state.
                    order = trees if rnd % 2 == 0 else trees[::-1]
                    for label, tree in order:
                        try:
                            r = run_once(args, label, tree, n, mode, workdir)
                        except Exception as exc:
                            failed = True
                            print(f"  {label} {mode} {n}: FAILED: {exc}")
                            continue
                        runs.append(r)
                        print(
                            f"  {label:4} {mode:6} {n:6}: RSS {r['rss_kib']:5.2f} KiB/conn "
                            f"({r['rss_mib'][0]}->{r['rss_mib'][1]} MiB)  skmem {r['skmem_kib']:5.2f}  "
                            f"sockstat {r['sockstat_kib']:5.2f}  slab {r['slab_kib']:5.2f} KiB/conn  "
                            f"kobj {r['kobj_kib']:4.2f} KiB/socket  "
                            f"connect {r['connect_s']} s",
                            flush=True,
                        )
        if args.heap:
            for label, tree in trees:
                try:
                    heaps.append(run_heap(args, label, tree, workdir))
                except Exception as exc:
                    failed = True
                    print(f"  {label} heap: FAILED: {exc}")
    for h in heaps:
        print_heap(h)
    print(f"\nload average at end: {uptime()}")
    print(
        f"\n{'tree':5} {'mode':7} {'conns':>6}  RSS KiB/conn  skmem (server)  sockstat (both)  slab (both)  "
        "kobj/socket  target"
    )
    met = True
    for n in args.counts:
        for mode in args.mode_list:
            med: dict[str, float] = {}
            for label, _tree in trees:
                mine = [r for r in runs if r["tree"] == label and r["n"] == n and r["mode"] == mode]
                if not mine:
                    continue
                m = {
                    k: statistics.median(r[k] for r in mine)
                    for k in ("rss_kib", "skmem_kib", "sockstat_kib", "slab_kib", "kobj_kib")
                }
                med[label] = m["rss_kib"]
                verdict = ""
                if label == "this":
                    verdict = "PASS" if m["rss_kib"] <= TARGET_KIB else "FAIL"
                    met = met and m["rss_kib"] <= TARGET_KIB
                print(
                    f"{label:5} {mode:7} {n:6}  {m['rss_kib']:12.2f}  {m['skmem_kib']:14.2f}  "
                    f"{m['sockstat_kib']:15.2f}  {m['slab_kib']:11.2f}  {m['kobj_kib']:11.2f}  {verdict}"
                )
            if "this" in med and "base" in med and med["base"]:
                print(f"      ratio this/base RSS per connection: {med['this'] / med['base']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "heaps": heaps}, indent=1))
    if failed:
        return 2
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
