"""The HTTP API on two fluxrt processes over one Redis (docs/protocol.md, "Broadcast from the database and from
backends"): a message posted to one node reaches subscribers on both, with one id; presence read from one node shows
members tracked on the other; with Redis stopped, 503 UNAVAILABLE and nothing delivered."""

from __future__ import annotations

import orjson
import pytest
import trio

from fluxrt_trio.client import PublishError, publish

from ..support.clients import connect, http_get, recv, subscribe
from ..support.config import token
from ..support.nodes import running_nodes
from ..support.redis import RedisServer
from ..support.waiting import nothing_before_pong
from .test_cluster import presence
from .test_cluster_faults import cluster_state, track

SERVICE = token("backend", role="service_role")


def base(node) -> str:
    return f"http://127.0.0.1:{node.port}"


async def test_a_posted_message_reaches_subscribers_on_both_nodes_with_one_id(db, redis: RedisServer, tmp_path):
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes,
        connect(nodes[0].remote) as near,
        connect(nodes[1].remote) as far,
    ):
        for ws in (near, far):
            await subscribe(ws, "broadcast:orders")
        assert await publish(base(nodes[0]), SERVICE, "broadcast:orders", {"id": 42}) == 1
        ids = set()
        for ws in (near, far):
            message = await recv(ws, timeout=10)
            ids.add(message.pop("id"))
            assert message == {"type": "broadcast", "channel": "broadcast:orders", "payload": {"id": 42}}
        # A position in the channel's history in Redis, the same on both nodes (resume works on either).
        assert len(ids) == 1 and ids.pop().startswith("b2~")

        # A batch, posted to the other node, arrives whole and in order everywhere.
        batch = [("broadcast:orders", i) for i in range(100)]
        assert await publish(base(nodes[1]), SERVICE, messages=batch) == 100
        for ws in (near, far):
            assert [(await recv(ws, timeout=10))["payload"] for _ in range(100)] == list(range(100))

        # A batch with one bad message publishes nothing on either node.
        with pytest.raises(PublishError) as refused:
            await publish(base(nodes[0]), SERVICE, messages=[("broadcast:orders", "no"), ("broadcast:", 1)])
        assert refused.value.code == "INVALID_CHANNEL"
        assert await publish(base(nodes[0]), SERVICE, "broadcast:orders", "after") == 1
        for ws in (near, far):
            assert (await recv(ws, timeout=10))["payload"] == "after"
            await nothing_before_pong(ws)


async def test_presence_read_on_one_node_shows_members_tracked_on_the_other(db, redis: RedisServer, tmp_path):
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes,
        connect(nodes[1].remote, tok=token("alice")) as alice,
        connect(nodes[0].remote) as watcher,
    ):
        await presence(watcher)
        await presence(alice)
        assert (await track(alice, 1))["status"] == "tracked"
        # The diff on node 0 says its view has alice in it.
        while (diff := await recv(watcher, timeout=10))["event"] != "diff":
            pass
        assert set(diff["payload"]["joins"]) == {"alice"}
        status, _, body = await http_get(
            nodes[0].remote, "/api/presence?channel=presence:lobby", {"Authorization": f"Bearer {SERVICE}"}
        )
        answer = orjson.loads(body)
        assert status == 200 and answer["channel"] == "presence:lobby"
        assert {key: [meta["state"] for meta in metas] for key, metas in answer["state"].items()} == {
            "alice": [{"n": 1}]
        }


async def test_with_redis_stopped_a_post_is_503_unavailable_and_nothing_is_delivered(db, redis: RedisServer, tmp_path):
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes,
        connect(nodes[0].remote) as near,
    ):
        await subscribe(near, "broadcast:news")
        redis.stop()
        await cluster_state(nodes[0], "unreachable")
        with pytest.raises(PublishError) as refused:
            await publish(base(nodes[0]), SERVICE, "broadcast:news", "during the outage")
        assert (refused.value.status, refused.value.code) == (503, "UNAVAILABLE")
        assert "nothing of the request was published" in refused.value.message
        _, _, metrics = await http_get(nodes[0].remote, "/metrics")
        assert 'fluxrt_api_requests_total{endpoint="broadcast",status="503"} 1.0' in metrics.decode()
        await nothing_before_pong(near)
        redis.restart()
        await cluster_state(nodes[0], "up")
        with trio.fail_after(10):
            assert await publish(base(nodes[0]), SERVICE, "broadcast:news", "back") == 1
        assert (await recv(near, timeout=10))["payload"] == "back"
