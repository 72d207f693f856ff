"""Resume on table channels (docs/protocol.md "Resume"), against a real PostgreSQL over real sockets: a client whose
socket dies reconnects with `since` = the last payload.id it processed and gets every event it missed once, in
order, under the same row-level security, column privileges, `event` and `filter` as live delivery (judged now),
then the live stream; positions that cannot be replayed get `recovered: false` and the live stream; the ack is a
barrier for what commits after it.

The sockets are killed, not closed: `abort` resets the TCP connection (SO_LINGER 0), so neither side sends a close
frame and whatever the client had not read yet is lost with it, as when a phone drops off the network."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import attrs
import orjson
import pytest
import trio
from wsproto.events import CloseConnection, Message

from fluxrt_trio.postgres import changelog
from fluxrt_trio.protocol.positions import TablePosition
from fluxrt_trio.server import Server

from .pg import ScratchDatabase
from .process import Remote
from .support.clients import RawClient, connect, raw_connect, recv, request, send, subscribe
from .support.config import token
from .support.database import in_asyncio
from .support.messages import summary
from .support.servers import start

ALICE, BOB = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
USERS = {"alice": ALICE, "bob": BOB}
CHANNEL = "table:public.items"
TABLE = """
CREATE TABLE items (id int PRIMARY KEY, user_id uuid, v int NOT NULL DEFAULT 0, body text, secret int);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON items FOR SELECT USING (user_id = (SELECT auth.uid()));
GRANT SELECT ON items TO authenticated;
SELECT enable_realtime('items');
"""
NO_SECRET = "REVOKE SELECT ON items FROM authenticated; GRANT SELECT (id, user_id, v, body) ON items TO authenticated"
ROWS = 1000
WRITERS = 4
MARKERS = {"alice": 100_001, "bob": 100_002}
"""a row each user inserts last: once it arrives, everything committed before it has (the replay comes first)"""
LIMITS = {"message_rate_limit": 1_000_000, "max_connections_per_user": 100}

Target = Server | Remote
Event = tuple[str, int, int]
"""(type, row id, v) of a change as the client processed it"""


def abort(client: RawClient) -> None:
    """Kill the client's TCP connection: a reset, no close frame, unread data lost."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


async def next_message(client: RawClient) -> dict[str, Any]:
    """The next whole message (RawClient.next_message takes the part of a message that one read brought for all of
    it; under load a long replay's messages arrive split across reads)."""
    parts = []
    while True:
        event = await client.next_event(timeout=10)
        if isinstance(event, CloseConnection):
            raise AssertionError(f"closed {event.code} {event.reason}")
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                return orjson.loads("".join(parts))


def owners(rows: int, seed: int = 14) -> dict[int, str]:
    """Who owns each of rows 1..rows (fixed, so a failure can be replayed)."""
    rng = random.Random(seed)
    return {row: rng.choice(["alice", "bob"]) for row in range(1, rows + 1)}


def expected_events(owned: dict[int, str], who: str) -> list[Event]:
    """Every change of `who`'s rows, each row inserted with v=0 then updated to v=1."""
    return [(op, row, v) for row, owner in owned.items() if owner == who for op, v in (("INSERT", 0), ("UPDATE", 1))]


@attrs.define
class Writers:
    """WRITERS connections, each committing its share of the rows `owned` one transaction at a time: the transaction
    that inserts a row (v=0) also sets v=1 on the row it inserted before (its last row gets a transaction of its
    own), so each row's two changes commit in that order, in different transactions, under different writers'
    interleavings."""

    dsn: str
    owned: dict[int, str]
    pause: float = 0.004
    done: threading.Event = attrs.Factory(threading.Event)
    committed: int = 0

    async def _writer(self, index: int) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            previous = None
            for row in range(index + 1, len(self.owned) + 1, WRITERS):
                async with conn.transaction():
                    await conn.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", row, USERS[self.owned[row]])
                    if previous is not None:
                        await conn.execute("UPDATE items SET v = 1 WHERE id = $1", previous)
                self.committed += 1
                previous = row
                await asyncio.sleep(self.pause)
            if previous is not None:
                await conn.execute("UPDATE items SET v = 1 WHERE id = $1", previous)
        finally:
            await conn.close()

    async def _all(self) -> None:
        try:
            async with asyncio.timeout(40):
                await asyncio.gather(*(self._writer(i) for i in range(WRITERS)))
        finally:
            self.done.set()

    async def run(self) -> None:
        await in_asyncio(self._all)

    def writing(self) -> bool:
        return not self.done.is_set()


