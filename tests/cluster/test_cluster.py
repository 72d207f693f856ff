"""Several fluxrt nodes as real processes over one private Redis: broadcasts, presence and per-user counts across
nodes (docs/protocol.md "Several nodes")."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..support.clients import connect, http_get, recv, request, send, subscribe
from ..support.config import token
from ..support.nodes import Node, running_nodes
from ..support.redis import RedisServer

PER_PUBLISHER = 334
"""messages each of three publishers sends: about 1,000 in all"""


async def collect(ws: WebSocketConnection, count: int, into: list[dict[str, Any]], timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while len(into) < count:
            into.append(orjson.loads(await ws.get_message()))


UNLIMITED = {"realtime": {"message_rate_limit": 1_000_000}}


async def test_broadcasts_reach_every_node_once_in_publisher_order(db, redis: RedisServer, tmp_path):
    async with (
        running_nodes(3, tmp_path, db.dsn, redis_url=redis.url, sections=UNLIMITED) as nodes,
        connect(nodes[0].remote, tok=token("s0")) as s0,
        connect(nodes[1].remote, tok=token("s1")) as s1,
        connect(nodes[2].remote, tok=token("s2")) as s2,
        connect(nodes[0].remote, tok=token("p0")) as p0,
        connect(nodes[1].remote, tok=token("p1")) as p1,
        connect(nodes[2].remote, tok=token("p2")) as p2,
    ):
        subscribers, publishers = [s0, s1, s2], [p0, p1, p2]
        for ws in subscribers:
            await subscribe(ws, "broadcast:chat")
        received: list[list[dict[str, Any]]] = [[], [], []]

        async def publish(index: int, ws: WebSocketConnection) -> None:
            for i in range(PER_PUBLISHER):
                ref = "last" if i == PER_PUBLISHER - 1 else None
                await send(ws, type="broadcast", channel="broadcast:chat", payload={"p": index, "i": i}, ref=ref)
            assert await recv(ws, timeout=30) == {
                "type": "ack",
                "channel": "broadcast:chat",
                "status": "sent",
                "ref": "last",
            }

        async with trio.open_nursery() as nursery:
            for index, ws in enumerate(subscribers):
                nursery.start_soon(collect, ws, 3 * PER_PUBLISHER, received[index])
            for index, ws in enumerate(publishers):
                nursery.start_soon(publish, index, ws)
        for frames in received:
            assert all(f["type"] == "broadcast" and f["channel"] == "broadcast:chat" for f in frames)
            for publisher in range(3):
                sequence = [f["payload"]["i"] for f in frames if f["payload"]["p"] == publisher]
                assert sequence == list(range(PER_PUBLISHER)), f"publisher {publisher}"


async def test_a_sender_subscribed_on_its_channel_does_not_hear_itself_but_its_node_does(db, redis, tmp_path):
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes,
        connect(nodes[0].remote) as sender,
        connect(nodes[0].remote) as neighbour,
        connect(nodes[1].remote) as far,
    ):
        for ws in (sender, neighbour, far):
            await subscribe(ws, "broadcast:room")
        await send(sender, type="broadcast", channel="broadcast:room", payload=1)
        ids = set()
        for ws in (neighbour, far):
            message = await recv(ws)
            ids.add(message.pop("id"))
            assert message == {"type": "broadcast", "channel": "broadcast:room", "payload": 1}
        # Its position for resume (test_cluster_resume.py): the same on both nodes.
        assert len(ids) == 1 and ids.pop().startswith("b2~")
        # The sender's next reply is the pong: its own broadcast never came back to it.
        assert await request(sender, type="ping") == {"type": "pong"}


async def presence(ws: WebSocketConnection, room: str = "presence:lobby") -> dict[str, Any]:
    """Subscribe to `room`; the sync's payload."""
    await subscribe(ws, room)
    sync = await recv(ws)
    assert sync["event"] == "sync", sync
    return sync["payload"]


