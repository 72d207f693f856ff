"""A cluster under faults, with real processes: a node SIGKILLed or stopped, Redis stopped and started again,
stalled (SIGSTOP), or failed over by Sentinel (docs/protocol.md "Several nodes")."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection

from ..support.clients import connect, http_get, recv, request, send, subscribe
from ..support.config import token
from ..support.database import users_table
from ..support.nodes import Node, running_nodes
from ..support.redis import RedisServer, sentinel_setup
from .test_cluster import eventually, presence

NODE_TIMEOUT = 2.0


async def track(ws: WebSocketConnection, n: int, room: str = "presence:lobby") -> dict[str, Any]:
    """Track state {"n": n} in `room` with a ref; the reply (ack or error)."""
    await send(ws, type="presence", channel=room, event="track", payload={"n": n}, ref=f"t{n}")
    while True:
        reply = await recv(ws, timeout=10)
        if reply["type"] in ("ack", "error"):
            return reply


async def health(node: Node) -> dict[str, Any]:
    return orjson.loads((await http_get(node.remote, "/health"))[2])


async def cluster_state(node: Node, state: str, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while (await health(node))["cluster"]["state"] != state:
            await trio.sleep(0.05)


async def broadcast(ws: WebSocketConnection, payload: Any, ref: str) -> dict[str, Any]:
    """Broadcast with a ref; the reply to it (ack `sent` or error), skipping anything else."""
    await send(ws, type="broadcast", channel="broadcast:news", payload=payload, ref=ref)
    while True:
        reply = await recv(ws, timeout=10)
        if reply.get("ref") == ref:
            return reply


async def test_a_sigkilled_nodes_members_leave_everywhere_within_node_timeout(db, redis, tmp_path):
    limit = {"realtime": {"max_connections_per_user": 1}}
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, node_timeout=NODE_TIMEOUT, sections=limit) as nodes,
        connect(nodes[1].remote, tok=token("erin")) as erin,
        connect(nodes[0].remote) as observer,
    ):
        await presence(observer)
        await presence(erin)
        assert (await track(erin, 1))["status"] == "tracked"
        await eventually(nodes[0], {"erin": [1]})
        while (await recv(observer))["event"] != "diff":
            pass
        nodes[1].kill()
        killed = trio.current_time()
        leave = await recv(observer, timeout=NODE_TIMEOUT + 5)
        elapsed = trio.current_time() - killed
        assert leave["event"] == "diff"
        assert list(leave["payload"]["leaves"]) == ["erin"] and leave["payload"]["joins"] == {}
        # The promise is node_timeout; the margin is for a loaded machine's scheduling, not for the design.
        assert elapsed < NODE_TIMEOUT + 1.0, elapsed
        # Erin's one place, held on the dead node, is free again on the living one.
        async with connect(nodes[0].remote, tok=token("erin")) as again:
            assert await request(again, type="ping") == {"type": "pong"}


async def test_a_graceful_shutdown_says_goodbye_at_once(db, redis, tmp_path):
    # A long node_timeout: a leave this fast comes from the shutdown itself (untrack, goodbye), not from expiry.
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, node_timeout=30) as nodes,
        connect(nodes[1].remote, tok=token("finn")) as finn,
        connect(nodes[0].remote) as observer,
    ):
        await presence(observer)
        await presence(finn)
        assert (await track(finn, 1))["status"] == "tracked"
        while (await recv(observer))["event"] != "diff":
            pass
        nodes[1].terminate()
        leave = await recv(observer, timeout=10)
        assert list(leave["payload"]["leaves"]) == ["finn"]
        assert await nodes[1].wait() == 0


async def test_redis_stopped_and_restarted(db, redis: RedisServer, tmp_path):
    users_table(db)
    async with (
        running_nodes(2, tmp_path, db.dsn, redis_url=redis.url, node_timeout=NODE_TIMEOUT) as nodes,
        connect(nodes[0].remote, tok=token("gus")) as gus,
        connect(nodes[1].remote, tok=token("hana")) as hana,
        connect(nodes[1].remote) as reader,
    ):
        await subscribe(reader, "broadcast:news")
        await subscribe(reader, "table:public.users")
        await presence(gus)
        await presence(hana)
        assert (await track(gus, 1))["status"] == "tracked"
        await eventually(nodes[1], {"gus": [1]})

        redis.stop()
        for node in nodes:
            await cluster_state(node, "unreachable")
        _, _, metrics = await http_get(nodes[0].remote, "/metrics")
        assert "fluxrt_cluster_engine_up 0.0" in metrics.decode()
        refused = await broadcast(gus, {"during": "outage"}, "b1")
        assert refused["type"] == "error" and refused["code"] == "UNAVAILABLE", refused
        assert "nothing was delivered" in refused["message"]
        refused = await track(hana, 2)
        assert refused["type"] == "error" and refused["code"] == "UNAVAILABLE", refused
        # The node's own work goes on: table changes and pings.
        await db.execute("INSERT INTO users (id, name) VALUES (1, 'during the outage')")
        change = await recv(reader, timeout=10)
        assert change["payload"]["record"]["name"] == "during the outage"
        assert await request(hana, type="ping") == {"type": "pong"}

        redis.restart()
        for node in nodes:
            await cluster_state(node, "up")
        # Presence subscribers are told the whole room afresh, and gus is back in it once his node (which
        # may reconnect later than hana's) has announced him again.
        with trio.fail_after(10):
            while (await recv(hana))["event"] != "sync":
                pass
        await eventually(nodes[1], {"gus": [1]})
        assert (await broadcast(gus, {"after": "outage"}, "b2"))["status"] == "sent"
        received = await recv(reader)
        assert received.pop("id").startswith("b2~")
        assert received == {"type": "broadcast", "channel": "broadcast:news", "payload": {"after": "outage"}}
        assert (await track(hana, 2))["status"] == "tracked"
        await eventually(nodes[0], {"gus": [1], "hana": [2]})


async def test_a_stalled_redis_does_not_stall_local_delivery(db, redis: RedisServer, tmp_path):
    users_table(db)
    async with (
        running_nodes(1, tmp_path, db.dsn, redis_url=redis.url, node_timeout=NODE_TIMEOUT) as nodes,
        connect(nodes[0].remote) as reader,
        connect(nodes[0].remote, tok=token("ivy")) as ivy,
    ):
        await subscribe(reader, "table:public.users")
        redis.pause()
        try:
            await db.execute("INSERT INTO users (id, name) VALUES (1, 'while Redis sleeps')")
            change = await recv(reader, timeout=5)
            assert change["payload"]["record"]["name"] == "while Redis sleeps"
            assert await request(ivy, type="ping") == {"type": "pong"}
            # A broadcast cannot be handed over: it is refused within a bounded time, not held forever.
            with trio.fail_after(NODE_TIMEOUT + 5):
                refused = await broadcast(ivy, 1, "b1")
            assert refused["code"] == "UNAVAILABLE", refused
        finally:
            redis.resume()
        # The refusal may reach the client a moment before the node has marked the engine down: /health can still
        # say "up" then, so wait for a broadcast to be taken again, refused meanwhile, never lost or held.
        with trio.fail_after(NODE_TIMEOUT + 10):
            attempt = 0
            while (reply := await broadcast(ivy, 2, f"b{attempt + 2}")).get("status") != "sent":
                assert reply["code"] == "UNAVAILABLE", reply
                attempt += 1
                await trio.sleep(0.1)
        await cluster_state(nodes[0], "up")


async def test_a_slow_redis_is_a_bounded_backlog_then_unavailable(db, redis: RedisServer, tmp_path):
    small = {"cluster": {"max_backlog": 4096}, "realtime": {"message_rate_limit": 1_000_000}}
    async with (
        running_nodes(1, tmp_path, db.dsn, redis_url=redis.url, node_timeout=30, sections=small) as nodes,
        connect(nodes[0].remote, tok=token("jay")) as jay,
    ):
        await cluster_state(nodes[0], "up")
        redis.pause()
        try:
            for i in range(200):
                await send(jay, type="broadcast", channel="broadcast:news", payload="x" * 100, ref=str(i))
            replies = [await recv(jay, timeout=5) for _ in range(150)]
        finally:
            redis.resume()
        # What did not fit in 4 KiB was refused at once, while Redis was still stalled.
        assert {r["code"] for r in replies} == {"UNAVAILABLE"}
        assert all("backlog" in r["message"] for r in replies)


async def test_a_sentinel_failover_is_survived(db, tmp_path):
    with sentinel_setup("fluxrt") as (primary, _replica, sentinel):
        async with (
            running_nodes(2, tmp_path, db.dsn, redis_url=sentinel.url, node_timeout=NODE_TIMEOUT) as nodes,
            connect(nodes[0].remote) as sender,
            connect(nodes[1].remote) as listener,
        ):
            await subscribe(listener, "broadcast:news")
            assert (await broadcast(sender, "before", "b0"))["status"] == "sent"
            assert (await recv(listener))["payload"] == "before"
            primary.kill()
            await sentinel.wait_failover(timeout=15)
            # Until its node has found the new primary, a broadcast is refused, never half-delivered.
            with trio.fail_after(30):
                attempt = 0
                while (reply := await broadcast(sender, "lost?", f"a{attempt}")).get("status") != "sent":
                    assert reply["code"] == "UNAVAILABLE", reply
                    attempt += 1
                    await trio.sleep(0.1)
            # Redis pub/sub is at most once: what went out while the listener's node was still looking for the
            # primary is not replayed (resume is a later issue). Once both are back, everything flows.
            for node in nodes:
                await cluster_state(node, "up")
            assert (await broadcast(sender, "after", "b1"))["status"] == "sent"
            with trio.fail_after(10):
                while (await recv(listener))["payload"] != "after":
                    pass


def test_one_node_runs_no_redis_code():
    """Without cluster.redis_url, serving never imports the Redis client (nothing of it on any path)."""
    script = (
        "import sys, trio\n"
        "from fluxrt_trio.server import Server\n"
        "from tests.support.config import make_config\n"
        "async def main():\n"
        "    async with trio.open_nursery() as n:\n"
        "        server = Server(make_config())\n"
        "        await n.start(server.serve)\n"
        "        n.cancel_scope.cancel()\n"
        "trio.run(main)\n"
        "loaded = [m for m in sys.modules if m.partition('.')[0] == 'redis']\n"
        "loaded += [m for m in ('fluxrt_trio.cluster.engine', 'fluxrt_trio.cluster.hub') if m in sys.modules]\n"
        "print(sorted(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
