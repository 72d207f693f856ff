"""The coverage-guided harnesses of fuzz/ run: each for a few seconds from a fresh corpus, with no crash. `make fuzz`
runs them for FUZZ_SECONDS each (bench/RESULTS.md, Fuzzing, has the long runs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("decode", "channels", "filters", "session", "inbound")
SECONDS = 3


def test_every_harness_runs_without_a_crash(tmp_path: Path) -> None:
    # All at once, so that the four cost one budget of wall time rather than four.
    runs = {}
    for target in TARGETS:
        corpus = tmp_path / target
        corpus.mkdir()
        seeds = ROOT / "fuzz" / "seeds" / target
        runs[target] = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "fuzz" / f"fuzz_{target}.py"),
                f"-max_total_time={SECONDS}",
                "-timeout=10",
                f"-artifact_prefix={tmp_path}/{target}-",
                str(corpus),
                *([str(seeds)] if seeds.is_dir() else []),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for target, process in runs.items():
        output, _ = process.communicate(timeout=50)
        assert process.returncode == 0, f"fuzz_{target}.py failed:\n{output[-3000:]}"
        done = re.search(r"Done (\d+) runs", output)
        assert done and int(done[1]) >= 100, f"fuzz_{target}.py barely ran:\n{output[-3000:]}"
    assert not list(tmp_path.glob("*crash-*")), "a harness wrote a crashing input"