@attrs.define
class Resumer:
    """One user's client: subscribes, processes events (its position is the last payload.id it processed), and
    while the writers run has its socket killed after a few events (sometimes right after sending the subscribe,
    sometimes in the middle of a replay), then reconnects with `since`, to each target in turn."""

    who: str
    targets: Sequence[Target]
    rng: random.Random
    events: list[Event] = attrs.Factory(list)
    position: str | None = None
    kills: int = 0
    kills_while_writing: int = 0
    others: list[dict[str, Any]] = attrs.Factory(list)

    def _killed(self, client: RawClient, writing: bool) -> None:
        abort(client)
        self.kills += 1
        self.kills_while_writing += writing

    async def run(self, writing: Callable[[], bool], *, task_status: trio.TaskStatus[None]) -> None:
        """Until this user's marker row arrives; started once subscribed (the writers may begin)."""
        for attempt in itertools.count():
            target = self.targets[attempt % len(self.targets)]
            client = await raw_connect(target, query=f"token={token(USERS[self.who])}")
            subscribe = {"type": "subscribe", "channel": CHANNEL}
            if self.position is not None:
                subscribe["since"] = self.position
            client.send(**subscribe)
            now_writing = writing()
            if self.position is not None and now_writing and self.rng.random() < 0.1:
                self._killed(client, now_writing)
                continue
            ack = await next_message(client)
            assert ack == {
                "type": "ack",
                "channel": CHANNEL,
                "status": "subscribed",
                **({} if self.position is None else {"recovered": True}),
            }, ack
            if attempt == 0:
                task_status.started()
            budget = self.rng.choice([1, 2, 5, self.rng.randint(10, 150)]) if writing() else None
            while budget is None or budget > 0:
                message = await next_message(client)
                if message["type"] != "broadcast":
                    self.others.append(message)
                    continue
                payload = message["payload"]
                record = payload["record"]
                self.position = payload["id"]
                if record["id"] == MARKERS[self.who]:
                    client.close()
                    return
                self.events.append((payload["type"], record["id"], record["v"]))
                if budget is not None:
                    budget -= 1
            self._killed(client, now_writing)

    def check(self, owned: dict[int, str]) -> None:
        """Every change of this user's rows once, each row's in commit order, nothing of the other user's."""
        assert self.others == []
        expected = expected_events(owned, self.who)
        foreign = [e for e in self.events if owned.get(e[1]) != self.who]
        assert foreign == [], foreign[:5]
        repeated = [e for e, n in collections.Counter(self.events).items() if n > 1]
        assert repeated == [], repeated[:5]
        missing = sorted(set(expected) - set(self.events))
        assert missing == [], f"{len(missing)} missing, first {missing[:5]}"
        assert len(self.events) == len(expected)
        at = {e: k for k, e in enumerate(self.events)}
        backwards = [row for _, row, _ in expected if at[("UPDATE", row, 1)] < at[("INSERT", row, 0)]]
        assert backwards == [], backwards[:5]


async def killed_while_writing(
    db: ScratchDatabase, targets: Sequence[Target], seed: int, rows: int = ROWS
) -> dict[str, Resumer]:
    """Run the writers on `rows` rows, alice and bob each killed and resuming over `targets`, then the markers;
    check each."""
    owned = owners(rows)
    writers = Writers(db.dsn, owned)
    resumers = {who: Resumer(who, targets, random.Random(seed + n)) for n, who in enumerate(USERS)}
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            for resumer in resumers.values():
                await nursery.start(resumer.run, writers.writing)
            await writers.run()
            for who, row in MARKERS.items():
                await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", row, USERS[who])
    for resumer in resumers.values():
        resumer.check(owned)
        # The kills happened while rows were being written (not only once everything was in the log).
        assert resumer.kills_while_writing >= 3, resumer.kills_while_writing
    print(
        "\n"
        + ", ".join(f"{r.who}: {len(r.events)} events, {r.kills} kills" for r in resumers.values())
        + f"; {writers.committed} transactions"
    )
    return resumers


