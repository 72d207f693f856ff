"""The TypeScript SDK's and the React hooks' builds, and running Node's test runner on them, for the tests that use
them (test_sdk_typescript.py, test_browser.py, test_sdk_react.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .. import pg
from .config import SECRET

SDK = pg.ROOT / "sdk" / "typescript"
REACT = pg.ROOT / "sdk" / "react"
REACT_TODOS = pg.ROOT / "examples" / "react-todos"
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


def _run(command: list[str], what: str, cwd: Path = SDK) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(command)} in {cwd}):\n{result.stdout}\n{result.stderr}", pytrace=False)


def _install(npm: str, folder: Path, what: str) -> None:
    """`npm ci` in `folder`, only when its node_modules was not installed from its current package-lock.json (npm ci
    wipes and reinstalls node_modules)."""
    digest = hashlib.sha256((folder / "package-lock.json").read_bytes()).hexdigest()
    stamp = folder / "node_modules" / ".installed-from-lock"
    if not stamp.is_file() or stamp.read_text() != digest:
        _run([npm, "ci", "--no-audit", "--no-fund"], f"installing {what}'s packages", folder)
        stamp.write_text(digest)


@functools.cache
def prepare_sdk() -> str:
    """Install (when needed) and build the SDK and its tests; returns the path of node. Runs once per session."""
    node, npm = tool("node"), tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        pytest.fail(f"node {version} is too old: the SDK needs Node.js {NODE_MAJOR} or newer", pytrace=False)
    _install(npm, SDK, "the SDK")
    _run([npm, "run", "--silent", "build"], "building the SDK (tsc)")
    _run([npm, "run", "--silent", "build:test"], "building the SDK's tests (tsc)")
    return node


@functools.cache
def prepare_react() -> str:
    """prepare_sdk(), then install and build sdk/react (it links ../typescript) and its tests, and the react-todos
    example (esbuild, linking both); returns the path of node. Runs once per session."""
    node = prepare_sdk()
    npm = tool("npm")
    _install(npm, REACT, "@fluxbase/react")
    _run([npm, "run", "--silent", "build"], "building @fluxbase/react (tsc)", REACT)
    _run([npm, "run", "--silent", "build:test"], "building @fluxbase/react's tests (tsc)", REACT)
    _install(npm, REACT_TODOS, "examples/react-todos")
    _run([npm, "run", "--silent", "build"], "building examples/react-todos (esbuild)", REACT_TODOS)
    return node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_fluxrt(dsn: str, folder: Path, tls: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    """The environment that tells the Node side (sdk/typescript/test/support/fluxrt.ts) how to run fluxrt on `dsn`
    with a config written in `folder`, and the log file it appends fluxrt's output to. With `tls` (server settings,
    ThrowawayCA.server_settings()) fluxrt serves TLS and the URL is https://."""
    port = free_port()
    config = folder / "fluxrt.yaml"
    write_config(config, port=port, dsn=dsn, tls=tls)
    log = folder / "fluxrt.log"
    env = {
        "SDK_TEST_FLUXRT": json.dumps([sys.executable, "-m", "fluxrt_trio"]),
        "SDK_TEST_CONFIG": str(config),
        "SDK_TEST_URL": f"{'https' if tls else 'http'}://127.0.0.1:{port}",
        "SDK_TEST_DSN": dsn,
        "SDK_TEST_SECRET": SECRET,
        "SDK_TEST_LOG": str(log),
    }
    return env, log


def write_config(path: Path, *, port: int, dsn: str, tls: dict[str, str] | None = None) -> None:
    """A fluxrt.yaml for a fluxrt that the Node side runs (test/support/fluxrt.ts) on `port` and `dsn`, with the
    server settings `tls` when given."""
    # JSON is YAML: quoting every value keeps the secret and the DSN intact.
    config = {
        "server": {"host": "127.0.0.1", "port": port, **(tls or {})},
        # The least leeway: a token is closed 1 s after its exp, so the token-refresh test does not wait 10 s.
        "auth": {"jwt_secret": SECRET, "leeway": "1s"},
        "database": {"dsn": dsn, "poll_interval": "10ms"},
        "realtime": {"shutdown_timeout": "2s"},
        "log": {"format": "text", "level": "info"},
    }
    path.write_text(json.dumps(config, indent=2))


async def run_node_tests(
    node: str, files: list[Path], env: dict[str, str], log: Path | None = None, cwd: Path = SDK
) -> str:
    """Run `node --test` on `files` in `cwd`; fail with Node's output (and fluxrt's log) unless every test passed."""
    assert files, f"no test files were built: is {cwd}/test empty?"
    command = [
        node,
        # Node 20 has a global WebSocket only behind this flag; the reference snippet uses the global, like a browser.
        "--experimental-websocket",
        "--test",
        "--test-reporter=spec",
        "--test-concurrency=1",
        *map(str, files),
    ]
    with trio.fail_after(240):
        result = await trio.run_process(
            command, cwd=cwd, env={**os.environ, **env}, capture_stdout=True, capture_stderr=True, check=False
        )
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    counts = {key: int(value) for key, value in re.findall(r"^\S* ?(tests|pass|fail) (\d+)$", output, re.M)}
    if result.returncode != 0 or counts.get("fail", 1) != 0 or not counts.get("pass"):
        server_log = log.read_text(errors="replace")[-20000:] if log is not None and log.exists() else ""
        pytest.fail(
            f"node --test failed (exit {result.returncode}):\n{output}\n--- fluxrt's log ---\n{server_log}",
            pytrace=False,
        )
    assert counts["pass"] == counts["tests"], output
    return output
