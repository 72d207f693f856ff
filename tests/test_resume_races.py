"""Resume for table channels against what a client can do around a replay: subscribe again (with or without
`since`, once or twice), a position from the future or of a table dropped and created again, and positions only as
the server writes them (found by the tests of test_resume_tables.py's author, each a bug fixed)."""

import itertools

import pytest
import trio

from fluxrt_trio.protocol.positions import TablePosition

from .support.clients import connect, recv, request, send, subscribe
from .support.config import token
from .support.servers import start
from .test_resume_tables import ALICE, CHANNEL, LIMITS, TABLE, _row, position_now, position_of_next_change, resubscribed


async def test_a_superseded_subscription_gets_nothing_of_its_replay(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db, realtime=LIMITS)
    since = await position_now(server, db)
    async with connect(server, tok=token(ALICE)) as witness:
        await subscribe(witness, CHANNEL)
        await db.execute("INSERT INTO items (id, user_id) SELECT i, $1::uuid FROM generate_series(1, 8000) i", ALICE)
        # Every row read and delivered live before the client comes back: what it gets after is replay or new.
        with trio.fail_after(30):
            while _row(await recv(witness)) != 8000:
                pass
    async with connect(server, tok=token(ALICE)) as ws:
        # Resume, think better of it, start afresh: after the unsubscribe's ack nothing of the replay may come,
        # and a subscribe without since gets only what commits after its ack.
        await send(ws, type="subscribe", channel=CHANNEL, since=since)
        await send(ws, type="unsubscribe", channel=CHANNEL)
        await send(ws, type="subscribe", channel=CHANNEL)
        got = []
        with trio.fail_after(10):
            while sum(m["type"] == "ack" for m in got) < 3:
                got.append(await recv(ws))
        await db.execute("INSERT INTO items (id, user_id) VALUES (99999, $1)", ALICE)
        with trio.fail_after(10):
            while not got or got[-1]["type"] != "broadcast" or _row(got[-1]) != 99999:
                got.append(await recv(ws))
    unsubscribed = next(k for k, m in enumerate(got) if m.get("status") == "unsubscribed")
    after = [_row(m) for m in got[unsubscribed:] if m["type"] == "broadcast"]
    assert after == [99999], (len(after), after[:5])


async def test_subscribing_twice_with_the_same_since_replays_each_event_once_per_subscribe(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db, realtime=LIMITS)
    since = await position_now(server, db)
    await db.execute("INSERT INTO items (id, user_id) SELECT i, $1::uuid FROM generate_series(1, 20) i", ALICE)
    async with connect(server, tok=token(ALICE)) as ws:
        await send(ws, type="subscribe", channel=CHANNEL, since=since)
        await send(ws, type="subscribe", channel=CHANNEL, since=since)
        rows = []
        with trio.fail_after(10):
            while len(rows) < 2 or rows[-1] != 20:
                message = await recv(ws)
                rows.append(_row(message) if message["type"] == "broadcast" else message["type"])
    # Each subscribe's replay in order, whole (the second one's may come alone): never one event twice in a row.
    events = [r for r in rows if r != "ack"]
    assert all(a != b for a, b in itertools.pairwise(events)), rows


async def test_resubscribing_with_since_on_a_connection_gets_no_frame_planned_for_its_previous_subscription(
    start_server, db
):
    db.sql(TABLE)
    # Deciding who may see a row whose body is 'slow' takes half a second: its window is in flight meanwhile.
    db.sql(
        "ALTER POLICY mine ON items USING (user_id = (SELECT auth.uid())"
        " AND (body IS DISTINCT FROM 'slow' OR pg_sleep(0.5) IS NOT NULL))"
    )
    server = await start(start_server, db, realtime=LIMITS)
    async with connect(server, tok=token(ALICE)) as ws:
        await subscribe(ws, CHANNEL)
        since = await position_of_next_change(ws, db)
        await db.execute("INSERT INTO items (id, user_id, body) VALUES (2, $1, 'slow')", ALICE)
        with trio.fail_after(5):
            while not await db.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"):
                await trio.sleep(0.01)
        # Row 2's live delivery (planned for the first subscription) is being decided: resume from before it.
        assert await request(ws, type="unsubscribe", channel=CHANNEL) == {
            "type": "ack",
            "channel": CHANNEL,
            "status": "unsubscribed",
        }
        ack = await request(ws, type="subscribe", channel=CHANNEL, since=since)
        assert ack["recovered"] is True, ack
        await db.execute("INSERT INTO items (id, user_id) VALUES (3, $1)", ALICE)
        rows = []
        with trio.fail_after(10):
            while not rows or rows[-1] != 3:
                message = await recv(ws)
                rows.append(_row(message) if message["type"] == "broadcast" else message)
    assert rows == [2, 3]


def beyond(position: str) -> str:
    version, relid, prev, cur, _ = position.split("~")
    xmin, xmax, _ = cur.split(":")
    # A position no node can have written yet: a snapshot 100,000 transactions ahead of the database.
    return f"{version}~{relid}~{prev}~{xmin}:{int(xmax) + 100_000}:~0"


async def test_a_position_from_the_future_is_not_recovered(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db)
    since = beyond(await position_now(server, db))
    # Today: recovered true, 10 s without live changes, CHANGES_MISSED (the row committed after the ack is lost).
    assert await resubscribed(server, db, since) is False


async def test_a_table_dropped_and_created_again_right_after_a_resume_check_is_not_recovered(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db)
    old = await position_now(server, db)
    await db.execute("INSERT INTO items (id, user_id) SELECT i, $1::uuid FROM generate_series(1, 5) i", ALICE)
    async with connect(server, tok=token(ALICE)) as ws:
        assert (await request(ws, type="subscribe", channel=CHANNEL, since=old))["recovered"] is True
    # Within RETAINED_FOR (0.5 s) of that check the table's oid may come from the check's cache: the ack may then
    # say recovered, but the replay asks the oid afresh and, finding another table, tells CHANGES_MISSED before
    # anything of the old table. Either way the client refetches and gets nothing of the dropped table.
    await db.execute("DROP TABLE items;" + TABLE)
    async with connect(server, tok=token(ALICE)) as ws:
        ack = await request(ws, type="subscribe", channel=CHANNEL, since=old)
        if ack["recovered"]:
            notice = await recv(ws)
            assert notice["type"] == "error" and notice["code"] == "CHANGES_MISSED", notice
    assert await resubscribed(server, db, old) is False


@pytest.mark.parametrize(
    "text",
    [
        "t1~ 16384~10:20:12~20:25:22~7",
        "t1~16384~10:20:12~20:25:22~+7",
        "t1~16384~10:20:12~20:25:22~0_7",
        "t1~16384~10:20:12~20:25:22~\u0667",
        "t1~16384~10:20:15,12~20:25:22~7",
        "t1~16384~10:20:12,12~20:25:22~7",
    ],
)
def test_a_position_is_only_what_text_writes_within_what_postgresql_holds(text):
    assert TablePosition.parse(text) is None
