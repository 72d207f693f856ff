"""Clients of a test server: trio-websocket for what a browser sees, `RawClient` for every frame, plain HTTP."""

from __future__ import annotations

import base64
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, RejectConnection, Request

from fluxrt_trio.server import Server


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


async def http_get(
    server: Server, path: str, headers: dict[str, str] | None = None, *, ssl_context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 GET, over TLS with `ssl_context`; returns status, lower-cased headers and body."""
    stream: trio.abc.Stream = (
        await trio.open_tcp_stream("127.0.0.1", server.port)
        if ssl_context is None
        else await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", server.port, ssl_context=ssl_context, https_compatible=True
        )
    )
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
        # wsproto hands a message over in pieces when its frame arrives in several reads.
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, Message):
                parts.append(event.data)
                if not event.message_finished:
                    continue
                data = parts[0][:0].join(parts)  # type: ignore[arg-type]
                return orjson.loads(data)
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