def summary(state: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    return {key: sorted(meta["state"]["n"] for meta in metas) for key, metas in state.items()}


async def sync_of(node: Node, room: str = "presence:lobby") -> dict[str, list[Any]]:
    async with connect(node.remote) as ws:
        return summary(await presence(ws, room))


async def eventually(node: Node, expected: dict[str, list[Any]], timeout: float = 10) -> None:
    """Until a fresh subscriber on `node` gets `expected` in its sync."""
    with trio.fail_after(timeout):
        while (seen := await sync_of(node)) != expected:
            await trio.sleep(0.05)
    assert seen == expected


async def test_presence_converges_on_every_node_and_one_user_on_two_nodes_is_one_key(db, redis, tmp_path):
    async with running_nodes(3, tmp_path, db.dsn, redis_url=redis.url) as nodes:
        async with (
            connect(nodes[0].remote, tok=token("alice")) as alice0,
            connect(nodes[1].remote, tok=token("alice")) as alice1,
            connect(nodes[1].remote, tok=token("bob")) as bob,
            connect(nodes[2].remote, tok=token("carol")) as carol,
            connect(nodes[2].remote) as observer,
        ):
            assert await presence(observer) == {}
            for n, ws in enumerate((alice0, alice1, bob, carol)):
                await presence(ws)
                await send(ws, type="presence", channel="presence:lobby", event="track", payload={"n": n})
            expected = {"alice": [0, 1], "bob": [2], "carol": [3]}
            for node in nodes:
                await eventually(node, expected)
            # The observer saw each join once, as a diff, whichever node it happened on.
            joins: dict[str, list[int]] = {}
            with trio.fail_after(10):
                while sum(len(v) for v in joins.values()) < 4:
                    diff = await recv(observer)
                    assert diff["event"] == "diff" and diff["payload"]["leaves"] == {}, diff
                    for key, metas in diff["payload"]["joins"].items():
                        joins.setdefault(key, []).extend(meta["state"]["n"] for meta in metas)
            assert {key: sorted(v) for key, v in joins.items()} == expected

            await send(alice1, type="presence", channel="presence:lobby", event="untrack")
            leave = await recv(observer, timeout=10)
            assert leave["payload"] == {
                "joins": {},
                "leaves": {"alice": [{"ref": leave["payload"]["leaves"]["alice"][0]["ref"], "state": {"n": 1}}]},
            }
        # Every connection closed: the room is empty everywhere.
        for node in nodes:
            await eventually(node, {})


async def test_the_per_user_limit_counts_every_node(db, redis, tmp_path):
    limit = {"realtime": {"max_connections_per_user": 2}}
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, sections=limit) as nodes:
        async with connect(nodes[0].remote, tok=token("dave")) as a, connect(nodes[1].remote, tok=token("dave")) as b:
            await request(a, type="ping")
            await request(b, type="ping")

            async def third(node: Node) -> dict[str, Any]:
                async with connect(node.remote, tok=token("dave")) as c:
                    # A pong while the other node's count is still on its way; the refusal once it is here.
                    with contextlib.suppress(ConnectionClosed):
                        await send(c, type="ping")
                    return await recv(c)

            with trio.fail_after(10):
                # The count of the other node arrives over the bus: within a round trip of the connection.
                while (reply := await third(nodes[0]))["type"] == "pong":
                    await trio.sleep(0.05)
            assert reply["code"] == "RATE_LIMITED"
            assert "counted on every node" in reply["message"]
        # Both gone (one counted on each node): the user may hold both places on one node again.
        with trio.fail_after(10):
            while not await both_accepted(nodes[1], "dave"):
                await trio.sleep(0.05)


async def both_accepted(node: Node, sub: str) -> bool:
    """Whether two connections of `sub` on `node` are both served."""
    try:
        async with connect(node.remote, tok=token(sub)) as c1, connect(node.remote, tok=token(sub)) as c2:
            return [await request(c1, type="ping"), await request(c2, type="ping")] == [{"type": "pong"}] * 2
    except ConnectionClosed:
        return False


async def test_metrics_and_health_show_the_cluster(db, redis, tmp_path):
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes:
        status, _, body = await http_get(nodes[0].remote, "/health")
        assert status == 200
        # A node listens while it connects to Redis (it serves its own clients either way): up a moment later.
        with trio.fail_after(10):
            while (health := orjson.loads(body))["cluster"]["state"] != "up":
                assert health["cluster"]["state"] == "connecting", health
                await trio.sleep(0.05)
                status, _, body = await http_get(nodes[0].remote, "/health")
        assert health["cluster"]["node_id"] == "node-0"
        with trio.fail_after(10):
            while orjson.loads((await http_get(nodes[0].remote, "/health"))[2])["cluster"]["nodes"] != 2:
                await trio.sleep(0.05)
        _, _, metrics = await http_get(nodes[0].remote, "/metrics")
        text = metrics.decode()
        assert "fluxrt_cluster_engine_up 1.0" in text
        assert "fluxrt_cluster_nodes 2.0" in text
