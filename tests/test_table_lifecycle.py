"""The table lifecycle against a real PostgreSQL (migration 0007): a dropped or renamed enabled table is reported to
its subscribers and a dropped one leaves the registry; TRUNCATE of one partition is captured; without the event
triggers (no superuser) the pruning pass notices drops and renames, and the node says what is missing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import trio

from fluxrt_trio.client import Change, open_client
from fluxrt_trio.postgres.migrate import LIFECYCLE_MISSING, lifecycle_missing
from fluxrt_trio.protocol import delivery

from . import pg
from .process import run_cli
from .support.clients import connect, recv, request, subscribe, url
from .support.database import fresh_database, in_asyncio, users_table
from .support.servers import serving, start, wait_ok
from .support.waiting import nothing_arrives


async def failure(ws) -> dict:
    message = await recv(ws)
    assert message["type"] == "error" and message["code"] == "SUBSCRIPTION_FAILED", message
    return message


def registry(db) -> list[tuple[str, str]]:
    return [tuple(row) for row in db.sql("SELECT schema_name, table_name FROM realtime_enabled_tables")]


def value(db, sql: str):
    return db.sql(sql)[0][0]


async def test_a_dropped_table_is_reported_and_leaves_the_registry(start_server, db):
    users_table(db)
    relid = value(db, "SELECT 'public.users'::regclass::oid")
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await db.execute("DROP TABLE users")
        message = await failure(ws)
        assert message["channel"] == "table:public.users"
        assert "public.users was dropped" in message["message"]
        assert "enable_realtime('public.users')" in message["message"]
        assert server.hub.statistics().subscriptions["table"] == 0
    assert value(db, f"SELECT count(*) FROM realtime.tables WHERE relid = {relid}") == 0
    assert ("public", "users") not in registry(db)


async def test_a_renamed_table_is_reported_with_its_new_name_and_stays_enabled(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await db.execute("ALTER TABLE users RENAME TO people")
        message = await failure(ws)
        assert message["channel"] == "table:public.users"
        assert "renamed to public.people; subscribe to table:public.people" in message["message"]
        assert ("public", "people") in registry(db)
        await subscribe(ws, "table:public.people")
        await db.execute("INSERT INTO people VALUES (1, 'ann', null)")
        change = await recv(ws)
        assert change["channel"] == "table:public.people"
        assert change["payload"]["record"]["name"] == "ann"
        reply = await request(ws, type="subscribe", channel="table:public.users")
        assert reply["code"] == "SUBSCRIPTION_FAILED" and "does not exist" in reply["message"]


async def test_moving_a_table_to_another_schema_is_a_rename(start_server, db):
    users_table(db)
    db.sql("CREATE SCHEMA archive")
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await db.execute("ALTER TABLE users SET SCHEMA archive")
        message = await failure(ws)
        assert "renamed to archive.users" in message["message"]


@contextlib.asynccontextmanager
async def changefeed_held(dsn: str) -> AsyncIterator[None]:
    """Every read of the change log waits (it reads realtime.pruned, locked meanwhile) until the block ends: what
    commits inside reaches the changefeed after whatever the block did next, as it may under load."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE realtime.pruned IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_asyncio, hold)
        try:
            assert await trio.to_thread.run_sync(locked.wait, 10), "the change log could not be locked"
            yield
        finally:
            release.set()


@pytest.mark.parametrize(
    ("ddl", "reason"),
    [
        (
            "DROP TABLE users; CREATE TABLE users (id bigint PRIMARY KEY, name text, email text);"
            "GRANT SELECT ON users TO anon; SELECT enable_realtime('users')",
            "public.users was dropped",
        ),
        (
            "DO $$ BEGIN PERFORM disable_realtime('users'); PERFORM enable_realtime('users'); END $$",
            "realtime was disabled for public.users",
        ),
        ("ALTER TABLE users RENAME TO people; ALTER TABLE people RENAME TO users", "renamed to public.people"),
    ],
    ids=["dropped-and-created", "disabled-and-enabled", "renamed-and-back"],
)
async def test_what_ended_a_table_before_a_subscribe_was_checked_ends_only_the_earlier_subscriptions(
    start_server, db, ddl, reason
):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as earlier, connect(server) as later:
        await subscribe(earlier, "table:public.users")
        async with changefeed_held(db.dsn):
            await db.execute(ddl)
            # Checked against the table as it is now, and acked before the changefeed reads what ended the other.
            await subscribe(later, "table:public.users")
        assert reason in (await failure(earlier))["message"]
        await db.execute("INSERT INTO users VALUES (1, 'ann', null)")
        change = await recv(later)
        assert change["type"] == "broadcast" and change["payload"]["record"]["name"] == "ann", change
        assert server.hub.statistics().subscriptions["table"] == 1


