"""Test servers: started in the test's nursery (the `start_server` fixture) or for one block, with a database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from fluxrt_trio.server import Server

from .config import make_config

StartServer = Callable[..., Awaitable[Server]]
"""The `start_server` fixture: `await start_server(realtime={...})` runs a Server and returns it."""


async def wait_ok(server: Server, timeout: float = 10) -> None:
    """Until the server's database is `ok` (migrated, changefeed reading)."""
    with trio.fail_after(timeout):
        while server.database_state() != "ok":
            await trio.sleep(0.01)


async def start(start_server: StartServer, db: Any, **sections: Any) -> Server:
    """A server on the scratch database `db`, polling every 10 ms, once its database is ok."""
    database = {"dsn": db.dsn, "poll_interval": 0.01, **sections.pop("database", {})}
    server = await start_server(database=database, **sections)
    await wait_ok(server)
    return server


@asynccontextmanager
async def serving(**sections: Any) -> AsyncIterator[Server]:
    """A server that is stopped when the block ends (so that what it uses can be cleaned up after it)."""
    async with trio.open_nursery() as nursery:
        server = Server(make_config(**sections))
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
