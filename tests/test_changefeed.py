"""The change log end to end: commit order, zero loss across lost connections and restarts, several nodes, gaps
after pruning, migrations, the SQL interface, NOTIFY wake-up and retention (docs/architecture.md, "Change capture").

Writers run asyncpg on their own asyncio loop in a worker thread (`in_asyncio`), so the server keeps running; every
asyncio program has its own deadline too, since a worker thread cannot be cancelled from Trio.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection

from fluxrt_trio.postgres.changefeed import next_wait
from fluxrt_trio.postgres.changelog import PRUNE
from fluxrt_trio.postgres.embedded import EmbeddedPostgres
from fluxrt_trio.postgres.migrate import migrate, migrations
from fluxrt_trio.protocol.positions import TablePosition

from . import pg
from .process import run_cli
from .support.clients import connect, http_get, recv, subscribe
from .support.database import fresh_database, in_asyncio, terminate_changefeed
from .support.servers import serving, start, wait_ok
from .support.waiting import nothing_arrives

ALL_MIGRATIONS = [f"{v:04d}_{n}" for v, n, _ in migrations()]

# ---- helpers -------------------------------------------------------------------------------------------------


def items_table(db_sql: Callable[..., Any], name: str = "items", *, notify: bool = False) -> None:
    db_sql(
        f"CREATE TABLE {name} (id int PRIMARY KEY, note text);"
        f"GRANT SELECT ON {name} TO anon;"
        f"SELECT enable_realtime('{name}', {'true' if notify else 'false'});"
    )


async def receive(ws: WebSocketConnection, n: int, timeout: float) -> list[dict[str, Any]]:
    """The next `n` messages."""
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            out.append(orjson.loads(await ws.get_message()))
    return out


class Collector:
    """Reads a subscriber's messages in the background: ids of INSERTs in arrival order, and anything else."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.ids: list[int] = []
        self.other: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def run(self) -> None:
        while True:
            message = orjson.loads(await self.ws.get_message())
            payload = message.get("payload") or {}
            if message.get("type") == "broadcast" and payload.get("type") == "INSERT":
                self.ids.append(payload["record"]["id"])
            else:
                self.other.append(message)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, expected: list[int], timeout: float) -> None:
        """Until every expected id arrived (then a little longer, so that duplicates would show)."""
        want = set(expected)
        with trio.move_on_after(timeout):
            while not want <= set(self.ids):
                await self._changed.wait()
        await trio.sleep(0.3)


def summary(got: list[int], expected: list[int]) -> str:
    missing = sorted(set(expected) - set(got))
    duplicates = len(got) - len(set(got))
    return f"{len(got)} received, {len(missing)} missing (first {missing[:10]}), {duplicates} duplicates"


def with_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{host}{port}"))


# ---- 1. commit order -----------------------------------------------------------------------------------------


def test_reads_follow_each_other_sooner_while_changes_flow_and_back_off_to_the_poll_interval():
    # After a read that found changes the next comes a tenth of the interval later, unless delivery was still
    # behind (then the poll interval, cut short when delivery is done); each empty read doubles the wait, never
    # past the interval, so an idle database is read as often as before.
    wait, waits = 0.01, []
    reads = [(True, False), (False, False), (False, True), (False, False), (False, False), (False, False)]
    reads += [(True, True), (True, False), (False, False)]
    for found, behind in reads:
        wait = next_wait(wait, found=found, behind=behind, poll_interval=0.01)
        waits.append(wait)
    assert waits == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.01, 0.01, 0.01, 0.001, 0.002])