async def test_a_subscription_that_changed_its_filter_after_realtime_was_disabled_and_enabled_is_still_ended(
    start_server, db
):
    # Subscribed throughout, so the changes made while realtime was disabled never reached it: a new filter, checked
    # after realtime was enabled again and acked before the changefeed reads the DISABLE row, must not hide that.
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        async with changefeed_held(db.dsn):
            await db.execute("SELECT disable_realtime('users')")
            await db.execute("INSERT INTO users VALUES (1, 'ann', null)")
            await db.execute("SELECT enable_realtime('users')")
            await subscribe(ws, "table:public.users", filter="id=gt.0")
        assert "realtime was disabled for public.users" in (await failure(ws))["message"]


async def test_a_subscribe_with_a_position_that_cannot_resume_is_not_ended_by_what_its_check_saw(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        async with changefeed_held(db.dsn):
            await db.execute("DO $$ BEGIN PERFORM disable_realtime('users'); PERFORM enable_realtime('users'); END $$")
            ack = await subscribe(ws, "table:public.users", since="not a position")
            assert ack["recovered"] is False
        await db.execute("INSERT INTO users VALUES (1, 'ann', null)")
        change = await recv(ws)
        assert change["type"] == "broadcast" and change["payload"]["record"]["name"] == "ann", change


async def renamed_away_and_created(db, third_column: str, policies: str = "") -> None:
    """A row of users, then users renamed to people and a new users (id, name, `third_column`) made in its place with
    `policies`, readable by anon and enabled."""
    await db.execute("INSERT INTO users VALUES (7, 'old', null)")
    await db.execute(
        "ALTER TABLE users RENAME TO people;"
        f"CREATE TABLE users (id bigint PRIMARY KEY, name text, {third_column});"
        f"GRANT SELECT ON users TO anon; {policies} SELECT enable_realtime('users')"
    )


async def test_a_table_created_under_a_renamed_ones_name_is_decided_by_its_own_policies(start_server, db):
    # One stretch of the change log holds the old table's row, its RENAME, and the new table's rows, all read after
    # the new table's subscriber was acked. The new table's rows are decided by its own policy (anon sees only
    # 'public'), never by the old table's (none); and the old table's row is not the new table's subscribers'.
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        async with changefeed_held(db.dsn):
            await renamed_away_and_created(
                db,
                "email text",
                "ALTER TABLE users ENABLE ROW LEVEL SECURITY;"
                "CREATE POLICY only_public ON users FOR SELECT USING (name = 'public');",
            )
            await subscribe(ws, "table:public.users")
            await db.execute("INSERT INTO users VALUES (1, 'secret', null)")
            await db.execute("INSERT INTO users VALUES (2, 'public', null)")
        change = await recv(ws)
        assert change["type"] == "broadcast" and change["payload"]["record"]["name"] == "public", change


async def test_a_filter_on_a_column_only_the_new_table_has_is_not_ended_by_the_old_ones_last_changes(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        async with changefeed_held(db.dsn):
            await renamed_away_and_created(db, "owner text")
            await subscribe(ws, "table:public.users", filter="owner=eq.ann")
        await db.execute("INSERT INTO users VALUES (1, 'x', 'ann')")
        change = await recv(ws)
        assert change["type"] == "broadcast" and change["payload"]["record"]["owner"] == "ann", change


async def test_rows_of_a_table_dropped_and_created_again_are_withheld_and_named_only_to_its_own_subscribers(
    start_server, db
):
    # The old table's row is read after its DROP committed: its policies are gone, so it can be judged by nobody.
    # Its subscriber is told so and then that the table was dropped; the new table's subscriber hears of neither.
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as earlier, connect(server) as later:
        await subscribe(earlier, "table:public.users")
        async with changefeed_held(db.dsn):
            await db.execute("INSERT INTO users VALUES (7, 'old', null)")
            await db.execute(
                "DROP TABLE users; CREATE TABLE users (id bigint PRIMARY KEY, name text, email text);"
                "GRANT SELECT ON users TO anon; SELECT enable_realtime('users')"
            )
            await subscribe(later, "table:public.users")
        missed = await recv(earlier)
        assert missed["type"] == "error" and missed["code"] == "CHANGES_MISSED", missed
        assert missed["channel"] == "table:public.users"
        assert missed["message"] == delivery.DROPPED_UNCHECKED
        assert "public.users was dropped" in (await failure(earlier))["message"]
        await db.execute("INSERT INTO users VALUES (1, 'ann', null)")
        change = await recv(later)
        assert change["type"] == "broadcast" and change["payload"]["record"]["name"] == "ann", change


async def test_a_recreated_table_is_not_enabled_by_its_predecessor(db):
    users_table(db)
    relid = value(db, "SELECT 'public.users'::regclass::oid")
    db.sql("DROP TABLE users; CREATE TABLE users (id int)")
    # The view could not list the old oid anyway: the registry itself must have let go of it.
    assert value(db, "SELECT count(*) FROM realtime.tables") == 0
    # An entry left behind by a drop the event triggers did not see, whose oid a new table took: not enabled
    # while that table has no capture trigger.
    db.sql(f"INSERT INTO realtime.tables (relid, schema_name, table_name) VALUES ({relid}, 'public', 'old')")
    db.sql(
        f"CREATE TABLE reused (id int) ; UPDATE realtime.tables SET relid = 'reused'::regclass WHERE relid = {relid}"
    )
    assert ("public", "reused") not in registry(db)


async def test_a_table_whose_capture_trigger_was_dropped_by_hand_cannot_be_subscribed(start_server, db):
    users_table(db)
    db.sql("DROP TRIGGER fluxrt_capture ON users")
    server = await start(start_server, db)
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.users")
        assert reply["code"] == "SUBSCRIPTION_FAILED", reply
        assert "realtime is not enabled for public.users" in reply["message"]


async def test_truncating_one_partition_names_it_and_the_whole_table_once(start_server, db):
    db.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
        "GRANT SELECT ON events TO anon; SELECT enable_realtime('events');"
        # Created after enable_realtime: the event trigger gives it its TRUNCATE trigger.
        "CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b');"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.events")
        await db.execute("TRUNCATE events_b")
        first = (await recv(ws))["payload"]
        assert (first["type"], first["table"], first["partition"]) == ("TRUNCATE", "events", "public.events_b")
        await db.execute("TRUNCATE events_a")
        assert (await recv(ws))["payload"]["partition"] == "public.events_a"
        await db.execute("TRUNCATE events")
        whole = (await recv(ws))["payload"]
        assert whole["type"] == "TRUNCATE" and "partition" not in whole
        await nothing_arrives(ws)
    # The Python client hands the field on.
    truncated: list[Change] = []
    async with open_client(url(server)) as client:
        await client.channel("table:public.events", event="TRUNCATE").on("TRUNCATE", truncated.append).subscribe()
        await db.execute("TRUNCATE events_b")
        await db.execute("TRUNCATE events")
        with trio.fail_after(10):
            while len(truncated) < 2:
                await trio.sleep(0.01)
    assert [(change.type, change.table, change.partition) for change in truncated] == [
        ("TRUNCATE", "events", "public.events_b"),
        ("TRUNCATE", "events", None),
    ]


async def test_a_partitioned_table_with_foreign_partitions_can_be_enabled(db):
    # PostgreSQL allows foreign tables no TRUNCATE trigger: those partitions are left out, not a failure.
    db.sql(
        "CREATE FOREIGN DATA WRAPPER lc_fdw; CREATE SERVER lc_server FOREIGN DATA WRAPPER lc_fdw;"
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
        "CREATE FOREIGN TABLE events_f PARTITION OF events FOR VALUES IN ('f') SERVER lc_server;"
        "SELECT enable_realtime('events');"
        "CREATE FOREIGN TABLE events_g PARTITION OF events FOR VALUES IN ('g') SERVER lc_server;"
    )
    assert registry(db) == [("public", "events")]
    assert value(
        db,
        "SELECT array_agg(tgrelid::regclass::text ORDER BY 1) FROM pg_trigger WHERE tgname = 'fluxrt_capture_truncate'",
    ) == ["events", "events_a"]


async def test_a_detached_partition_reports_no_truncate(db):
    # Its TRUNCATE trigger stays (PostgreSQL removes only the cloned row trigger), on a table nobody may subscribe to.
    db.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
        "CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b');"
        "CREATE TABLE others (id int, kind text) PARTITION BY LIST (kind);"
        "SELECT enable_realtime('events');"
        "ALTER TABLE events DETACH PARTITION events_a; ALTER TABLE events DETACH PARTITION events_b;"
        "ALTER TABLE others ATTACH PARTITION events_b FOR VALUES IN ('b');"
        "TRUNCATE events_a; TRUNCATE events_b; TRUNCATE others"
    )
    assert logged(db, "TRUNCATE") == []


async def test_disable_realtime_removes_the_partition_triggers(db):
    db.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
        "SELECT enable_realtime('events'); SELECT disable_realtime('events');"
    )
    assert value(db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'fluxrt%'") == 0


@pytest.fixture
def without_event_triggers(db):
    db.sql("DROP EVENT TRIGGER fluxrt_lifecycle_drop; DROP EVENT TRIGGER fluxrt_lifecycle_ddl")
    return db


async def test_without_event_triggers_the_pruning_pass_reports_drops_and_renames(start_server, without_event_triggers):
    db = without_event_triggers
    users_table(db)
    db.sql("CREATE TABLE notes (id int PRIMARY KEY); GRANT SELECT ON notes TO anon; SELECT enable_realtime('notes')")
    # Not migrating: as a superuser the node would put the event triggers back, and they would report instead.
    server = await start(start_server, db, database={"retention": 0.5, "migrate": False})
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await subscribe(ws, "table:public.notes")
        await db.execute("DROP TABLE users")
        await db.execute("ALTER TABLE notes RENAME TO memos")
        reasons = {(m := await failure(ws))["channel"]: m["message"] for _ in range(2)}
    assert "public.users was dropped" in reasons["table:public.users"]
    assert "renamed to public.memos" in reasons["table:public.notes"]


async def test_migrating_as_a_superuser_puts_missing_event_triggers_back(start_server, without_event_triggers):
    db = without_event_triggers
    assert await in_asyncio(_ask, db.dsn) == LIFECYCLE_MISSING
    await start(start_server, db, database={"migrate": True})
    assert await in_asyncio(_ask, db.dsn) is None


async def test_a_node_migrating_without_a_superuser_says_what_is_missing(pg_admin, caplog):
    role = f"fluxrt_lc_{uuid.uuid4().hex[:8]}"
    await trio.to_thread.run_sync(pg.run_sql, pg_admin, f"CREATE ROLE {role} LOGIN CREATEROLE")
    try:
        async with fresh_database(pg_admin) as dsn:
            name = dsn.rpartition("/")[2]
            await trio.to_thread.run_sync(pg.run_sql, pg_admin, f"ALTER DATABASE {name} OWNER TO {role}")
            await trio.to_thread.run_sync(pg.run_sql, dsn, f"ALTER SCHEMA public OWNER TO {role}")
            parts = urllib.parse.urlsplit(dsn)
            own = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
            with caplog.at_level(logging.WARNING, logger="fluxrt"):
                async with serving(database={"dsn": own, "migrate": True}) as server:
                    await wait_ok(server)
            assert await in_asyncio(_ask, own) == LIFECYCLE_MISSING
            assert [r for r in caplog.records if r.getMessage() == LIFECYCLE_MISSING]
            code, out, err = await run_cli(own, "migrate")
            assert (code, out.strip()) == (0, "already up to date"), err
            assert f"fluxrt migrate: warning: {LIFECYCLE_MISSING}" in err.splitlines()
    finally:
        await trio.to_thread.run_sync(pg.run_sql, pg_admin, f"DROP ROLE {role}")


async def _ask(dsn: str) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await lifecycle_missing(conn)
    finally:
        await conn.close()


async def test_a_table_owner_who_is_no_superuser_gets_new_partitions_covered(start_server, db):
    role = f"fluxrt_lc_{uuid.uuid4().hex[:8]}"
    db.sql(f"CREATE ROLE {role} NOLOGIN; GRANT CREATE ON SCHEMA public TO {role}")
    try:
        db.sql(
            f"SET ROLE {role};"
            "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
            "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
            "GRANT SELECT ON events TO anon; SELECT enable_realtime('events');"
            "CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b');"
            "ALTER TABLE events ADD COLUMN note text;"
        )
        assert value(db, "SELECT count(*) FROM pg_trigger WHERE tgname = 'fluxrt_capture_truncate'") == 3
        server = await start(start_server, db)
        async with connect(server) as ws:
            await subscribe(ws, "table:public.events")
            await db.execute(f"SET ROLE {role}; TRUNCATE events_b")
            assert (await recv(ws))["payload"]["partition"] == "public.events_b"
            await db.execute(f"SET ROLE {role}; ALTER TABLE events RENAME TO happenings")
            assert "renamed to public.happenings" in (await failure(ws))["message"]
    finally:
        db.sql(f"DROP OWNED BY {role}; DROP ROLE {role}")


def logged(db, *ops: str) -> list[tuple]:
    """(op, schema, table, new_record) of the change log's rows of `ops`, in order."""
    rows = db.sql(
        "SELECT op, schema_name, table_name, new_record FROM realtime.changes WHERE op = ANY($1) ORDER BY id", list(ops)
    )
    return [(r["op"], r["schema_name"], r["table_name"], r["new_record"]) for r in rows]


async def _sweep_while_another_holds(dsn: str) -> tuple[int, int, int, int]:
    holder = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        # A sweep that waited for the holder would fail here rather than hang the test.
        await other.execute("SET lock_timeout = '5s'")
        held = holder.transaction()
        await held.start()
        by_holder = await holder.fetchval("SELECT realtime.sweep_lifecycle()")
        while_held = await other.fetchval("SELECT realtime.sweep_lifecycle()")
        await held.rollback()
        after_rollback = await other.fetchval("SELECT realtime.sweep_lifecycle()")
        again = await holder.fetchval("SELECT realtime.sweep_lifecycle()")
        return by_holder, while_held, after_rollback, again
    finally:
        await holder.close()
        await other.close()


async def test_a_sweep_skips_what_an_open_transaction_holds_and_each_event_is_logged_once(without_event_triggers):
    # A session that swept and stays open (anyone may call the sweep) must not stall every node's pruning pass.
    db = without_event_triggers
    users_table(db)
    db.sql("CREATE TABLE notes (id int); SELECT enable_realtime('notes')")
    db.sql("DROP TABLE users; ALTER TABLE notes RENAME TO memos")
    assert await in_asyncio(_sweep_while_another_holds, db.dsn) == (2, 0, 2, 0)
    assert logged(db, "DROP", "RENAME") == [
        ("DROP", "public", "users", None),
        ("RENAME", "public", "notes", '{"table": "memos", "schema": "public"}'),
    ]


async def test_a_renamed_schema_renames_its_tables_and_a_dropped_one_drops_them(db):
    db.sql(
        "CREATE SCHEMA shop; CREATE TABLE shop.orders (id int); CREATE TABLE shop.items (id int);"
        "SELECT enable_realtime('shop.orders'); SELECT enable_realtime('shop.items')"
    )
    db.sql("ALTER SCHEMA shop RENAME TO store")
    assert sorted(registry(db)) == [("store", "items"), ("store", "orders")]
    db.sql("DROP SCHEMA store CASCADE")
    assert sorted(logged(db, "DROP", "RENAME")) == [
        ("DROP", "store", "items", None),
        ("DROP", "store", "orders", None),
        ("RENAME", "shop", "items", '{"table": "items", "schema": "store"}'),
        ("RENAME", "shop", "orders", '{"table": "orders", "schema": "store"}'),
    ]
    assert value(db, "SELECT count(*) FROM realtime.tables") == 0


async def test_ddl_sweeps_only_the_tables_it_touched(db):
    # The event triggers run on every CREATE and ALTER TABLE of the database: the registry is not read whole each
    # time. A rename the DDL trigger missed waits for the pruning pass or the next DDL on that table.
    db.sql("CREATE TABLE notes (id int); SELECT enable_realtime('notes')")
    db.sql("ALTER EVENT TRIGGER fluxrt_lifecycle_ddl DISABLE; ALTER TABLE notes RENAME TO memos")
    db.sql("ALTER EVENT TRIGGER fluxrt_lifecycle_ddl ENABLE; CREATE TABLE other (id int); ALTER TABLE other ADD x int")
    assert logged(db, "RENAME") == []
    db.sql("ALTER TABLE memos ADD COLUMN body text")
    assert logged(db, "RENAME") == [("RENAME", "public", "notes", '{"table": "memos", "schema": "public"}')]


async def test_nested_partitions_truncate_cascade_and_partition_ddl(db):
    db.sql(
        "CREATE TABLE events (id int, kind text, n int) PARTITION BY LIST (kind);"
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a') PARTITION BY RANGE (n);"
        "CREATE TABLE events_a1 PARTITION OF events_a FOR VALUES FROM (0) TO (10);"
        "CREATE TABLE events_a2 PARTITION OF events_a FOR VALUES FROM (10) TO (20);"
        "CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b');"
        "CREATE TABLE marks (id int, event_id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE marks_x PARTITION OF marks FOR VALUES IN ('x');"
        "SELECT enable_realtime('events'); SELECT enable_realtime('marks');"
        "CREATE TABLE owners (id int PRIMARY KEY); ALTER TABLE marks ADD FOREIGN KEY (event_id) REFERENCES owners"
    )
    db.sql("TRUNCATE events")
    db.sql("TRUNCATE events_a")
    db.sql("TRUNCATE events_a2, events_b")
    db.sql("TRUNCATE owners CASCADE")
    # A partition renamed or dropped is not the enabled table: no RENAME or DROP, and the registry keeps it.
    db.sql("ALTER TABLE events_a1 RENAME TO events_low; DROP TABLE events_a2; TRUNCATE events_low")
    assert logged(db, "TRUNCATE", "DROP", "RENAME") == [
        ("TRUNCATE", "public", "events", None),
        ("TRUNCATE", "public", "events", '{"partition": "public.events_a"}'),
        ("TRUNCATE", "public", "events", '{"partition": "public.events_a2"}'),
        ("TRUNCATE", "public", "events", '{"partition": "public.events_b"}'),
        ("TRUNCATE", "public", "marks", None),
        ("TRUNCATE", "public", "events", '{"partition": "public.events_low"}'),
    ]
    assert sorted(registry(db)) == [("public", "events"), ("public", "marks")]


async def _notices_of(dsn: str, role: str, statements: list[str]) -> list[str]:
    conn = await asyncpg.connect(dsn)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(f"{message.severity}: {message.message}"))
    try:
        await conn.execute(f"SET ROLE {role}")
        for statement in statements:
            await conn.execute(statement)
        return notices
    finally:
        await conn.close()