# ---- 1. a killed socket, 1,000 rows from 4 writers -------------------------------------------------------------


@pytest.mark.parametrize(("page", "rows"), [(changelog.PAGE, ROWS), (7, 400)], ids=["default page", "page of 7"])
async def test_a_killed_client_resumes_with_every_row_of_its_own_once_in_order(
    start_server, db, monkeypatch, page, rows
):
    # A page of 7 rows makes most windows come in several pages, so positions fall inside windows, and a replay
    # reads many pages (the changefeed and the replay read the same constant).
    monkeypatch.setattr(changelog, "PAGE", page)
    db.sql(TABLE)
    server = await start(start_server, db, realtime=LIMITS)
    await killed_while_writing(db, [server], seed=page, rows=rows)


# ---- 3. visibility, column privileges, event and filter, judged now -------------------------------------------


async def marker_reached(ws: Any, row: int, into: list[dict[str, Any]]) -> None:
    """Read `ws` until the change of row `row`, then until a pong (nothing else queued for it before)."""
    with trio.fail_after(10):
        while True:
            message = await recv(ws)
            into.append(message)
            if message["type"] == "broadcast" and _row(message) == row:
                break
        assert await request(ws, type="ping", ref="barrier") == {"type": "pong", "ref": "barrier"}


def _row(message: dict[str, Any]) -> int:
    payload = message["payload"]
    return (payload.get("record") or payload["old_record"])["id"]


async def last_position(ws: Any, row: int) -> str:
    """The position of row `row`'s change, the next thing `ws` receives."""
    message = await recv(ws)
    assert message["type"] == "broadcast" and _row(message) == row, message
    return message["payload"]["id"]


async def test_a_replay_judges_rows_policies_and_column_privileges_as_they_are_now(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db)
    positions = {}
    for who in USERS:
        async with connect(server, tok=token(USERS[who])) as ws:
            await subscribe(ws, CHANNEL)
            row = 1 if who == "alice" else 2
            await db.execute("INSERT INTO items (id, user_id, secret) VALUES ($1, $2, 7)", row, USERS[who])
            positions[who] = await last_position(ws, row)
    # While both are away: row 1 moves from alice to bob; row 3 is alice's, then a policy hides it from her; row
    # 4 is alice's and stays so; then authenticated loses the secret column.
    await db.execute(f"UPDATE items SET user_id = '{BOB}' WHERE id = 1")
    await db.execute(f"INSERT INTO items (id, user_id, body, secret) VALUES (3, '{ALICE}', 'later hidden', 7)")
    await db.execute(f"INSERT INTO items (id, user_id, body, secret) VALUES (4, '{ALICE}', 'kept', 7)")
    await db.execute(
        "ALTER POLICY mine ON items USING (user_id = (SELECT auth.uid()) AND body IS DISTINCT FROM 'later hidden');"
        + NO_SECRET
    )
    await db.execute(
        f"INSERT INTO items (id, user_id) VALUES ({MARKERS['alice']}, '{ALICE}'), ({MARKERS['bob']}, '{BOB}')"
    )
    got: dict[str, list[dict[str, Any]]] = {}
    for who in USERS:
        async with connect(server, tok=token(USERS[who])) as ws:
            ack = await subscribe(ws, CHANNEL, since=positions[who])
            assert ack["recovered"] is True
            got[who] = []
            await marker_reached(ws, MARKERS[who], got[who])
    assert [summary(m) for m in got["alice"]] == ["INSERT 4 -secret", f"INSERT {MARKERS['alice']} -secret"]
    # Bob could not see row 1 before it moved: its old image is not his to see.
    assert [summary(m) for m in got["bob"]] == ["UPDATE 1 -secret", f"INSERT {MARKERS['bob']} -secret"]


