"""Headless Chromium for the tests of the example pages (test_browser.py, test_sdk_react.py): Debian's `chromium`,
installed here when missing, driven by playwright-core from a Node script (sdk/typescript/test/browser/pages.ts)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from .sdk import SDK

CHROMIUM = Path("/usr/bin/chromium")


@functools.cache
def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing (the suite runs as root on CI)."""
    if CHROMIUM.exists():
        return str(CHROMIUM)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            f"Chromium is missing ({CHROMIUM}): the browser tests drive Debian's chromium package; "
            "install it with `sudo apt-get install chromium`",
            pytrace=False,
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        # A machine that never ran `apt-get update` does not know the package yet.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not CHROMIUM.exists():
        pytest.fail(
            f"installing Chromium failed ({' '.join(install)}):\n{result.stdout}\n{result.stderr}", pytrace=False
        )
    return str(CHROMIUM)


async def see(scenario: str, tools: tuple[str, str], env: dict[str, str], log: Path | None = None) -> Any:
    """Run one scenario of pages.js; its report, or a failure carrying everything it printed (and fluxrt's `log`)."""
    node, chromium = tools
    with trio.fail_after(90):
        result = await trio.run_process(
            [node, str(SDK / "build" / "browser" / "pages.js"), scenario],
            cwd=SDK,
            env={**os.environ, **env, "CHROMIUM": chromium},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    if result.returncode != 0:
        server_log = log.read_text(errors="replace")[-20000:] if log is not None and log.exists() else ""
        pytest.fail(
            f"the {scenario} page did not behave (exit {result.returncode}):\n{err}\n{out}\n--- fluxrt's log ---\n"
            f"{server_log}",
            pytrace=False,
        )
    return json.loads(out.strip().splitlines()[-1])["result"]
