"""The three-minute soak (bench/soak.py --quick): 1,000 connections with churn, broadcasts, presence and table
changes; RSS, descriptors, tasks and every gauge stay flat, and the gauges return to zero once every client left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.timeout(420)
def test_three_minutes_of_churn_leave_nothing_behind(pg_admin: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--check", "--dsn", pg_admin],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASS" in result.stdout
