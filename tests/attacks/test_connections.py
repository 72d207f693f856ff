"""Connection attacks on one live fluxrt process: floods of sockets that never finish their handshake, more
connections than the node takes, and anonymous connections trying to fill it.

The server runs in a child process for the whole module, as operators run it, so that its memory (RSS) can be read
before and after and its descriptors are its own. Attackers connect from 127.0.0.1, and every other client from its
own loopback address (127.0.0.2 and up: Linux routes all of 127/8 to the loopback), because the limits under test
are per source address. After each test the server is back to no open connection (`/health`), so tests do not
depend on each other's order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jwt
import orjson
import pytest
import trio
import yaml
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from fluxrt_trio.config import Config, ServerConfig

from ..process import Remote
from ..support.clients import RawClient
from ..support.config import SECRET, make_config, token
from ..support.waiting import wait_until

ATTACKER = "127.0.0.1"
MONITOR = "127.0.0.254"
FLOOD = 1000
HANDSHAKE_TIMEOUT = 1.0
MAX_PENDING = 32
MAX_CONNECTIONS = 20
ANONYMOUS_SHARE = 0.5
MAX_ANONYMOUS_PER_ADDRESS = 4
RSS_GROWTH_LIMIT_KIB = 4 * 1024
"""what a flood may leave behind in the server's resident memory. Measured: about 0.3 MiB with the pending limit;
about 9 MiB when all 1,000 half-open requests are let into their handshake"""


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> None:
    """The flood tests hold FLOOD sockets at once in this process, plus the suite's own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 1024
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"open files limit {hard} is below the {needed} these tests need: raise `ulimit -n`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("attack-connections")
    config = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "handshake_timeout": HANDSHAKE_TIMEOUT,
            "max_pending_handshakes_per_address": MAX_PENDING,
        },
        "auth": {"jwt_secret": SECRET},
        "realtime": {
            "max_connections": MAX_CONNECTIONS,
            "anonymous_share": ANONYMOUS_SHARE,
            "max_anonymous_per_address": MAX_ANONYMOUS_PER_ADDRESS,
            "max_connections_per_user": MAX_CONNECTIONS,
        },
        "log": {"format": "json", "level": "info"},
    }
    path = folder / "fluxrt.yaml"
    path.write_text(yaml.safe_dump(config))
    server = LiveServer(path, folder / "stderr.log")
    try:
        yield server
    finally:
        server.stop()


class LiveServer(Remote):
    """fluxrt in a child process; `port`, `config` (for the client helpers), `rss_kib()`."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fluxrt_trio", "--config", str(config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"fluxrt did not start:\n{log_path.read_text()}")
            for line in log_path.read_text().splitlines():
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if record.get("msg") == "listening":
                        port = record["port"]
            time.sleep(0.05)
        super().__init__(port, Config(server=ServerConfig(path="/realtime")))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET `path` from a monitoring address of its own (the attacker's address may be refused at accept)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=MONITOR)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def health(self) -> dict:
        status, body = await self.get("/health")
        assert status == 200, body
        return orjson.loads(body)

    async def rejected(self, reason: str) -> float:
        status, body = await self.get("/metrics")
        assert status == 200, body
        for line in body.decode().splitlines():
            if line.startswith(f'fluxrt_rejected_connections_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture
async def server(live: LiveServer) -> AsyncIterator[LiveServer]:
    """The module's server, checked to hold no connection before and after the test."""
    assert live.process.poll() is None, live.log_path.read_text()
    assert (await live.health())["connections"] == 0
    yield live
    with trio.fail_after(10):
        while (await live.health())["connections"]:
            await trio.sleep(0.05)


# ---- clients --------------------------------------------------------------------------------------------------


