"""Run fluxrt with a memory probe beside it: does what grows live in Python objects, or in memory the allocators
hold? For investigations (`bench/soak.py --probe FILE`), never in production.

    python bench/memprobe.py OUT [--every S] [--trim] -- FLUXRT-ARGUMENTS

A thread appends one JSON line to OUT every S seconds (default 30):

- `rss_mib`; `gc_objects`, the gc-tracked objects by type (`top`, 25 types) and the types that grew most since the
  line before (`grew`). fluxrt freezes what it made at start-up (gc.freeze), and gc does not list frozen objects:
  these counts are of what came after. Dicts and tuples of plain values are not tracked either.
- `connections` and `closed_connections`: fluxrt_trio.connection.Connection objects alive, and those already closed
  (`closed_held_by`: the types of what refers to the first 50 of these).
- `timer_handles`: asyncio TimerHandles alive, and how many of them are cancelled (trio-asyncio keeps a cancelled
  timer until its time comes).
- pymalloc (sys._debugmallocstats): `arenas`, `allocated_bytes` in blocks in use, `free_bytes` in free blocks of
  pools in use. Growth of allocated bytes is live objects; of arenas with allocated bytes flat, fragmentation.
- With `--trim`, `trim_mib`: RSS before and after glibc's malloc_trim(0), which returns to the system the free
  memory malloc holds; a large drop means the RSS was freed memory retained, not objects.
- With PYTHONTRACEMALLOC=1 in the environment, `tracemalloc`: the 12 source lines whose allocations grew most since
  the first line (tracemalloc slows fluxrt several times over).

The thread holds the GIL while it counts: a few milliseconds per 100,000 objects, once per line.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import re
import runpy
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any

CONNECTION = "fluxrt_trio.connection"
_MALLOC_STATS = {
    "arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "allocated_bytes": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "free_bytes": r"# bytes in available blocks\s*=\s*([\d,]+)",
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024  # type: ignore[union-attr]


def malloc_stats() -> dict[str, int]:
    """pymalloc's own figures; sys._debugmallocstats writes them to the C stderr, so fd 2 is lent to a file."""
    with tempfile.TemporaryFile(mode="w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    found = {key: re.search(pattern, text) for key, pattern in _MALLOC_STATS.items()}
    return {key: int(m.group(1).replace(",", "")) for key, m in found.items() if m}


class Probe:
    def __init__(self, out: str, every: float, trim: bool) -> None:
        self.out = out
        self.every = every
        self.libc = ctypes.CDLL("libc.so.6") if trim else None
        self.started = time.monotonic()
        self.counts: collections.Counter[str] | None = None
        self.first: tracemalloc.Snapshot | None = None

    def run(self) -> None:
        while True:
            time.sleep(self.every)
            line = self.line()
            with open(self.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    def line(self) -> dict[str, Any]:
        line: dict[str, Any] = {"s": round(time.monotonic() - self.started), "rss_mib": round(rss_mib(), 1)}
        objects = gc.get_objects()
        counts = collections.Counter(type(o).__qualname__ for o in objects)
        line["gc_objects"] = len(objects)
        line["top"] = counts.most_common(25)
        if self.counts is not None:
            grew = counts.copy()
            grew.subtract(self.counts)
            line["grew"] = [(name, n) for name, n in grew.most_common(15) if n > 0]
        self.counts = counts
        connections = [o for o in objects if type(o).__name__ == "Connection" and type(o).__module__ == CONNECTION]
        closed = [c for c in connections if c.closed]
        line["connections"], line["closed_connections"] = len(connections), len(closed)
        holders: collections.Counter[str] = collections.Counter()
        for conn in closed[:50]:
            for referrer in gc.get_referrers(conn):
                if referrer is not objects and referrer is not connections and referrer is not closed:
                    holders[type(referrer).__qualname__] += 1
        line["closed_held_by"] = holders.most_common(8)
        timers = [o for o in objects if type(o).__name__ == "TimerHandle"]
        line["timer_handles"] = [len(timers), sum(1 for t in timers if t.cancelled())]
        del objects, connections, closed, timers
        line.update(malloc_stats())
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.first is None:
                self.first = snapshot
            else:
                line["tracemalloc"] = [str(stat) for stat in snapshot.compare_to(self.first, "lineno")[:12]]
        if self.libc is not None:
            before = rss_mib()
            self.libc.malloc_trim(0)
            line["trim_mib"] = [round(before, 1), round(rss_mib(), 1)]
        return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="file the JSON lines are appended to")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--trim", action="store_true", help="call malloc_trim(0) at each line, RSS before and after")
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    args = parser.parse_args(sys.argv[1:cut])
    probe = Probe(args.out, args.every, args.trim)
    threading.Thread(target=probe.run, name="memprobe", daemon=True).start()
    sys.argv = ["fluxrt", *sys.argv[cut + 1 :]]
    # As `python -m fluxrt_trio` would: the package of the working directory, not this script's directory.
    sys.path[0] = os.getcwd()
    runpy.run_module("fluxrt_trio", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
