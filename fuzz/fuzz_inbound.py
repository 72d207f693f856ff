"""Fuzz `FrameGuard`, which reads client frame headers before wsproto does: on any byte stream it refuses where
RFC 6455's message sizes say, and however the stream is cut into reads it refuses the same frame in the read that
completes that frame's header (tests/fuzz/guard.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# The property lives with the property tests; the harness runs from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["fluxrt_trio", "tests.fuzz"]):
    from tests.fuzz.guard import check_cuts


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_size = fdp.PickValueInList([0, 1, 125, 126, 65535, 65536, 2**63])
    cuts = [fdp.ConsumeIntInRange(0, 256) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    check_cuts(fdp.ConsumeBytes(fdp.remaining_bytes()), cuts, max_size)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
