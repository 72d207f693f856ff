"""The cluster engine over TLS, with real processes: nodes reach a private redis-server that listens with TLS only
(`rediss://`, and `rediss+sentinel://` through a TLS sentinel) and verify its certificate against a CA made for the
test (`?ssl_ca_certs=`); without that CA the certificate cannot be verified and the node stays unreachable, saying
why (docs/protocol.md "Several nodes")."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from .. import pg
from ..support.clients import connect, recv, subscribe
from ..support.nodes import running_nodes
from ..support.redis import HOST, ping, redis_server, sentinel_setup
from ..support.tls import ThrowawayCA, make_ca
from .test_cluster_faults import broadcast, cluster_state, health


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCA:
    return make_ca(tmp_path / "ca")


def test_a_tls_server_answers_only_over_tls_with_the_ca(ca: ThrowawayCA) -> None:
    with redis_server(tls=ca) as server:
        assert server.url == f"rediss://{HOST}:{server.port}/0?ssl_ca_certs={ca.ca_cert}"
        assert ping(server.port, tls=ca)
        assert not ping(server.port)
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        without_ca = redis.Redis.from_url(f"rediss://{HOST}:{server.port}/0", socket_connect_timeout=2)
        with without_ca, pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            without_ca.ping()
        server.restart()
        assert ping(server.port, tls=ca)


async def test_two_nodes_over_rediss_with_the_test_ca(db: pg.ScratchDatabase, tmp_path: Path, ca: ThrowawayCA) -> None:
    with redis_server(tls=ca) as server:
        async with (
            running_nodes(2, tmp_path, db.dsn, redis_url=server.url) as nodes,
            connect(nodes[0].remote) as sender,
            connect(nodes[1].remote) as listener,
        ):
            for node in nodes:
                await cluster_state(node, "up", timeout=8)
                assert (await health(node))["cluster"]["last_error"] is None
            await subscribe(listener, "broadcast:news")
            assert (await broadcast(sender, {"over": "tls"}, "b1"))["status"] == "sent"
            received = await recv(listener)
            assert received.pop("id").startswith("b2~")
            assert received == {"type": "broadcast", "channel": "broadcast:news", "payload": {"over": "tls"}}


async def test_a_node_without_the_ca_cannot_verify_the_certificate_and_stays_unreachable(
    db: pg.ScratchDatabase, tmp_path: Path, ca: ThrowawayCA
) -> None:
    with redis_server(tls=ca) as server:
        async with (
            running_nodes(1, tmp_path, db.dsn, redis_url=f"rediss://{HOST}:{server.port}/0") as nodes,
            connect(nodes[0].remote) as sender,
        ):
            await cluster_state(nodes[0], "unreachable", timeout=8)
            last_error = (await health(nodes[0]))["cluster"]["last_error"]
            assert "ssl_ca_certs" in last_error and "could not be verified" in last_error, last_error
            assert "self-signed certificate" in last_error, last_error
            refused = await broadcast(sender, "lost", "b1")
            assert refused["type"] == "error" and refused["code"] == "UNAVAILABLE", refused
            # The server was there all along: only the certificate stood in the way.
            assert server.execute("PING") is True


async def test_a_tls_sentinel_finds_the_tls_primary(db: pg.ScratchDatabase, tmp_path: Path, ca: ThrowawayCA) -> None:
    with sentinel_setup("fluxrt", tls=ca) as (primary, _replica, sentinel):
        assert sentinel.url == f"rediss+sentinel://{HOST}:{sentinel.port}/fluxrt/0?ssl_ca_certs={ca.ca_cert}"
        assert sentinel.primary_addr() == (HOST, primary.port)
        async with (
            running_nodes(2, tmp_path, db.dsn, redis_url=sentinel.url) as nodes,
            connect(nodes[0].remote) as sender,
            connect(nodes[1].remote) as listener,
        ):
            for node in nodes:
                await cluster_state(node, "up", timeout=8)
            await subscribe(listener, "broadcast:news")
            assert (await broadcast(sender, "via sentinel", "b1"))["status"] == "sent"
            assert (await recv(listener))["payload"] == "via sentinel"
            # The nodes' state went to the primary the sentinel named.
            assert any(key.startswith("fluxrt-test-") for key in primary.execute("KEYS", "*"))
