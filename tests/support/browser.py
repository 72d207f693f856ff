"""Headless Chromium for the tests of the example pages (test_browser.py, test_sdk_react.py): Debian's `chromium`,
installed here when missing, driven by playwright-core from a Node script (sdk/typescript/test/browser/pages.ts);
and a HOME whose NSS database makes it trust a test CA (certutil, from Debian's libnss3-tools, installed likewise)."""

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
CERTUTIL = Path("/usr/bin/certutil")


@functools.cache
def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing (the suite runs as root on CI)."""
    _ensure_debian_package(CHROMIUM, "chromium", "the browser tests drive Debian's chromium package")
    return str(CHROMIUM)


@functools.cache
def ensure_certutil() -> str:
    """NSS's certutil (Debian's libnss3-tools), installed with apt-get when it is missing."""
    _ensure_debian_package(CERTUTIL, "libnss3-tools", "the wss:// browser test makes Chromium's NSS database with it")
    return str(CERTUTIL)


def _ensure_debian_package(path: Path, package: str, why: str) -> None:
    if path.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{path} is missing: {why}; install it with `sudo apt-get install {package}`", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        # A machine that never ran `apt-get update` does not know the package yet.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not path.exists():
        pytest.fail(
            f"installing {package} failed ({' '.join(install)}):\n{result.stdout}\n{result.stderr}", pytrace=False
        )


def home_trusting(directory: Path, ca_cert: Path) -> Path:
    """`directory` made a HOME whose NSS database trusts `ca_cert` to identify web sites. Chromium on Linux keeps the
    user's own certificate authorities in $HOME/.pki/nssdb and verifies against them and its built-in roots, so a
    Chromium run with this HOME verifies the test server as it would any site: no certificate error is ignored."""
    certutil = ensure_certutil()
    nssdb = f"sql:{directory / '.pki' / 'nssdb'}"
    (directory / ".pki" / "nssdb").mkdir(parents=True, exist_ok=True)
    for command in (
        [certutil, "-N", "-d", nssdb, "--empty-password"],
        # C: a trusted CA for server certificates (TLS), nothing for mail or code signing.
        [certutil, "-A", "-d", nssdb, "-n", "fluxrt test CA", "-t", "C,,", "-i", str(ca_cert)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
    return directory


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
