"""Every client message type over real sockets: subscribe, unsubscribe, broadcast, presence, ping, and bad input."""

from __future__ import annotations

import orjson
import pytest
import trio

from .support.clients import connect, raw_connect, recv, request, send, subscribe
from .support.config import token
from .support.waiting import nothing_before_pong, wait_until


async def test_subscribe_is_acked_in_the_reference_shape(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await send(ws, type="subscribe", channel="broadcast:notifications")
        raw = await ws.get_message()
    assert raw == '{"type":"ack","channel":"broadcast:notifications","status":"subscribed"}'


async def test_second_subscribe_is_acked_again_and_is_one_subscription(start_server):
    server = await start_server()
    async with connect(server) as a, connect(server) as b:
        await subscribe(a, "broadcast:x")
        assert (await request(a, type="subscribe", channel="broadcast:x", ref="again"))["ref"] == "again"
        await send(b, type="broadcast", channel="broadcast:x", payload=1)
        assert (await recv(a))["payload"] == 1
        # A second copy would have been queued together with the first.
        await nothing_before_pong(a)
        assert server.hub.statistics().subscriptions["broadcast"] == 1


async def test_unsubscribe_is_acked_even_when_not_subscribed_and_stops_delivery(start_server):
    server = await start_server()
    async with connect(server) as a, connect(server) as b:
        assert await request(a, type="unsubscribe", channel="broadcast:never") == {
            "type": "ack",
            "channel": "broadcast:never",
            "status": "unsubscribed",
        }
        await subscribe(a, "broadcast:x")
        await request(a, type="unsubscribe", channel="broadcast:x")
        await send(b, type="broadcast", channel="broadcast:x", payload={"m": 1})
        await nothing_before_pong(b)  # b's broadcast has been delivered to whoever gets it
        await nothing_before_pong(a)


async def test_broadcast_reaches_every_other_subscriber_and_not_the_sender(start_server):
    server = await start_server()
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        for ws in (a, b, c):
            await subscribe(ws, "broadcast:chat")
        payload = {"message": "Hello World", "user": "john"}
        await send(a, type="broadcast", channel="broadcast:chat", payload=payload)
        for ws in (b, c):
            message = await recv(ws)
            # Its position for resume (tests/test_broadcast_resume.py), opaque to clients.
            assert message.pop("id").startswith("b1~")
            assert message == {"type": "broadcast", "channel": "broadcast:chat", "payload": payload}
        await nothing_before_pong(a)


async def test_broadcast_with_ref_is_acked_sent_and_sender_need_not_subscribe(start_server):
    server = await start_server()
    async with connect(server) as sender, connect(server) as listener:
        await subscribe(listener, "broadcast:t")
        reply = await request(sender, type="broadcast", channel="broadcast:t", payload=[1, "two", None], ref="m1")
        assert reply == {"type": "ack", "channel": "broadcast:t", "status": "sent", "ref": "m1"}
        assert (await recv(listener))["payload"] == [1, "two", None]


async def test_a_subscribed_sender_gets_its_ack_once_and_never_its_own_broadcast(start_server):
    # The hub answers the sender: exactly one ack per broadcast with a ref, none without one.
    server = await start_server()
    async with connect(server) as sender, connect(server) as listener:
        await subscribe(sender, "broadcast:t")
        await subscribe(listener, "broadcast:t")
        await send(sender, type="broadcast", channel="broadcast:t", payload=1)
        assert await request(sender, type="broadcast", channel="broadcast:t", payload=2, ref="m2") == {
            "type": "ack",
            "channel": "broadcast:t",
            "status": "sent",
            "ref": "m2",
        }
        await nothing_before_pong(sender)
        assert [(await recv(listener))["payload"] for _ in range(2)] == [1, 2]
        await nothing_before_pong(listener)


@pytest.mark.parametrize("payload", [None, 0, "text", [1, 2], {"deep": {"er": [True, 1.5]}}])
async def test_broadcast_payload_is_any_json_value(start_server, payload):
    server = await start_server()
    async with connect(server) as a, connect(server) as b:
        await subscribe(b, "broadcast:any")
        await send(a, type="broadcast", channel="broadcast:any", payload=payload)
        assert (await recv(b))["payload"] == payload


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "subscribe", "channel": "users"}, "INVALID_CHANNEL"),
        ({"type": "subscribe", "channel": "table:users"}, "INVALID_CHANNEL"),
        ({"type": "subscribe", "channel": "table:public.users.x"}, "INVALID_CHANNEL"),
        ({"type": "subscribe", "channel": "presence:"}, "INVALID_CHANNEL"),
        ({"type": "subscribe", "channel": "broadcast:has space"}, "INVALID_CHANNEL"),
        ({"type": "broadcast", "channel": "presence:room", "payload": 1}, "INVALID_CHANNEL"),
        ({"type": "broadcast", "channel": "table:public.users", "payload": 1}, "INVALID_CHANNEL"),
        ({"type": "presence", "channel": "broadcast:x", "event": "track", "payload": {}}, "INVALID_CHANNEL"),
        ({"type": "presence", "channel": "presence:x", "event": "track", "payload": {}}, "SUBSCRIPTION_FAILED"),
        ({"type": "subscribe", "channel": "table:public.users"}, "SUBSCRIPTION_FAILED"),
    ],
)
async def test_channel_errors_carry_channel_and_ref(start_server, message, code):
    server = await start_server()
    async with connect(server) as ws:
        reply = await request(ws, **message, ref="r")
        assert reply["type"] == "error"
        assert reply["code"] == code
        assert reply["channel"] == message["channel"]
        assert reply["ref"] == "r"
        # The connection stays usable.
        assert await request(ws, type="ping") == {"type": "pong"}


