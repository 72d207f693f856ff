"""Databases for tests beyond the `db` fixture's: asyncpg on its own loop, empty databases, shared tables."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import pg

# The changefeed's window query is the only statement that names pg_snapshot_xip (pruning, the gap check and the
# subscribe checks do not), and the changefeed runs it every poll_interval: pg_stat_activity.query finds it.
_CHANGEFEED_BACKENDS = """
SELECT pid FROM pg_catalog.pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%pg\\_snapshot\\_xip%'
"""
_TERMINATE = f"SELECT pg_terminate_backend(pid) AS done FROM ({_CHANGEFEED_BACKENDS}) b"


async def in_asyncio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run the asyncio coroutine function `fn(*args)` on its own event loop in a worker thread."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(fn(*args)))


@asynccontextmanager
async def fresh_database(admin: str) -> AsyncIterator[str]:
    """An empty database (not cloned from the migrated template); its DSN."""
    name = f"fluxrt_m_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await trio.to_thread.run_sync(pg.run_sql, admin, f"CREATE DATABASE {name} TEMPLATE template0")
    try:
        yield pg.with_database(admin, name)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pg.run_sql, admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def users_table(db: pg.ScratchDatabase) -> None:
    """public.users (id, name, email), readable by anon and authenticated, enabled for realtime."""
    db.sql(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, email text);"
        "GRANT SELECT ON users TO anon, authenticated;"
        "SELECT enable_realtime('users');"
    )


async def terminate_changefeed(db, timeout: float = 5) -> None:
    """Terminate the changefeed's backend, waiting for it to be connected first."""
    with trio.fail_after(timeout):
        while not any(r["done"] for r in await db.execute(_TERMINATE)):
            await trio.sleep(0.01)
