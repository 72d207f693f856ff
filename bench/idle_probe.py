"""Run fluxrt with a heap probe beside it, for bench/idle.py: what the Python heap holds per connection.

    python bench/idle_probe.py DIR -- FLUXRT-ARGUMENTS

A thread watches DIR. When the file `start` appears it starts tracemalloc (FRAMES frames per traceback) and
counts the gc-tracked objects by type; when `stop` appears it takes a snapshot and writes DIR/heap.json:

- `traced_bytes`: bytes tracemalloc sees allocated since `start` and still alive (the Python heap's growth);
- `by_line`: the 30 source lines that hold most of them; `by_traceback`: the 15 allocation tracebacks that do;
- `objects`: gc-tracked objects that appeared since `start`, by type (fluxrt freezes what it made at start-up, and
  gc does not list dicts and tuples of plain values, so these are only the new containers).

Tracing starts after start-up, so only what came after is counted; it slows fluxrt several times over, so the
RSS of a probed run is not a figure to record.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 12


def type_counts() -> collections.Counter[str]:
    """Live gc-tracked objects by type, frozen ones included (fluxrt freezes the survivors of full collections)."""
    gc.unfreeze()
    try:
        return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    finally:
        gc.freeze()


def watch(control: Path) -> None:
    while not (control / "start").exists():
        time.sleep(0.1)
    before = type_counts()
    tracemalloc.start(FRAMES)
    (control / "started").write_text("")
    while not (control / "stop").exists():
        time.sleep(0.1)
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    grew = type_counts()
    grew.subtract(before)
    heap = {
        "traced_bytes": sum(stat.size for stat in snapshot.statistics("filename")),
        "by_line": [[str(s.traceback[0]), s.size, s.count] for s in snapshot.statistics("lineno")[:30]],
        "by_traceback": [[s.traceback.format(), s.size, s.count] for s in snapshot.statistics("traceback")[:15]],
        "objects": [[name, n] for name, n in grew.most_common(40) if n > 0],
    }
    (control / "heap.json").write_text(json.dumps(heap))


def main() -> None:
    cut = sys.argv.index("--")
    control = Path(sys.argv[1])
    threading.Thread(target=watch, args=(control,), name="idle-probe", daemon=True).start()
    sys.argv = ["fluxrt", *sys.argv[cut + 1 :]]
    # As `python -m fluxrt_trio` would: the package of the working directory (or PYTHONPATH), not this directory.
    sys.path[0] = os.getcwd()
    runpy.run_module("fluxrt_trio", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