WORKLOAD = (
    f"INSERT INTO items (id, user_id, v, body) SELECT i, CASE WHEN i % 2 = 0 THEN '{ALICE}'::uuid ELSE '{BOB}' END,"
    " i % 4, CASE WHEN i % 3 = 0 THEN 'keep' ELSE 'drop' END FROM generate_series(10, 29) i",
    "UPDATE items SET v = v + 1 WHERE id % 3 = 1",
    f"UPDATE items SET user_id = '{BOB}' WHERE id = 10",
    f"UPDATE items SET user_id = '{ALICE}' WHERE id = 11",
    "UPDATE items SET body = 'keep' WHERE id IN (12, 13)",
    "DELETE FROM items WHERE id IN (14, 15, 16, 17)",
    "UPDATE items SET v = 3, body = 'keep' WHERE id IN (18, 19)",
    "TRUNCATE items",
    f"INSERT INTO items (id, user_id, v, body) VALUES (30, '{ALICE}', 1, 'keep'), (31, '{BOB}', 3, 'keep')",
)
OPTIONS = {
    "all": {},
    "inserts": {"event": "INSERT"},
    "updates": {"event": "UPDATE"},
    "deletes": {"event": "DELETE"},
    "truncates": {"event": "TRUNCATE"},
    "body=eq.keep": {"filter": "body=eq.keep"},
    "v=in.(1,3)": {"filter": "v=in.(1,3)"},
    "updates of v=gt.1": {"event": "UPDATE", "filter": "v=gt.1"},
}


@attrs.define
class Reader:
    """Everything one subscription receives, read in the background."""

    ws: Any
    got: list[dict[str, Any]] = attrs.Factory(list)

    async def pong(self) -> None:
        """Until the pong of a ping sent now: whatever was queued for the connection before has arrived."""
        await send(self.ws, type="ping", ref="barrier")
        with trio.fail_after(10):
            while not any(m.get("ref") == "barrier" for m in self.got):
                await trio.sleep(0.01)
        self.got = [m for m in self.got if m.get("ref") != "barrier"]

    async def until_row(self, row: int) -> None:
        with trio.fail_after(10):
            while not any(m["type"] == "broadcast" and _row_or_none(m) == row for m in self.got):
                await trio.sleep(0.01)


async def reading(server: Target, tok: str, options: dict[str, Any], *, task_status: trio.TaskStatus[Reader]) -> None:
    """Connect, subscribe with `options` (since included), then read until cancelled; started with the Reader."""
    async with connect(server, tok=tok) as ws:
        ack = await subscribe(ws, CHANNEL, **options)
        assert ack.get("recovered", True) is True, ack
        reader = Reader(ws)
        task_status.started(reader)
        while True:
            reader.got.append(orjson.loads(await ws.get_message()))


def _row_or_none(message: dict[str, Any]) -> int | None:
    payload = message["payload"]
    image = payload.get("record") or payload.get("old_record")
    return None if image is None else image["id"]


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message without its position and time, which differ between a replay's windows and live ones."""
    if message["type"] != "broadcast":
        return message
    payload = {k: v for k, v in message["payload"].items() if k not in ("id", "timestamp")}
    return {**message, "payload": payload}


