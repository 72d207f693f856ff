"""The TypeScript SDK (sdk/typescript) under Node's test runner: its pure modules, and the SDK against a real fluxrt
and a real PostgreSQL.

Python prepares, Node tests: this file installs the SDK's packages (`npm ci`, only when node_modules is missing or
was installed from another package-lock.json), builds it with `tsc`, makes a scratch database with
public.users, writes a fluxrt.yaml for it, and runs `node --test`. The Node side starts, stops and restarts fluxrt as
a child process itself (sdk/typescript/test/support/fluxrt.ts), because restarting the server under a connected
client is one of the things it tests. A Node failure fails the test with Node's output and fluxrt's log.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import trio

from .support.config import SECRET
from .support.sdk import SDK, USERS, prepare_sdk


@pytest.fixture
def node() -> str:
    return prepare_sdk()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, *, port: int, dsn: str) -> None:
    # JSON is YAML: quoting every value keeps the secret and the DSN intact.
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        # The least leeway: a token is closed 1 s after its exp, so the token-refresh test does not wait 10 s.
        "auth": {"jwt_secret": SECRET, "leeway": "1s"},
        "database": {"dsn": dsn, "poll_interval": "10ms"},
        "realtime": {"shutdown_timeout": "2s"},
        "log": {"format": "text", "level": "info"},
    }
    path.write_text(json.dumps(config, indent=2))


async def run_node_tests(node: str, files: list[Path], env: dict[str, str], log: Path | None = None) -> str:
    """Run `node --test` on `files`; fail with Node's output (and fluxrt's log) unless every test passed."""
    assert files, "no test files were built: is sdk/typescript/test empty?"
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
            command, cwd=SDK, env={**os.environ, **env}, capture_stdout=True, capture_stderr=True, check=False
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


def built_tests(folder: str) -> list[Path]:
    return sorted((SDK / "build" / folder).glob("*.test.js"))


@pytest.mark.timeout(300)
async def test_pure_modules(node):
    """Message types, channel state, presence, backoff and token timing, without sockets."""
    await run_node_tests(node, built_tests("unit"), {})


@pytest.mark.timeout(300)
async def test_sdk_against_fluxrt(node, db, tmp_path):
    """The reference snippets, broadcast, presence, table options, errors, auth and reconnects, live."""
    db.sql(USERS)
    port = free_port()
    config = tmp_path / "fluxrt.yaml"
    write_config(config, port=port, dsn=db.dsn)
    log = tmp_path / "fluxrt.log"
    env = {
        "SDK_TEST_FLUXRT": json.dumps([sys.executable, "-m", "fluxrt_trio"]),
        "SDK_TEST_CONFIG": str(config),
        "SDK_TEST_URL": f"http://127.0.0.1:{port}",
        "SDK_TEST_DSN": db.dsn,
        "SDK_TEST_SECRET": SECRET,
        "SDK_TEST_LOG": str(log),
    }
    await run_node_tests(node, built_tests("live"), env, log)
