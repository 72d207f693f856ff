"""Start-up of the shipped fluxrt.pyz: its size, the first start (unpacking and compiling), warm starts.

Usage: python bench/startup.py [--pyz PATH] [--runs N] [--dsn DSN]

Builds fluxrt.pyz as `make pyz` does unless --pyz names one. Each start runs the pyz with a cleared environment
(`env -i`, as a service would) and is timed from spawning the process to the first answered `GET /health`
(accepting connections), then stopped with SIGTERM. "First" starts use an empty SHIV_ROOT each; "warm" starts
reuse one. With --dsn, the server also connects to that database (migrations already applied) before it listens,
as in production.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, free_port, proc_cpu

TIMEOUT = 60.0


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


def start_once(pyz: Path, shiv_root: Path, dsn: str | None, python: str) -> tuple[float, float]:
    """Seconds from spawn to the first answered /health, and the CPU seconds the process had used by then (less
    sensitive to a busy machine than the wall time)."""
    port = free_port("127.0.0.1")
    env = [f"SHIV_ROOT={shiv_root}", "FLUXRT_AUTH_JWT_SECRET=bench-" + "x" * 40, f"FLUXRT_SERVER_PORT={port}"]
    env += ["FLUXRT_SERVER_HOST=127.0.0.1", "FLUXRT_LOG_LEVEL=warning", "FLUXRT_DATABASE_EMBEDDED="]
    if dsn:
        env += [f"FLUXRT_DATABASE_DSN={dsn}", "FLUXRT_DATABASE_MIGRATE=false"]
    began = time.perf_counter()
    proc = subprocess.Popen(["env", "-i", *env, python, str(pyz)], stderr=subprocess.DEVNULL)
    try:
        while not _answers(port):
            if proc.poll() is not None:
                raise SystemExit(f"fluxrt exited {proc.returncode} before listening")
            if time.perf_counter() - began > TIMEOUT:
                raise SystemExit("fluxrt did not listen within 60 s")
            time.sleep(0.002)
        return time.perf_counter() - began, proc_cpu(proc.pid) or 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyz", type=Path, help="a built fluxrt.pyz (default: build one now)")
    parser.add_argument("--runs", type=int, default=10, help="warm starts to time (default 10); first starts: 3")
    parser.add_argument("--dsn", help="a migrated database to connect to while starting")
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter a host would use")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pyz = args.pyz
        if pyz is None:
            pyz = Path(tmp) / "fluxrt.pyz"
            subprocess.run(
                [sys.executable, str(REPO_ROOT / "packaging" / "build_pyz.py"), "--also-next", "--output", str(pyz)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        first = []
        for i in range(3):
            root = Path(tmp) / f"first{i}"
            first.append(start_once(pyz, root, args.dsn, args.python)[0])
            shutil.rmtree(root)
        warm_root = Path(tmp) / "warm"
        start_once(pyz, warm_root, args.dsn, args.python)
        runs = [start_once(pyz, warm_root, args.dsn, args.python) for _ in range(args.runs)]
        warm, cpu = [wall for wall, _ in runs], [used for _, used in runs]
        size = pyz.stat().st_size
    print(f"pyz size:            {size / 1e6:.1f} MB ({size} bytes)")
    print(f"python:              {subprocess.run([args.python, '-V'], capture_output=True, text=True).stdout.strip()}")
    print(f"database:            {'yes' if args.dsn else 'none'}")
    print(
        f"first start:         median {statistics.median(first):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in first)})"
    )
    print(
        f"warm start:          median {statistics.median(warm):.3f} s  min {min(warm):.3f}  max {max(warm):.3f}"
        f"  ({len(warm)} runs)"
    )
    print(f"warm start CPU:      median {statistics.median(cpu):.3f} s  (user + system, to the first answer)")


if __name__ == "__main__":
    main()