async def test_invalid_channel_message_shows_the_expected_format(start_server):
    server = await start_server()
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:users")
    assert "table:{schema}.{table}" in reply["message"]


async def test_table_channel_without_database_says_no_database_is_configured(start_server):
    server = await start_server()
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.users")
    assert reply["code"] == "SUBSCRIPTION_FAILED"
    assert "no database is configured" in reply["message"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ('"hello"', "JSON object"),
        ('{"channel":"broadcast:x"}', "no type"),
        ('{"type":"dance"}', "unknown message type"),
        ('{"type":"subscribe"}', "missing field 'channel'"),
        ('{"type":"subscribe","channel":42}', "'channel'"),
        ('{"type":"broadcast","channel":"broadcast:x"}', "missing field 'payload'"),
        ('{"type":"ping","ref":' + orjson.dumps("r" * 65).decode() + "}", "ref"),
        ('{"type":"presence","channel":"presence:r","event":"wave"}', "track"),
    ],
)
async def test_malformed_messages_get_invalid_message_and_the_connection_stays_open(start_server, text, fragment):
    server = await start_server()
    async with connect(server) as ws:
        if "presence:r" in text:
            await subscribe(ws, "presence:r")
            await recv(ws)
        await ws.send_message(text)
        reply = await recv(ws)
        assert reply["type"] == "error"
        assert reply["code"] == "INVALID_MESSAGE"
        assert fragment in reply["message"]
        assert await request(ws, type="ping") == {"type": "pong"}


async def test_binary_frame_is_invalid_message(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await ws.send_message(b'{"type":"ping"}')
        reply = await recv(ws)
        assert reply["code"] == "INVALID_MESSAGE"
        assert "binary" in reply["message"]
        assert await request(ws, type="ping") == {"type": "pong"}


async def test_ping_gets_pong_with_ref(start_server):
    server = await start_server()
    async with connect(server) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}
        assert await request(ws, type="ping", ref="p-1") == {"type": "pong", "ref": "p-1"}


async def test_refs_are_echoed_on_every_reply_kind(start_server):
    server = await start_server()
    async with connect(server) as ws:
        assert (await request(ws, type="subscribe", channel="presence:r", ref="a"))["ref"] == "a"
        await recv(ws)  # sync
        assert (await request(ws, type="presence", channel="presence:r", event="track", payload={}, ref="b")) == {
            "type": "ack",
            "channel": "presence:r",
            "status": "tracked",
            "ref": "b",
        }
        await recv(ws)  # own join diff
        reply = await request(ws, type="presence", channel="presence:r", event="untrack", ref="c")
        assert reply == {"type": "ack", "channel": "presence:r", "status": "untracked", "ref": "c"}
        await recv(ws)  # own leave diff
        assert (await request(ws, type="unsubscribe", channel="presence:r", ref="d"))["ref"] == "d"
        assert (await request(ws, type="auth", token=token("z"), ref="e")) == {
            "type": "ack",
            "status": "authorized",
            "ref": "e",
        }


# ---- presence ----------------------------------------------------------------------------------------------------


async def _join(ws, room="presence:lobby"):
    await subscribe(ws, room)
    return await recv(ws)


