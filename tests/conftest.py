"""Shared fixtures (helpers live in tests/support/). The rules every test here follows:

- Servers listen on 127.0.0.1 port 0 (a free port); nothing leaves the machine.
- Every test has a deadline (`timeout` in pyproject.toml, enforced by pytest-timeout), so a hang fails instead of
  stalling CI; tests that wait for the server to act use short configured intervals, never long sleeps.
- Protocol logic is tested without sockets (test_session.py and friends). Integration tests use real sockets, with
  trio-websocket as the client, or `RawClient` when a test needs to see frames a browser would hide (pings, close
  codes on a client that does not read).
- Proving that nothing arrives takes a barrier (tests/support/waiting.py): a message that can only come after
  the one that must not; a timed wait only where no barrier exists, saying why.
- `trio.testing` clocks are never mixed with real sockets.
- When both sides could close first, the test decides which one does, so outcomes are deterministic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from fluxrt_trio.hub import Hub
from fluxrt_trio.server import Server

from . import pg
from .support.config import make_config
from .support.servers import StartServer


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """A superuser DSN of a PostgreSQL server (see tests/pg.py for where it comes from)."""
    dsn, embedded = pg.admin_dsn()
    try:
        yield dsn
    finally:
        if embedded is not None:
            embedded.stop(quiet=True)


@pytest.fixture(scope="session")
def pg_template(pg_admin: str) -> Iterator[str]:
    name = pg.make_template(pg_admin)
    try:
        yield name
    finally:
        pg.run_sql(pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db(pg_admin: str, pg_template: str) -> Iterator[pg.ScratchDatabase]:
    """A fresh, migrated database for this test."""
    database = pg.ScratchDatabase(pg_admin, pg_template)
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """`await start_server(realtime={...})` runs a Server in the test's nursery and returns it."""

    async def start(*, hub: Hub | None = None, **sections: dict[str, Any]) -> Server:
        server = Server(make_config(**sections), hub=hub)
        await nursery.start(server.serve)
        return server

    yield start
