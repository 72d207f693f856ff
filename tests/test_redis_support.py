"""The test infrastructure of the cluster tests works: private Redis servers that start, restart on their port, stall
and die on demand, a sentinel that promotes a replica, and fluxrt nodes as real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import yaml

from . import pg
from .support.clients import connect, request
from .support.nodes import node_config, running_nodes
from .support.redis import HOST, RedisServer, ping, redis_server, sentinel_setup
from .support.waiting import wait_until


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_ping_and_restart_on_the_same_port() -> None:
    with redis_server() as server:
        assert server.port != 6379
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            client.set("k", "v")
        port, pid = server.port, server.pid
        server.restart()
        assert (server.port, gone(pid)) == (port, True)
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            # Nothing persisted: a restarted server is empty.
            assert client.get("k") is None
        server.kill()
        assert not ping(port)
        server.start()
        assert server.port == port and ping(port)


def test_a_paused_server_answers_nothing_until_resumed_and_is_cleaned_up_paused() -> None:
    server = RedisServer()
    with server, redis.Redis.from_url(server.url, socket_timeout=0.3) as client:
        assert client.ping()
        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        # The timed-out connection may hold a late PONG: a fresh one answers this PING.
        client.connection_pool.disconnect()
        assert client.ping()
        server.pause()
        pid, directory = server.pid, server.dir
    assert gone(pid)
    assert not directory.exists()


async def test_sentinel_promotes_the_replica_when_the_primary_dies() -> None:
    with sentinel_setup("cluster") as (primary, replica, sentinel):
        assert sentinel.primary_addr() == (HOST, primary.port)
        assert sentinel.url == f"redis+sentinel://127.0.0.1:{sentinel.port}/cluster/0"
        with redis.Redis.from_url(primary.url) as client:
            client.set("k", "v")
            assert client.wait(1, 2000) == 1
        primary.kill()
        assert await sentinel.wait_failover(timeout=10) == (HOST, replica.port)
        assert replica.role() == "master"
        with redis.Redis.from_url(replica.url) as client:
            assert client.get("k") == b"v"
            client.set("after", "failover")


def test_a_node_configuration_has_a_cluster_section_only_with_a_redis_url() -> None:
    plain = node_config("postgresql://x/db", node_id="node-0", sections={"realtime": {"max_connections": 5}})
    assert "cluster" not in plain
    assert plain["realtime"] == {"max_connections": 5}
    clustered = node_config(
        "postgresql://x/db", node_id="node-1", redis_url="redis://127.0.0.1:1/0", node_timeout=1.5, prefix="p"
    )
    assert clustered["cluster"] == {
        "redis_url": "redis://127.0.0.1:1/0",
        "node_id": "node-1",
        "node_timeout": 1.5,
        "prefix": "p",
    }
    assert yaml.safe_load(yaml.safe_dump(clustered)) == clustered


async def test_nodes_run_as_processes_and_come_back_on_their_port(db: pg.ScratchDatabase, tmp_path: Path) -> None:
    async with running_nodes(2, tmp_path, db.dsn) as nodes:
        assert len({node.port for node in nodes}) == 2
        for node in nodes:
            assert node.url == f"ws://127.0.0.1:{node.port}/realtime"
            async with connect(node.remote) as ws:
                assert await request(ws, type="ping") == {"type": "pong"}
        port = nodes[1].port
        nodes[1].kill()
        assert await nodes[1].wait() == -9
        nodes[1] = await nodes[1].respawn()
        assert nodes[1].port == port
        async with connect(nodes[1].remote) as ws:
            assert await request(ws, type="ping") == {"type": "pong"}


async def test_clustered_nodes_share_the_private_redis_under_their_prefix(
    db: pg.ScratchDatabase, tmp_path: Path
) -> None:
    with redis_server() as server:
        async with running_nodes(2, tmp_path, db.dsn, redis_url=server.url, prefix="selftest") as nodes:
            assert [node.node_id for node in nodes] == ["node-0", "node-1"]
            await wait_until(lambda: bool(server.execute("KEYS", "*")))
            keys = server.execute("KEYS", "*")
            assert all(key.startswith("selftest") for key in keys), keys
