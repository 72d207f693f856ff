"""Plumbing shared by the benchmark drivers and their load generators: processes, CPU accounting, percentiles, and
the copies a subscriber process recorded."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import signal
import socket
import subprocess
import sys
from array import array
from collections.abc import Callable, Coroutine, Iterable, Iterator
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


def run_driver(amain: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace) -> int:
    """A driver's asyncio main on its parsed arguments, the open-file limit raised first (`raise_nofile_limit`);
    returns its exit status."""
    raise_nofile_limit()
    return asyncio.run(amain(args))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least pct% of values <= it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def counted(counts: Iterable[tuple[str, int]]) -> list[str]:
    """Each (label, N) whose N is not zero as "N label", in order: a step's correctness problems."""
    return [f"{value} {label}" for label, value in counts if value]


class Copies:
    """The copies a subscriber process recorded in one step (quadruples: sequence number, connection index, kernel
    receive time, read time), each message's copy to a connection once. Message i of the step is sequence number
    seq0 + i; `published[i]` is false for one that was not published. Iterating yields (i, connection, stamp,
    read) for the first copy of a published message to each connection and counts the rest: `foreign` (not one of
    the step's published messages) and `duplicates` (a connection's second copy)."""

    def __init__(self, records: array, seq0: int, published: list[int], connections: int) -> None:
        self.records = records
        self.seq0 = seq0
        self.published = published
        self.connections = connections
        self.foreign = 0
        self.duplicates = 0

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        records, seq0, published, nconn = self.records, self.seq0, self.published, self.connections
        n = len(published)
        seen: set[int] = set()
        for k in range(0, len(records), 4):
            i, conn = records[k] - seq0, records[k + 1]
            if not 0 <= i < n or not published[i]:
                self.foreign += 1
                continue
            key = i * nconn + conn
            if key in seen:
                self.duplicates += 1
                continue
            seen.add(key)
            yield i, conn, records[k + 2], records[k + 3]


def stat_times(stat: str) -> tuple[float, float]:
    """(utime, stime) in seconds from the text of a /proc/PID/stat file."""
    # The command name may contain spaces; fields after it are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def stat_cpu_s(stat: str) -> float:
    """utime+stime in seconds from the text of a /proc/PID/stat file."""
    return sum(stat_times(stat))


def proc_times(pid: int | None) -> tuple[float, float] | None:
    """(utime, stime) of a process in seconds, from /proc/PID/stat; None without a pid or when it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat_times(stat)


def proc_cpu(pid: int | None) -> float | None:
    """utime+stime of a process in seconds, from /proc/PID/stat; None without a pid or when it is gone."""
    times = proc_times(pid)
    return None if times is None else sum(times)


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


def postgres_cpus() -> dict[int, float]:
    """CPU seconds of each process named postgres (the whole cluster, whoever it works for), by pid."""
    return {
        pid: stat_cpu_s(stat)
        for pid, stat in proc_stats()
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "postgres"
    }


def postgres_cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the postgres processes used since `before`: a process that started since counts whole, one that
    ended is missed (its last share unknown) rather than subtracted, so the figure can only be an underestimate
    (ours, the writers' and fluxrt's backends, live throughout)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_cpus().items())


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


def health(host: str, port: int) -> dict[str, Any] | None:
    """fluxrt's GET /health body when it answers 200, else None (not listening, another status, not JSON)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None