async def test_updates_to_one_row_from_eight_writers_arrive_in_commit_order(start_server, db):
    db.sql(
        "CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counter VALUES (1, 0);"
        "GRANT SELECT ON counter TO anon; SELECT enable_realtime('counter');"
    )
    server = await start(start_server, db)

    async def eight_writers() -> None:
        conns = [await asyncpg.connect(db.dsn) for _ in range(8)]
        try:

            async def writer(conn: asyncpg.Connection) -> None:
                for _ in range(125):
                    await conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

            async with asyncio.timeout(30):
                await asyncio.gather(*(writer(c) for c in conns))
        finally:
            for conn in conns:
                await conn.close()

    async with connect(server) as ws:
        await subscribe(ws, "table:public.counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_asyncio, eight_writers)
            messages = await receive(ws, 1000, timeout=30)
        # A marker committed after the writers: were anything repeated, it would come before the marker.
        await db.execute("INSERT INTO counter VALUES (2, -1)")
        assert (await recv(ws))["payload"]["record"] == {"id": 2, "n": -1}
    payloads = [m["payload"] for m in messages]
    assert {p["type"] for p in payloads} == {"UPDATE"}
    values = [p["record"]["n"] for p in payloads]
    wrong = [(i, v) for i, v in enumerate(values) if v != i + 1]
    assert not wrong, f"{len(wrong)} out of place; first (position, n): {wrong[:5]}"
    assert [p["old_record"]["n"] for p in payloads] == list(range(1000))
    # Each change once, each with a position of its own, every one past the one before it.
    positions = [TablePosition.parse(p["id"]) for p in payloads]
    assert all(later.cut.includes(earlier.cut) for earlier, later in itertools.pairwise(positions))
    assert len({p["id"] for p in payloads}) == len(payloads)
    assert db.sql("SELECT n FROM counter")[0]["n"] == 1000


# ---- 2. terminated changefeed connection ---------------------------------------------------------------------


async def test_no_change_lost_when_the_changefeed_connection_is_terminated(start_server, db):
    items_table(db.sql)
    server = await start(start_server, db)
    total = 5000
    writer_done, stop = trio.Event(), threading.Event()
    kills = 0
    health: list[tuple[int, str]] = []

    async def write() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            async with asyncio.timeout(40):
                # 1,000 transactions of 1 to 9 rows, paced so that the stream outlasts the reconnects, and so that
                # what piles up while the changefeed is away stays under the default write_buffer_size (1024): a
                # larger window is a test of its own, below.
                first, size = 1, 1
                while first <= total and not stop.is_set():
                    last = min(first + size - 1, total)
                    await conn.execute("INSERT INTO items SELECT generate_series($1::int, $2::int)", first, last)
                    first, size = last + 1, size % 9 + 1
                    await asyncio.sleep(0.003)
        finally:
            await conn.close()

    async def writer() -> None:
        try:
            await in_asyncio(write)
        finally:
            writer_done.set()

    async def killer() -> None:
        # Three times (its reconnect backoff doubles at each failure), each time once it is back and reading.
        nonlocal kills
        for _ in range(3):
            await terminate_changefeed(db)
            kills += 1
            await wait_ok(server)
            await trio.sleep(0.3)

    async def watch_health() -> None:
        while True:
            status, _, body = await http_get(server, "/health")
            health.append((status, orjson.loads(body)["database"]))
            await trio.sleep(0.02)

    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        collector = Collector(ws)
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(collector.run)
                nursery.start_soon(watch_health)
                nursery.start_soon(writer)
                with trio.fail_after(45):
                    await killer()
                    assert not writer_done.is_set(), "the writer finished before the last termination"
                    await writer_done.wait()
                await collector.wait_for(list(range(1, total + 1)), timeout=20)
                nursery.cancel_scope.cancel()
            finally:
                stop.set()  # the writer thread cannot be cancelled: when the test ends early, it must stop itself
    expected = list(range(1, total + 1))
    assert kills == 3
    assert collector.other == []
    assert collector.ids == expected, summary(collector.ids, expected)
    # While it reconnects (at least its 0.1 s backoff after each termination), /health says so.
    assert (503, "degraded") in health, sorted(set(health))
    await wait_ok(server)
    status, _, body = await http_get(server, "/health")
    assert status == 200 and orjson.loads(body)["database"] == "ok"


async def test_a_window_of_more_than_1024_changes_reaches_a_subscriber_with_room_for_it(start_server, db):
    items_table(db.sql)
    server = await start(start_server, db, realtime={"write_buffer_size": 5000})
    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        await db.execute("INSERT INTO items SELECT generate_series(1, 3000)")
        messages = await receive(ws, 3000, timeout=3)
    assert [m["payload"]["record"]["id"] for m in messages] == list(range(1, 3001))


async def test_reconnect_delay_does_not_grow_across_recovered_outages(start_server, db):
    items_table(db.sql)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        for n in range(1, 7):
            # Each outage is a single dropped connection, after the previous one was fully recovered from.
            await terminate_changefeed(db)
            await db.execute("INSERT INTO items VALUES ($1)", n)
            started = trio.current_time()
            message = await recv(ws, timeout=10)
            assert message["payload"]["record"]["id"] == n
            delay = trio.current_time() - started
            assert delay < 1.0, f"outage {n}: the change took {delay:.1f} s to arrive"


# ---- 3. PostgreSQL restart -----------------------------------------------------------------------------------


class Stream:
    """Shared between the Trio test and the asyncio writer thread."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.committed = 0
        self.errors = 0


async def write_until_stopped(dsn: str, stream: Stream) -> None:
    """Insert 1, 2, 3... one per transaction until told to stop, reconnecting and retrying through errors.

    A commit whose answer was lost is retried; ON CONFLICT DO NOTHING makes that harmless (and fires no trigger).
    """
    conn = None
    next_id = 1
    async with asyncio.timeout(25):
        while not stream.stop.is_set():
            try:
                if conn is None:
                    conn = await asyncpg.connect(dsn, timeout=2)
                await conn.execute("INSERT INTO items VALUES ($1) ON CONFLICT DO NOTHING", next_id)
                stream.committed = next_id
                next_id += 1
                await asyncio.sleep(0.002)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError):
                stream.errors += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)
    if conn is not None:
        await conn.close()


async def test_no_change_lost_across_a_postgres_restart():
    data_dir = pg.ROOT / ".fluxrt" / f"test-restart-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    embedded = EmbeddedPostgres(data_dir)
    try:
        with trio.fail_after(20):
            dsn = await trio.to_thread.run_sync(embedded.start)

        async def prepare() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, pg.ROLES)
                await conn.execute(
                    "CREATE TABLE items (id int PRIMARY KEY, note text); GRANT SELECT ON items TO anon;"
                    "SELECT enable_realtime('items')"
                )
            finally:
                await conn.close()

        async def committed() -> list[int]:
            conn = await asyncpg.connect(dsn)
            try:
                return [r["id"] for r in await conn.fetch("SELECT id FROM items ORDER BY id")]
            finally:
                await conn.close()

        await in_asyncio(prepare)
        stream = Stream()
        writer_done = trio.Event()

        async def writer() -> None:
            try:
                await in_asyncio(write_until_stopped, dsn, stream)
            finally:
                writer_done.set()

        async with (
            serving(database={"dsn": dsn, "poll_interval": 0.01}) as server,
            connect(server) as ws,
            trio.open_nursery() as nursery,
        ):
            try:
                await wait_ok(server)
                await subscribe(ws, "table:public.items")
                collector = Collector(ws)
                nursery.start_soon(collector.run)
                nursery.start_soon(writer)
                with trio.fail_after(20):
                    while stream.committed < 200:
                        await trio.sleep(0.01)
                    await trio.to_thread.run_sync(embedded.stop)
                    await trio.to_thread.run_sync(embedded.start)
                    resumed_from = stream.committed
                    while stream.committed < resumed_from + 200:
                        await trio.sleep(0.01)
                    stream.stop.set()
                    await writer_done.wait()
                # What the writer's last, possibly unanswered, statements did is settled by the table itself.
                expected = await in_asyncio(committed)
                await collector.wait_for(expected, timeout=10)
                nursery.cancel_scope.cancel()
            finally:
                stream.stop.set()  # the writer thread cannot be cancelled: when the test ends early, it must stop
        assert stream.errors > 0, "the restart did not interrupt the writer"
        assert collector.other == []
        assert collector.ids == expected, summary(collector.ids, expected)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: embedded.stop(quiet=True))
        shutil.rmtree(data_dir, ignore_errors=True)


# ---- 4. two nodes --------------------------------------------------------------------------------------------


async def test_two_nodes_each_deliver_every_change_once(start_server, db):
    items_table(db.sql)
    first = await start(start_server, db)
    second = await start(start_server, db)

    async def write() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            async with asyncio.timeout(20):
                for i in range(1, 501):
                    await conn.execute("INSERT INTO items VALUES ($1)", i)
        finally:
            await conn.close()

    async with connect(first) as ws1, connect(second) as ws2:
        await subscribe(ws1, "table:public.items")
        await subscribe(ws2, "table:public.items")
        one, two = Collector(ws1), Collector(ws2)
        expected = list(range(1, 501))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one.run)
            nursery.start_soon(two.run)
            await in_asyncio(write)
            await one.wait_for(expected, timeout=15)
            await two.wait_for(expected, timeout=5)
            nursery.cancel_scope.cancel()
    assert one.ids == expected, summary(one.ids, expected)
    assert two.ids == expected, summary(two.ids, expected)
    assert one.other == two.other == []


# ---- 5. CHANGES_MISSED ---------------------------------------------------------------------------------------


async def test_an_outage_longer_than_retention_is_reported_as_changes_missed(db):
    role = f"fluxrt_cm_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    db.sql(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    items_table(db.sql)
    try:
        async with serving(database={"dsn": with_user(db.dsn, role, password), "poll_interval": 0.01}) as server:
            await wait_ok(server)
            async with connect(server) as ws:
                await subscribe(ws, "table:public.items")
                await db.execute("INSERT INTO items VALUES (1)")
                assert (await recv(ws))["payload"]["record"]["id"] == 1
                # The node loses the database and cannot come back.
                await db.execute(f"ALTER ROLE {role} NOLOGIN")
                with trio.fail_after(5):
                    while await db.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
                    ):
                        await trio.sleep(0.05)
                # Meanwhile changes are written and pruned: the node never sees them.
                await db.execute("INSERT INTO items SELECT generate_series(2, 6)")
                await db.execute("INSERT INTO realtime.horizons (snap) VALUES (pg_current_snapshot())")
                deleted = (await db.execute(PRUNE, timedelta(0), 10000))[0][0]
                assert deleted >= 5
                left = await db.execute("SELECT count(*) FROM realtime.changes WHERE table_name = 'items'")
                assert left[0][0] == 0
                await db.execute(f"ALTER ROLE {role} LOGIN")
                # The next message is the error: none of the pruned changes arrived before it.
                message = await recv(ws, timeout=10)
                assert message["type"] == "error", message
                assert message["code"] == "CHANGES_MISSED"
                assert message["channel"] == "table:public.items"
                assert message["message"]
                # And the stream goes on.
                await db.execute("INSERT INTO items VALUES (7)")
                message = await recv(ws, timeout=5)
                assert message["type"] == "broadcast" and message["payload"]["record"]["id"] == 7, message
                await db.execute("INSERT INTO items VALUES (8)")
                assert (await recv(ws, timeout=5))["payload"]["record"]["id"] == 8, "7 came once"
    finally:
        db.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        db.sql(f"DROP OWNED BY {role}; DROP ROLE {role}")


# ---- 6. migrations -------------------------------------------------------------------------------------------


async def test_migrate_twice_is_a_no_op(pg_admin):
    async with fresh_database(pg_admin) as dsn:

        async def twice() -> tuple[list[str], list[str], list[tuple[int, str]]]:
            conn = await asyncpg.connect(dsn)
            try:
                first = await migrate(conn, pg.ROLES)
                second = await migrate(conn, pg.ROLES)
                rows = await conn.fetch("SELECT version, name FROM realtime.schema_migrations ORDER BY version")
                return first, second, [tuple(r) for r in rows]
            finally:
                await conn.close()

        first, second, recorded = await in_asyncio(twice)
    assert first == ALL_MIGRATIONS
    assert second == []
    assert [f"{v:04d}_{n}" for v, n in recorded] == ALL_MIGRATIONS


async def test_concurrent_migrations_apply_each_migration_once(pg_admin):
    async with fresh_database(pg_admin) as dsn:

        async def together() -> tuple[list[list[str]], list[tuple[int, int]]]:
            conns = [await asyncpg.connect(dsn) for _ in range(2)]
            try:
                async with asyncio.timeout(30):
                    results = await asyncio.gather(*(migrate(c, pg.ROLES) for c in conns))
                rows = await conns[0].fetch(
                    "SELECT version, count(*) FROM realtime.schema_migrations GROUP BY version ORDER BY version"
                )
                return results, [tuple(r) for r in rows]
            finally:
                for conn in conns:
                    await conn.close()

        results, counts = await in_asyncio(together)
    # Both succeeded; between them every migration was applied exactly once.
    assert sorted(results[0] + results[1]) == ALL_MIGRATIONS
    assert counts == [(v, 1) for v, _, _ in migrations()]


async def test_migrate_command_reports_what_it_did(pg_admin, db):
    async with fresh_database(pg_admin) as dsn:
        code, out, err = await run_cli(dsn, "migrate")
        assert code == 0, err
        assert out.strip() == "applied: " + ", ".join(ALL_MIGRATIONS)
        code, out, err = await run_cli(dsn, "migrate")
        assert code == 0, err
        assert out.strip() == "already up to date"
    # The per-test database is cloned from a migrated template.
    code, out, err = await run_cli(db.dsn, "migrate")
    assert code == 0, err
    assert out.strip() == "already up to date"


async def test_capture_survives_rerunning_migrations(start_server, db):
    items_table(db.sql, notify=True)

    async def rerun() -> None:
        conns = [await asyncpg.connect(db.dsn) for _ in range(2)]
        try:
            assert await migrate(conns[0], pg.ROLES) == []
            assert await asyncio.gather(*(migrate(c, pg.ROLES) for c in conns)) == [[], []]
        finally:
            for conn in conns:
                await conn.close()

    await in_asyncio(rerun)
    code, out, err = await run_cli(db.dsn, "migrate")
    assert code == 0 and out.strip() == "already up to date", err
    triggers = db.sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal ORDER BY tgname"
    )
    assert [r["tgname"] for r in triggers] == ["fluxrt_capture", "fluxrt_capture_truncate"]
    assert [tuple(r) for r in db.sql("SELECT schema_name, table_name, notify FROM realtime_enabled_tables")] == [
        ("public", "items", True)
    ]
    # And changes still stream (a server start migrates too).
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        await db.execute("INSERT INTO items VALUES (1)")
        assert (await recv(ws))["payload"]["record"]["id"] == 1


# ---- 7. SQL interface ----------------------------------------------------------------------------------------


async def test_enable_realtime_resolves_names_and_refuses_what_it_cannot_capture(db):
    db.sql(
        "CREATE SCHEMA app;"
        "CREATE TABLE app.users (id int PRIMARY KEY); CREATE TABLE app.orders (id int PRIMARY KEY);"
        "CREATE TABLE public.users (id int PRIMARY KEY);"
        "CREATE VIEW public.users_view AS SELECT * FROM public.users;"
    )
    # 'users' goes through the caller's search_path; 'app.orders' is explicit.
    db.sql("SET search_path = app, public; SELECT enable_realtime('users')")
    db.sql("SELECT enable_realtime('app.orders')")
    enabled = db.sql("SELECT schema_name, table_name FROM realtime_enabled_tables ORDER BY 1, 2")
    assert [tuple(r) for r in enabled] == [("app", "orders"), ("app", "users")]

    refusals = [
        ("missing_table", r'table "missing_table" does not exist'),
        ("app.missing", r'table "app.missing" does not exist'),
        ("users_view", r"users_view is a view, not a table"),
        ("pg_catalog.pg_class", r"in the system schema pg_catalog"),
        ("information_schema.sql_features", r"in the system schema information_schema"),
        ("realtime.changes", r"in the system schema realtime"),
    ]
    for name, message in refusals:
        with pytest.raises(asyncpg.PostgresError, match=message):
            db.sql(f"SELECT enable_realtime('{name}')")
    assert len(db.sql("SELECT 1 FROM realtime_enabled_tables")) == 2


async def test_enabling_twice_is_a_no_op_that_may_change_notify(db):
    db.sql("CREATE TABLE users (id int PRIMARY KEY); SELECT enable_realtime('users')")

    def state() -> tuple[list[tuple[str, bytes]], list[tuple[Any, ...]]]:
        triggers = db.sql(
            "SELECT tgname, tgargs FROM pg_trigger WHERE tgrelid = 'users'::regclass AND NOT tgisinternal"
            " ORDER BY tgname"
        )
        registry = db.sql("SELECT schema_name, table_name, enabled_at, notify FROM realtime_enabled_tables")
        return [(r["tgname"], r["tgargs"]) for r in triggers], [tuple(r) for r in registry]

    triggers, registry = state()
    assert [t for t, _ in triggers] == ["fluxrt_capture", "fluxrt_capture_truncate"]
    assert len(registry) == 1 and registry[0][3] is False
    db.sql("SELECT enable_realtime('users')")
    assert state() == (triggers, registry)
    db.sql("SELECT enable_realtime('public.users', notify => true)")
    triggers_after, registry_after = state()
    assert [t for t, _ in triggers_after] == ["fluxrt_capture", "fluxrt_capture_truncate"]
    assert all(args.startswith(b"notify") for _, args in triggers_after)
    assert registry_after == [(*registry[0][:3], True)]
    db.sql("SELECT enable_realtime('users', false)")
    assert state() == (triggers, registry)


async def test_enabled_tables_view_columns(db):
    db.sql("CREATE TABLE users (id int PRIMARY KEY); SELECT enable_realtime('users', true)")
    db.sql("CREATE TABLE plain (id int PRIMARY KEY)")
    columns = db.sql(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'realtime_enabled_tables' ORDER BY ordinal_position"
    )
    assert [tuple(r) for r in columns] == [
        ("schema_name", "name"),
        ("table_name", "name"),
        ("enabled_at", "timestamp with time zone"),
        ("notify", "boolean"),
    ]
    rows = db.sql("SELECT * FROM realtime_enabled_tables")
    assert len(rows) == 1 and (rows[0]["schema_name"], rows[0]["table_name"], rows[0]["notify"]) == (
        "public",
        "users",
        True,
    )


async def test_writers_need_no_privilege_on_realtime_and_cannot_read_the_change_log(db):
    writer = f"fluxrt_w_{uuid.uuid4().hex[:10]}"
    reader = f"fluxrt_r_{uuid.uuid4().hex[:10]}"
    db.sql(
        f"CREATE ROLE {writer} NOLOGIN; CREATE ROLE {reader} NOLOGIN;"
        "CREATE TABLE users (id int PRIMARY KEY, secret text); SELECT enable_realtime('users');"
        f"GRANT INSERT ON users TO {writer}; GRANT SELECT ON users TO {reader};"
    )
    try:
        for role in (writer, reader, "anon", "authenticated"):
            privileges = db.sql(
                "SELECT has_table_privilege($1, 'realtime.changes', 'SELECT') AS s,"
                " has_table_privilege($1, 'realtime.changes', 'INSERT') AS i,"
                " has_table_privilege($1, 'realtime.tables', 'SELECT') AS t",
                role,
            )[0]
            assert not any(privileges.values()), (role, dict(privileges))
        db.sql(f"SET ROLE {writer}; INSERT INTO users VALUES (1, 'hunter2'); RESET ROLE")
        captured = db.sql("SELECT op, new_record::text AS new FROM realtime.changes WHERE table_name = 'users'")
        assert [(r["op"], orjson.loads(r["new"])) for r in captured] == [("INSERT", {"id": 1, "secret": "hunter2"})]
        for role in (writer, reader, "anon", "authenticated"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                db.sql(f"SET ROLE {role}; SELECT * FROM realtime.changes")
    finally:
        db.sql(f"DROP OWNED BY {writer}, {reader}; DROP ROLE {writer}; DROP ROLE {reader}")


# ---- 8. NOTIFY -----------------------------------------------------------------------------------------------


async def test_notify_wakes_the_changefeed_despite_a_long_poll_interval(start_server, db):
    items_table(db.sql, "loud", notify=True)
    items_table(db.sql, "quiet")
    server = await start(start_server, db, database={"poll_interval": 5})
    async with connect(server) as ws:
        await subscribe(ws, "table:public.loud")
        await subscribe(ws, "table:public.quiet")
        started = trio.current_time()
        await db.execute("INSERT INTO loud VALUES (1)")
        message = await recv(ws, timeout=3)
        elapsed = trio.current_time() - started
        assert message["payload"]["table"] == "loud" and message["payload"]["record"]["id"] == 1
        assert elapsed < 1.0, f"{elapsed:.2f} s"
        # Without NOTIFY the change waits for the next poll, 5 s away (this shows the poll interval is long)...
        await db.execute("INSERT INTO quiet VALUES (1)")
        # A timed wait: what is shown is that the change is not delivered yet, and only time can show that.
        await nothing_arrives(ws, 1.0)
        # ... until a notifying table's change wakes the changefeed, which then reads everything committed.
        started = trio.current_time()
        await db.execute("INSERT INTO loud VALUES (2)")
        both = await receive(ws, 2, timeout=3)
        elapsed = trio.current_time() - started
    # Each table is delivered in its own lane, so the two tables' changes may arrive in either order.
    assert sorted(m["payload"]["table"] for m in both) == ["loud", "quiet"]
    assert elapsed < 1.0, f"{elapsed:.2f} s"


# ---- 9. retention --------------------------------------------------------------------------------------------


async def test_retention_prunes_by_horizon_and_a_long_transaction_is_still_delivered(start_server, db):
    items_table(db.sql)
    server = await start(start_server, db, database={"retention": 0.2})

    async def captured() -> int:
        return (await db.execute("SELECT count(*) FROM realtime.changes WHERE table_name = 'items'"))[0][0]

    long_open = threading.Event()
    commit_now = threading.Event()

    async def long_transaction() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            async with asyncio.timeout(20):
                async with conn.transaction():
                    await conn.execute("INSERT INTO items VALUES (1000, 'long')")
                    long_open.set()
                    while not commit_now.is_set():
                        await asyncio.sleep(0.01)
        finally:
            await conn.close()

    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        await db.execute("INSERT INTO items SELECT generate_series(1, 50)")
        assert [m["payload"]["record"]["id"] for m in await receive(ws, 50, timeout=5)] == list(range(1, 51))
        with trio.fail_after(3):
            while await captured():
                await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(in_asyncio, long_transaction)
                with trio.fail_after(5):
                    while not long_open.is_set():
                        await trio.sleep(0.01)
                await db.execute("INSERT INTO items SELECT generate_series(51, 60)")
                received = await receive(ws, 10, timeout=5)
                assert [m["payload"]["record"]["id"] for m in received] == list(range(51, 61))
                # Five retention periods later, with the transaction still open: its row was written long ago, but
                # the horizon stays below it, and so below everything committed since it began.
                await trio.sleep(1.0)
                assert await captured() == 10
            finally:
                commit_now.set()
        message = await recv(ws, timeout=5)
        assert message["payload"]["record"] == {"id": 1000, "note": "long"}
        await db.execute("INSERT INTO items VALUES (2000)")
        assert (await recv(ws, timeout=5))["payload"]["record"]["id"] == 2000, "1000 came once"
        with trio.fail_after(5):
            while await captured():
                await trio.sleep(0.05)
        await db.execute("INSERT INTO items VALUES (1001)")
        assert (await recv(ws))["payload"]["record"]["id"] == 1001


GATED_ITEMS = (
    # The row-level security policy waits for an advisory lock that a test can hold, so delivery stalls. (An advisory
    # lock, unlike LOCK TABLE, gives its holder no transaction id, which would hold the pruning horizon back.)
    "CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql AS"
    " $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN true; END $$;"
    "CREATE TABLE items (id int PRIMARY KEY); GRANT SELECT ON items TO anon;"
    "ALTER TABLE items ENABLE ROW LEVEL SECURITY;"
    "CREATE POLICY gated ON items FOR SELECT USING (gate());"
    "SELECT enable_realtime('items');"
)


@asynccontextmanager
async def closed_gate(dsn: str) -> AsyncIterator[None]:
    """Hold the advisory lock that `gate()` waits for (from a worker thread) until the block ends."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with asyncio.timeout(20):
                await conn.execute("SELECT pg_advisory_lock(4242)")
                locked.set()
                while not release.is_set():
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_asyncio, hold)
        try:
            with trio.fail_after(5):
                while not locked.is_set():
                    await trio.sleep(0.01)
            yield
        finally:
            release.set()


