"""Process plumbing shared by the benchmark drivers (fanout.py, changes.py) and their load generators."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; thousands of sockets need it (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least pct% of values <= it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def stat_cpu_s(stat: str) -> float:
    """utime+stime in seconds from the text of a /proc/PID/stat file."""
    # The command name may contain spaces; fields after it are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float | None:
    """utime+stime of a process in seconds, from /proc/PID/stat; None without a pid or when it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat_cpu_s(stat)


def proc_stats() -> Iterator[tuple[int, str]]:
    """(pid, text of /proc/PID/stat) of every process on the machine; one that ends while being read is skipped."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        yield int(entry.name), stat


def split_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    """(server CPU, client CPU): the first two this process may run on, or (None, None) when asked not to pin or
    when there are fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def stop_child(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Close a load generator's stdin and wait for it to exit; kill it if it has not after `timeout` s."""
    with contextlib.suppress(OSError):
        proc.stdin.close()  # type: ignore[union-attr]
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def emit(event: str, **fields: Any) -> None:
    """One JSON event line on stdout, for the driver."""
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


class ServerProcess:
    """A server under test as a child process run from the repository root, its output in a log file."""

    LOG_TAIL = 3000

    def __init__(self, argv: list[str], log_path: Path, cpu: int | None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})

    @property
    def pid(self) -> int:
        return self.proc.pid

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

    def log_tail(self, limit: int | None = None) -> str:
        with contextlib.suppress(ValueError):  # already closed by stop()
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-(limit or self.LOG_TAIL) :]
        except OSError:
            return ""
