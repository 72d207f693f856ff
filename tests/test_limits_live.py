"""The limits of docs/protocol.md enforced on real connections, and the close codes they lead to."""

from __future__ import annotations

import time

import pytest
import trio
from wsproto.events import Message, Ping

from fluxrt_trio.hub import LocalHub

from .support.clients import connect, http_get, raw_connect, recv, request, send, subscribe


async def test_subscriptions_per_connection_are_limited(start_server):
    server = await start_server(realtime={"max_subscriptions_per_connection": 3})
    async with connect(server) as ws:
        for i in range(3):
            await subscribe(ws, f"broadcast:t{i}")
        reply = await request(ws, type="subscribe", channel="broadcast:t3", ref="4th")
        assert reply["code"] == "SUBSCRIPTION_FAILED"
        assert reply["channel"] == "broadcast:t3" and reply["ref"] == "4th"
        assert "at most 3" in reply["message"]
        await request(ws, type="unsubscribe", channel="broadcast:t1")
        await subscribe(ws, "broadcast:t3")


async def test_broadcast_rate_is_limited_and_ping_is_exempt(start_server):
    server = await start_server(realtime={"message_rate_limit": 5})
    async with connect(server) as ws:
        for i in range(5):
            assert (await request(ws, type="broadcast", channel="broadcast:x", payload=i, ref=str(i)))[
                "status"
            ] == "sent"
        reply = await request(ws, type="broadcast", channel="broadcast:x", payload=5, ref="5")
        assert reply["code"] == "RATE_LIMITED"
        assert reply["ref"] == "5"
        for _ in range(30):
            assert await request(ws, type="ping") == {"type": "pong"}


async def test_invalid_messages_count_against_the_rate(start_server):
    server = await start_server(realtime={"message_rate_limit": 3})
    async with connect(server) as ws:
        for _ in range(3):
            await ws.send_message("{broken")
            assert (await recv(ws))["code"] == "INVALID_MESSAGE"
        await ws.send_message("{broken")
        assert (await recv(ws))["code"] == "RATE_LIMITED"


async def test_subscribe_and_unsubscribe_have_their_own_allowance(start_server):
    server = await start_server(realtime={"message_rate_limit": 1, "max_subscriptions_per_connection": 2})
    async with connect(server) as ws:
        assert (await request(ws, type="broadcast", channel="broadcast:x", payload=1, ref="a"))["status"] == "sent"
        assert (await request(ws, type="broadcast", channel="broadcast:x", payload=1))["code"] == "RATE_LIMITED"
        # twice the subscription limit per minute, independent of the message allowance
        for i in range(4):
            await subscribe(ws, f"broadcast:s{i % 2}")
        assert (await request(ws, type="subscribe", channel="broadcast:s0"))["code"] == "RATE_LIMITED"


async def test_sustained_flood_at_twice_the_rate_closes_4029(start_server):
    server = await start_server(realtime={"message_rate_limit": 5})
    client = await raw_connect(server)
    for i in range(11):
        client.send(type="broadcast", channel="broadcast:x", payload=i)
    codes = []
    while True:
        message = await client.next_message() if not codes or codes[-1] != "RATE_LIMITED-close" else None
        if message is None:
            break
        codes.append(message["code"])
        if "closing" in message["message"]:
            codes[-1] = "RATE_LIMITED-close"
    assert codes == ["RATE_LIMITED"] * 5 + ["RATE_LIMITED-close"]
    assert await client.close_code() == 4029


async def test_message_larger_than_max_message_size_closes_1009(start_server):
    server = await start_server(realtime={"max_message_size": 1024})
    async with connect(server) as ws:
        fits = '{"type":"broadcast","channel":"broadcast:x","payload":"' + "a" * 900 + '"}'
        await ws.send_message(fits)
        assert await request(ws, type="ping") == {"type": "pong"}
    client = await raw_connect(server)
    client.send(type="broadcast", channel="broadcast:x", payload="a" * 2000)
    assert await client.close_code() == 1009


async def test_fragmented_message_is_measured_whole(start_server):
    server = await start_server(realtime={"max_message_size": 1024})
    client = await raw_connect(server)
    for _ in range(5):
        client.send_bytes(client.ws.send(Message(data="x" * 300, message_finished=False)))
    assert await client.close_code() == 1009


