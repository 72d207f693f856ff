"""Resource faults: the database out of connections (SQLSTATE 53300), reads that fail after every reconnect, change
windows of huge rows, and a table whose changes cannot be authorized. Each is met with backoff, a log line and
`fluxrt_database_errors_total`, bounded memory, or CHANGES_MISSED, and the stream goes on afterwards."""

from __future__ import annotations

import logging

import asyncpg
import orjson
import trio

from fluxrt_trio.postgres import bridge, changelog

from ..support.clients import connect, http_get, recv, request, subscribe
from ..support.database import in_asyncio
from ..support.servers import serving, wait_ok
from .support import PrivatePostgres, Subscriber, exactly_once


def serve(private_pg: PrivatePostgres):  # type: ignore[no-untyped-def]
    return serving(database={"dsn": private_pg.dsn, "poll_interval": 0.01})


async def errors_of_class(sqlstate_class: str, seconds: float) -> int:
    """How many database errors of the class this process meets over the next `seconds`."""
    before = bridge.errors[sqlstate_class]
    await trio.sleep(seconds)
    return bridge.errors[sqlstate_class] - before


async def test_out_of_connections_is_retried_with_backoff_counted_logged_and_recovered(private_pg, caplog):
    caplog.set_level(logging.WARNING, logger="fluxrt.postgres")
    table = private_pg.table()
    async with serve(private_pg) as server, connect(server) as ws, connect(server) as newcomer:
        await wait_ok(server)
        await subscribe(ws, f"table:public.{table}")
        subscriber = Subscriber(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber.run)
            try:
                # The authorizer's login may no longer connect: every check and every delivery needs it.
                await private_pg.execute(
                    "ALTER ROLE fluxrt_authorizer CONNECTION LIMIT 0;"
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'fluxrt_authorizer'"
                )
                with trio.fail_after(3):
                    reply = await request(newcomer, type="subscribe", channel=f"table:public.{table}", ref="s")
                assert reply["code"] == "SUBSCRIPTION_FAILED", reply
                assert reply["message"].startswith("database unavailable"), reply
                assert "TooManyConnectionsError" in reply["message"], reply
                await private_pg.execute(f"INSERT INTO {table} SELECT generate_series(1, 50)")
                # The window waits for the pool, retrying with backoff: a handful of attempts, not a spin.
                await trio.sleep(1)
                attempts = await errors_of_class("53", 4)
                print(f"\nretries against 53300 in 4 s: {attempts}")
                assert 1 <= attempts <= 12
                status, _, body = await http_get(server, "/metrics")
                assert status == 200
                counted = [
                    line for line in body.decode().splitlines() if line.startswith("fluxrt_database_errors_total")
                ]
                assert any('sqlstate_class="53"' in line for line in counted), counted
                logged = [r for r in caplog.records if "out of a resource" in r.getMessage()]
                assert len(logged) == 1, [r.getMessage() for r in logged]
                assert getattr(logged[0], "ctx_sqlstate", None) == "53300"
                assert subscriber.counts == {}
            finally:
                with trio.CancelScope(shield=True):
                    await private_pg.execute("ALTER ROLE fluxrt_authorizer CONNECTION LIMIT -1")
            # Back: the waiting window is delivered once, with nothing missed, and subscribes work again.
            await subscriber.wait_for(range(1, 51), timeout=10)
            await private_pg.execute(f"INSERT INTO {table} VALUES (51)")
            await subscriber.wait_for([51], timeout=5)
            assert exactly_once(subscriber, list(range(1, 52))) is None
            assert subscriber.other == []
            reply = await request(newcomer, type="subscribe", channel=f"table:public.{table}", ref="s")
            assert reply["type"] == "ack", reply
            nursery.cancel_scope.cancel()