async def test_event_filter_and_columns_select_the_replay_as_they_select_live_delivery(start_server, db):
    """For each user and set of options, a subscriber that stayed and one that resumes from before the workload
    receive the same changes (but for their positions): the replay is one more window, not a second path. The
    role may not read `secret` throughout."""
    db.sql(TABLE + NO_SECRET)
    server = await start(start_server, db, realtime=LIMITS)
    async with trio.open_nursery() as nursery:

        async def reader(who: str, name: str, **since: str) -> Reader:
            return await nursery.start(reading, server, token(USERS[who]), {**OPTIONS[name], **since})

        staying = {(who, name): await reader(who, name) for who in USERS for name in OPTIONS}
        probe = await reader("alice", "all")
        await db.execute(f"INSERT INTO items (id, user_id) VALUES (1, '{ALICE}')")
        await probe.until_row(1)
        since = probe.got[-1]["payload"]["id"]
        for statement in WORKLOAD:
            await db.execute(statement)
        await db.execute(f"INSERT INTO items (id, user_id, body) VALUES (1000, '{ALICE}', 'marker')")
        await probe.until_row(1000)
        for subscriber in staying.values():
            await subscriber.pong()
        resumed = {(who, name): await reader(who, name, since=since) for who in USERS for name in OPTIONS}
        # Behind the replays in the table's lane: once the probe has it, every replay was handed out.
        await db.execute(f"INSERT INTO items (id, user_id, body) VALUES (1001, '{ALICE}', 'marker')")
        await probe.until_row(1001)
        for subscriber in resumed.values():
            await subscriber.pong()
        nursery.cancel_scope.cancel()
    for key in staying:
        live = staying[key].got
        # What the stayer got after the position the others resume from (the probe's first change, row 1).
        live = live[next((k + 1 for k, m in enumerate(live) if m["payload"]["id"] == since), 0) :]
        replayed = [comparable(m) for m in resumed[key].got if _row_or_none(m) != 1001]
        assert replayed == [comparable(m) for m in live], key
    # The workload reached every kind of subscription (the comparison above is not between empty lists).
    assert all(staying[("alice", name)].got for name in OPTIONS)
    assert not any("secret" in (m["payload"].get("record") or {}) for r in resumed.values() for m in r.got)


# ---- 4. recovered: false, and the subscription stays ----------------------------------------------------------

OTHERS = (
    "CREATE TABLE others (id int PRIMARY KEY); GRANT SELECT ON others TO authenticated;"
    "SELECT enable_realtime('others');"
)
_rows = itertools.count(50_000)


async def position_of_next_change(ws: Any, db: ScratchDatabase, table: str = "items") -> str:
    row = next(_rows)
    columns = "(id, user_id) VALUES ($1, $2)" if table == "items" else "(id) VALUES ($1)"
    await db.execute(f"INSERT INTO {table} {columns}", row, *([ALICE] if table == "items" else []))
    return await last_position(ws, row)


async def position_now(server: Target, db: ScratchDatabase) -> str:
    """The position of a change committed now, as alice, subscribed to the table on a connection closed right after,
    receives it: what commits later is what she misses until she resumes from it."""
    async with connect(server, tok=token(ALICE)) as ws:
        await subscribe(ws, CHANNEL)
        return await position_of_next_change(ws, db)


async def resubscribed(server: Target, db: ScratchDatabase, since: Any) -> bool:
    """Subscribe alice with `since` on a fresh connection; whatever the ack says, the subscription must stand and
    the next change committed after the ack must be the next thing received. Returns the ack's `recovered`."""
    async with connect(server, tok=token(ALICE)) as ws:
        ack = await request(ws, type="subscribe", channel=CHANNEL, since=since)
        assert ack["type"] == "ack" and ack["status"] == "subscribed", ack
        row = next(_rows)
        await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", row, ALICE)
        message = await recv(ws)
        assert message["type"] == "broadcast" and _row(message) == row, message
        return ack["recovered"]


@pytest.mark.parametrize(
    "since",
    ["garbage", "", 12345, None, ["t1"], {"id": 1}, "t1~1~1:1:~1:1:~0"],
    ids=["garbage", "empty", "a number", "null", "a list", "an object", "an unknown table"],
)
async def test_a_malformed_position_is_not_recovered_and_the_live_stream_follows(start_server, db, since):
    db.sql(TABLE)
    server = await start(start_server, db)
    async with connect(server, tok=token(ALICE)) as ws:
        ack = await request(ws, type="subscribe", channel=CHANNEL, since=since)
        if since is None:
            # `since: null` is no position at all: a plain subscribe.
            assert ack == {"type": "ack", "channel": CHANNEL, "status": "subscribed"}
        else:
            assert ack == {"type": "ack", "channel": CHANNEL, "status": "subscribed", "recovered": False}
        row = next(_rows)
        await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", row, ALICE)
        message = await recv(ws)
        assert message["type"] == "broadcast" and _row(message) == row, message


