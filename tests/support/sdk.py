"""The TypeScript SDK's build for the tests that run it (test_sdk_typescript.py, test_browser.py)."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess

import pytest

from .. import pg

SDK = pg.ROOT / "sdk" / "typescript"
NODE_MAJOR = 20

USERS = (
    "CREATE TABLE public.users (id serial PRIMARY KEY, name text, email text);"
    "GRANT SELECT ON public.users TO anon, authenticated;"
    "SELECT enable_realtime('public.users');"
)


def tool(name: str) -> str:
    """The path of `name`, or fail saying how to get it (never skip: these tests must run everywhere)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: the TypeScript SDK and browser tests need Node.js {NODE_MAJOR}+ with npm "
            "(on Debian: apt-get install nodejs npm)",
            pytrace=False,
        )
    return path


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, cwd=SDK, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(command)}):\n{result.stdout}\n{result.stderr}", pytrace=False)


@functools.cache
def prepare_sdk() -> str:
    """Install (when needed) and build the SDK and its tests; returns the path of node. Runs once per session."""
    node, npm = tool("node"), tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        pytest.fail(f"node {version} is too old: the SDK needs Node.js {NODE_MAJOR} or newer", pytrace=False)
    # npm ci wipes and reinstalls node_modules: only do it when package-lock.json changed since the last install.
    digest = hashlib.sha256((SDK / "package-lock.json").read_bytes()).hexdigest()
    stamp = SDK / "node_modules" / ".installed-from-lock"
    if not stamp.is_file() or stamp.read_text() != digest:
        _run([npm, "ci", "--no-audit", "--no-fund"], "installing the SDK's packages")
        stamp.write_text(digest)
    _run([npm, "run", "--silent", "build"], "building the SDK (tsc)")
    _run([npm, "run", "--silent", "build:test"], "building the SDK's tests (tsc)")
    return node
