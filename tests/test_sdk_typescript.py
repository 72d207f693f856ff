"""The TypeScript SDK (sdk/typescript) under Node's test runner: its pure modules, and the SDK against a real fluxrt
and a real PostgreSQL.

Python prepares, Node tests: this file installs the SDK's packages (`npm ci`, only when node_modules is missing or
was installed from another package-lock.json), builds it with `tsc`, makes a scratch database with
public.users, writes a fluxrt.yaml for it, and runs `node --test`. The Node side starts, stops and restarts fluxrt as
a child process itself (sdk/typescript/test/support/fluxrt.ts), because restarting the server under a connected
client is one of the things it tests. A Node failure fails the test with Node's output and fluxrt's log.
test_sdk_over_wss runs the same way against a fluxrt that serves TLS with a certificate from a CA made at test time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .support.sdk import SDK, USERS, node_fluxrt, prepare_sdk, run_node_tests
from .support.tls import make_ca


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


@pytest.mark.timeout(120)
async def test_sdk_over_wss(node, db, tmp_path):
    """test/tls/wss.test.ts against https://127.0.0.1:PORT: a table change and a broadcast arrive over wss:// (on the
    `ws` package and on Node's own WebSocket), a cut connection reconnects with a new handshake and the table resumes,
    and with Node's bundled roots only (what a process without NODE_EXTRA_CA_CERTS trusts) the handshake is refused.
    Verification stays on: Node trusts the test CA because NODE_EXTRA_CA_CERTS names it, as an operator with a private
    CA would set it up."""
    ca = make_ca(tmp_path / "ca")
    db.sql(USERS)
    env, log = node_fluxrt(db.dsn, tmp_path, tls=ca.server_settings())
    # Read at Node's start-up and added to its default roots: `ws`, undici's WebSocket and fetch all trust it.
    env["NODE_EXTRA_CA_CERTS"] = str(ca.ca_cert)
    await run_node_tests(node, built_tests("tls"), env, log)