async def test_a_position_of_another_table_is_not_recovered(start_server, db):
    db.sql(TABLE + OTHERS)
    server = await start(start_server, db)
    async with connect(server, tok=token(ALICE)) as ws:
        await subscribe(ws, CHANNEL)
        await subscribe(ws, "table:public.others")
        mine = await position_of_next_change(ws, db)
        theirs = await position_of_next_change(ws, db, "others")
    # The control: a position of this table is recovered.
    assert await resubscribed(server, db, mine) is True
    assert await resubscribed(server, db, theirs) is False


async def test_a_position_of_a_table_dropped_and_created_again_is_not_recovered(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db)
    old = await position_now(server, db)
    # Changes of the old table follow the position in the log: none of them may be replayed as the new one's.
    await db.execute("INSERT INTO items (id, user_id) SELECT i, $1::uuid FROM generate_series(1, 5) i", ALICE)
    await db.execute("DROP TABLE items;" + TABLE)
    assert await resubscribed(server, db, old) is False


async def test_a_position_older_than_retention_is_not_recovered(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db, database={"retention": 0.2})
    old = await position_now(server, db)
    prev = TablePosition.parse(old)
    assert prev is not None
    # What the client missed is written, then pruned: the horizon passes the position's snapshot.
    for row in range(50):
        await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", 10_000 + row, ALICE)
    with trio.fail_after(10):
        while not await db.execute(
            "SELECT 1 FROM realtime.pruned WHERE horizon > $1::text::xid8", str(prev.cut.prev.xmin)
        ):
            await trio.sleep(0.05)
    assert await resubscribed(server, db, old) is False


# ---- 5. the ack is a barrier ---------------------------------------------------------------------------------


