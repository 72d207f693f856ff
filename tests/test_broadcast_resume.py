"""Resume on `broadcast:` channels, one node, over real sockets (docs/protocol.md, Resume): a client whose socket died
gets what it missed, then the live stream, each message once and in order; what the node no longer holds is
`recovered: false`, never a wrong replay."""

from __future__ import annotations

import socket
import struct
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection

from fluxrt_trio.config import ConfigError, load_config

from .support.clients import RawClient, connect, http_get, raw_connect, recv, request, send, subscribe
from .support.servers import serving
from .support.waiting import wait_until

CHAT = "broadcast:chat"
UNLIMITED = {"message_rate_limit": 1_000_000}


def kill(client: RawClient) -> None:
    """End the client's socket with a reset, as a dropped network or a killed process does: no close frame."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


async def subscribed(client: RawClient, channel: str, **options: Any) -> dict[str, Any]:
    client.send(type="subscribe", channel=channel, **options)
    ack = await client.next_message()
    assert ack["type"] == "ack" and ack["status"] == "subscribed", ack
    return ack


async def sent(ws: WebSocketConnection, payload: Any, channel: str = CHAT) -> None:
    """Broadcast `payload` and wait for the ack: every subscriber on the node has it queued."""
    reply = await request(ws, type="broadcast", channel=channel, payload=payload, ref="r")
    assert reply["status"] == "sent", reply


async def last_id(server: Any, channel: str = CHAT) -> str:
    """The position of a broadcast on `channel`, as a subscriber there receives it."""
    async with connect(server) as listener, connect(server) as sender:
        await subscribe(listener, channel)
        await sent(sender, {"n": 0}, channel)
        message = await recv(listener)
        assert isinstance(message["id"], str), message
        return message["id"]


async def test_a_client_killed_gets_the_50_it_missed_then_live_each_once_in_order(start_server):
    server = await start_server(realtime=UNLIMITED)
    async with connect(server) as publisher, connect(server) as observer:
        await subscribe(observer, CHAT)
        first = await raw_connect(server)
        await subscribed(first, CHAT)
        observed: list[int] = []
        processed: list[dict[str, Any]] = []
        stop = trio.Event()
        published = 0

        async def publish() -> None:
            nonlocal published
            while not stop.is_set():
                published += 1
                await send(publisher, type="broadcast", channel=CHAT, payload={"n": published})
                await trio.sleep(0.003)

        async def observe() -> None:
            while True:
                observed.append(orjson.loads(await observer.get_message())["payload"]["n"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            nursery.start_soon(observe)
            while len(processed) < 20:
                processed.append(await first.next_message())
            kill(first)
            since = processed[-1]["id"]
            await wait_until(lambda: bool(observed) and observed[-1] >= processed[-1]["payload"]["n"] + 50)

            # Broadcasts keep coming while the client subscribes again, on a new connection.
            second = await raw_connect(server)
            ack = await subscribed(second, CHAT, since=since, ref="again")
            assert ack == {"type": "ack", "channel": CHAT, "status": "subscribed", "recovered": True, "ref": "again"}
            resubscribed_at = observed[-1]
            while not processed or processed[-1]["payload"]["n"] < resubscribed_at + 30:
                processed.append(await second.next_message())
            stop.set()
            await sent(publisher, {"n": "end"})
            nursery.cancel_scope.cancel()
        final = published
        while processed[-1]["payload"]["n"] != "end":
            processed.append(await second.next_message())

    numbers = [message["payload"]["n"] for message in processed[:-1]]
    assert numbers == list(range(1, final + 1))
    assert all(message["type"] == "broadcast" and message["channel"] == CHAT for message in processed)
    ids = [message["id"] for message in processed]
    assert len(set(ids)) == len(ids)
    second.close()


async def test_history_trimmed_past_the_position_is_not_recovered_and_live_follows(start_server):
    server = await start_server(realtime={"history_size": 5})
    async with connect(server) as publisher:
        first = await raw_connect(server)
        await subscribed(first, CHAT)
        await sent(publisher, {"n": 0})
        since = (await first.next_message())["id"]
        kill(first)
        for n in range(1, 11):
            await sent(publisher, {"n": n})
        second = await raw_connect(server)
        assert (await subscribed(second, CHAT, since=since))["recovered"] is False
        await sent(publisher, {"n": 11})
        # Nothing was replayed: the first frame after the ack is live.
        assert (await second.next_message())["payload"] == {"n": 11}
        second.close()


async def test_a_position_whose_history_expired_is_not_recovered(start_server):
    server = await start_server(realtime={"history_ttl": 0.2})
    since = await last_id(server)
    await trio.sleep(0.4)
    async with connect(server) as client:
        assert (await subscribe(client, CHAT, since=since))["recovered"] is False


async def test_within_history_a_quiet_channel_is_recovered_with_nothing_to_replay(start_server):
    server = await start_server()
    since = await last_id(server)
    async with connect(server) as client, connect(server) as sender:
        assert (await subscribe(client, CHAT, since=since))["recovered"] is True
        await sent(sender, {"n": 1})
        assert (await recv(client))["payload"] == {"n": 1}


async def test_a_restarted_node_does_not_recover_a_position_of_its_former_life():
    async with serving() as before:
        since = await last_id(before)
    async with serving() as after:
        # Its own positions look alike and count from 1 again: the incarnation tells them apart.
        assert (await last_id(after)).rsplit("~", 1)[1] == since.rsplit("~", 1)[1]
        async with connect(after) as client:
            assert (await subscribe(client, CHAT, since=since))["recovered"] is False


async def test_history_size_0_keeps_nothing_and_sends_no_position(start_server):
    server = await start_server(realtime={"history_size": 0})
    async with connect(server) as listener, connect(server) as sender:
        await subscribe(listener, CHAT)
        await sent(sender, {"n": 1})
        assert await recv(listener) == {"type": "broadcast", "channel": CHAT, "payload": {"n": 1}}
    async with connect(server) as client:
        ack = await subscribe(client, CHAT, since="b1~000000000000~1")
        assert ack["recovered"] is False
    status, _, body = await http_get(server, "/metrics")
    assert status == 200 and b"\nfluxrt_history_messages 0.0\n" in body


@pytest.mark.parametrize(
    "since",
    [
        42,
        {"id": 1},
        "",
        "b1~000000000000~1",
        "b1~zzzzzzzzzzzz~1",
        "b1~{incarnation}~99999",
        "b1~{incarnation}~0",
        "b1~{incarnation}~1~1",
        "b2~1700000000000-0",
        "t1~16384~1:1:~1:1:~0",
        "b1~{incarnation}~" + "9" * 5000,
    ],
)
async def test_a_malformed_or_foreign_position_is_not_recovered_and_the_subscription_works(start_server, since):
    server = await start_server()
    own = await last_id(server)
    incarnation = own.split("~")[1]
    if isinstance(since, str):
        since = since.replace("{incarnation}", incarnation)
    async with connect(server) as client, connect(server) as sender:
        assert (await subscribe(client, CHAT, since=since))["recovered"] is False
        await sent(sender, {"n": 1})
        assert (await recv(client))["payload"] == {"n": 1}


async def test_history_is_bounded_per_channel_and_shown_in_metrics(start_server):
    server = await start_server(realtime={"history_size": 3, **UNLIMITED})
    async with connect(server) as sender:
        for channel in ("broadcast:a", "broadcast:b"):
            for n in range(5):
                await sent(sender, {"n": n}, channel)
    status, _, body = await http_get(server, "/metrics")
    assert status == 200
    assert b"\nfluxrt_history_messages 6.0\n" in body
    size = len(b'{"type":"broadcast","channel":"broadcast:a","payload":{"n":0},"id":""}')
    history_bytes = float(body.split(b"\nfluxrt_history_bytes ")[1].split(b"\n")[0])
    assert 6 * size < history_bytes < 6 * (size + 40)


def test_history_settings_are_read_and_checked() -> None:
    config = load_config(None, {"FLUXRT_REALTIME_HISTORY_SIZE": "0", "FLUXRT_REALTIME_HISTORY_TTL": "90s"})
    assert (config.realtime.history_size, config.realtime.history_ttl) == (0, 90.0)
    defaults = load_config(None, {})
    assert (defaults.realtime.history_size, defaults.realtime.history_ttl) == (100, 300.0)
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"FLUXRT_REALTIME_HISTORY_SIZE": "-1", "FLUXRT_REALTIME_HISTORY_TTL": "0"})
    assert [problem.split(":")[1].strip() for problem in refused.value.problems] == [
        "realtime.history_size",
        "realtime.history_ttl",
    ]
