"""Run a server module with every garbage collection timed: `python bench/gcprobe.py OUT.json -m fluxrt_trio ARGS`.

A `gc.callbacks` hook notes each collection's start (``time.monotonic()``, CLOCK_MONOTONIC, the same clock as the
driver's), duration, generation and objects collected; the list is written to OUT.json as the process exits (fluxrt
exits normally on SIGTERM). The module is run as `python -m` would run it, from the current directory (`env -C TREE`
picks the tree), so a `--compare-tree` runs its own fluxrt_trio under the same probe. The hook costs two clock reads
and a tuple per collection. `--threshold A,B,C` sets `gc.set_threshold(A, B, C)` first, to try a policy on a tree
that does not set one (connect.py --gc-threshold).
"""

from __future__ import annotations

import atexit
import gc
import os
import runpy
import sys
import time
from typing import Any

import orjson


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--threshold":
        gc.set_threshold(*(int(n) for n in sys.argv[2].split(",")))
        del sys.argv[1:3]
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: gcprobe.py [--threshold A,B,C] OUT.json -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]
    records: list[tuple[float, float, int, int]] = []
    started: list[float] = [0.0]

    def hook(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
        else:
            now = time.monotonic()
            records.append((started[0], now - started[0], info["generation"], info["collected"]))

    def write() -> None:
        with open(out, "wb") as f:
            f.write(orjson.dumps({"collections": records, "frozen": gc.get_freeze_count()}))

    gc.callbacks.append(hook)
    atexit.register(write)
    sys.argv = [module, *sys.argv[4:]]
    if not sys.flags.safe_path:
        # As `python -m` does; under -P (fanout.fluxrt_command's PYTHONPATH trees) nothing is put first.
        sys.path[0] = os.getcwd()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def summary(path: str, since: float, until: float) -> dict[str, Any]:
    """Collections that started within [since, until] (monotonic seconds): count, total and longest pause in ms, per
    generation."""
    with open(path, "rb") as f:
        data = orjson.loads(f.read())
    by_gen: dict[int, dict[str, float]] = {}
    for start, duration, generation, _collected in data["collections"]:
        if since <= start <= until:
            g = by_gen.setdefault(generation, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            g["count"] += 1
            g["total_ms"] += duration * 1000
            g["max_ms"] = max(g["max_ms"], duration * 1000)
    return {
        "by_generation": {str(k): v for k, v in sorted(by_gen.items())},
        "total_ms": sum(g["total_ms"] for g in by_gen.values()),
        "max_ms": max((g["max_ms"] for g in by_gen.values()), default=0.0),
    }


if __name__ == "__main__":
    main()
