"""Shared fixtures. The rules every test here follows:

- Servers listen on 127.0.0.1 port 0 (a free port); nothing leaves the machine.
- Every test has a deadline (`timeout` in pyproject.toml, enforced by pytest-timeout), so a hang fails instead of
  stalling CI; tests that wait for the server to act use short configured intervals, never long sleeps.
- Protocol logic is tested without sockets (test_session.py and friends). Integration tests use real sockets, with
  trio-websocket as the client, or `RawClient` when a test needs to see frames a browser would hide (pings, close
  codes on a client that does not read).
- `trio.testing` clocks are never mixed with real sockets.
- When both sides could close first, the test decides which one does, so outcomes are deterministic.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, RejectConnection, Request

from fluxrt_trio.auth import mint
from fluxrt_trio.config import AuthConfig, Config, DatabaseConfig, LogConfig, RealtimeConfig, ServerConfig
from fluxrt_trio.hub import Hub
from fluxrt_trio.server import Server

from . import pg

SECRET = "test-secret-" + "x" * 64


def make_config(**sections: dict[str, Any]) -> Config:
    """A test configuration: 127.0.0.1, port 0, an HS256 secret; keyword arguments override sections."""
    server = {"host": "127.0.0.1", "port": 0, **sections.pop("server", {})}
    auth = {"jwt_secret": SECRET, **sections.pop("auth", {})}
    parts = {
        "server": ServerConfig(**server),
        "auth": AuthConfig(**auth),
        "database": DatabaseConfig(**sections.pop("database", {})),
        "realtime": RealtimeConfig(**sections.pop("realtime", {})),
        "log": LogConfig(**sections.pop("log", {})),
    }
    assert not sections, f"unknown sections {sections}"
    return Config(**parts)


def token(sub: str = "alice", **kwargs: Any) -> str:
    return mint(SECRET, sub, **kwargs)


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """A superuser DSN of a PostgreSQL server (see tests/pg.py for where it comes from)."""
    dsn, embedded = pg.admin_dsn()
    try:
        yield dsn
    finally:
        if embedded is not None:
            embedded.stop(quiet=True)


@pytest.fixture(scope="session")
def pg_template(pg_admin: str) -> Iterator[str]:
    name = pg.make_template(pg_admin)
    try:
        yield name
    finally:
        pg.run_sql(pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db(pg_admin: str, pg_template: str) -> Iterator[pg.ScratchDatabase]:
    """A fresh, migrated database for this test."""
    database = pg.ScratchDatabase(pg_admin, pg_template)
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """`await start_server(realtime={...})` runs a Server in the test's nursery and returns it."""

    async def start(*, hub: Hub | None = None, **sections: dict[str, Any]) -> Server:
        server = Server(make_config(**sections), hub=hub)
        await nursery.start(server.serve)
        return server

    yield start


def url(server: Server, *, path: str | None = None, query: str = "") -> str:
    path = path or server.config.server.path
    return f"ws://127.0.0.1:{server.port}{path}{'?' + query if query else ''}"


@asynccontextmanager
async def connect(
    server: Server, *, tok: str | None = None, headers: list[tuple[str, str]] | None = None, path: str | None = None
) -> AsyncIterator[WebSocketConnection]:
    query = f"token={tok}" if tok is not None else ""
    # The client accepts large messages: fluxrt delivers rows of any size.
    async with open_websocket_url(
        url(server, path=path, query=query), extra_headers=headers or [], max_message_size=64 * 1024 * 1024
    ) as ws:
        yield ws


async def send(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def recv(ws: WebSocketConnection, timeout: float = 5.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        return orjson.loads(await ws.get_message())


async def request(ws: WebSocketConnection, **message: Any) -> dict[str, Any]:
    await send(ws, **message)
    return await recv(ws)


async def subscribe(ws: WebSocketConnection, channel: str, **options: Any) -> dict[str, Any]:
    reply = await request(ws, type="subscribe", channel=channel, **options)
    assert reply["type"] == "ack", reply
    return reply


async def nothing_arrives(ws: WebSocketConnection, within: float = 0.3) -> None:
    with trio.move_on_after(within):
        message = await ws.get_message()
        raise AssertionError(f"expected nothing, got {message!r}")


async def http_get(
    server: Server, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET; returns status, lower-cased headers and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


@attrs.define
class RawClient:
    """A WebSocket client over a plain socket, showing every frame (pings, close codes), reading only when asked."""

    sock: socket.socket
    ws: WSConnection
    events: list[Any] = attrs.field(factory=list)
    rejected: RejectConnection | None = None

    async def next_event(self, timeout: float = 5.0) -> Any:
        with trio.fail_after(timeout):
            while not self.events:
                await trio.lowlevel.wait_readable(self.sock)
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    if isinstance(event, Ping):
                        self.send_bytes(self.ws.send(event.response()))
                    self.events.append(event)
            return self.events.pop(0)

    async def next_message(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Message):
                return orjson.loads(event.data)
            if isinstance(event, CloseConnection):
                raise AssertionError(f"closed {event.code} {event.reason}")

    async def close_code(self, timeout: float = 5.0) -> int:
        """Read until the server's close frame and return its code."""
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, CloseConnection):
                return event.code

    def send_bytes(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def send(self, **message: Any) -> None:
        self.send_bytes(self.ws.send(Message(data=orjson.dumps(message).decode())))

    def close(self) -> None:
        self.sock.close()


async def raw_connect(
    server: Server, *, query: str = "", rcvbuf: int | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> RawClient:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", server.port))
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    client = RawClient(sock, ws)
    target = server.config.server.path + (f"?{query}" if query else "")
    client.send_bytes(ws.send(Request(host="localhost", target=target, extra_headers=headers or [])))
    event = await client.next_event()
    if isinstance(event, RejectConnection):
        client.rejected = event
    else:
        assert isinstance(event, AcceptConnection), event
    return client


def random_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()