@attrs.define
class Ticker:
    """Commits rows 1, 2, 3... into `ticks`, one per transaction, as fast as it can, until stopped; `committed` is
    the last id whose commit returned. Commit order is id order, so a subscriber's stream is the ids in order."""

    dsn: str
    stop: threading.Event = attrs.Factory(threading.Event)
    committed: int = 0

    async def _write(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            async with asyncio.timeout(40):
                while not self.stop.is_set():
                    await conn.execute("INSERT INTO ticks VALUES ($1)", self.committed + 1)
                    self.committed += 1
        finally:
            await conn.close()

    async def run(self) -> None:
        await in_asyncio(self._write)

    async def wait_for(self, n: int) -> None:
        with trio.fail_after(10):
            while self.committed < n:
                await trio.sleep(0.001)


TICKS = "table:public.ticks"


ROUNDS = (("new", False), ("new", True), ("kept", False))
"""where a subscriber subscribes (a new connection, or one that was subscribed and has just unsubscribed), and
whether with since"""


async def unsubscribed(ws: Any) -> list[dict[str, Any]]:
    """Unsubscribe from TICKS; what the subscription delivered before the unsubscribe was answered."""
    await send(ws, type="unsubscribe", channel=TICKS)
    delivered = []
    while (message := await recv(ws))["type"] == "broadcast":
        delivered.append(message)
    assert message == {"type": "ack", "channel": TICKS, "status": "unsubscribed"}, message
    return delivered


async def test_every_change_committed_after_the_ack_is_delivered(start_server, db):
    """While a writer commits in a tight loop, a client subscribes again and again: on a new connection, with and
    without `since`, and on a connection that was subscribed and has just unsubscribed. Without since: every row
    whose commit began after the ack was received arrives, in order. With since (the last row the client
    processed): exactly the rows after it, in order, none missing or repeated, across the replay and the live
    stream."""
    db.sql("CREATE TABLE ticks (id int PRIMARY KEY); GRANT SELECT ON ticks TO anon; SELECT enable_realtime('ticks')")
    server = await start(start_server, db, realtime=LIMITS)
    ticker = Ticker(db.dsn)
    total = 30
    done = 0
    async with trio.open_nursery() as nursery, connect(server) as kept:
        nursery.start_soon(ticker.run)
        await ticker.wait_for(1)
        position: str | None = None
        last = 0
        for where, resume in itertools.islice(itertools.cycle(ROUNDS), total):
            async with contextlib.AsyncExitStack() as stack:
                if where == "new":
                    ws = await stack.enter_async_context(connect(server))
                else:
                    ws = kept
                    await subscribe(ws, TICKS)
                    assert (await recv(ws))["type"] == "broadcast"
                    await unsubscribed(ws)
                await send(ws, type="subscribe", channel=TICKS, **({"since": position} if resume else {}))
                ack = await recv(ws)
                floor = ticker.committed
                assert ack == {
                    "type": "ack",
                    "channel": TICKS,
                    "status": "subscribed",
                    **({"recovered": True} if resume else {}),
                }, ack
                target = floor + 20
                await ticker.wait_for(target)
                ids: list[int] = []
                with trio.fail_after(10):
                    while not ids or ids[-1] < target:
                        message = await recv(ws)
                        assert message["type"] == "broadcast", message
                        ids.append(message["payload"]["record"]["id"])
                        position = message["payload"]["id"]
                if resume:
                    assert ids == list(range(last + 1, ids[-1] + 1)), (where, last, ids[:10])
                else:
                    assert ids == sorted(set(ids)), (where, ids[:10])
                    # The row whose commit returned last before the ack may have committed before it or after.
                    assert set(range(floor + 2, target + 1)) <= set(ids), (where, floor, ids[:10])
                last = ids[-1]
                if where == "kept":
                    await unsubscribed(ws)
                done += 1
        ticker.stop.set()
    assert done == total


# ---- 6. replays longer than a page ----------------------------------------------------------------------------


async def test_a_replay_of_more_than_a_page_of_rows_arrives_complete_and_in_order(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db, realtime=LIMITS)
    since = await position_now(server, db)
    # 12,000 rows in three transactions, half alice's: the replay reads three pages of 5,000 from the log.
    for first in (1, 4001, 8001):
        await db.execute(
            "INSERT INTO items (id, user_id) SELECT i, CASE WHEN i % 2 = 0 THEN $2::uuid ELSE $3::uuid END"
            " FROM generate_series($1::int, $1::int + 3999) i",
            first,
            ALICE,
            BOB,
        )
    await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", MARKERS["alice"], ALICE)
    async with connect(server, tok=token(ALICE)) as ws:
        ack = await subscribe(ws, CHANNEL, since=since)
        assert ack["recovered"] is True
        rows: list[int] = []
        with trio.fail_after(20):
            while not rows or rows[-1] != MARKERS["alice"]:
                message = await recv(ws)
                assert message["type"] == "broadcast", message
                rows.append(_row(message))
    assert rows == [*range(2, 12_001, 2), MARKERS["alice"]]


async def test_a_replay_of_more_than_a_page_of_bytes_arrives_complete_and_in_order(start_server, db):
    db.sql(TABLE)
    server = await start(start_server, db, realtime=LIMITS)
    since = await position_now(server, db)
    # 24 rows of 1 MiB in one transaction: the replay reads the window in pages of at most PAGE_BYTES.
    big = 24
    assert big * 2**20 > 2 * changelog.PAGE_BYTES
    await db.execute(
        "INSERT INTO items (id, user_id, body)"
        " SELECT i, $1::uuid, repeat('x', 1048576) FROM generate_series(1, $2::int) i",
        ALICE,
        big,
    )
    await db.execute("INSERT INTO items (id, user_id) VALUES ($1, $2)", MARKERS["alice"], ALICE)
    async with connect(server, tok=token(ALICE)) as ws:
        ack = await subscribe(ws, CHANNEL, since=since)
        assert ack["recovered"] is True
        rows: list[int] = []
        with trio.fail_after(30):
            while not rows or rows[-1] != MARKERS["alice"]:
                message = await recv(ws, timeout=20)
                assert message["type"] == "broadcast", message
                rows.append(_row(message))
                assert len(message["payload"]["record"]["body"] or "x" * 2**20) == 2**20
    assert rows == [*range(1, big + 1), MARKERS["alice"]]
