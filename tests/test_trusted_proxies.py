"""server.trusted_proxies: behind a TLS proxy every client shares the proxy's address, so per-address limits would
count them all as one. From a trusted proxy, X-Forwarded-For names the client; from anyone else it is ignored."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio

from fluxrt_trio.config import ConfigError, load_config
from fluxrt_trio.http import client_address, is_trusted, trusted_networks

from .support.clients import raw_connect

LOOPBACK = trusted_networks(("127.0.0.1",))
PROXIES = trusted_networks(("10.0.0.0/8", "::1"))


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode()) for value in values]


@pytest.mark.parametrize(
    ("headers", "peer", "trusted", "client"),
    [
        (xff("203.0.113.7"), "198.51.100.1", PROXIES, "198.51.100.1"),  # not a proxy: its header is the client's word
        (xff("203.0.113.7"), "10.1.2.3", (), "10.1.2.3"),  # nothing trusted: ignored
        (xff("203.0.113.7"), "10.1.2.3", PROXIES, "203.0.113.7"),
        (xff("1.1.1.1, 203.0.113.7"), "10.1.2.3", PROXIES, "203.0.113.7"),  # the left entry is the client's claim
        (xff("203.0.113.7, 10.9.9.9"), "10.1.2.3", PROXIES, "203.0.113.7"),  # a chain of trusted proxies
        (xff("1.1.1.1", "203.0.113.7"), "10.1.2.3", PROXIES, "203.0.113.7"),  # two headers read as one list
        (xff("2001:db8::5"), "::1", PROXIES, "2001:db8::5"),
        (xff("203.0.113.7"), "::ffff:10.0.0.1", PROXIES, "203.0.113.7"),  # an IPv4-mapped proxy address
        (xff("unknown"), "10.1.2.3", PROXIES, "10.1.2.3"),  # not an address: the proxy's own
        ([], "10.1.2.3", PROXIES, "10.1.2.3"),
        (xff("10.0.0.9"), "10.1.2.3", PROXIES, "10.1.2.3"),  # only proxies: the nearest one
    ],
)
def test_the_client_address(headers, peer, trusted, client):
    assert client_address(headers, peer, trusted) == client


def test_trust_is_by_network():
    assert is_trusted("10.255.0.1", PROXIES) and is_trusted("::1", PROXIES)
    assert not is_trusted("11.0.0.1", PROXIES) and not is_trusted("not-an-ip", PROXIES)
    assert trusted_networks(("192.168.1.7/24",)) == (ipaddress.ip_network("192.168.1.0/24"),)


def test_a_trusted_proxy_that_is_not_an_address_is_a_configuration_error(tmp_path):
    path = tmp_path / "fluxrt.yaml"
    path.write_text("server:\n  trusted_proxies: [127.0.0.1, nginx.internal]\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert "server.trusted_proxies: 'nginx.internal' is not an IP address or network" in str(info.value)


async def test_anonymous_clients_behind_a_trusted_proxy_count_per_client_address(start_server):
    server = await start_server(server={"trusted_proxies": ("127.0.0.1",)}, realtime={"max_anonymous_per_address": 2})
    # Three clients behind the proxy: each is one of its own address.
    clients = [await raw_connect(server, headers=xff(f"203.0.113.{n}")) for n in range(3)]
    for client in clients:
        client.send(type="ping")
        assert await client.next_message() == {"type": "pong"}
    # The per-address limit still holds for one client address.
    same = [await raw_connect(server, headers=xff("203.0.113.0")) for _ in range(2)]
    same[0].send(type="ping")
    assert await same[0].next_message() == {"type": "pong"}
    assert await same[1].close_code() == 4029


async def test_without_trust_x_forwarded_for_is_ignored(start_server):
    server = await start_server(realtime={"max_anonymous_per_address": 2})
    first, _second = [await raw_connect(server, headers=xff(f"203.0.113.{n}")) for n in range(2)]
    third = await raw_connect(server, headers=xff("203.0.113.99"))
    assert await third.close_code() == 4029
    first.send(type="ping")
    assert await first.next_message() == {"type": "pong"}


async def test_a_trusted_proxy_may_hold_more_handshakes_than_the_per_address_cap(start_server):
    server = await start_server(server={"trusted_proxies": ("127.0.0.1",), "max_pending_handshakes_per_address": 2})
    idle = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port))
        idle.append(sock)
    try:
        client = await raw_connect(server, headers=xff("203.0.113.1"))
        client.send(type="ping")
        with trio.fail_after(5):
            assert await client.next_message() == {"type": "pong"}
    finally:
        for sock in idle:
            sock.close()
