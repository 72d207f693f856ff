"""`realtime.send` with two nodes over one database and one Redis (docs/protocol.md, "Broadcast from the database and
from backends"): every node reads each send from the change log and offers it to Redis, which publishes the first
offer only; so a committed send reaches the channel's subscribers on both nodes once each, with the same `id` and in
the same order (commit order), a client resumes past it on either node, and sends committed while Redis was away
arrive when it is back."""

from __future__ import annotations

from typing import Any

import trio

from ..support.clients import connect, raw_connect, recv, subscribe
from ..support.database import in_asyncio
from ..support.nodes import Node, running_nodes
from ..support.redis import RedisServer
from ..support.waiting import nothing_arrives
from ..test_broadcast_resume import kill, subscribed
from ..test_send import numbered_sends
from .test_cluster_faults import cluster_state
from .test_cluster_resume import stream_order, up

NEWS = "broadcast:news"


async def received(ws: Any, count: int) -> list[dict[str, Any]]:
    messages = [await recv(ws, timeout=20) for _ in range(count)]
    await nothing_arrives(ws, 0.3)
    return messages


async def position_of_a_send(node: Node, db: Any) -> str:
    """The `id` of a send as a client of `node` receives it; the client's socket is then killed."""
    client = await raw_connect(node.remote)
    await subscribed(client, NEWS)
    await db.execute("SELECT realtime.send('broadcast:news', '0')")
    last = (await client.next_message())["id"]
    kill(client)
    return str(last)


async def resumed(node: Node, since: str, count: int) -> list[Any]:
    """The payloads a client resuming on `node` from `since` is replayed (the ack must say recovered)."""
    client = await raw_connect(node.remote)
    ack = await subscribed(client, NEWS, since=since)
    assert ack["recovered"] is True, ack
    payloads = [(await client.next_message())["payload"] for _ in range(count)]
    client.close()
    return payloads


async def test_sends_from_eight_writers_reach_both_nodes_once_with_one_id_in_commit_order(db, redis, tmp_path):
    db.sql("CREATE TABLE send_counter (n int NOT NULL); INSERT INTO send_counter VALUES (0)")
    history = {"realtime": {"history_size": 1000}}
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, sections=history) as nodes:
        for node in nodes:
            await up(node)
        async with connect(nodes[0].remote) as first, connect(nodes[1].remote) as second:
            await subscribe(first, NEWS)
            await subscribe(second, NEWS)
            await db.execute("BEGIN; SELECT realtime.send('broadcast:news', '{\"n\": 0}'); ROLLBACK")
            got: list[list[dict[str, Any]]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_asyncio, numbered_sends, db.dsn, 300, 8)
                for ws in (first, second):
                    got.append(await received(ws, 300))
            for messages in got:
                assert [m["payload"]["n"] for m in messages] == list(range(1, 301))
            ids = [[m["id"] for m in messages] for messages in got]
            assert ids[0] == ids[1]
            assert stream_order(ids[0]) == sorted(stream_order(ids[0]))
            # Both nodes offered all 300; Redis published each once (the later offers came back duplicates).
            prefix = nodes[0].config["cluster"]["prefix"]
            assert redis.execute("XLEN", f"{prefix}:history:{NEWS}") == 300


async def test_a_client_resumes_past_sends_on_the_other_node(db, redis, tmp_path):
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes:
        for node in nodes:
            await up(node)
        last = await position_of_a_send(nodes[0], db)
        async with connect(nodes[1].remote) as observer:
            await subscribe(observer, NEWS)
            await db.execute("SELECT realtime.send('broadcast:news', to_jsonb(n)) FROM generate_series(1, 10) n")
            assert [m["payload"] for m in await received(observer, 10)] == list(range(1, 11))
        assert await resumed(nodes[1], last, 10) == list(range(1, 11))


async def test_sends_committed_while_redis_is_away_are_published_once_when_it_is_back(db, redis: RedisServer, tmp_path):
    """Each node holds what it read and offers it when it is back; the first node back publishes it. A node back
    later does not hear that publication (pub/sub is at most once, docs/protocol.md "Several nodes"): its
    connected clients may miss the sends, but nobody gets one twice and a client resumes them on any node."""
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, node_timeout=3) as nodes:
        for node in nodes:
            await up(node)
        last = await position_of_a_send(nodes[0], db)
        async with connect(nodes[0].remote) as first, connect(nodes[1].remote) as second:
            await subscribe(first, NEWS)
            await subscribe(second, NEWS)
            # Paused, not stopped: the history stays, so that clients can resume past the outage.
            redis.pause()
            for node in nodes:
                await cluster_state(node, "unreachable")
            await db.execute("SELECT realtime.send('broadcast:news', to_jsonb(n)) FROM generate_series(1, 5) n")
            await nothing_arrives(first, 0.5)
            redis.resume()
            for node in nodes:
                await cluster_state(node, "up")
            await db.execute("SELECT realtime.send('broadcast:news', '6')")
            heard = []
            for ws in (first, second):
                payloads = []
                while not payloads or payloads[-1] != 6:
                    payloads.append((await recv(ws, timeout=20))["payload"])
                assert payloads in ([6], [1, 2, 3, 4, 5, 6]), payloads
                heard.append(payloads)
            assert [1, 2, 3, 4, 5, 6] in heard
        for node in nodes:
            assert await resumed(node, last, 6) == [1, 2, 3, 4, 5, 6]