async def test_an_ordinary_users_ddl_is_not_slowed_by_warnings(db):
    # The event triggers run as whoever issues the DDL, who may read nothing in realtime.*.
    role = f"fluxrt_lc_{uuid.uuid4().hex[:8]}"
    db.sql(f"CREATE ROLE {role} NOLOGIN; GRANT CREATE ON SCHEMA public TO {role}")
    users_table(db)
    try:
        notices = await in_asyncio(
            _notices_of,
            db.dsn,
            role,
            [
                "CREATE TABLE mine (id int)",
                "ALTER TABLE mine ADD COLUMN note text",
                "ALTER TABLE mine RENAME TO mine2",
                "CREATE TABLE log (id int, kind text) PARTITION BY LIST (kind)",
                "CREATE TABLE log_a PARTITION OF log FOR VALUES IN ('a')",
                "SELECT enable_realtime('log')",
                "CREATE TABLE log_b PARTITION OF log FOR VALUES IN ('b')",
                "ALTER TABLE log RENAME TO journal",
                "TRUNCATE log_b",
                "DROP TABLE mine2",
                "DROP TABLE journal",
            ],
        )
        assert notices == []
        assert logged(db, "DROP", "RENAME", "TRUNCATE") == [
            ("RENAME", "public", "log", '{"table": "journal", "schema": "public"}'),
            ("TRUNCATE", "public", "journal", '{"partition": "public.log_b"}'),
            ("DROP", "public", "journal", None),
        ]
        assert registry(db) == [("public", "users")]
    finally:
        db.sql(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_without_event_triggers_enable_and_disable_log_a_pending_drop_or_rename_first(without_event_triggers):
    db = without_event_triggers
    db.sql(
        "CREATE TABLE notes (id int); CREATE TABLE drafts (id int); CREATE TABLE users (id int);"
        "SELECT enable_realtime('notes'); SELECT enable_realtime('drafts'); SELECT enable_realtime('users')"
    )
    # Renamed, then enabled again under the new name: the old name's subscribers are still told.
    db.sql("ALTER TABLE notes RENAME TO memos; SELECT enable_realtime('memos')")
    # Renamed, then disabled: told of the rename under the old name, not only of the disable under the new one.
    db.sql("ALTER TABLE drafts RENAME TO sketches; SELECT disable_realtime('sketches')")
    # Dropped and made again: the DROP comes before the new table's changes, never after them.
    db.sql("DROP TABLE users; CREATE TABLE users (id int); SELECT enable_realtime('users')")
    db.sql("INSERT INTO users VALUES (1)")
    assert value(db, "SELECT realtime.sweep_lifecycle()") == 0
    assert logged(db, "DROP", "RENAME", "DISABLE", "INSERT") == [
        ("RENAME", "public", "notes", '{"table": "memos", "schema": "public"}'),
        ("RENAME", "public", "drafts", '{"table": "sketches", "schema": "public"}'),
        ("DISABLE", "public", "sketches", None),
        ("DROP", "public", "users", None),
        ("INSERT", "public", "users", '{"id": 1}'),
    ]
    assert sorted(registry(db)) == [("public", "memos"), ("public", "users")]


async def test_pruning_goes_on_when_the_sweep_fails(start_server, without_event_triggers):
    # As on a database not yet migrated to 0007 by a node that does not migrate: the sweep fails every pass.
    db = without_event_triggers
    users_table(db)
    db.sql("DROP FUNCTION realtime.sweep_lifecycle(oid[]); INSERT INTO users VALUES (1, 'ann', null)")
    await start(start_server, db, database={"retention": 0.5, "migrate": False})
    with trio.fail_after(30):
        while (await db.execute("SELECT count(*) FROM realtime.changes"))[0][0]:
            await trio.sleep(0.1)


async def test_renames_and_a_drop_in_one_transaction_are_each_logged_in_order(db):
    # The transaction holds the registry entry after the first rename; its own later DDL must not skip it.
    db.sql("CREATE TABLE notes (id int); SELECT enable_realtime('notes')")
    db.sql(
        "BEGIN; ALTER TABLE notes RENAME TO memos; ALTER TABLE memos SET SCHEMA auth;"
        "INSERT INTO auth.memos VALUES (1); DROP TABLE auth.memos; COMMIT"
    )
    assert logged(db, "RENAME", "DROP", "INSERT") == [
        ("RENAME", "public", "notes", '{"table": "memos", "schema": "public"}'),
        ("RENAME", "public", "memos", '{"table": "memos", "schema": "auth"}'),
        ("INSERT", "auth", "memos", '{"id": 1}'),
        ("DROP", "auth", "memos", None),
    ]


# ---- partitions are never channels of their own (migration 0008) -------------------------------------------------

PARTITIONED = (
    "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
    "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
    "GRANT SELECT ON events, events_a TO anon;"
)


@pytest.mark.parametrize("root_enabled", [True, False])
async def test_enable_realtime_refuses_a_partition_and_names_its_root(db, root_enabled):
    # Its rows are reported as its root's: enabled alone, its subscribers were acked and then sent nothing.
    db.sql(PARTITIONED + ("SELECT enable_realtime('events');" if root_enabled else ""))
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'fluxrt%'"
    before = value(db, triggers)
    with pytest.raises(asyncpg.WrongObjectTypeError) as refused:
        await db.execute("SELECT enable_realtime('events_a')")
    assert refused.value.args[0] == (
        "enable_realtime: events_a is a partition of public.events; enable the partitioned table instead: "
        "SELECT enable_realtime('public.events')"
    )
    assert "published on table:public.events" in refused.value.hint
    assert value(db, triggers) == before
    assert registry(db) == ([("public", "events")] if root_enabled else [])


async def test_subscribing_to_a_partition_names_its_roots_channel(start_server, db):
    db.sql(PARTITIONED + "SELECT enable_realtime('events')")
    server = await start(start_server, db)
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.events_a")
        assert reply["code"] == "SUBSCRIPTION_FAILED", reply
        assert reply["message"] == (
            "public.events_a is a partition of public.events: its changes are published on table:public.events; "
            "subscribe there (a filter on the partition key selects this partition's rows)"
        )
        await subscribe(ws, "table:public.events", filter="kind=eq.a")
        await db.execute("INSERT INTO events VALUES (1, 'a')")
        assert (await recv(ws))["payload"]["record"] == {"id": 1, "kind": "a"}


@pytest.mark.parametrize("event_triggers", [True, False])
async def test_an_enabled_table_attached_as_a_partition_ends_its_subscriptions(start_server, db, event_triggers):
    # Its rows now belong to its root's channel: its subscribers are told where, instead of being sent nothing.
    if not event_triggers:
        db.sql("DROP EVENT TRIGGER fluxrt_lifecycle_drop; DROP EVENT TRIGGER fluxrt_lifecycle_ddl")
    db.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE solo (id int, kind text); GRANT SELECT ON events, solo TO anon; SELECT enable_realtime('solo')"
    )
    # migrate False: a migration run as a superuser would put the event triggers back.
    server = await start(start_server, db, database={"retention": 0.5, "migrate": False})
    async with connect(server) as ws:
        await subscribe(ws, "table:public.solo")
        await db.execute("ALTER TABLE events ATTACH PARTITION solo FOR VALUES IN ('s')")
        ended = await failure(ws)
        assert ended["channel"] == "table:public.solo"
        assert ended["message"] == (
            "table public.solo became a partition of public.events: its changes are published on "
            "table:public.events; subscribe there"
        )
        assert registry(db) == []
        # The trigger it kept reports nothing while its root is not enabled, and gives way when the root is.
        await db.execute("INSERT INTO solo VALUES (1, 's')")
        assert logged(db, "INSERT") == []
        await db.execute("SELECT enable_realtime('events')")
        await subscribe(ws, "table:public.events")
        await db.execute("INSERT INTO solo VALUES (2, 's')")
        change = await recv(ws)
        assert (change["channel"], change["payload"]["record"]) == ("table:public.events", {"id": 2, "kind": "s"})