async def raw_from(server: Remote, source: str, *, query: str = "") -> RawClient:
    """A WebSocket client connecting from the loopback address `source`."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", server.port))
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    client = RawClient(sock, ws)
    target = "/realtime" + (f"?{query}" if query else "")
    client.send_bytes(ws.send(Request(host="localhost", target=target)))
    event = await client.next_event()
    if isinstance(event, RejectConnection):
        client.rejected = event
    else:
        assert isinstance(event, AcceptConnection), event
    return client


async def healthy(server: Remote, source: str = "127.0.0.2") -> float:
    """A user with a token connects from `source`, pings and is answered; returns how long it took."""
    started = trio.current_time()
    client = await raw_from(server, source, query=f"token={token('control')}")
    try:
        client.send(type="ping", ref="control")
        assert await client.next_message() == {"type": "pong", "ref": "control"}
    finally:
        client.close()
    return trio.current_time() - started


def attack_sockets(server: Remote, n: int, payload: bytes) -> list[socket.socket]:
    """`n` sockets from ATTACKER, each having sent `payload` (nothing when empty)."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind((ATTACKER, 0))
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        if payload:
            with contextlib.suppress(OSError):
                sock.send(payload)
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (end of stream or reset), reading past any 503 it sent."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            assert exc.errno in (errno.ECONNRESET, errno.EPIPE), exc
            return True
        if not data:
            return True
        assert data.startswith(b"HTTP/1.1 503 "), data[:200]


async def flood_is_shrugged_off(server: LiveServer, payload: bytes) -> None:
    await healthy(server)
    refused_before = await server.rejected("pending_handshakes")
    rss_before = server.rss_kib()
    socks = attack_sockets(server, FLOOD, payload)
    try:
        flooded_at = trio.current_time()
        # While the flood holds its sockets, a client from elsewhere gets in and is served.
        assert await healthy(server) < 2.0
        # All but MAX_PENDING were refused at accept, without a handshake, a task or a timer each.
        assert await server.rejected("pending_handshakes") - refused_before >= FLOOD - MAX_PENDING
        open_socks = set(socks)
        with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
            while open_socks:
                open_socks = {s for s in open_socks if not closed_by_server(s)}
                await trio.sleep(0.05)
        # The ones allowed to wait were dropped at the handshake timeout, not earlier than it allows for.
        assert trio.current_time() - flooded_at >= HANDSHAKE_TIMEOUT * 0.9
        rss_after = server.rss_kib()
        assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)
        # And the attacker's address may connect again once its sockets are gone.
        assert await healthy(server, ATTACKER) < 2.0
    finally:
        for sock in socks:
            sock.close()


# ---- floods that never finish a handshake ---------------------------------------------------------------------


async def test_a_thousand_half_open_http_requests_do_not_keep_a_client_out_and_are_closed_in_time(server):
    await flood_is_shrugged_off(server, b"GET /realtime HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")


async def test_a_thousand_idle_tcp_connections_do_not_keep_a_client_out_and_are_closed_in_time(server):
    await flood_is_shrugged_off(server, b"")


async def test_sockets_over_the_pending_limit_are_answered_503_with_the_setting(server):
    socks = attack_sockets(server, MAX_PENDING + 1, b"")
    try:
        last = socks[-1]
        last.setblocking(True)
        last.settimeout(5)
        answer = last.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"retry-after: 1" in answer.lower()
        body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"] == "too_many_handshakes"
        assert "server.max_pending_handshakes_per_address = 32" in body["message"]
    finally:
        for sock in socks:
            sock.close()


# ---- admission ------------------------------------------------------------------------------------------------


async def expect_refused(client: RawClient, setting: str) -> None:
    message = await client.next_message()
    assert message["type"] == "error" and message["code"] == "RATE_LIMITED", message
    assert setting in message["message"], message
    assert await client.close_code() == 4029


async def test_connections_past_max_connections_are_refused_at_once_with_4029(server):
    clients = [await raw_from(server, f"127.0.1.{n}", query=f"token={token(f'u{n}')}") for n in range(20)]
    try:
        started = trio.current_time()
        extra = await raw_from(server, "127.0.1.99", query=f"token={token('late')}")
        await expect_refused(extra, f"realtime.max_connections = {MAX_CONNECTIONS}")
        assert trio.current_time() - started < 2.0
        assert (await server.health())["connections"] == MAX_CONNECTIONS
        # A closed connection gives its place back.
        clients.pop().close()
        await wait_until_connections(server, MAX_CONNECTIONS - 1)
        client = await raw_from(server, "127.0.1.99", query=f"token={token('late')}")
        clients.append(client)
        client.send(type="ping")
        assert await client.next_message() == {"type": "pong"}
    finally:
        for client in clients:
            client.close()