async def test_silent_connection_times_out_with_4008(start_server):
    server = await start_server(realtime={"connection_timeout": 0.5, "heartbeat_interval": 60})
    client = await raw_connect(server)
    started = time.monotonic()
    assert await client.close_code() == 4008
    assert 0.4 <= time.monotonic() - started <= 2.0


async def test_any_client_frame_keeps_the_connection_alive(start_server):
    server = await start_server(realtime={"connection_timeout": 0.5, "heartbeat_interval": 60})
    async with connect(server) as ws:
        for _ in range(8):
            await trio.sleep(0.2)
            assert await request(ws, type="ping") == {"type": "pong"}


async def test_server_pings_every_heartbeat_interval_and_pongs_keep_it_alive(start_server):
    server = await start_server(realtime={"heartbeat_interval": 0.2, "connection_timeout": 0.6})
    client = await raw_connect(server)
    pings = 0
    started = time.monotonic()
    # RawClient answers each ping with a pong, as browsers do without page code.
    while time.monotonic() - started < 1.5:
        event = await client.next_event(timeout=1)
        assert isinstance(event, Ping), event
        pings += 1
    assert 5 <= pings <= 9
    assert len(server.connections) == 1


async def test_slow_consumer_is_closed_4009_without_delaying_a_fast_one(start_server):
    server = await start_server(realtime={"write_buffer_size": 20, "message_rate_limit": 100_000})
    slow = await raw_connect(server, rcvbuf=4096)
    slow.send(type="subscribe", channel="broadcast:feed")
    assert (await slow.next_message())["status"] == "subscribed"
    n = 3000
    payload = "p" * 1000
    async with connect(server) as fast, connect(server) as publisher:
        await subscribe(fast, "broadcast:feed")
        received = []

        async def publish():
            for i in range(n):
                await send(publisher, type="broadcast", channel="broadcast:feed", payload={"i": i, "p": payload})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            with trio.fail_after(20):
                while len(received) < n:
                    received.append((await recv(fast))["payload"]["i"])
        assert received == list(range(n))
        # The slow one never read: it was cut off, and it is told why once it reads.
        assert server.counters.slow_consumer_closes == 1
        assert await slow.close_code() == 4009
        _, _, body = await http_get(server, "/metrics")
        assert b"fluxrt_slow_consumer_closes_total 1.0" in body
        assert b'fluxrt_closes_total{code="4009"} 1.0' in body


class FaultyHub(LocalHub):
    """A hub whose broadcast fails on one topic: a stand-in for a server fault."""

    def broadcast(self, channel, payload, *, sender=None, ref=None):
        if channel == "broadcast:boom":
            raise RuntimeError("injected fault")
        return super().broadcast(channel, payload, sender=sender, ref=ref)


async def test_a_server_fault_answers_internal_error_and_the_connection_stays_usable(start_server):
    server = await start_server(hub=FaultyHub())
    async with connect(server) as ws:
        reply = await request(ws, type="broadcast", channel="broadcast:boom", payload=1, ref="b")
        assert reply == {
            "type": "error",
            "code": "INTERNAL_ERROR",
            "message": "internal error while handling this message",
            "ref": "b",
        }
        assert await request(ws, type="ping") == {"type": "pong"}


async def test_a_fault_outside_message_handling_closes_1011(start_server, monkeypatch):
    server = await start_server()

    def broken_admit(conn, identity):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(server.admission, "admit", broken_admit)
    client = await raw_connect(server)
    assert await client.close_code() == 1011
    monkeypatch.undo()
    async with connect(server) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}


@pytest.mark.parametrize("n", [50])
async def test_many_connections_subscribe_and_receive(start_server, n):
    # All from 127.0.0.1: n subscribers and the publisher.
    server = await start_server(realtime={"max_anonymous_per_address": n + 1})
    clients = [await raw_connect(server) for _ in range(n)]
    for c in clients:
        c.send(type="subscribe", channel="broadcast:all")
    for c in clients:
        assert (await c.next_message())["status"] == "subscribed"
    async with connect(server) as publisher:
        await send(publisher, type="broadcast", channel="broadcast:all", payload="hi")
    for c in clients:
        assert (await c.next_message())["payload"] == "hi"
