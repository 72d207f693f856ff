"""PostgreSQL restarted, and every fluxrt backend terminated, under a steady insert stream: every committed row
reaches every subscriber exactly once, the WebSocket connections stay open, and delivery resumes within seconds.

Each test runs a server in-process against this module's private PostgreSQL (conftest.py), three subscribers of one
table, and a writer at ~200 rows/s that retries through the outage and knows which inserts committed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from fluxrt_trio.server import Server

from .. import pg
from ..support.clients import connect, subscribe
from ..support.servers import serving, wait_ok
from .support import WRITER_APP, PrivatePostgres, Subscriber, Writer, exactly_once

SUBSCRIBERS = 3
RECOVERY_LIMIT = 15.0
"""seconds from the fault's end until a row committed after it has reached every subscriber"""

FLUXRT_BACKENDS = f"""
SELECT pg_terminate_backend(pid) AS done FROM pg_catalog.pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
   AND application_name <> '{WRITER_APP}'
"""


@asynccontextmanager
async def streaming(private_pg: PrivatePostgres) -> AsyncIterator[tuple[Server, list[Subscriber], Writer]]:
    """A server, three subscribers of a fresh table reading in the background, and a writer already writing."""
    table = private_pg.table()
    writer = Writer(private_pg.dsn, table)
    async with serving(database={"dsn": private_pg.dsn, "poll_interval": 0.01}) as server:
        await wait_ok(server)
        async with connect(server) as ws1, connect(server) as ws2, connect(server) as ws3:
            subscribers = [Subscriber(ws) for ws in (ws1, ws2, ws3)]
            async with trio.open_nursery() as nursery:
                try:
                    for subscriber in subscribers:
                        await subscribe(subscriber.ws, f"table:public.{table}")
                        nursery.start_soon(subscriber.run)
                    nursery.start_soon(writer.run)
                    await writer.wait_committed(200)
                    yield server, subscribers, writer
                    nursery.cancel_scope.cancel()
                finally:
                    # The writer's thread cannot be cancelled: when the test ends early it must still stop.
                    writer.stop.set()


async def recovered(subscribers: list[Subscriber], writer: Writer, since: float) -> float:
    """Seconds from `since` until a row committed after now has reached every subscriber."""
    after = writer.committed + 1
    await writer.wait_committed(after, timeout=RECOVERY_LIMIT)
    for subscriber in subscribers:
        await subscriber.wait_for([after], timeout=RECOVERY_LIMIT)
    return trio.current_time() - since


async def settle(server: Server, subscribers: list[Subscriber], writer: Writer) -> None:
    """Stop writing, wait for every committed row, and check the guarantees: exactly once, connections open."""
    expected = await writer.finish()
    for subscriber in subscribers:
        await subscriber.wait_for(expected, timeout=10)
    # A marker row behind the last one: a repeat of anything before it would have arrived first.
    marker = expected[-1] + 1
    await trio.to_thread.run_sync(lambda: pg.run_sql(writer.dsn, f"INSERT INTO {writer.table} VALUES ($1)", marker))
    for subscriber in subscribers:
        await subscriber.wait_for([marker], timeout=10)
    for n, subscriber in enumerate(subscribers):
        problem = exactly_once(subscriber, [*expected, marker])
        assert problem is None, f"subscriber {n}: {problem}"
        assert subscriber.other == [], f"subscriber {n} was told: {subscriber.other[:3]}"
        assert subscriber.closed is None
        await subscriber.ping("alive")
    assert server.database_state() == "ok"


async def fault_under_load(
    private_pg: PrivatePostgres, what: str, fault: Callable[[Server], Awaitable[None]]
) -> tuple[float, int]:
    """Run `fault` while the stream flows; the seconds it took to recover after it, and the writer's errors."""
    async with streaming(private_pg) as (server, subscribers, writer):
        started = trio.current_time()
        await fault(server)
        ended = trio.current_time()
        recovery = await recovered(subscribers, writer, ended)
        print(f"\n{what}: fault lasted {ended - started:.2f} s, delivery recovered {recovery:.2f} s after it")
        assert recovery < RECOVERY_LIMIT
        await settle(server, subscribers, writer)
        return recovery, writer.errors


async def test_postgres_restart_under_load_delivers_every_committed_row_once(private_pg):
    async def restart(server: Server) -> None:
        await trio.to_thread.run_sync(private_pg.stop)
        await trio.to_thread.run_sync(private_pg.start)

    _, errors = await fault_under_load(private_pg, "PostgreSQL restart", restart)
    assert errors > 0, "the restart did not interrupt the writer"


async def terminate_fluxrt_backends(private_pg: PrivatePostgres) -> int:
    """Terminate every backend of the database but the writer's (and this one): the changefeed's, the pool's."""
    return sum(1 for r in await private_pg.execute(FLUXRT_BACKENDS) if r["done"])


async def test_every_fluxrt_backend_terminated_at_once_then_ten_times_in_ten_seconds(private_pg):
    terminated: list[int] = []

    async def once(server: Server) -> None:
        # The changefeed and at least one pooled connection (deliveries are authorized on the pool).
        terminated.append(await terminate_fluxrt_backends(private_pg))

    await fault_under_load(private_pg, "every fluxrt backend terminated once", once)
    assert terminated[0] >= 2, f"only {terminated[0]} fluxrt backends were connected"

    async def ten_times(server: Server) -> None:
        for _ in range(10):
            terminated.append(await terminate_fluxrt_backends(private_pg))
            await trio.sleep(1)

    await fault_under_load(private_pg, "every fluxrt backend terminated 10 times in 10 s", ten_times)
    assert sum(n > 0 for n in terminated[1:]) >= 5, f"backends terminated per round: {terminated[1:]}"