async def test_a_table_attached_written_and_detached_between_sweeps_ends_its_subscriptions(
    start_server, without_event_triggers
):
    # Without the event triggers nothing swept between the ATTACH and the DETACH: the rows written meanwhile were
    # withheld (its root carries no capture trigger) and its subscribers, never told, kept a subscription that had
    # silently lost them. The first withheld row ends them instead, in commit order.
    db = without_event_triggers
    db.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE solo (id int, kind text); GRANT SELECT ON events, solo TO anon; SELECT enable_realtime('solo')"
    )
    # migrate False: a migration run as a superuser would put the event triggers back.
    server = await start(start_server, db, database={"migrate": False})
    async with connect(server) as ws:
        await subscribe(ws, "table:public.solo")
        await db.execute(
            "ALTER TABLE events ATTACH PARTITION solo FOR VALUES IN ('s'); INSERT INTO solo VALUES (1, 's');"
            "ALTER TABLE events DETACH PARTITION solo"
        )
        ended = await failure(ws)
        assert ended["channel"] == "table:public.solo"
        assert "public.solo became a partition of public.events" in ended["message"]
    assert logged(db, "DISABLE", "INSERT") == [("DISABLE", "public", "solo", '{"partition_of": "public.events"}')]


async def test_a_partitioned_table_attached_as_a_partition_ends_its_subscriptions_on_a_write_to_its_partition(
    without_event_triggers,
):
    # The same for an enabled partitioned table attached under another: its rows fire on its partitions.
    db = without_event_triggers
    db.sql(
        "CREATE TABLE big (id int, kind text) PARTITION BY LIST (kind);"
        "CREATE TABLE mid (id int, kind text) PARTITION BY LIST (id);"
        "CREATE TABLE leaf PARTITION OF mid FOR VALUES IN (1); SELECT enable_realtime('mid');"
        "ALTER TABLE big ATTACH PARTITION mid FOR VALUES IN ('m'); INSERT INTO big VALUES (1, 'm');"
        "ALTER TABLE big DETACH PARTITION mid"
    )
    assert logged(db, "DISABLE", "INSERT") == [("DISABLE", "public", "mid", '{"partition_of": "public.big"}')]
    assert registry(db) == []


