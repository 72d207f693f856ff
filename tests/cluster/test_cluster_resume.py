"""Resume on `broadcast:` channels across nodes, with real processes over one private Redis (docs/protocol.md,
Resume): a client whose socket died on one node resumes on another and gets every message once, in order, while
publishers on both nodes keep going; every node delivers a channel's broadcasts in one order, that of their ids."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection

from fluxrt_trio.cluster import wire
from fluxrt_trio.cluster.hub import STASH_WAIT, WATCH_INTERVAL, ClusterHub
from fluxrt_trio.cluster.view import Delivered
from fluxrt_trio.protocol.messages import ServerMessage, encode

from ..support.clients import connect, http_get, raw_connect, recv, request, send, subscribe
from ..support.nodes import Node, running_nodes
from ..support.redis import RedisServer
from ..test_broadcast_resume import kill, subscribed

CHAT = "broadcast:chat"
UNLIMITED = {"realtime": {"message_rate_limit": 1_000_000}}


async def up(node: Node) -> None:
    """Until the node has joined the cluster (it listens before it has reached Redis)."""
    with trio.fail_after(15):
        while orjson.loads((await http_get(node.remote, "/health"))[2])["cluster"]["state"] != "up":
            await trio.sleep(0.02)


async def sent(ws: WebSocketConnection, payload: Any, channel: str = CHAT) -> None:
    """Broadcast with a ref, skipping what else arrives, until the ack: every node has the message."""
    await send(ws, type="broadcast", channel=channel, payload=payload, ref="r")
    while (reply := await recv(ws, timeout=10)).get("ref") != "r":
        pass
    assert reply["status"] == "sent", reply


def stream_order(ids: list[str]) -> list[tuple[int, int]]:
    """The stream ids inside positions `b2~<ms>-<seq>`, as numbers."""
    parsed = []
    for position in ids:
        version, stream_id = position.split("~")
        assert version == "b2", position
        milliseconds, sequence = stream_id.split("-")
        parsed.append((int(milliseconds), int(sequence)))
    return parsed


async def test_a_client_killed_on_one_node_resumes_on_another_with_what_it_missed_once_in_order(
    db, redis: RedisServer, tmp_path
):
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, sections=UNLIMITED) as nodes:
        for node in nodes:
            await up(node)
        async with (
            connect(nodes[0].remote) as p0,
            connect(nodes[1].remote) as p1,
            connect(nodes[0].remote) as o0,
            connect(nodes[1].remote) as o1,
        ):
            observed: list[list[dict[str, Any]]] = [[], []]
            for ws in (o0, o1):
                await subscribe(ws, CHAT)
            first = await raw_connect(nodes[0].remote)
            await subscribed(first, CHAT)
            processed: list[dict[str, Any]] = []
            stop = trio.Event()

            async def publish(index: int, ws: WebSocketConnection) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    await send(ws, type="broadcast", channel=CHAT, payload={"p": index, "n": n})
                    await trio.sleep(0.006)

            async def observe(index: int, ws: WebSocketConnection) -> None:
                while True:
                    observed[index].append(orjson.loads(await ws.get_message()))

            def count(index: int) -> int:
                return len(observed[index])

            async with trio.open_nursery() as nursery:
                for index, ws in enumerate((o0, o1)):
                    nursery.start_soon(observe, index, ws)
                # Publishers on both nodes: what the client missed interleaves two nodes' messages.
                for index, ws in enumerate((p0, p1)):
                    nursery.start_soon(publish, index, ws)
                while len(processed) < 20:
                    processed.append(await first.next_message())
                kill(first)
                with trio.fail_after(15):
                    # Until the observer on the first node has had 50 more than what the client processed.
                    while processed[-1] not in observed[0][-51::-1]:
                        await trio.sleep(0.005)

                second = await raw_connect(nodes[1].remote)
                ack = await subscribed(second, CHAT, since=processed[-1]["id"])
                assert ack["recovered"] is True, ack
                resubscribed_at = count(1)
                with trio.fail_after(15):
                    while len(processed) < resubscribed_at + 30:
                        processed.append(await second.next_message())
                stop.set()
                # Each publisher's last message, acked (Redis took it) before the other sends its own.
                await sent(p1, "end of p1")
                await sent(p0, "end")
                with trio.fail_after(15):
                    while not (observed[0] and observed[0][-1]["payload"] == "end"):
                        await trio.sleep(0.005)
                    while not (observed[1] and observed[1][-1]["payload"] == "end"):
                        await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
            with trio.fail_after(15):
                while processed[-1]["payload"] != "end":
                    processed.append(await second.next_message())
            second.close()

    # Every node delivered the channel in one order, that of the ids; the client got exactly that across the kill.
    assert observed[0] == observed[1]
    order = stream_order([message["id"] for message in observed[0]])
    assert order == sorted(set(order))
    assert processed == observed[0]
    assert {message["payload"]["p"] for message in processed if isinstance(message["payload"], dict)} == {0, 1}


async def test_history_trimmed_or_expired_or_unknown_is_not_recovered_on_another_node(db, redis, tmp_path):
    sections = {"realtime": {"history_size": 5, "history_ttl": "1s", "message_rate_limit": 1_000_000}}
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, sections=sections) as nodes:
        for node in nodes:
            await up(node)
        async with connect(nodes[0].remote) as publisher, connect(nodes[0].remote) as listener:
            await subscribe(listener, CHAT)
            await sent(publisher, 0)
            trimmed = (await recv(listener))["id"]
            for n in range(1, 5):
                await sent(publisher, n)
            kept = [(await recv(listener))["id"] for _ in range(4)][-1]
            for n in range(5, 10):
                await sent(publisher, n)
            for _ in range(5):
                await recv(listener)

            async def recovered(since: Any) -> bool:
                async with connect(nodes[1].remote) as client:
                    ack = await request(client, type="subscribe", channel=CHAT, since=since)
                    assert ack["type"] == "ack" and ack["status"] == "subscribed", ack
                    return bool(ack["recovered"])

            # Nine messages followed the first, more than history_size: trimmed. Five followed the fifth: kept.
            assert await recovered(trimmed) is False
            assert await recovered(kept) is True
            for since in ("b2~1-0", "b2~99999999999999-0", "b2~x", "b1~000000000000~1", 7, ""):
                assert await recovered(since) is False
            # A second after the last message, it has expired.
            await trio.sleep(1.3)
            assert await recovered(kept) is False


class Recorder:
    """A subscriber of an in-process hub: the messages it is handed, decoded."""

    def __init__(self) -> None:
        self.conn_id = "recorder"
        self.got: list[dict[str, Any]] = []

    def deliver_nowait(self, frame: bytes) -> None:
        # A server text frame: FIN + opcode, a length (7 or 16 bits here, unmasked), then the JSON.
        self.got.append(orjson.loads(frame[4:] if frame[1] & 0x7F == 126 else frame[2:]))

    def reply_nowait(self, message: ServerMessage) -> None:
        self.got.append(orjson.loads(encode(message)))


async def test_a_read_whose_subscription_never_came_is_dropped_and_a_late_replay_says_changes_missed(
    redis: RedisServer, nursery
):
    offset = 0.0
    hub: ClusterHub[Recorder] = ClusterHub(
        redis.url, node_id="solo", node_timeout=60, history_size=10, clock=lambda: time.monotonic() + offset
    )
    await nursery.start(hub.run)
    with trio.fail_after(10):
        while hub.cluster_statistics().state != "up":
            await trio.sleep(0.01)
    live = Recorder()
    hub.join(CHAT, live)
    for n in range(3):
        hub.broadcast(CHAT, n)
    with trio.fail_after(10):
        while len(live.got) < 3:
            await trio.sleep(0.01)
    since = live.got[0]["id"]

    # Resumed at once: the read is used, and gone.
    assert await hub.resumable(CHAT, since)
    assert hub.cluster_statistics().resumes_pending == 1
    resumed = Recorder()
    hub.replay(CHAT, resumed, since)
    assert resumed.got == live.got[1:]
    assert hub.cluster_statistics().resumes_pending == 0

    # The connection closed between the read and its subscription: the watcher drops the read.
    assert await hub.resumable(CHAT, since)
    assert hub.cluster_statistics().resumes_pending == 1
    offset = STASH_WAIT + 1
    await trio.sleep(3 * WATCH_INTERVAL)
    assert hub.cluster_statistics().resumes_pending == 0
    late = Recorder()
    hub.replay(CHAT, late, since)
    assert [message["code"] for message in late.got] == ["CHANGES_MISSED"]
    assert hub.cluster_statistics().resume_gaps == 1

    # Without Redis, nothing can be said: not recovered.
    redis.stop()
    assert not await hub.resumable(CHAT, since)
    nursery.cancel_scope.cancel()


def test_a_broadcast_older_than_one_delivered_goes_out_without_its_id() -> None:
    # Heard in a batch buffered while its node's state was read, it comes after a newer one of the channel: with
    # its id the client's position would move back, and a resume from it would send the newer one again.
    hub: ClusterHub[Recorder] = ClusterHub("redis://127.0.0.1:1", node_id="solo", node_timeout=60, history_size=10)
    client = Recorder()
    hub.join(CHAT, client)
    hub._handle([Delivered(CHAT, "newer", "1700000000002-0"), Delivered(CHAT, "late", "1700000000001-0")])
    hub._handle([Delivered(CHAT, "next", "1700000000003-0"), Delivered(CHAT, "twice", wire.DUPLICATE)])
    assert [(m["payload"], m.get("id")) for m in client.got] == [
        ("newer", "b2~1700000000002-0"),
        ("late", None),
        ("next", "b2~1700000000003-0"),
    ]


# ---- the stream ids on the bus (pure) ------------------------------------------------------------------------


def test_stream_ids_ride_after_the_operations_and_a_batch_without_them_still_decodes() -> None:
    ops = (wire.Broadcast(CHAT, {"m": 1}, "1700000000000-0"), wire.UserCount("ann", 1), wire.Broadcast(CHAT, 2, None))
    data = wire.encode(wire.Batch("n1", "i1", 7, ops))
    assert data.endswith(b'{"m":1}],["c","ann",1],["b","broadcast:chat",2]],"x":["1700000000000-0",""]}')
    assert wire.decode(data).ops == ops
    # What a node of the version before sends, and what it reads of this one: the same operations, without ids.
    assert wire.decode(wire.encode(wire.Batch("n1", "i1", 7, (wire.Broadcast(CHAT, 1),)))).ops[0].id is None
    assert orjson.loads(data)["o"][0] == ["b", CHAT, {"m": 1}]


@pytest.mark.parametrize("ids", ['"1-0"', '["1-0"]', '["1-0","2-0","3-0"]', '["x","1-0"]', '[1,"1-0"]'])
def test_stream_ids_that_do_not_match_the_broadcasts_are_refused(ids: str) -> None:
    data = b'{"v":1,"n":"n1","i":"i1","s":1,"o":[["b","c",1],["b","c",2]],"x":' + ids.encode() + b"}"
    with pytest.raises(wire.WireError):
        wire.decode(data)
