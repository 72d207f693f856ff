"""Table channels against a real PostgreSQL: payload shapes, subscribe checks, row-level security, columns, filters."""

from __future__ import annotations

import orjson
import pytest
import trio

from fluxrt_trio.protocol.positions import TablePosition

from .support.clients import connect, http_get, recv, request, subscribe
from .support.config import token
from .support.database import users_table
from .support.servers import start
from .support.waiting import nothing_arrives

ALICE = "11111111-1111-1111-1111-111111111111"
BOB = "22222222-2222-2222-2222-222222222222"


def strip_extensions(message: dict) -> dict:
    payload = dict(message["payload"])
    assert TablePosition.parse(payload.pop("id")) is not None
    assert payload.pop("timestamp").endswith("Z")
    return {**message, "payload": payload}


async def test_reference_payload_shapes(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        assert await request(ws, type="subscribe", channel="table:public.users") == {
            "type": "ack",
            "channel": "table:public.users",
            "status": "subscribed",
        }
        await db.execute("INSERT INTO users VALUES (123, 'John Doe', 'john@example.com')")
        await db.execute("UPDATE users SET name = 'John' WHERE id = 123")
        await db.execute("DELETE FROM users WHERE id = 123")
        insert, update, delete = [strip_extensions(await recv(ws)) for _ in range(3)]
    assert insert == {
        "type": "broadcast",
        "channel": "table:public.users",
        "payload": {
            "type": "INSERT",
            "schema": "public",
            "table": "users",
            "record": {"id": 123, "name": "John Doe", "email": "john@example.com"},
        },
    }
    assert update["payload"] == {
        "type": "UPDATE",
        "schema": "public",
        "table": "users",
        "old_record": {"id": 123, "name": "John Doe", "email": "john@example.com"},
        "record": {"id": 123, "name": "John", "email": "john@example.com"},
    }
    assert delete["payload"] == {
        "type": "DELETE",
        "schema": "public",
        "table": "users",
        "old_record": {"id": 123, "name": "John", "email": "john@example.com"},
    }


async def test_change_positions_follow_each_other_and_timestamps_are_utc(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await db.execute("INSERT INTO users VALUES (1, 'a', null), (2, 'b', null)")
        first, second = await recv(ws), await recv(ws)
    one, two = (TablePosition.parse(m["payload"]["id"]) for m in (first, second))
    assert one is not None and two is not None
    # One transaction, one window: the second position is the first one read further.
    assert two.cut.includes(one.cut) and not one.cut.includes(two.cut)
    assert first["payload"]["timestamp"][:4].isdigit()


async def test_table_deliveries_are_counted_in_messages_out(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as first, connect(server) as second:
        for ws in (first, second):
            await subscribe(ws, "table:public.users")
        await db.execute("INSERT INTO users VALUES (1, 'a', null), (2, 'b', null), (3, 'c', null)")
        for ws in (first, second):
            for _ in range(3):
                await recv(ws)
        _, _, body = await http_get(server, "/metrics")
    # Two acks and three changes to each of two subscribers.
    assert b"fluxrt_messages_out_total 8.0" in body


async def test_a_long_window_and_the_changes_behind_it_arrive_once_and_in_order(start_server, db):
    # 700 changes in one window (its hand-out pauses twice, letting the changefeed read on) and 30 committed behind
    # it: every change reaches each subscriber once, in order.
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as first, connect(server) as second:
        for ws in (first, second):
            await subscribe(ws, "table:public.users")
        await db.execute("INSERT INTO users SELECT g, 'bulk', null FROM generate_series(1, 700) g")
        for n in range(701, 731):
            await db.execute(f"INSERT INTO users VALUES ({n}, 'after', null)")
        for ws in (first, second):
            ids = [(await recv(ws))["payload"]["record"]["id"] for _ in range(730)]
            assert ids == list(range(1, 731))
            await nothing_arrives(ws)


async def test_subscribe_checks_in_order(start_server, db):
    db.sql(
        "CREATE TABLE secret (id int PRIMARY KEY);"
        "CREATE TABLE plain (id int PRIMARY KEY); GRANT SELECT ON plain TO anon;"
        "CREATE VIEW plain_view AS SELECT * FROM plain; GRANT SELECT ON plain_view TO anon;"
        "SELECT enable_realtime('secret');"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:

        async def refusal(channel, **options):
            reply = await request(ws, type="subscribe", channel=channel, ref="r", **options)
            assert reply["type"] == "error", reply
            assert reply["channel"] == channel and reply["ref"] == "r"
            return reply["code"], reply["message"]

        assert (await refusal("table:nodot"))[0] == "INVALID_CHANNEL"
        code, message = await refusal("table:public.missing")
        assert code == "SUBSCRIPTION_FAILED" and "does not exist" in message
        code, message = await refusal("table:public.plain_view")
        assert code == "SUBSCRIPTION_FAILED" and "does not exist" in message
        # Enabled but not readable: FORBIDDEN comes before anything else about it.
        code, message = await refusal("table:public.secret", filter="bogus")
        assert code == "FORBIDDEN" and "GRANT SELECT ON public.secret TO anon" in message
        code, message = await refusal("table:public.plain")
        assert code == "SUBSCRIPTION_FAILED"
        assert "realtime is not enabled for public.plain: run SELECT enable_realtime('public.plain')" in message
        await db.execute("SELECT enable_realtime('plain')")
        code, message = await refusal("table:public.plain", filter="nocolumn=eq.1")
        assert code == "SUBSCRIPTION_FAILED" and "nocolumn" in message
        code, message = await refusal("table:public.plain", filter="id=like.1")
        assert code == "SUBSCRIPTION_FAILED" and "like" in message
        code, message = await refusal("table:public.plain", event="UPSERT")
        assert code == "SUBSCRIPTION_FAILED" and "UPSERT" in message
        await subscribe(ws, "table:public.plain", filter="id=eq.1", event="INSERT")


async def test_subscribe_to_a_mixed_case_table_uses_catalog_names(start_server, db):
    db.sql(
        'CREATE SCHEMA "App"; CREATE TABLE "App"."Orders" (id int PRIMARY KEY);'
        'GRANT USAGE ON SCHEMA "App" TO anon; GRANT SELECT ON "App"."Orders" TO anon;'
        """SELECT enable_realtime('"App"."Orders"');"""
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:App.Orders")
        await db.execute('INSERT INTO "App"."Orders" VALUES (7)')
        message = await recv(ws)
    assert message["channel"] == "table:App.Orders", message
    assert "payload" in message, message
    assert message["payload"]["schema"] == "App" and message["payload"]["table"] == "Orders"


def todos_table(db) -> None:
    db.sql(
        "CREATE TABLE todos (id int PRIMARY KEY, user_id uuid NOT NULL, title text);"
        "ALTER TABLE todos ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY todos_realtime_policy ON todos FOR SELECT USING (user_id = auth.uid());"
        "GRANT SELECT ON todos TO authenticated;"
        "SELECT enable_realtime('todos');"
    )


async def test_row_level_security_on_insert_update_and_delete(start_server, db):
    todos_table(db)
    server = await start(start_server, db)
    async with connect(server, tok=token(ALICE)) as alice, connect(server, tok=token(BOB)) as bob:
        await subscribe(alice, "table:public.todos")
        await subscribe(bob, "table:public.todos")
        await db.execute(f"INSERT INTO todos VALUES (1, '{ALICE}', 'alice 1'), (2, '{BOB}', 'bob 1')")
        await db.execute("UPDATE todos SET title = title || ' (edited)'")
        await db.execute("DELETE FROM todos")
        got = {}
        for name, ws in (("alice", alice), ("bob", bob)):
            got[name] = [
                (m["payload"]["type"], m["payload"].get("record", m["payload"].get("old_record"))["id"])
                for m in [await recv(ws) for _ in range(3)]
            ]
            await nothing_arrives(ws)
    assert got["alice"] == [("INSERT", 1), ("UPDATE", 1), ("DELETE", 1)]
    assert got["bob"] == [("INSERT", 2), ("UPDATE", 2), ("DELETE", 2)]


async def test_update_moving_a_row_out_of_view_sends_nothing(start_server, db):
    todos_table(db)
    server = await start(start_server, db)
    async with connect(server, tok=token(ALICE)) as alice:
        await subscribe(alice, "table:public.todos")
        await db.execute(f"INSERT INTO todos VALUES (1, '{ALICE}', 'mine')")
        assert (await recv(alice))["payload"]["type"] == "INSERT"
        await db.execute(f"UPDATE todos SET user_id = '{BOB}' WHERE id = 1")
        await nothing_arrives(alice, 0.5)


async def test_revoked_column_never_appears(start_server, db):
    db.sql(
        "CREATE TABLE profiles (id int PRIMARY KEY, name text, ssn text);"
        "GRANT SELECT (id, name) ON profiles TO authenticated;"
        "SELECT enable_realtime('profiles');"
    )
    server = await start(start_server, db)
    async with connect(server, tok=token("carol")) as ws:
        await subscribe(ws, "table:public.profiles")
        reply = await request(ws, type="subscribe", channel="table:public.profiles", filter="ssn=eq.1", ref="f")
        assert reply["code"] == "SUBSCRIPTION_FAILED" and "ssn" in reply["message"]
        await db.execute("INSERT INTO profiles VALUES (1, 'Carol', '123-45-6789')")
        await db.execute("UPDATE profiles SET name = 'C.'")
        await db.execute("DELETE FROM profiles")
        messages = [await recv(ws) for _ in range(3)]
    raw = orjson.dumps(messages).decode()
    assert "ssn" not in raw and "123-45-6789" not in raw
    assert messages[1]["payload"]["old_record"] == {"id": 1, "name": "Carol"}
    assert messages[1]["payload"]["record"] == {"id": 1, "name": "C."}


async def test_anonymous_identities_use_the_anon_role_and_its_policies(start_server, db):
    db.sql(
        "CREATE TABLE posts (id int PRIMARY KEY, public boolean);"
        "ALTER TABLE posts ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY everyone_reads_public ON posts FOR SELECT TO anon USING (public);"
        "CREATE POLICY members_read_all ON posts FOR SELECT TO authenticated USING (true);"
        "GRANT SELECT ON posts TO anon, authenticated;"
        "SELECT enable_realtime('posts');"
    )
    server = await start(start_server, db)
    async with connect(server) as anonymous, connect(server, tok=token("dave")) as member:
        await subscribe(anonymous, "table:public.posts")
        await subscribe(member, "table:public.posts")
        await db.execute("INSERT INTO posts VALUES (1, false), (2, true)")
        assert [(await recv(member))["payload"]["record"]["id"] for _ in range(2)] == [1, 2]
        assert (await recv(anonymous))["payload"]["record"]["id"] == 2
        await nothing_arrives(anonymous)


async def test_bypassrls_role_and_table_without_rls_see_every_row(start_server, db, pg_admin):
    todos_table(db)
    db.sql("CREATE TABLE notes (id int PRIMARY KEY); GRANT SELECT ON notes TO authenticated;")
    db.sql("SELECT enable_realtime('notes')")
    server = await start(start_server, db)
    async with connect(server, tok=token(ALICE)) as ws:
        await subscribe(ws, "table:public.notes")
        await db.execute("INSERT INTO notes VALUES (1)")
        assert (await recv(ws))["payload"]["record"] == {"id": 1}


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ("status=eq.open", [1]),
        ("status=neq.open", [2, 3]),
        ("priority=gt.5", [2]),
        ("priority=lte.5", [1, 3]),
        ("status=in.(open,late)", [1, 3]),
        ("owner=is.null", [3]),
        ("done=is.true", [2]),
    ],
)
async def test_filters(start_server, db, flt, expected):
    db.sql(
        "CREATE TABLE tasks (id int PRIMARY KEY, status text, priority int, owner text, done boolean);"
        "GRANT SELECT ON tasks TO anon; SELECT enable_realtime('tasks');"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.tasks", filter=flt)
        await db.execute(
            "INSERT INTO tasks VALUES (1, 'open', 3, 'x', false), (2, 'closed', 9, 'y', true),"
            " (3, 'late', 5, null, false)"
        )
        got = [(await recv(ws))["payload"]["record"]["id"] for _ in expected]
        await nothing_arrives(ws)
    assert got == expected


async def test_filter_on_delete_uses_the_old_record_and_event_option(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users", event="DELETE", filter="name=eq.gone")
        await db.execute("INSERT INTO users VALUES (1, 'gone', null), (2, 'kept', null)")
        await db.execute("DELETE FROM users")
        message = await recv(ws)
        await nothing_arrives(ws)
    assert message["payload"]["type"] == "DELETE"
    assert message["payload"]["old_record"]["id"] == 1


async def test_a_one_megabyte_row_arrives_whole_and_numbers_keep_their_digits(start_server, db):
    db.sql(
        "CREATE TABLE blobs (id bigint PRIMARY KEY, body text, amount numeric, big bigint);"
        "GRANT SELECT ON blobs TO anon; SELECT enable_realtime('blobs');"
    )
    server = await start(start_server, db, realtime={"write_buffer_size": 10})
    body = "x" * (1024 * 1024)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.blobs")
        await db.execute(
            "INSERT INTO blobs VALUES (9007199254740993, $1, 123456789012345678901234567890.000000000000001, "
            "9223372036854775807)",
            body,
        )
        with trio.fail_after(10):
            raw = await ws.get_message()
    assert len(raw) > 1024 * 1024
    assert '"id":9007199254740993' in raw
    assert '"amount":123456789012345678901234567890.000000000000001' in raw
    assert '"big":9223372036854775807' in raw
    assert orjson.loads(raw)["payload"]["record"]["body"] == body


async def test_truncate_reaches_star_and_truncate_subscribers(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as star, connect(server) as only_inserts, connect(server) as filtered:
        await subscribe(star, "table:public.users")
        await subscribe(only_inserts, "table:public.users", event="INSERT")
        await subscribe(filtered, "table:public.users", event="TRUNCATE", filter="id=eq.1")
        await db.execute("TRUNCATE users")
        for ws in (star, filtered):
            payload = strip_extensions(await recv(ws))["payload"]
            assert payload == {"type": "TRUNCATE", "schema": "public", "table": "users"}
        await nothing_arrives(only_inserts)


async def test_disable_realtime_ends_subscriptions_with_subscription_failed(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.users")
        await db.execute("SELECT disable_realtime('users')")
        message = await recv(ws)
        assert message["type"] == "error" and message["code"] == "SUBSCRIPTION_FAILED"
        assert message["channel"] == "table:public.users"
        assert "enable_realtime('public.users')" in message["message"]
        await db.execute("INSERT INTO users VALUES (5, 'after', null)")
        await nothing_arrives(ws)
        assert server.hub.statistics().subscriptions["table"] == 0


async def test_auth_refresh_reauthorizes_table_subscriptions(start_server, db):
    db.sql(
        "CREATE ROLE fluxrt_test_reader NOLOGIN;"
        "CREATE TABLE ledger (id int PRIMARY KEY); GRANT SELECT ON ledger TO authenticated;"
        "SELECT enable_realtime('ledger');"
    )
    try:
        server = await start(start_server, db, auth={"roles": ("fluxrt_test_reader",)})
        async with connect(server, tok=token("erin")) as ws:
            await subscribe(ws, "table:public.ledger")
            reply = await request(ws, type="auth", token=token("erin", role="fluxrt_test_reader"))
            assert reply == {"type": "ack", "status": "authorized"}
            dropped = await recv(ws)
            assert dropped["code"] == "FORBIDDEN" and dropped["channel"] == "table:public.ledger"
            await db.execute("INSERT INTO ledger VALUES (1)")
            await nothing_arrives(ws)
    finally:
        db.sql("DROP ROLE IF EXISTS fluxrt_test_reader")


async def test_a_role_not_named_in_the_configuration_is_forbidden(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with connect(server, tok=token("root", role="postgres")) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.users")
    assert reply["code"] == "FORBIDDEN"
    assert "auth.roles" in reply["message"]


async def test_a_policy_that_raises_withholds_that_identity_only(start_server, db):
    db.sql(
        "CREATE TABLE fragile (id int PRIMARY KEY, owner text);"
        "ALTER TABLE fragile ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY p ON fragile FOR SELECT USING ("
        "  CASE WHEN auth.jwt() ->> 'sub' = 'breaker' THEN length(owner) / 0 = 1 ELSE true END);"
        "GRANT SELECT ON fragile TO authenticated; SELECT enable_realtime('fragile');"
    )
    server = await start(start_server, db)
    async with connect(server, tok=token("breaker")) as breaker, connect(server, tok=token("fine")) as fine:
        await subscribe(breaker, "table:public.fragile")
        await subscribe(fine, "table:public.fragile")
        await db.execute("INSERT INTO fragile VALUES (1, 'x')")
        first = await recv(fine)
        assert first.get("payload", {}).get("record", {}).get("id") == 1, first
        error = await recv(breaker)
        assert error["code"] == "CHANGES_MISSED" and "policy raised an error" in error["message"]
        # What the policy said stays in the server's log: policy code may reveal more than the row would.
        assert "division by zero" not in error["message"]
        await db.execute("INSERT INTO fragile VALUES (2, 'y')")
        assert (await recv(fine))["payload"]["record"]["id"] == 2