async def test_a_changefeed_that_falls_behind_the_pruning_horizon_reports_changes_missed(start_server, db):
    items_table(db.sql)
    server = await start(start_server, db)
    total = 40
    stalled = {"read": server.db.changefeed.changes}

    async def stall_write_and_prune() -> int:
        """Hold realtime.pruned locked, so the changefeed's next read waits (as on a stalled node), write, then
        prune everything written in that same transaction, as `retention` would have."""
        lock, writer = await asyncpg.connect(db.dsn), await asyncpg.connect(db.dsn)
        try:
            async with asyncio.timeout(20):
                transaction = lock.transaction()
                await transaction.start()
                await lock.execute("LOCK TABLE realtime.pruned IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(0.1)  # the changefeed polls every 10 ms: it is now waiting for the lock
                stalled["read"] = server.db.changefeed.changes
                for i in range(1, total + 1):
                    await writer.execute("INSERT INTO items VALUES ($1)", i)
                # Taking the lock gave this transaction an id, which holds back a horizon taken now: record one past
                # every transaction instead, as a later one would be.
                await lock.execute(
                    "INSERT INTO realtime.horizons (snap) SELECT (x || ':' || x || ':')::pg_snapshot"
                    " FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text AS x) s"
                )
                deleted = await lock.fetchval(PRUNE, timedelta(0), 10000)
                await transaction.commit()
                return deleted
        finally:
            await lock.close()
            await writer.close()

    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        collector = Collector(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            assert await in_asyncio(stall_write_and_prune) == total
            assert stalled["read"] == 0
            with trio.move_on_after(3):
                while not collector.other:
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    # The pruned changes never arrive, and the subscriber is told so instead of seeing a silent gap.
    assert collector.ids == []
    assert [m.get("code") for m in collector.other] == ["CHANGES_MISSED"]


async def test_a_pool_connection_lost_while_authorizing_a_window_loses_nothing(start_server, db):
    db.sql(GATED_ITEMS)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.items")
        async with closed_gate(db.dsn):
            await db.execute("INSERT INTO items VALUES (1)")
            # The connection judging the window waits for the gate: drop it (a restart or failover would too).
            with trio.fail_after(5):
                while not await db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
                ):
                    await trio.sleep(0.02)
        message = await recv(ws, timeout=5)
        assert message.get("payload", {}).get("record") == {"id": 1}, message
        await db.execute("INSERT INTO items VALUES (2)")
        assert (await recv(ws))["payload"]["record"] == {"id": 2}
