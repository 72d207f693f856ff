"""`realtime.send(channel, payload)`: a broadcast from SQL, delivered when and only when its transaction commits, in
commit order, through a listener fault, with a position to resume from (docs/protocol.md, "Broadcast from the
database and from backends"). Real PostgreSQL, real server, real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import attrs
import orjson
import pytest
import trio

from fluxrt_trio.postgres.migrate import migrate
from fluxrt_trio.protocol.changes import SEND, LoggedBroadcastError, RowChange, logged_broadcast
from fluxrt_trio.protocol.channels import ChannelError, parse_channel

from .support.clients import connect, raw_connect, recv, subscribe
from .support.database import in_asyncio, terminate_changefeed
from .support.servers import start
from .support.waiting import nothing_arrives

NEWS = "broadcast:news"


def sql_error(db: Any, sql: str, *args: Any) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        db.sql(sql, *args)
    return caught.value


# ---- the function, in SQL --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channel",
    ["table:public.users", "presence:room", "news", "broadcast:", "broadcast:a b", "broadcast:" + "x" * 256],
)
def test_a_channel_that_is_not_a_broadcast_topic_raises_in_the_callers_transaction(db, channel):
    error = sql_error(db, "SELECT realtime.send($1, '{}')", channel)
    assert error.sqlstate == "22023"
    assert "expected broadcast:{topic}" in str(error)
    assert db.sql("SELECT count(*) AS n FROM realtime.changes")[0]["n"] == 0


def test_the_sql_channel_rule_is_the_servers(db):
    """Every character the server refuses in a topic, and its neighbours, is judged the same by realtime.send:
    nothing is sent that no client could subscribe to."""
    refused = [*range(0x01, 0x21), *range(0x7F, 0xA1), 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F]
    probes = sorted({*refused, 0x205F, 0x3000, 0x21, 0x7E, 0xA1, 0x167F, 0x1681, 0x200B, 0x2030, 0x3001, 0x1F600})
    channels = [f"broadcast:a{chr(c)}b" for c in probes]
    for channel in channels:
        try:
            parse_channel(channel)
            server_accepts = True
        except ChannelError:
            server_accepts = False
        try:
            db.sql("SELECT realtime.send($1, '1')", channel)
            sql_accepts = True
        except asyncpg.PostgresError:
            sql_accepts = False
        assert sql_accepts == server_accepts, (hex(ord(channel[-2])), sql_accepts, server_accepts)


def test_a_null_payload_raises_and_a_json_null_is_sent(db):
    error = sql_error(db, "SELECT realtime.send('broadcast:x', NULL)")
    assert error.sqlstate == "22004" and "'null'::jsonb" in str(error)
    db.sql("SELECT realtime.send('broadcast:x', 'null')")
    assert db.sql("SELECT new_record->'payload' AS p FROM realtime.changes")[0]["p"] == "null"


async def test_a_payload_over_max_message_size_raises_naming_both_sizes(db):
    async def configure() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            await migrate(conn, max_message_size=100)
        finally:
            await conn.close()

    await in_asyncio(configure)
    db.sql("SELECT realtime.send('broadcast:x', to_jsonb(repeat('x', 98)))")
    error = sql_error(db, "SELECT realtime.send('broadcast:x', to_jsonb(repeat('x', 99)))")
    assert error.sqlstate == "54000"
    assert "101 bytes, over realtime.max_message_size (100 bytes)" in str(error)


async def test_the_servers_max_message_size_is_recorded_at_start_and_on_reload(start_server, db):
    server = await start(start_server, db, realtime={"max_message_size": 1000})
    big = "SELECT realtime.send('broadcast:x', to_jsonb(repeat('x', 1500)))"
    with pytest.raises(asyncpg.PostgresError, match=r"over realtime.max_message_size \(1000 bytes\)"):
        await db.execute(big)
    config = server.config
    server.reload(attrs.evolve(config, realtime=attrs.evolve(config.realtime, max_message_size=2000)))
    with trio.fail_after(10):
        while (await db.execute("SELECT max_message_size FROM realtime.settings"))[0][0] != 2000:
            await trio.sleep(0.02)
    await db.execute(big)


def test_only_a_role_granted_execute_may_send(db):
    db.sql("DROP ROLE IF EXISTS send_app; CREATE ROLE send_app")
    try:
        error = sql_error(db, "SET ROLE send_app; SELECT realtime.send('broadcast:x', '1')")
        assert isinstance(error, asyncpg.InsufficientPrivilegeError)
        db.sql("GRANT EXECUTE ON FUNCTION realtime.send(text, jsonb) TO send_app")
        db.sql("SET ROLE send_app; SELECT realtime.send('broadcast:x', '1')")
        assert db.sql("SELECT count(*) AS n FROM realtime.changes WHERE op = 'SEND'")[0]["n"] == 1
    finally:
        db.sql("DROP OWNED BY send_app; DROP ROLE send_app")


# ---- reading a SEND row, as a value ----------------------------------------------------------------------------


def row(new: Any, op: str = SEND) -> RowChange:
    return RowChange(7, None, 0, "realtime", "send", op, None, new)  # type: ignore[arg-type]


def test_a_send_row_gives_its_channel_and_payload():
    assert logged_broadcast(row({"channel": NEWS, "payload": [1]})) == (NEWS, [1])
    assert logged_broadcast(row({"channel": NEWS, "payload": None})) == (NEWS, None)


@pytest.mark.parametrize(
    "new,op",
    [
        ({"channel": NEWS, "payload": 1}, "UNREADABLE"),
        ({"channel": NEWS}, SEND),
        ({"channel": "presence:room", "payload": 1}, SEND),
        ({"channel": "broadcast:a b", "payload": 1}, SEND),
        ({"channel": 5, "payload": 1}, SEND),
        (None, SEND),
    ],
)
def test_a_row_realtime_send_would_not_write_is_refused(new, op):
    with pytest.raises(LoggedBroadcastError, match="change 7"):
        logged_broadcast(row(new, op))


# ---- delivery ----------------------------------------------------------------------------------------------------


async def test_a_committed_send_reaches_every_subscriber_once_as_a_broadcast_with_an_id(start_server, db):
    server = await start(start_server, db)
    async with connect(server) as alice, connect(server) as bob:
        await subscribe(alice, NEWS)
        await subscribe(bob, NEWS)
        await db.execute("BEGIN; SELECT realtime.send('broadcast:news', '{\"shipped\": 42}'); COMMIT")
        for ws in (alice, bob):
            message = await recv(ws)
            assert message == {"type": "broadcast", "channel": NEWS, "payload": {"shipped": 42}, "id": message["id"]}
            assert isinstance(message["id"], str)
            await nothing_arrives(ws, 0.2)


async def test_a_rolled_back_send_is_delivered_nowhere(start_server, db):
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, NEWS)
        await db.execute("BEGIN; SELECT realtime.send('broadcast:news', '\"rolled back\"'); ROLLBACK")
        await db.execute("SELECT realtime.send('broadcast:news', '\"committed\"')")
        assert (await recv(ws))["payload"] == "committed"
        await nothing_arrives(ws, 0.2)


SENDS = 1000
WRITERS = 8


async def numbered_sends(dsn: str, total: int, writers: int) -> None:
    """`total` sends from `writers` connections, each numbered under a row lock: commit order is number order."""

    async def writer(conn: asyncpg.Connection) -> None:
        while True:
            async with conn.transaction():
                n = await conn.fetchval("UPDATE send_counter SET n = n + 1 RETURNING n")
                if n > total:
                    return
                await conn.execute("SELECT realtime.send('broadcast:news', jsonb_build_object('n', $1::int))", n)

    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    try:
        await asyncio.gather(*(writer(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()


async def received_numbers(ws: Any, total: int) -> list[int]:
    numbers: list[int] = []
    with trio.fail_after(60):
        while len(numbers) < total:
            numbers.append((await recv(ws, timeout=30))["payload"]["n"])
    await nothing_arrives(ws, 0.3)
    return numbers


@pytest.mark.parametrize("listener_faults", [0, 5], ids=["steady", "changefeed-killed-5-times"])
async def test_sends_from_eight_writers_arrive_in_commit_order_each_once(start_server, db, listener_faults):
    db.sql("CREATE TABLE send_counter (n int NOT NULL); INSERT INTO send_counter VALUES (0)")
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, NEWS)
        numbers: list[int] = []
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                numbers.extend(await received_numbers(ws, SENDS))

            nursery.start_soon(receive)
            nursery.start_soon(in_asyncio, numbered_sends, db.dsn, SENDS, WRITERS)
            for _ in range(listener_faults):
                await trio.sleep(0.15)
                await terminate_changefeed(db)
        assert numbers == list(range(1, SENDS + 1))


async def test_a_client_that_missed_sends_resumes_from_its_last_id(start_server, db):
    server = await start(start_server, db)
    client = await raw_connect(server)
    client.send(type="subscribe", channel=NEWS)
    assert (await client.next_message())["status"] == "subscribed"
    await db.execute("SELECT realtime.send('broadcast:news', '0')")
    last = (await client.next_message())["id"]
    client.close()
    await db.execute("SELECT realtime.send('broadcast:news', to_jsonb(n)) FROM generate_series(1, 5) n")
    async with connect(server) as ws:
        # The sends are delivered once the node has read them: a live observer tells when.
        await subscribe(ws, NEWS)
        await db.execute("SELECT realtime.send('broadcast:news', '6')")
        while (await recv(ws))["payload"] != 6:
            pass
    again = await raw_connect(server)
    again.send(type="subscribe", channel=NEWS, since=last)
    ack = await again.next_message()
    assert ack["recovered"] is True, ack
    assert [(await again.next_message())["payload"] for _ in range(6)] == [1, 2, 3, 4, 5, 6]
    again.close()


async def test_the_payload_is_delivered_as_sent_with_unicode_and_nesting(start_server, db):
    server = await start(start_server, db)
    payload = {"text": "héllo ✓ \u2028", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    async with connect(server) as ws:
        await subscribe(ws, NEWS)
        await db.execute("SELECT realtime.send('broadcast:news', $1::jsonb)", orjson.dumps(payload).decode())
        assert (await recv(ws))["payload"] == payload
