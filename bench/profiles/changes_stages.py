"""Where a change's commit-to-delivery time goes, from the timestamps of bench/profiles/changes-stages.patch.

The patch (apply it to a worktree and run bench/changes.py with --fluxrt-tree there) makes each fluxrt process write
/tmp/lat-trace-PID.txt (one line per change delivered live: its id, table, `created_at` (clock_timestamp() in the
capture trigger, just before the commit), when the read that found it began and ended, when its lane began
delivering it, when the lane's authorization answered, when the hand-out ended, and the batch size),
/tmp/lat-reads-PID.txt (every read: start, end, whether delivery was behind as it began, whether it found changes),
/tmp/lat-pool-PID.txt (every crossing into asyncpg: into the asyncio task, connection acquired, work done, back in
Trio) and /tmp/lat-lag-PID.txt (how late a 1 ms trio.sleep woke up). All clocks are the wall clock.

    .venv/bin/python bench/profiles/changes_stages.py PID [PID ...]

Only the last 20,000 changes of each process are used (the measured round of a `--rounds 1 --rate 2000` run, after
its warm-up).
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

LAST = 20_000


def lines(kind: str, pid: str) -> list[list[str]]:
    return [row.split() for row in Path(f"/tmp/lat-{kind}-{pid}.txt").read_text().splitlines()]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def line(name: str, xs: list[float]) -> str:
    return (
        f"  {name:30s} n {len(xs):6d}  p50 {pct(xs, 50):6.2f}  p90 {pct(xs, 90):6.2f}  p99 {pct(xs, 99):6.2f}"
        f"  max {max(xs):7.2f} ms"
    )


def stages(pid: str) -> None:
    rows = lines("trace", pid)
    changes = sorted(((float(r[2]), *map(float, r[3:10]), int(r[10])) for r in rows), key=lambda r: r[0])[-LAST:]
    lo, hi = changes[0][0], changes[-1][0]
    names = (
        "commit -> read begins",
        "read (query + crossing)",
        "queued behind the lane",
        "authorization (crossing)",
        "hand-out",
        "commit -> handed out",
    )
    # created, read start, read end, (unused), behind, lane start, decided, handed out, batch
    series = [
        [(r[1] - r[0]) * 1e3 for r in changes],
        [(r[2] - r[1]) * 1e3 for r in changes],
        [(r[5] - r[2]) * 1e3 for r in changes],
        [(r[6] - r[5]) * 1e3 for r in changes],
        [(r[7] - r[6]) * 1e3 for r in changes],
        [(r[7] - r[0]) * 1e3 for r in changes],
    ]
    print(f"fluxrt pid {pid}: {len(changes)} changes over {hi - lo:.1f} s")
    for name, xs in zip(names, series, strict=True):
        print(line(name, xs))
    total = series[-1]
    worst = [i for i, x in enumerate(total) if x >= pct(total, 99)]
    named = zip(names, series, strict=True)
    means = ", ".join(f"{name} {statistics.mean(xs[i] for i in worst):.1f}" for name, xs in named)
    print(f"  the slowest 1% (mean ms): {means}")

    reads = [list(map(float, r)) for r in lines("reads", pid)]
    reads = [r for r in reads if lo < r[0] < hi]
    pairs = list(itertools.pairwise(reads))
    print(f"  reads: {len(reads) / (hi - lo):.0f}/s, {sum(r[3] == 0 for r in reads)} found nothing")
    for name, keep in (
        ("gap after a read behind", lambda r: r[2] == 1 and r[3] == 1),
        ("gap after a read not behind", lambda r: r[2] == 0 and r[3] == 1),
        ("gap after an empty read", lambda r: r[3] == 0),
    ):
        gaps = [(b[0] - a[1]) * 1e3 for a, b in pairs if keep(a)]
        if gaps:
            print(line(name, gaps))

    crossings = [[*map(float, r[:5]), len(r) > 5] for r in lines("pool", pid) if lo < float(r[0]) < hi]
    for kind, feed in (("authorizer pool", False), ("changefeed", True)):
        chosen = [r for r in crossings if r[5] == feed]
        if not chosen:
            continue
        print(f"  crossings, {kind}:")
        print(line("into asyncio", [(r[1] - r[0]) * 1e3 for r in chosen]))
        print(line("the work", [(r[3] - r[2]) * 1e3 for r in chosen]))
        print(line("release and back to Trio", [(r[4] - r[3]) * 1e3 for r in chosen]))
    lag = [float(r[1]) for r in lines("lag", pid) if lo < float(r[0]) < hi]
    print(line("event loop late by", lag))


if __name__ == "__main__":
    for pid in sys.argv[1:]:
        stages(pid)