async def wait_until_connections(server: LiveServer, n: int) -> None:
    with trio.fail_after(5):
        while (await server.health())["connections"] != n:
            await trio.sleep(0.02)


async def test_one_address_cannot_take_more_than_its_anonymous_connections(server):
    clients = [await raw_from(server, "127.0.2.1") for _ in range(MAX_ANONYMOUS_PER_ADDRESS)]
    try:
        await expect_refused(await raw_from(server, "127.0.2.1"), "realtime.max_anonymous_per_address = 4")
        # A token from the same address, and anonymous connections from another, still get in.
        await healthy(server, "127.0.2.1")
        other = await raw_from(server, "127.0.2.2")
        clients.append(other)
        other.send(type="ping")
        assert await other.next_message() == {"type": "pong"}
    finally:
        for client in clients:
            client.close()


async def test_anonymous_connections_cannot_lock_out_users_with_a_token(server):
    places = int(MAX_CONNECTIONS * ANONYMOUS_SHARE)
    clients = [
        await raw_from(server, f"127.0.3.{n // MAX_ANONYMOUS_PER_ADDRESS}") for n in range(places)
    ]  # as many addresses as it takes to fill the anonymous share
    try:
        await expect_refused(await raw_from(server, "127.0.3.200"), "realtime.anonymous_share = 0.5")
        # The other half of the node is for users with a token.
        for n in range(MAX_CONNECTIONS - places):
            client = await raw_from(server, "127.0.4.1", query=f"token={token(f'user{n}')}")
            clients.append(client)
            client.send(type="ping")
            assert await client.next_message() == {"type": "pong"}
        await expect_refused(
            await raw_from(server, "127.0.4.1", query=f"token={token('one-too-many')}"), "realtime.max_connections"
        )
    finally:
        for client in clients:
            client.close()


async def test_authenticating_frees_the_anonymous_place_and_going_back_needs_one(server):
    clients = [await raw_from(server, "127.0.5.1") for _ in range(MAX_ANONYMOUS_PER_ADDRESS)]
    try:
        first = clients[0]
        first.send(type="auth", token=token("dora"), ref="a")
        assert await first.next_message() == {"type": "ack", "status": "authorized", "ref": "a"}
        newcomer = await raw_from(server, "127.0.5.1")
        clients.append(newcomer)
        newcomer.send(type="ping")
        assert await newcomer.next_message() == {"type": "pong"}
        # A token without sub is anonymous again: no place left from this address, so it is refused and dora stays.
        first.send(type="auth", token=_token_without_sub(), ref="b")
        refused = await first.next_message()
        assert refused["code"] == "RATE_LIMITED" and refused["ref"] == "b"
        assert "realtime.max_anonymous_per_address" in refused["message"]
        first.send(type="ping")
        assert await first.next_message() == {"type": "pong"}
    finally:
        for client in clients:
            client.close()


def _token_without_sub() -> str:
    return jwt.encode({"role": "anon", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def test_reload_applies_the_anonymous_limits(start_server):
    server = await start_server(realtime={"max_anonymous_per_address": 1})
    first = await raw_from(server, "127.0.6.1")
    await expect_refused(await raw_from(server, "127.0.6.1"), "realtime.max_anonymous_per_address = 1")
    server.reload(make_config(realtime={"max_anonymous_per_address": 2, "anonymous_share": 0.002}))
    second = await raw_from(server, "127.0.6.1")
    second.send(type="ping")
    assert await second.next_message() == {"type": "pong"}
    await expect_refused(await raw_from(server, "127.0.6.2"), "realtime.anonymous_share = 0.002")
    first.close()
    second.close()
    await wait_until(lambda: not server.connections)