async def test_the_refusal_of_a_partition_quotes_its_roots_name_in_the_sql_it_suggests(db):
    db.sql(
        'CREATE SCHEMA "My App"; CREATE TABLE "My App"."Ev\'ents" (id int, kind text) PARTITION BY LIST (kind);'
        'CREATE TABLE "My App".part_a PARTITION OF "My App"."Ev\'ents" FOR VALUES IN (\'a\')'
    )
    with pytest.raises(asyncpg.WrongObjectTypeError) as refused:
        await db.execute("SELECT enable_realtime('\"My App\".part_a')")
    suggested = refused.value.args[0].split("instead: ", 1)[1]
    assert suggested == "SELECT enable_realtime('\"My App\".\"Ev''ents\"')"
    await db.execute(suggested)
    assert registry(db) == [("My App", "Ev'ents")]
    assert "published on table:My App.Ev'ents;" in refused.value.hint


@pytest.mark.parametrize(
    ("root", "code", "told"),
    [
        # A GRANT on the partition would not help: its changes are never published on its channel.
        ("public", "SUBSCRIPTION_FAILED", "public.events_a is a partition of public.events"),
        # A role that may read neither is not told the root's name.
        ("hidden", "FORBIDDEN", "role anon may not read public.events_a"),
    ],
)
async def test_subscribing_to_a_partition_the_role_may_not_read(start_server, db, root, code, told):
    db.sql(
        "CREATE SCHEMA IF NOT EXISTS hidden;"
        f"CREATE TABLE {root}.events (id int, kind text) PARTITION BY LIST (kind);"
        f"CREATE TABLE public.events_a PARTITION OF {root}.events FOR VALUES IN ('a');"
        f"GRANT SELECT ON {root}.events TO anon; SELECT enable_realtime('{root}.events')"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.events_a")
        assert (reply["code"], reply["message"].startswith(told)) == (code, True), reply
        assert "hidden" not in reply["message"]


async def test_enabling_a_root_whose_partition_of_another_owner_kept_its_trigger_says_who_must_drop_it(db):
    # The root's owner may not drop the trigger the partition kept from before it was attached (TRIGGER allows only
    # creating one), and PostgreSQL would not clone over it: the refusal says what its owner runs.
    alice, bob = (f"fluxrt_lc_{uuid.uuid4().hex[:8]}" for _ in range(2))
    db.sql(f"CREATE ROLE {alice} NOLOGIN; CREATE ROLE {bob} NOLOGIN; GRANT CREATE ON SCHEMA public TO {alice}, {bob}")
    try:
        db.sql(
            f"SET ROLE {alice}; CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind); RESET ROLE;"
            f"SET ROLE {bob}; CREATE TABLE solo (id int, kind text); SELECT enable_realtime('solo');"
            # Without it PostgreSQL lets nobody but bob put the root's trigger on solo.
            f"GRANT TRIGGER ON solo TO {alice}; RESET ROLE;"
            "ALTER TABLE events ATTACH PARTITION solo FOR VALUES IN ('s')"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await db.execute(f"SET ROLE {alice}; SELECT enable_realtime('events')")
        assert refused.value.args[0] == (
            "realtime: partition public.solo keeps the capture trigger it had before it was attached, and only its "
            f"owner may drop it: as {bob} (or a superuser) run SELECT disable_realtime('public.solo'), then try again"
        )
        await db.execute(f"SET ROLE {bob}; SELECT disable_realtime('public.solo')")
        await db.execute(f"SET ROLE {alice}; SELECT enable_realtime('events')")
        assert registry(db) == [("public", "events")]
    finally:
        db.sql(f"DROP OWNED BY {alice}; DROP OWNED BY {bob}; DROP ROLE {alice}; DROP ROLE {bob}")


async def test_disable_realtime_refuses_a_partition_of_an_enabled_table_and_names_it(db):
    # Its capture trigger is a clone of the root's: PostgreSQL's own refusal suggested dropping the root's trigger by
    # hand, which would leave the root registered without it.
    db.sql(PARTITIONED + "SELECT enable_realtime('events')")
    with pytest.raises(asyncpg.WrongObjectTypeError) as refused:
        await db.execute("SELECT disable_realtime('events_a')")
    assert refused.value.args[0] == (
        "disable_realtime: events_a is a partition of public.events, for which realtime is enabled; a partition's "
        "changes cannot be stopped apart from the rest: SELECT disable_realtime('public.events')"
    )
    assert registry(db) == [("public", "events")]
    assert value(db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'fluxrt%'") == 4
