"""The TypeScript SDK (sdk/typescript) under Node's test runner: its pure modules, and the SDK against a real fluxrt
and a real PostgreSQL.

Python prepares, Node tests: this file installs the SDK's packages (`npm ci`, only when node_modules is missing or
was installed from another package-lock.json), builds it with `tsc`, makes a scratch database with
public.users, writes a fluxrt.yaml for it, and runs `node --test`. The Node side starts, stops and restarts fluxrt as
a child process itself (sdk/typescript/test/support/fluxrt.ts), because restarting the server under a connected
client is one of the things it tests. A Node failure fails the test with Node's output and fluxrt's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .support.sdk import SDK, USERS, node_fluxrt, prepare_sdk, run_node_tests


@pytest.fixture
def node() -> str:
    return prepare_sdk()


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
    env, log = node_fluxrt(db.dsn, tmp_path)
    await run_node_tests(node, built_tests("live"), env, log)
