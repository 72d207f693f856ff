"""Run fluxrt with a heap probe beside it, for bench/idle.py: what the Python heap holds per connection.

    python bench/idle_probe.py DIR -- FLUXRT-ARGUMENTS

A thread watches DIR. When the file `start` appears it starts tracemalloc (FRAMES frames per traceback) and
counts the gc-tracked objects by type; when `stop` appears it takes a snapshot and writes DIR/heap.json:

- `traced_bytes`: bytes tracemalloc sees allocated since `start` and still alive (the Python heap's growth);
- `by_package`: those bytes by where the allocating line is: trio, wsproto, h11, fluxrt_trio, attrs/cattrs-generated
  code (named after the class it builds), the standard library, other;
- `by_line`: the 30 source lines that hold most of them; `by_traceback`: the 15 allocation tracebacks that do;
- `h11_kept`: the 5 tracebacks of h11's allocations still alive: what of the HTTP handshake outlives it;
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


def package(filename: str) -> str:
    """Where an allocating source file belongs; generated code (`<attrs generated methods trio...>`) goes with the
    package of the class it was generated for."""
    for name in ("fluxrt_trio", "wsproto", "h11", "trio"):
        if f"/{name}/" in filename or (filename.startswith("<") and f" {name}." in filename):
            return name
    if filename.startswith("<"):
        return "generated"
    return "stdlib" if "/python3" in filename and "site-packages" not in filename else "other"


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
    by_file = snapshot.statistics("filename")
    packages: collections.Counter[str] = collections.Counter()
    for stat in by_file:
        packages[package(stat.traceback[0].filename)] += stat.size
    heap = {
        "traced_bytes": sum(stat.size for stat in by_file),
        "by_package": packages.most_common(),
        "by_line": [[str(s.traceback[0]), s.size, s.count] for s in snapshot.statistics("lineno")[:30]],
        "by_traceback": [[s.traceback.format(), s.size, s.count] for s in snapshot.statistics("traceback")[:15]],
        "h11_kept": [
            [s.traceback.format(), s.size, s.count]
            for s in snapshot.filter_traces([tracemalloc.Filter(True, "*/h11/*")]).statistics("traceback")[:5]
        ],
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