async def test_presence_across_three_clients_with_one_dropping_its_socket(start_server):
    server = await start_server()
    async with connect(server, tok=token("ann")) as ann, connect(server, tok=token("ben")) as ben:
        assert (await _join(ann)) == {"type": "presence", "channel": "presence:lobby", "event": "sync", "payload": {}}
        await send(ann, type="presence", channel="presence:lobby", event="track", payload={"status": "online"})
        ann_join = await recv(ann)
        assert ann_join["event"] == "diff"
        ann_meta = ann_join["payload"]["joins"]["ann"][0]
        assert ann_meta["state"] == {"status": "online"}
        assert ann_join["payload"]["leaves"] == {}

        sync = await _join(ben)
        assert sync["payload"] == {"ann": [ann_meta]}
        await send(ben, type="presence", channel="presence:lobby", event="track", payload={"status": "away"})
        for ws in (ann, ben):
            diff = await recv(ws)
            assert list(diff["payload"]["joins"]) == ["ben"]

        carl = await raw_connect(server, query=f"token={token('carl')}")
        carl.send(type="subscribe", channel="presence:lobby")
        assert (await carl.next_message())["type"] == "ack"
        assert set((await carl.next_message())["payload"]) == {"ann", "ben"}
        carl.send(type="presence", channel="presence:lobby", event="track", payload={"status": "typing"})
        for ws in (ann, ben):
            assert list((await recv(ws))["payload"]["joins"]) == ["carl"]
        carl_meta = (await carl.next_message())["payload"]["joins"]["carl"][0]

        carl.close()  # the socket drops without a close frame
        for ws in (ann, ben):
            diff = await recv(ws)
            assert diff["payload"] == {"joins": {}, "leaves": {"carl": [carl_meta]}}


async def test_one_user_with_three_tabs_is_one_key_with_three_metas(start_server):
    server = await start_server()
    tok = token("ann")
    async with connect(server, tok=tok) as t1, connect(server, tok=tok) as t2, connect(server, tok=tok) as t3:
        for i, ws in enumerate((t1, t2, t3)):
            await _join(ws)
            await send(ws, type="presence", channel="presence:lobby", event="track", payload={"tab": i})
            await recv(ws)
        async with connect(server) as observer:
            sync = await _join(observer)
    metas = sync["payload"]["ann"]
    assert sorted(m["state"]["tab"] for m in metas) == [0, 1, 2]
    assert len({m["ref"] for m in metas}) == 3


async def test_retrack_is_one_diff_with_old_leave_and_new_join_same_ref(start_server):
    server = await start_server()
    async with connect(server, tok=token("ann")) as ws:
        await _join(ws)
        await send(ws, type="presence", channel="presence:lobby", event="track", payload={"v": 1})
        first = (await recv(ws))["payload"]["joins"]["ann"][0]
        await send(ws, type="presence", channel="presence:lobby", event="track", payload={"v": 2})
        diff = (await recv(ws))["payload"]
    assert diff["leaves"] == {"ann": [first]}
    assert diff["joins"] == {"ann": [{"ref": first["ref"], "state": {"v": 2}}]}


@pytest.mark.parametrize("how", ["untrack", "unsubscribe", "close"])
async def test_untrack_unsubscribe_and_disconnect_all_produce_the_leave(start_server, how):
    server = await start_server()
    async with connect(server, tok=token("obs")) as observer:
        await _join(observer)
        async with connect(server, tok=token("ann")) as ws:
            await _join(ws)
            await send(ws, type="presence", channel="presence:lobby", event="track", payload={"a": 1})
            joined = (await recv(observer))["payload"]["joins"]
            if how == "untrack":
                await send(ws, type="presence", channel="presence:lobby", event="untrack")
            elif how == "unsubscribe":
                await send(ws, type="unsubscribe", channel="presence:lobby")
        diff = await recv(observer)
        assert diff["payload"] == {"joins": {}, "leaves": joined}
        # Once ann's connection is released, a second leave (at disconnect, after an untrack) would have been sent.
        await wait_until(lambda: len(server.connections) == 1)
        await nothing_before_pong(observer)


async def test_presence_state_larger_than_the_limit_is_invalid_message(start_server):
    server = await start_server(realtime={"max_presence_state_size": 100})
    async with connect(server) as ws:
        await _join(ws)
        reply = await request(ws, type="presence", channel="presence:lobby", event="track", payload={"x": "y" * 100})
        assert reply["code"] == "INVALID_MESSAGE"
        assert "max_presence_state_size" in reply["message"]
        reply = await request(ws, type="presence", channel="presence:lobby", event="track", payload={"x": 1}, ref="ok")
        assert reply["status"] == "tracked"


async def test_resubscribing_to_presence_sends_a_fresh_sync(start_server):
    server = await start_server()
    async with connect(server, tok=token("ann")) as ws:
        await _join(ws)
        await send(ws, type="presence", channel="presence:lobby", event="track", payload={})
        await recv(ws)
        sync = await _join(ws)
    assert list(sync["payload"]) == ["ann"]


async def test_messages_on_one_channel_arrive_in_order(start_server):
    server = await start_server(realtime={"message_rate_limit": 10_000})
    async with connect(server) as a, connect(server) as b:
        await subscribe(b, "broadcast:seq")
        for i in range(300):
            await send(a, type="broadcast", channel="broadcast:seq", payload=i)
        with trio.fail_after(10):
            received = [(await recv(b))["payload"] for _ in range(300)]
    assert received == list(range(300))