async def test_reads_failing_after_every_reconnect_back_off_instead_of_reconnecting_ten_times_a_second(private_pg):
    table = private_pg.table()
    async with serve(private_pg) as server, connect(server) as ws:
        await wait_ok(server)
        await subscribe(ws, f"table:public.{table}")
        await private_pg.execute(f"INSERT INTO {table} VALUES (1)")
        assert (await recv(ws))["payload"]["record"]["id"] == 1
        # The server accepts connections, but the changefeed's read fails on each (42P01): a fault that connecting
        # again cannot cure, like a server out of memory for the query.
        await private_pg.execute("ALTER TABLE realtime.changes RENAME TO changes_away")
        try:
            await trio.sleep(0.5)
            failures = await errors_of_class("42", 4)
            print(f"\nreads failed in 4 s: {failures}")
            assert 1 <= failures <= 8
            assert server.database_state() == "degraded"
            status, _, body = await http_get(server, "/health")
            assert status == 503 and "changes" in orjson.loads(body)["changefeed"]["last_error"]
        finally:
            with trio.CancelScope(shield=True):
                await private_pg.execute("ALTER TABLE realtime.changes_away RENAME TO changes")
        await wait_ok(server, timeout=10)
        await private_pg.execute(f"INSERT INTO {table} VALUES (2)")
        assert (await recv(ws, timeout=10))["payload"]["record"]["id"] == 2


async def test_a_page_stops_at_its_byte_cap_and_the_window_is_read_in_pages(private_pg):
    table = private_pg.table()
    row = 100_000

    async def pages() -> list[tuple[list[int], bool]]:
        conn = await asyncpg.connect(private_pg.dsn)
        try:
            prev = await changelog.current_snapshot(conn)
            await conn.execute(f"INSERT INTO {table} SELECT n, repeat('x', {row}) FROM generate_series(1, 10) n")
            out: list[tuple[list[int], bool]] = []
            cur, after = None, 0
            while True:
                page = await changelog.read_page(conn, prev, cur, after, max_bytes=int(2.5 * row))
                cur = page.snapshot
                out.append(([c.new["id"] for c in page.changes], page.full))  # type: ignore[index]
                if not page.full:
                    return out
                after = page.changes[-1].id
        finally:
            await conn.close()

    # A row is read while the rows before it in the page are under the cap: three of 100 kB under 250 kB.
    assert await in_asyncio(pages) == [
        ([1, 2, 3], True),
        ([4, 5, 6], True),
        ([7, 8, 9], True),
        ([10], False),
    ]


async def test_a_window_of_huge_rows_is_read_in_byte_capped_pages_and_delivered_once_in_order(private_pg):
    table = private_pg.table()
    count, size = 40, 1024 * 1024
    async with serve(private_pg) as server, connect(server) as ws:
        await wait_ok(server)
        await subscribe(ws, f"table:public.{table}")
        assert server.db is not None
        windows = server.db.changefeed.windows
        # One transaction, so that the whole 40 MiB is one commit window.
        await private_pg.execute(
            f"INSERT INTO {table} SELECT n, repeat('x', {size}) FROM generate_series(1, {count}) n"
        )
        ids = []
        with trio.fail_after(30):
            while len(ids) < count:
                message = orjson.loads(await ws.get_message())
                ids.append(message["payload"]["record"]["id"])
                assert len(message["payload"]["record"]["note"]) == size
        assert ids == list(range(1, count + 1))
        pages = server.db.changefeed.windows - windows
        print(f"\n{count} rows of 1 MiB read in {pages} pages")
        assert pages >= count * size // changelog.PAGE_BYTES


async def test_a_table_whose_changes_cannot_be_authorized_gets_changes_missed_and_the_stream_goes_on(private_pg):
    table = private_pg.table()
    # The policy raises for row 13 (division by zero) and passes every other row.
    private_pg.sql(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;"
        f"CREATE POLICY p ON {table} FOR SELECT TO anon USING (100 / (id - 13) IS NOT NULL)"
    )
    async with serve(private_pg) as server, connect(server) as ws:
        await wait_ok(server)
        await subscribe(ws, f"table:public.{table}")
        subscriber = Subscriber(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber.run)
            await private_pg.execute(f"INSERT INTO {table} SELECT generate_series(1, 12)")
            await subscriber.wait_for(range(1, 13), timeout=10)
            await private_pg.execute(f"INSERT INTO {table} VALUES (13)")
            with trio.fail_after(10):
                while not subscriber.other:
                    await trio.sleep(0.01)
            await private_pg.execute(f"INSERT INTO {table} SELECT generate_series(14, 20)")
            await subscriber.wait_for(range(14, 21), timeout=10)
            nursery.cancel_scope.cancel()
    assert [(m["type"], m["code"], m["channel"]) for m in subscriber.other] == [
        ("error", "CHANGES_MISSED", f"table:public.{table}")
    ]
    assert exactly_once(subscriber, [n for n in range(1, 21) if n != 13]) is None
