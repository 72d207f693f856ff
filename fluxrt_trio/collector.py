"""The server process's garbage-collector policy (docs/architecture.md, "Garbage collector", says why).

What start-up made is frozen; after that, every full (generation 2) collection freezes what survived it, so the next
full collection walks only what was made since, not every connection alive. A frozen object that later becomes
unreachable is still freed by its reference count; only garbage in reference cycles among frozen objects would stay,
and a connection's life makes none (tests/test_collector.py).
"""

from __future__ import annotations

import gc
from typing import Any


def install() -> None:
    """Freeze what exists now and freeze the survivors of every full collection from now on; for the server process
    only (never in a process whose cyclic garbage matters, such as a test run). Calling it again changes nothing."""
    gc.freeze()
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    # Called as the collection has finished ("stop"), its lists consistent: freezing only moves them.
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()
