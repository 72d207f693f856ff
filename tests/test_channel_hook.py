"""`realtime.authorize(channel, action)`: the optional hook guarding presence and broadcast channels."""

from __future__ import annotations

from .support.clients import connect, recv, request, send, subscribe
from .support.config import token
from .support.servers import start

HOOK = """
CREATE FUNCTION realtime.authorize(channel text, action text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE action
        WHEN 'subscribe' THEN channel NOT LIKE '%:staff-%' OR auth.role() = 'authenticated'
        WHEN 'broadcast' THEN auth.jwt() ->> 'sub' = 'alice'
        WHEN 'track' THEN current_user = 'authenticated'
    END
$$;
"""


async def test_hook_guards_subscribe_broadcast_and_track(start_server, db):
    db.sql(HOOK)
    server = await start(start_server, db)
    async with connect(server) as anonymous, connect(server, tok=token("alice")) as alice:
        reply = await request(anonymous, type="subscribe", channel="broadcast:staff-room", ref="s")
        assert reply["code"] == "FORBIDDEN" and reply["channel"] == "broadcast:staff-room" and reply["ref"] == "s"
        assert "realtime.authorize" in reply["message"]
        await subscribe(anonymous, "broadcast:lobby")
        await subscribe(alice, "broadcast:staff-room")
        await subscribe(alice, "broadcast:lobby")

        # Only alice may broadcast; the refused message goes nowhere.
        reply = await request(anonymous, type="broadcast", channel="broadcast:lobby", payload="no", ref="b")
        assert reply["code"] == "FORBIDDEN" and reply["ref"] == "b"
        await send(alice, type="broadcast", channel="broadcast:lobby", payload="yes")
        assert (await recv(anonymous))["payload"] == "yes"

        # Only the authenticated role may track; a refused track changes nothing.
        await subscribe(anonymous, "presence:hall")
        assert (await recv(anonymous))["event"] == "sync"
        reply = await request(anonymous, type="presence", channel="presence:hall", event="track", payload={}, ref="t")
        assert reply["code"] == "FORBIDDEN"
        await subscribe(alice, "presence:hall")
        assert (await recv(alice))["payload"] == {}
        reply = await request(alice, type="presence", channel="presence:hall", event="track", payload={"a": 1}, ref="t")
        assert reply["status"] == "tracked"
        assert list((await recv(anonymous))["payload"]["joins"]) == ["alice"]


async def test_without_the_hook_channels_are_open(start_server, db):
    server = await start(start_server, db)
    async with connect(server) as a, connect(server) as b:
        await subscribe(a, "broadcast:staff-room")
        await subscribe(b, "broadcast:staff-room")
        assert (await request(b, type="broadcast", channel="broadcast:staff-room", payload=1, ref="x"))[
            "status"
        ] == "sent"
        assert (await recv(a))["payload"] == 1


async def test_a_failing_hook_refuses(start_server, db):
    db.sql(
        "CREATE FUNCTION realtime.authorize(channel text, action text) RETURNS boolean LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'hook is broken'; END $$;"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="presence:x")
    assert reply["code"] == "FORBIDDEN"
    assert "hook is broken" in reply["message"]
