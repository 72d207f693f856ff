"""A Connection needs only a ConnectionHost, not a Server: one is built here from its parts, on a socketpair."""

from __future__ import annotations

import socket

import attrs
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

from fluxrt_trio.admission import Admission
from fluxrt_trio.auth import Verifier
from fluxrt_trio.checks import ChannelChecks
from fluxrt_trio.connection import Connection, ConnectionSettings
from fluxrt_trio.hub import LocalHub
from fluxrt_trio.metrics import Counters
from fluxrt_trio.outbox import Flusher
from fluxrt_trio.supervisor import Supervisor

from .support.config import make_config


@attrs.define
class Host:
    """The smallest node a connection can run on: no listener, no database."""

    settings: ConnectionSettings
    verifier: Verifier
    hub: LocalHub = attrs.field(factory=LocalHub)
    counters: Counters = attrs.field(factory=Counters)
    flusher: Flusher = attrs.field(factory=Flusher)
    supervisor: Supervisor = attrs.field(factory=lambda: Supervisor(30.0, 120.0))
    admission: Admission[Connection] = attrs.field(factory=lambda: Admission(10, 10))
    checks: ChannelChecks = attrs.field(factory=lambda: ChannelChecks(None, ()))
    draining: bool = False
    changed: list[str] = attrs.field(factory=list)

    def subscriptions_changed(self, channel: str) -> None:
        self.changed.append(channel)

    def admin(self, endpoint: str) -> tuple[int, bytes, str]:
        return 200, b"{}", "application/json"


class Peer:
    """The client end of the socketpair, speaking wsproto."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[object] = []

    async def send(self, data: bytes) -> None:
        while data:
            data = data[await self.sock.send(data) :]

    async def next_event(self) -> object:
        with trio.fail_after(5):
            while not self.events:
                self.ws.receive_data(await self.sock.recv(65536) or None)
                self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def request(self, **message: object) -> dict:
        await self.send(self.ws.send(TextMessage(orjson.dumps(message).decode())))
        event = await self.next_event()
        assert isinstance(event, Message), event
        return orjson.loads(event.data)


async def test_a_connection_runs_on_a_host_without_a_server():
    config = make_config()
    host = Host(ConnectionSettings.from_config(config), Verifier(config.auth))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    peer = Peer(trio.socket.from_stdlib_socket(theirs))
    connection = Connection(host, ours, "c1", "test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host.flusher.run)
        nursery.start_soon(connection.run)
        await peer.send(peer.ws.send(Request(host="localhost", target="/realtime")))
        assert isinstance(await peer.next_event(), AcceptConnection)
        assert host.admission.connections == {connection}
        ack = await peer.request(type="subscribe", channel="broadcast:a", ref="1")
        assert ack == {"type": "ack", "channel": "broadcast:a", "status": "subscribed", "ref": "1"}
        assert host.hub.subscribers("broadcast:a") == [connection]
        # A table subscribe on a host without a database is refused, and says how to configure one.
        refusal = await peer.request(type="subscribe", channel="table:public.users", ref="2")
        assert refusal["code"] == "SUBSCRIPTION_FAILED" and "database.dsn" in refusal["message"]
        assert await peer.request(type="ping") == {"type": "pong"}
        assert host.counters.messages_in == 3
        await peer.send(peer.ws.send(CloseConnection(code=1000, reason="bye")))
        closed = await peer.next_event()
        assert isinstance(closed, CloseConnection) and closed.code == 1000
        with trio.fail_after(5):
            while host.admission.connections:
                await trio.sleep(0.01)
        assert host.hub.subscribers("broadcast:a") == []
        nursery.cancel_scope.cancel()
