"""A Connection needs only a ConnectionHost, not a Server: one is built here from its parts, on a socketpair."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.messages import Error
from fluxrt_trio.protocol.session import CheckAction, CheckSubscribe
from fluxrt_trio.supervisor import Supervisor

from .support.config import make_config, token


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


class TablesAllowedOnce:
    """Checks that allow every subscribe, and fail with a fault of ours when a table subscription is checked again
    under a new token for `failing`."""

    def __init__(self, failing: str) -> None:
        self.failing = failing

    async def subscribe(self, identity: Identity, check: CheckSubscribe) -> Error | None:
        if check.renewal and check.channel.name == self.failing:
            raise RuntimeError("injected fault")
        return None

    async def action(self, identity: Identity, check: CheckAction) -> Error | None:
        return None


class CutOffHub(LocalHub):
    """A node whose cluster engine is unreachable while `cut_off`: it refuses presence changes and broadcasts."""

    def __init__(self) -> None:
        super().__init__()
        self.cut_off = True

    def unavailable(self) -> str | None:
        return "cluster engine unreachable" if self.cut_off else None


def make_host(**fields: Any) -> Host:
    config = make_config()
    return Host(ConnectionSettings.from_config(config), Verifier(config.auth), **fields)


@asynccontextmanager
async def connected(host: Host, target: str = "/realtime") -> AsyncIterator[tuple[Peer, Connection]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    peer = Peer(trio.socket.from_stdlib_socket(theirs))
    connection = Connection(host, ours, "c1", "test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(host.flusher.run)
        nursery.start_soon(connection.run)
        await peer.send(peer.ws.send(Request(host="localhost", target=target)))
        assert isinstance(await peer.next_event(), AcceptConnection)
        yield peer, connection
        nursery.cancel_scope.cancel()


async def test_a_connection_runs_on_a_host_without_a_server():
    host = make_host()
    async with connected(host) as (peer, connection):
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


async def test_a_subscription_that_cannot_be_checked_under_a_new_token_ends_and_the_others_are_checked():
    host = make_host(checks=TablesAllowedOnce("table:public.a"))
    async with connected(host, f"/realtime?token={token('alice')}") as (peer, connection):
        for name in ("table:public.a", "table:public.b"):
            assert (await peer.request(type="subscribe", channel=name))["status"] == "subscribed"
        assert await peer.request(type="auth", token=token("bob"), ref="t") == {
            "type": "ack",
            "status": "authorized",
            "ref": "t",
        }
        ended = await peer.next_event()
        assert isinstance(ended, Message)
        assert orjson.loads(ended.data) == {
            "type": "error",
            "code": "FORBIDDEN",
            "message": "no longer allowed under the new token: it could not be checked (internal error)",
            "channel": "table:public.a",
        }
        assert await peer.request(type="ping") == {"type": "pong"}
        assert host.hub.subscribers("table:public.a") == []
        assert host.hub.subscribers("table:public.b") == [connection]
        assert connection.identity is not None and connection.identity.sub == "bob"


async def test_a_presence_change_the_cluster_cannot_take_is_refused_unavailable_and_changes_nothing():
    hub = CutOffHub()
    host = make_host(hub=hub)
    async with connected(host, f"/realtime?token={token('alice')}") as (peer, connection):
        assert (await peer.request(type="subscribe", channel="presence:r"))["status"] == "subscribed"
        assert orjson.loads((await peer.next_event()).data) == {
            "type": "presence",
            "channel": "presence:r",
            "event": "sync",
            "payload": {},
        }
        refused = await peer.request(type="presence", channel="presence:r", event="track", payload={"s": 1}, ref="t")
        assert refused == {
            "type": "error",
            "code": "UNAVAILABLE",
            "message": "cluster engine unreachable: the presence change was not made; retry with backoff",
            "channel": "presence:r",
            "ref": "t",
        }
        assert hub.presence_state("presence:r") == {}
        assert connection.session is not None and connection.session.tracked == {}
        # Nothing is tracked, so there is nothing to untrack anywhere: acked at once, engine or not.
        untracked = {"type": "ack", "channel": "presence:r", "status": "untracked", "ref": "u"}
        assert await peer.request(type="presence", channel="presence:r", event="untrack", ref="u") == untracked

        hub.cut_off = False
        tracked = await peer.request(type="presence", channel="presence:r", event="track", payload={"s": 1}, ref="t2")
        assert tracked == {"type": "ack", "channel": "presence:r", "status": "tracked", "ref": "t2"}
        diff = orjson.loads((await peer.next_event()).data)
        assert diff["event"] == "diff" and list(diff["payload"]["joins"]) == ["alice"]
        assert list(hub.presence_state("presence:r")) == ["alice"]

        hub.cut_off = True
        refused = await peer.request(type="presence", channel="presence:r", event="untrack", ref="u2")
        assert refused["code"] == "UNAVAILABLE" and refused["ref"] == "u2" and refused["channel"] == "presence:r"
        assert list(hub.presence_state("presence:r")) == ["alice"]
        assert host.counters.errors["UNAVAILABLE"] == 2
        # Leaving is never refused: the unsubscribe gives the presence back.
        unsubscribed = await peer.request(type="unsubscribe", channel="presence:r", ref="x")
        assert unsubscribed == {"type": "ack", "channel": "presence:r", "status": "unsubscribed", "ref": "x"}
        assert hub.presence_state("presence:r") == {}
        assert connection.session.tracked == {}
