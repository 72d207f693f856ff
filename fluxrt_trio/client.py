"""A Trio client for fluxrt: one WebSocket shared by every channel of a client, callbacks or `async for`, and
reconnection that restores subscriptions and presence.

    async with open_client("ws://localhost:8080/realtime", token=token) as client:
        users = client.channel("table:public.users").on("INSERT", lambda change: print(change.record))
        await users.subscribe()

After a lost connection every table and broadcast channel resumes by itself: the core keeps the id of the last event
each delivered and resubscribes with it as `since`; `Resubscribed(recovered=...)` says whether what was missed
follows (docs/protocol.md, "Resume").

`publish()` sends broadcasts from a backend over HTTP (`POST /api/broadcast`) with a service role's token; it needs
no open client.

The protocol logic is `ClientCore`: values in, outputs out, no I/O (like h11), so it is tested without sockets.
`Backoff` and `CloseInfo.after` decide when to reconnect. `Client` is the Trio shell around them: one connection at
a time, with its reader, writer and heartbeat tasks in one nursery that belongs to the nursery of `open_client`.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import logging
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import attrs
import cattrs
import h11
import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection, wrap_client_stream

from .protocol.channels import ChannelKind, parse_channel
from .protocol.messages import (
    Ack,
    Auth,
    Broadcast,
    BroadcastEvent,
    ClientMessage,
    CloseCode,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Presence,
    PresenceEvent,
    ServerMessage,
    Subscribe,
    Unsubscribe,
    converter,
)

log = logging.getLogger("fluxrt.client")

HEARTBEAT_INTERVAL = 30.0
"""seconds between pings: docs/protocol.md's heartbeat; the server closes connections silent for 120 s"""
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 30.0
"""seconds `publish` waits for the whole exchange; the server answers 503 itself after api.publish_timeout (10 s)"""
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""largest message accepted from the server; fluxrt delivers rows of any size, so this is generous"""
EVENT_BUFFER = 1000
"""events an `EventStream` holds for a consumer that has not taken them yet"""
ABNORMAL_CLOSURE = 1006
"""RFC 6455's code for a connection that ended without a close frame: refused, timed out, or dropped"""

# Bounded like every queue here: a full queue makes the task that sends wait for the writer.
_OUTGOING_QUEUE = 64
_TABLE_EVENTS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
_PRESENCE_EVENTS = ("sync", "join", "leave")


class ConnectionState(enum.StrEnum):
    """The reference's connection states. CLOSED also covers the wait before a reconnect."""

    CONNECTING = "CONNECTING"
    OPEN = "OPEN"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class ChannelStatus(enum.StrEnum):
    CLOSED = "CLOSED"
    """not subscribed, and not asked to be"""
    SUBSCRIBING = "SUBSCRIBING"
    """asked to be: waiting for a connection or for the server's ack (also while reconnecting)"""
    SUBSCRIBED = "SUBSCRIBED"
    CHANNEL_ERROR = "CHANNEL_ERROR"
    """the server refused or ended the subscription (`Channel.error` says why); not retried until `subscribe()`"""


# ---- events ------------------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Change:
    """A row change on a `table:` channel, in the reference's shape. `timestamp` and `id` are fluxrt's extensions,
    and so is `partition`: on a TRUNCATE of one partition of a partitioned table, that partition (`schema.name`)."""

    type: str
    schema: str
    table: str
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None
    timestamp: str | None = None
    id: str | None = None
    partition: str | None = None


@attrs.frozen(slots=True)
class PresenceUpdate:
    """A presence change on a `presence:` channel.

    `event` is `sync` (the whole room, after each subscribe), `join` or `leave`; `key` is the presence key that
    joined or left (a token's `sub`, or `anon:...`) and `metas` its metas (`{"ref": R, "state": {...}}`) that did.
    `state` is the room as this client knows it after the update.
    """

    event: str
    key: str | None
    metas: list[dict[str, Any]]
    state: dict[str, list[dict[str, Any]]]


@attrs.frozen(slots=True)
class Resubscribed:
    """The channel is subscribed again after a lost connection, or from `subscribe(since=...)`.

    `recovered` True: it resumed from its position, and every event it missed follows, then the live stream. False:
    nothing was replayed (no event had arrived before the drop, the position is older than the server keeps, a
    restarted single node for broadcasts, a server without resume), so what happened in between is missing:
    refetch what you show.
    """

    recovered: bool = False


@attrs.frozen(slots=True)
class EventsDropped:
    """`count` events were dropped here because this stream's consumer fell `EVENT_BUFFER` events behind."""

    count: int


ChannelEvent = Change | BroadcastEvent | PresenceUpdate | Error | Resubscribed | EventsDropped


# ---- errors ------------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of the client's own exceptions."""


class ServerError(ClientError):
    """The server answered with `error`; `error` is that message, with `code`, `message` and `channel`."""

    def __init__(self, error: Error) -> None:
        where = f"{error.channel}: " if error.channel else ""
        super().__init__(f"{where}{error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def channel(self) -> str | None:
        return self.error.channel


class PublishError(ClientError):
    """The server refused a `publish`: `status` (HTTP), `code` (`INVALID_MESSAGE`, `INVALID_CHANNEL`,
    `UNAUTHORIZED`, `FORBIDDEN`, `RATE_LIMITED`, `UNAVAILABLE`) and `message` from its error, and `retry_after`
    (seconds) when it said to wait (429)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RequestInterrupted(ClientError):
    """The request can no longer be answered: its connection closed first (a broadcast may or may not have been
    delivered), or an unsubscribe or untrack overtook it."""


class ClientClosed(ClientError):
    """The client stopped and does not reconnect by itself. `close` says why; the message says what to do."""

    def __init__(self, close: CloseInfo) -> None:
        super().__init__(close.describe())
        self.close = close


# ---- when to reconnect -------------------------------------------------------------------------------------------


class After(enum.Enum):
    """What the client does after a connection ends."""

    RECONNECT = "reconnect"
    """after a `Backoff` delay"""
    NEW_TOKEN = "new_token"
    """only once `set_auth` gives a token other than the one refused"""
    STOP = "stop"


# Closes that blame this client: the same client would be closed the same way again. The SDK in sdk/typescript
# decides alike, so both clients of fluxrt behave the same.
_CLIENT_FAULTS = {
    1002: "the server saw a WebSocket protocol error",
    1003: "the server refused a frame type",
    1007: "the server received text that was not UTF-8",
    1008: "the server refused a message by policy",
    CloseCode.MESSAGE_TOO_BIG: "a message exceeded a size limit: the server's realtime.max_message_size for what this "
    "client sends, max_message_size of open_client() for what it receives",
}


@attrs.frozen(slots=True)
class CloseInfo:
    """How a connection ended: its close `code` and `reason`, the server's `error` sent just before (such as
    UNAUTHORIZED before 4001), or the `http_status` that refused the handshake."""

    code: int
    reason: str = ""
    error: Error | None = None
    http_status: int | None = None

    def after(self) -> After:
        """docs/protocol.md's advice for this close: wait for a new token after 4001; stop after 1000 and after closes
        that blame the client (1002, 1003, 1007, 1008, 1009); reconnect after anything else (1001, 1011, 4008,
        4009, 4029, and codes it does not list, such as 1006 for a dropped connection or 1012 from a proxy)."""
        if self.http_status is not None:
            # 5xx: draining or realtime disabled for now; any other refusal (404, 403) repeats on every attempt.
            return After.RECONNECT if self.http_status >= 500 or self.http_status == 429 else After.STOP
        if self.code == CloseCode.UNAUTHORIZED:
            return After.NEW_TOKEN
        if self.code == CloseCode.NORMAL or self.code in _CLIENT_FAULTS:
            return After.STOP
        return After.RECONNECT

    def describe(self) -> str:
        """One line: what happened and what to do about it."""
        if self.http_status is not None:
            what = f"the server refused the WebSocket handshake with HTTP {self.http_status}"
            if self.after() is After.STOP:
                return f"{what}: check the URL's path and the server's server.allowed_origins"
            return what
        said = f": {self.error.code}: {self.error.message}" if self.error else ""
        what = f"connection closed with {self.code} ({self.reason or 'no reason'}){said}"
        if self.code == CloseCode.UNAUTHORIZED:
            return f"{what}; the token was refused or expired: call set_auth() with a new token to reconnect"
        if self.code in _CLIENT_FAULTS:
            return f"{what}; {_CLIENT_FAULTS[self.code]}"
        return what


@attrs.define
class Backoff:
    """Exponential backoff with full jitter.

    The n-th delay in a row (from 0) is uniform in [0, min(cap, base * 2**n)] seconds, so clients that lost the same
    server spread their returns out instead of arriving together; after 4029, `rate_limited` seconds more. `reset`
    starts over.
    """

    base: float = 1.0
    cap: float = 30.0
    rate_limited: float = 5.0
    """added after close 4029, where the server asked for a back-off"""
    rng: random.Random = attrs.field(factory=random.Random)
    attempts: int = 0

    def next_delay(self, close: CloseInfo | None = None) -> float:
        """The delay before the next attempt, after `close`."""
        # The exponent stops growing long before the float could overflow; the cap has been reached by then.
        bound = min(self.cap, self.base * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        floor = self.rate_limited if close is not None and close.code == CloseCode.RATE_LIMITED else 0.0
        return floor + self.rng.uniform(0.0, bound)

    def reset(self) -> None:
        self.attempts = 0


# ---- the protocol core (no I/O) ----------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Send:
    """Send this text frame on the current connection."""

    text: str


@attrs.frozen(slots=True)
class Deliver:
    """Hand `event` to the listeners and streams of `channel`."""

    channel: str
    event: ChannelEvent


@attrs.frozen(slots=True)
class StatusChanged:
    """`channel` is now `status`; `error` when the server refused or ended it, `resumed` when it is subscribed again
    after a lost connection (or from an explicit `since`), and then `recovered` when the server replays what it
    missed."""

    channel: str
    status: ChannelStatus
    error: Error | None = None
    resumed: bool = False
    recovered: bool = False


WaitKey = tuple[str, str]
"""what a caller waits for: (`subscribe`, `unsubscribe`, `track` or `untrack`, channel) or (`broadcast` or `auth`,
ref)"""


@attrs.frozen(slots=True)
class Resolve:
    """Whoever waits for `key` is done: successfully, with the server's `error`, or `interrupted` (a reason)."""

    key: WaitKey
    error: Error | None = None
    interrupted: str | None = None


@attrs.frozen(slots=True)
class Abort:
    """The connection is dead (`reason`): drop it and reconnect."""

    reason: str


Output = Send | Deliver | StatusChanged | Resolve | Abort


@attrs.define
class ChannelState:
    """What the core knows about one channel."""

    name: str
    kind: ChannelKind
    event: str = "*"
    filter: str | None = None
    status: ChannelStatus = ChannelStatus.CLOSED
    error: Error | None = None
    subscribe_ref: str | None = None
    """the subscribe awaiting its ack on this connection"""
    resumed: bool = False
    """subscribed when the connection was lost (or given `since`): its next subscribe sends `position` as `since`,
    and its ack resumes it"""
    position: str | None = None
    """the id of the last event delivered on this subscription (a table change's `id`, a broadcast's `id`)"""
    presence: dict[str, Any] | None = None
    """the state this client tracks here; re-tracked after every (re)subscribe"""
    presence_acked: dict[str, Any] | None = None
    """the state the server holds for this connection"""
    track_ref: str | None = None
    presence_state: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)

    @property
    def wanted(self) -> bool:
        return self.status in (ChannelStatus.SUBSCRIBING, ChannelStatus.SUBSCRIBED)


@attrs.frozen(slots=True)
class _Request:
    kind: str
    channel: str = ""
    state: dict[str, Any] | None = None
    token: str | None = None
    since: str | None = None


@attrs.frozen(slots=True)
class _Diff:
    joins: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    leaves: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)


class ProtocolViolation(ValueError):
    """A server message that does not follow docs/protocol.md."""


_SERVER_TYPES: dict[str, type[ServerMessage]] = {
    "ack": Ack,
    "error": Error,
    "pong": Pong,
    "broadcast": BroadcastEvent,
    "presence": PresenceEvent,
}

_client_converter = converter.copy()
# A newer server's error codes reach the caller as plain strings instead of making the message unreadable.
_client_converter.register_structure_hook(ErrorCode, lambda value, _: ErrorCode._value2member_map_.get(value, value))


def decode_server(text: str | bytes) -> ServerMessage:
    """Decode one server frame into the models of protocol/messages.py.

    Raises ProtocolViolation naming the problem: invalid JSON, an unknown `type`, a missing or mistyped field.
    """
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(f"server message is not valid JSON: {exc}") from None
    kind = raw.get("type") if isinstance(raw, dict) else None
    cls = _SERVER_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolViolation(f"server message of unknown type: {str(text)[:200]}")
    message: ServerMessage = _structure(raw, cls)
    return message


def _structure(raw: Any, cls: type[Any]) -> Any:
    try:
        return _client_converter.structure(raw, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolViolation(f"malformed {cls.__name__}: {exc!r}: {str(raw)[:200]}") from None


def encode_client(message: ClientMessage) -> str:
    """Serialize a client message as compact JSON, `type` first, leaving out optional fields at their defaults.

    Raises TypeError when a payload holds something that is not JSON (orjson's message names it).
    """
    raw: dict[str, Any] = {"type": message.TYPE}
    for field in attrs.fields(type(message)):
        value = getattr(message, field.name)
        if field.default is not attrs.NOTHING and value == field.default:
            continue
        raw[field.name] = value
    return orjson.dumps(raw).decode()


class ClientCore:
    """The client side of docs/protocol.md without I/O.

    Operations (`subscribe`, `track`, ...) and connection events (`connected`, `receive`, `disconnected`,
    `heartbeat`) return outputs for the shell to carry out, in order. Every request carries a fresh `ref`, so each
    reply is matched to its request; refs never repeat, so a reply from an older connection matches nothing.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.presented: str | None = None
        """the token the server accepted last (at connect, or in an `auth` it acked)"""
        self.open = False
        self.confirmed = False
        """the server answered a request on this connection: it is serving us, not just accepting and closing"""
        self.server_error: Error | None = None
        """the last error about the connection itself (no channel, no ref), usually sent just before a close"""
        self.channels: dict[str, ChannelState] = {}
        self._requests: dict[str, _Request] = {}
        self._refs = itertools.count(1)
        self._awaiting_pong = False

    # ---- operations -------------------------------------------------------------------------------------------

    def add_channel(self, name: str, event: str = "*", filter: str | None = None) -> ChannelState:
        """The state of channel `name`, created on first use.

        Raises ChannelError (a ValueError) for a malformed name, and ValueError for `event` or `filter` on a channel
        that is not a table, or options other than those the channel was created with.
        """
        kind = parse_channel(name).kind
        if kind is not ChannelKind.TABLE and (event != "*" or filter is not None):
            raise ValueError(f"{name}: event and filter apply to table: channels only")
        existing = self.channels.get(name)
        if existing is None:
            existing = self.channels[name] = ChannelState(name, kind, event, filter)
        elif (existing.event, existing.filter) != (event, filter):
            raise ValueError(
                f"{name} is already open with event={existing.event!r}, filter={existing.filter!r}: one client "
                "holds one subscription per channel; use another client for other options"
            )
        return existing

    def subscribe(self, name: str, since: str | None = None) -> list[Output]:
        """Subscribe `name`, now or on the next connection. `since`: resume after that position (an id this channel
        delivered before) instead of starting from now.

        Raises ValueError for `since` on a presence channel, TypeError for a `since` that is not a string.
        """
        channel = self.channels[name]
        if since is not None:
            if not isinstance(since, str):
                raise TypeError(f"since must be a string, an id {name} delivered; got {type(since).__name__}")
            if channel.kind is ChannelKind.PRESENCE:
                raise ValueError(
                    f"{name}: presence has no history, so no since: the sync after each subscribe is the whole state"
                )
            channel.position = since
            channel.resumed = True
        out = [] if channel.status is ChannelStatus.SUBSCRIBED else self._set_status(channel, ChannelStatus.SUBSCRIBING)
        if self.open:
            out.append(self._send_subscribe(channel))
        return out

    def unsubscribe(self, name: str) -> list[Output]:
        channel = self.channels[name]
        was_wanted = channel.wanted
        self._forget(channel)
        out = self._set_status(channel, ChannelStatus.CLOSED)
        gone = f"unsubscribed from {name} first"
        out += [Resolve(("subscribe", name), interrupted=gone), Resolve(("track", name), interrupted=gone)]
        if self.open and was_wanted:
            out.append(Send(encode_client(Unsubscribe(name, ref=self._ref(_Request("unsubscribe", name))))))
        else:
            out.append(Resolve(("unsubscribe", name)))
        return out

    def broadcast(self, name: str, payload: Any) -> tuple[str, list[Output]]:
        """Returns the ref to wait for, with the outputs. Raises ValueError on a channel that is not broadcast:,
        TypeError for a payload that is not JSON."""
        _check_broadcast(self.channels[name])
        ref = str(next(self._refs))
        text = encode_client(Broadcast(name, payload, ref=ref))
        if not self.open:
            return ref, [Resolve(("broadcast", ref), interrupted="not connected")]
        self._requests[ref] = _Request("broadcast", name)
        return ref, [Send(text)]

    def track(self, name: str, state: dict[str, Any]) -> list[Output]:
        """Raises ValueError on a channel that is not presence: or not subscribed, TypeError for a state that is not
        a dict of JSON values."""
        channel = self._presence_channel(name)
        if not isinstance(state, dict):
            raise TypeError(f"presence state must be a dict (a JSON object), got {type(state).__name__}")
        orjson.dumps(state)
        if not channel.wanted:
            raise ValueError(f"subscribe to {name} before tracking presence on it")
        channel.presence = state
        if self.open and channel.status is ChannelStatus.SUBSCRIBED:
            return [self._send_track(channel)]
        return []

    def untrack(self, name: str) -> list[Output]:
        channel = self._presence_channel(name)
        channel.presence = None
        sent = channel.track_ref is not None or channel.presence_acked is not None
        if self.open and sent:
            ref = self._ref(_Request("untrack", name))
            return [Send(encode_client(Presence(name, "untrack", ref=ref)))]
        return [
            Resolve(("track", name), interrupted=f"untracked on {name} before the track was sent"),
            Resolve(("untrack", name)),
        ]

    def set_auth(self, token: str) -> tuple[str, list[Output]]:
        """Use `token` from now on; on an open connection, send it. Returns the ref to wait for, with the outputs."""
        self.token = token
        if not self.open:
            # The next connection presents it in its handshake.
            ref = str(next(self._refs))
            return ref, [Resolve(("auth", ref))]
        ref = self._ref(_Request("auth", token=token))
        return ref, [Send(encode_client(Auth(token, ref=ref)))]

    def heartbeat(self) -> list[Output]:
        """Time for a ping. A connection that sent nothing since the previous one is dead."""
        if not self.open:
            return []
        if self._awaiting_pong:
            return [Abort("nothing received from the server for a whole heartbeat interval")]
        self._awaiting_pong = True
        return [Send(encode_client(Ping()))]

    # ---- connection events ------------------------------------------------------------------------------------

    def connected(self) -> list[Output]:
        """A connection opened: subscribe every channel that should be (presence is re-tracked on each ack)."""
        self.open = True
        self.confirmed = False
        self.server_error = None
        self._awaiting_pong = False
        self.presented = self.token
        return [self._send_subscribe(channel) for channel in self.channels.values() if channel.wanted]

    def disconnected(self) -> list[Output]:
        """The connection ended. What the server held for it is gone; subscriptions and tracks wait for the next."""
        self.open = False
        out: list[Output] = []
        for ref, request in self._requests.items():
            if request.kind == "broadcast":
                out.append(
                    Resolve(
                        ("broadcast", ref),
                        interrupted="the connection closed before the server acknowledged the broadcast; it may or "
                        "may not have been delivered",
                    )
                )
            elif request.kind in ("unsubscribe", "untrack"):
                # Done either way: a new connection holds neither.
                out.append(Resolve((request.kind, request.channel)))
            elif request.kind == "auth":
                # The token goes with the next connection's handshake.
                out.append(Resolve(("auth", ref)))
        self._requests.clear()
        for channel in self.channels.values():
            channel.subscribe_ref = channel.track_ref = None
            channel.presence_acked = None
            if channel.status is ChannelStatus.SUBSCRIBED:
                channel.resumed = True
                out += self._set_status(channel, ChannelStatus.SUBSCRIBING)
        return out

    def receive(self, text: str | bytes) -> list[Output]:
        """One frame from the server. A frame that breaks the protocol is logged and ignored."""
        self._awaiting_pong = False
        try:
            message = decode_server(text)
            match message:
                case Ack():
                    self.confirmed = True
                    return self._ack(message)
                case Error():
                    return self._error(message)
                case Pong():
                    self.confirmed = True
                    return []
                case BroadcastEvent():
                    return self._broadcast_event(message)
                case PresenceEvent():
                    return self._presence_event(message)
        except ProtocolViolation as exc:
            log.warning("ignoring a server message: %s", exc)
        return []

    # ---- replies ----------------------------------------------------------------------------------------------

    def _ack(self, ack: Ack) -> list[Output]:
        ref = ack.ref
        request = self._requests.pop(ref, None) if ref is not None else None
        if ref is None or request is None:
            return []
        name = request.channel
        match request.kind:
            case "subscribe":
                channel = self.channels[name]
                if channel.subscribe_ref != ack.ref:
                    return []  # a later subscribe or an unsubscribe overtook it
                channel.subscribe_ref = None
                resumed, channel.resumed = channel.resumed, False
                # A server without resume sends no `recovered`: nothing was replayed.
                recovered = request.since is not None and ack.recovered is True
                if request.since is not None and not recovered:
                    # That position no longer describes what the application holds; the next event sets one.
                    channel.position = None
                out = self._set_status(channel, ChannelStatus.SUBSCRIBED, resumed=resumed, recovered=recovered)
                out.append(Resolve(("subscribe", name)))
                if channel.presence is not None:
                    out.append(self._send_track(channel))
                return out
            case "track":
                channel = self.channels[name]
                channel.presence_acked = request.state
                if channel.track_ref != ack.ref:
                    return []
                channel.track_ref = None
                return [Resolve(("track", name))]
            case "untrack":
                self.channels[name].presence_acked = None
                return [Resolve(("untrack", name))]
            case "unsubscribe":
                return [Resolve(("unsubscribe", name))]
            case "auth":
                self.presented = request.token
                return [Resolve(("auth", ref))]
            case _:
                return [Resolve(("broadcast", ref))]

    def _error(self, error: Error) -> list[Output]:
        if error.ref is None:
            return self._unsolicited(error)
        request = self._requests.pop(error.ref, None)
        if request is None:
            return []
        name = request.channel
        match request.kind:
            case "subscribe":
                channel = self.channels[name]
                if channel.subscribe_ref != error.ref:
                    return []
                return [*self._ended(channel, error), Resolve(("subscribe", name), error=error)]
            case "track":
                channel = self.channels[name]
                if channel.track_ref != error.ref:
                    return []
                # A refused track leaves the server with what it had, and so does this client.
                channel.track_ref = None
                channel.presence = channel.presence_acked
                return [Resolve(("track", name), error=error)]
            case "auth":
                # The server keeps the connection's identity; so does the next connection.
                if self.token == request.token:
                    self.token = self.presented
                return [Resolve(("auth", error.ref), error=error)]
            case "unsubscribe" | "untrack":
                return [Resolve((request.kind, name), error=error)]
            case _:
                return [Resolve(("broadcast", error.ref), error=error)]

    def _unsolicited(self, error: Error) -> list[Output]:
        if error.channel is None:
            self.server_error = error
            log.warning("server error: %s: %s", error.code, error.message)
            return []
        channel = self.channels.get(error.channel)
        if channel is None or not channel.wanted:
            return []
        if error.code == ErrorCode.CHANGES_MISSED:
            return [Deliver(channel.name, error)]
        # Any other error about a channel that nobody asked for ends its subscription (FORBIDDEN after a token
        # change, SUBSCRIPTION_FAILED after disable_realtime).
        return self._ended(channel, error)

    def _broadcast_event(self, message: BroadcastEvent) -> list[Output]:
        channel = self.channels.get(message.channel)
        if channel is None or not channel.wanted:
            return []
        event: Change | BroadcastEvent = message
        if channel.kind is ChannelKind.TABLE:
            event = _structure(message.payload, Change)
        if event.id is not None:
            channel.position = event.id
        return [Deliver(channel.name, event)]

    def _presence_event(self, message: PresenceEvent) -> list[Output]:
        channel = self.channels.get(message.channel)
        if channel is None or not channel.wanted or channel.kind is not ChannelKind.PRESENCE:
            return []
        if message.event == "sync":
            channel.presence_state = _structure(message.payload, dict[str, list[dict[str, Any]]])
            return [Deliver(channel.name, PresenceUpdate("sync", None, [], _copy_state(channel.presence_state)))]
        if message.event != "diff":
            raise ProtocolViolation(f"presence event {message.event!r} is neither sync nor diff")
        diff = _structure(message.payload, _Diff)
        state = channel.presence_state
        # Leaves first: a re-track is a leave and a join of the same ref, and must end up as the join.
        for key, metas in diff.leaves.items():
            gone = {meta.get("ref") for meta in metas}
            kept = [meta for meta in state.get(key, []) if meta.get("ref") not in gone]
            if kept:
                state[key] = kept
            else:
                state.pop(key, None)
        for key, metas in diff.joins.items():
            new = {meta.get("ref") for meta in metas}
            state[key] = [meta for meta in state.get(key, []) if meta.get("ref") not in new] + metas
        snapshot = _copy_state(state)
        out: list[Output] = [
            Deliver(channel.name, PresenceUpdate("leave", key, metas, snapshot)) for key, metas in diff.leaves.items()
        ]
        out += [
            Deliver(channel.name, PresenceUpdate("join", key, metas, snapshot)) for key, metas in diff.joins.items()
        ]
        return out

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _ref(self, request: _Request) -> str:
        ref = str(next(self._refs))
        self._requests[ref] = request
        return ref

    def _send_subscribe(self, channel: ChannelState) -> Send:
        # Only a resubscribe resumes: a subscribe again on a live subscription would replay what was delivered.
        since = channel.position if channel.resumed else None
        ref = channel.subscribe_ref = self._ref(_Request("subscribe", channel.name, since=since))
        return Send(encode_client(Subscribe(channel.name, channel.event, channel.filter, ref=ref, since=since)))

    def _send_track(self, channel: ChannelState) -> Send:
        ref = channel.track_ref = self._ref(_Request("track", channel.name, state=channel.presence))
        return Send(encode_client(Presence(channel.name, "track", channel.presence, ref=ref)))

    def _presence_channel(self, name: str) -> ChannelState:
        channel = self.channels[name]
        if channel.kind is not ChannelKind.PRESENCE:
            raise ValueError(f"cannot track presence on {name}: presence goes to presence:{{room}} channels")
        return channel

    def _set_status(
        self,
        channel: ChannelState,
        status: ChannelStatus,
        *,
        error: Error | None = None,
        resumed: bool = False,
        recovered: bool = False,
    ) -> list[Output]:
        if channel.status is status and not resumed:
            return []
        channel.status = status
        channel.error = error
        return [StatusChanged(channel.name, status, error, resumed, recovered)]

    def _forget(self, channel: ChannelState) -> None:
        channel.subscribe_ref = channel.track_ref = None
        channel.presence = channel.presence_acked = None
        channel.presence_state = {}
        channel.resumed = False
        channel.position = None

    def _ended(self, channel: ChannelState, error: Error) -> list[Output]:
        self._forget(channel)
        return [
            *self._set_status(channel, ChannelStatus.CHANNEL_ERROR, error=error),
            Resolve(("track", channel.name), error=error),
        ]


def _check_broadcast(channel: ChannelState) -> None:
    if channel.kind is not ChannelKind.BROADCAST:
        raise ValueError(f"cannot send on {channel.name}: broadcast messages go to broadcast:{{topic}} channels")


def _copy_state(state: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {key: list(metas) for key, metas in state.items()}


# ---- listeners and streams ---------------------------------------------------------------------------------------

Callback = Callable[[Any], object]

_LISTENABLE = {
    ChannelKind.TABLE: (*_TABLE_EVENTS, "*"),
    ChannelKind.BROADCAST: ("broadcast",),
    ChannelKind.PRESENCE: ("presence",),
}


class Listeners:
    """The callbacks of one channel, each for one kind of event; `matching` picks those an event goes to."""

    def __init__(self, name: str, kind: ChannelKind) -> None:
        self.name = name
        self.kind = kind
        self._entries: list[tuple[str, str | None, Callback]] = []

    def add(self, what: str, callback: Callback, event: str | None = None) -> None:
        """Listen for `what`: this channel kind's events (INSERT, UPDATE, DELETE, TRUNCATE or * on a table,
        broadcast, presence), `error`, `status` or `resubscribed`. `event` narrows presence to sync, join or leave.

        Raises ValueError naming what this channel offers, TypeError for an async callback.
        """
        offered = (*_LISTENABLE[self.kind], "error", "status", "resubscribed")
        if what not in offered:
            raise ValueError(f"{self.name}: cannot listen for {what!r}; this channel offers {', '.join(offered)}")
        if event is not None and (what != "presence" or event not in _PRESENCE_EVENTS):
            raise ValueError(f"{self.name}: event= narrows 'presence' to one of {', '.join(_PRESENCE_EVENTS)}")
        if inspect.iscoroutinefunction(callback):
            raise TypeError(
                f"{self.name}: callbacks are called synchronously, in order; to await per event, iterate "
                "channel.events() instead"
            )
        self._entries.append((what, event, callback))

    def matching(self, item: ChannelEvent | ChannelStatus) -> list[Callback]:
        match item:
            case Change():
                keys: tuple[str, ...] = (item.type, "*")
            case BroadcastEvent():
                keys = ("broadcast",)
            case PresenceUpdate():
                keys = ("presence",)
            case Error():
                keys = ("error",)
            case ChannelStatus():
                keys = ("status",)
            case Resubscribed():
                keys = ("resubscribed",)
            case _:
                return []
        presence_event = item.event if isinstance(item, PresenceUpdate) else None
        return [cb for what, event, cb in self._entries if what in keys and (event is None or event == presence_event)]


class EventStream:
    """A channel's events, in order, for `async for` (from `Channel.events`).

    Holds at most `max_buffer` events that the consumer has not taken. Beyond that, new events are dropped, so that
    a slow consumer never slows the connection, the callbacks or other channels; the consumer finds one
    `EventsDropped(count)` where they were. Iteration ends when the channel is unsubscribed or the client is closed;
    it raises ServerError when the server refuses or ends the subscription, ClientClosed when the client stops.
    Use it as a context manager, or call `close`, to stop receiving.
    """

    def __init__(self, channel: Channel, max_buffer: int) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer}")
        self._channel = channel
        self._send, self._receive = trio.open_memory_channel[ChannelEvent](max_buffer)
        self._dropped = 0
        self._error: ClientError | None = None

    def push(self, event: ChannelEvent) -> None:
        """Queue `event` without waiting, or count it as dropped."""
        if self._dropped:
            try:
                self._send.send_nowait(EventsDropped(self._dropped))
            except trio.WouldBlock:
                self._dropped += 1
                return
            self._dropped = 0
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1

    def end(self, error: ClientError | None) -> None:
        """No more events: the consumer takes what is buffered, then iteration stops (or raises `error`)."""
        self._error = error
        self._send.close()

    def close(self) -> None:
        self._channel._streams.discard(self)
        self._send.close()
        self._receive.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ChannelEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            pass
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return EventsDropped(dropped)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration


# ---- the Trio shell ----------------------------------------------------------------------------------------------


class Channel:
    """One channel of a client (from `Client.channel`). All its traffic goes over the client's one WebSocket."""

    def __init__(self, client: Client, state: ChannelState) -> None:
        self._client = client
        self._state = state
        self._listeners = Listeners(state.name, state.kind)
        self._streams: set[EventStream] = set()

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def kind(self) -> ChannelKind:
        return self._state.kind

    @property
    def status(self) -> ChannelStatus:
        return self._state.status

    @property
    def error(self) -> Error | None:
        """The server's error that refused or ended the subscription, while the status is CHANNEL_ERROR."""
        return self._state.error

    @property
    def position(self) -> str | None:
        """The id of the last event delivered on this channel (a `Change`'s `id`, a `BroadcastEvent`'s `id`), already
        set while callbacks run: after a reconnect the channel resubscribes from it. None before the first event,
        once the server could not resume from it (until the next event), and after the subscription ended. Keep it
        to resume later with `subscribe(since=...)`."""
        return self._state.position

    def on(self, what: str, callback: Callback, *, event: str | None = None) -> Channel:
        """Call `callback(item)` for each `what`, in arrival order; returns the channel, for chaining.

        `what`: `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE` or `*` (a `Change`) on a table channel; `broadcast` (a
        `BroadcastEvent`); `presence` (a `PresenceUpdate`, narrowed by `event=` to sync, join or leave); `error` (an
        `Error`: CHANGES_MISSED, or what refused or ended the subscription); `status` (a `ChannelStatus`);
        `resubscribed` (a `Resubscribed`: refetch unless its `recovered` is True).
        Callbacks run in the task that received the event and must not block; an exception from one propagates
        out of `open_client`. Raises ValueError for what this channel does not offer.
        """
        self._listeners.add(what, callback, event)
        return self

    def events(self, max_buffer: int = EVENT_BUFFER) -> EventStream:
        """A new stream of this channel's events (see EventStream). Open it before `subscribe` to miss nothing:

            with channel.events() as events:
                await channel.subscribe()
                async for event in events: ...

        Items: `Change`, `BroadcastEvent` or `PresenceUpdate`; `Error` for CHANGES_MISSED (refetch, the stream goes
        on); `Resubscribed` after a lost connection (refetch unless `recovered`); `EventsDropped` after an overflow.
        """
        stream = EventStream(self, max_buffer)
        self._streams.add(stream)
        return stream

    async def subscribe(self, *, since: str | None = None) -> Channel:
        """Subscribe, and return the channel once the server acked it.

        Waits through reconnects (bound it with `trio.fail_after`). After a reconnect the channel is subscribed
        again by itself, from its `position`, and says so with `Resubscribed`. `since` (table and broadcast
        channels): resume after that position, one kept from an earlier `position`; a `Resubscribed` then says
        whether the server replays what followed it. Raises ServerError with the server's code and message when it
        refuses (the status is then CHANNEL_ERROR), ClientClosed when the client has stopped, ValueError for `since`
        on a presence channel.
        """
        await self._client._request(("subscribe", self.name), self._client._core.subscribe(self.name, since))
        return self

    async def unsubscribe(self) -> None:
        """Unsubscribe; returns once the server acked it (at once when not connected). Streams end."""
        await self._client._request(("unsubscribe", self.name), self._client._core.unsubscribe(self.name))

    async def send(self, payload: Any) -> None:
        """Broadcast `payload` (any JSON value) to every other subscriber of this `broadcast:` channel.

        Waits for a connection, then for the server's ack. Raises ServerError (FORBIDDEN, RATE_LIMITED),
        RequestInterrupted when the connection closed before the ack (it may or may not have been delivered),
        ClientClosed when the client has stopped, ValueError on another kind of channel, TypeError for a payload
        that is not JSON.
        """
        _check_broadcast(self._state)
        await self._client._wait_open()
        ref, outputs = self._client._core.broadcast(self.name, payload)
        await self._client._request(("broadcast", ref), outputs)

    async def track(self, state: dict[str, Any]) -> None:
        """Share `state` (a JSON object) in this `presence:` channel; returns once the server acked it.

        The channel must be subscribed or subscribing; the state is tracked again after every reconnect. Raises
        ServerError (INVALID_MESSAGE for an oversized state, FORBIDDEN from `realtime.authorize`): the previous
        state then stays. ValueError when not subscribed or not a presence channel.
        """
        await self._client._request(("track", self.name), self._client._core.track(self.name, state))

    async def untrack(self) -> None:
        """Stop sharing presence here; returns once the server acked it (at once when nothing was sent)."""
        await self._client._request(("untrack", self.name), self._client._core.untrack(self.name))

    def presence_state(self) -> dict[str, list[dict[str, Any]]]:
        """The room as last synced and updated: presence key -> metas (`{"ref": R, "state": {...}}`)."""
        return _copy_state(self._state.presence_state)

    def _deliver(self, event: ChannelEvent) -> None:
        for callback in self._listeners.matching(event):
            callback(event)
        for stream in self._streams:
            stream.push(event)

    def _status_changed(self, change: StatusChanged) -> None:
        for callback in self._listeners.matching(change.status):
            callback(change.status)
        if change.status is ChannelStatus.CHANNEL_ERROR and change.error is not None:
            for callback in self._listeners.matching(change.error):
                callback(change.error)
            self._end_streams(ServerError(change.error))
        elif change.status is ChannelStatus.CLOSED:
            self._end_streams(None)
        elif change.resumed:
            resubscribed = Resubscribed(change.recovered)
            for callback in self._listeners.matching(resubscribed):
                callback(resubscribed)
            for stream in self._streams:
                stream.push(resubscribed)

    def _end_streams(self, error: ClientError | None) -> None:
        streams, self._streams = self._streams, set()
        for stream in streams:
            stream.end(error)


class _Waiter:
    def __init__(self) -> None:
        self.done = trio.Event()
        self._outcome: Resolve | ClientError | None = None

    def resolve(self, outcome: Resolve | ClientError) -> None:
        if not self.done.is_set():
            self._outcome = outcome
            self.done.set()

    def result(self) -> None:
        outcome = self._outcome
        if isinstance(outcome, ClientError):
            raise outcome
        if outcome is not None and outcome.error is not None:
            raise ServerError(outcome.error)
        if outcome is not None and outcome.interrupted is not None:
            raise RequestInterrupted(outcome.interrupted)


@attrs.frozen(slots=True)
class _Target:
    host: str
    port: int
    resource: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Target:
        parts = urllib.parse.urlsplit(url)
        tls = {"ws": False, "http": False, "wss": True, "https": True}.get(parts.scheme)
        if tls is None or not parts.hostname:
            raise ValueError(f"expected a URL like ws://localhost:8080/realtime or http://localhost:8080, got {url!r}")
        path = parts.path
        if parts.scheme in ("http", "https"):
            # A base URL, as the reference's createClient takes it: the endpoint is its /realtime.
            path = path.rstrip("/") + "/realtime"
        resource = (path or "/") + (f"?{parts.query}" if parts.query else "")
        context = (ssl_context or ssl.create_default_context()) if tls else None
        return cls(parts.hostname, parts.port or (443 if tls else 80), resource, context)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port in (80, 443) else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        # The query may hold a token: never log it.
        return f"{'wss' if self.ssl_context else 'ws'}://{self.host_header}{self.resource.partition('?')[0]}"

    async def open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if self.ssl_context is None:
            return await trio.open_tcp_stream(self.host, self.port)
        return await trio.open_ssl_over_tcp_stream(
            self.host, self.port, ssl_context=self.ssl_context, https_compatible=True
        )


class Client:
    """A fluxrt client: one WebSocket at a time, shared by its channels, reconnected with `backoff` after every
    close that docs/protocol.md says to retry. Obtain one from `open_client`, whose nursery runs it."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        backoff: Backoff | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        max_message_size: int = MAX_MESSAGE_SIZE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._target = _Target.parse(url, ssl_context)
        self._core = ClientCore(token)
        self._heartbeat_interval = heartbeat_interval
        self._backoff = backoff if backoff is not None else Backoff()
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._channels: dict[str, Channel] = {}
        self._waiters: dict[WaitKey, list[_Waiter]] = {}
        self._state = ConnectionState.CLOSED
        self._state_callbacks: list[Callable[[ConnectionState], object]] = []
        self._changed = trio.Event()
        self._ws: WebSocketConnection | None = None
        self._outgoing: trio.MemorySendChannel[str] | None = None
        self._connection_scope: trio.CancelScope | None = None
        self._abort_reason: str | None = None
        self._run_scope: trio.CancelScope | None = None
        self._stopped: CloseInfo | None = None
        self._finished = False
        self._closing = False
        self.last_close: CloseInfo | None = None
        """how the last connection ended"""

    @property
    def state(self) -> ConnectionState:
        return self._state

    def on_state(self, callback: Callable[[ConnectionState], object]) -> None:
        """Call `callback(state)` on every change of the connection state."""
        self._state_callbacks.append(callback)

    def channel(self, name: str, *, event: str = "*", filter: str | None = None) -> Channel:
        """The channel `name` of this client (the same object for the same name).

        `event` (INSERT, UPDATE, DELETE, TRUNCATE or *) and `filter` (`column=op.value`) narrow a table channel on
        the server. Raises ValueError for a malformed name (with the expected format), for options on another kind
        of channel, or for options other than those the channel already has.
        """
        state = self._core.add_channel(name, event, filter)
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(self, state)
        return channel

    async def set_auth(self, token: str) -> None:
        """Use `token` from now on.

        On an open connection, sends it in an `auth` message and returns once the server accepted it; raises
        ServerError (UNAUTHORIZED, RATE_LIMITED) if it did not, and the connection keeps its identity. Otherwise the
        next connection presents it; a client stopped by 4001 reconnects with it. Raises ClientClosed for the token
        that was just refused, or when the client has stopped for good.
        """
        if self._finished or (self._stopped is not None and token == self._core.presented):
            raise ClientClosed(self._stopped or CloseInfo(CloseCode.NORMAL, "the client was closed"))
        ref, outputs = self._core.set_auth(token)
        self._wake()
        await self._request(("auth", ref), outputs)

    async def aclose(self) -> None:
        """Close the connection with 1000 (waiting up to `close_timeout` for the server) and stop. Streams end;
        pending requests raise ClientClosed. `open_client` calls it on exit."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        with trio.CancelScope(shield=True):
            if ws is not None:
                self._set_state(ConnectionState.CLOSING)
                with trio.move_on_after(self._close_timeout):
                    await ws.aclose(CloseCode.NORMAL, "client closed")
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._stop(CloseInfo(CloseCode.NORMAL, "the client was closed"), finished=True)
        self._set_state(ConnectionState.CLOSED)

    # ---- running ----------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve and reconnect until `aclose` or a close not to retry. `open_client` runs it."""
        with trio.CancelScope() as self._run_scope:
            task_status.started()
            while True:
                close, confirmed = await self._connect_and_serve()
                if self._closing:
                    return
                self.last_close = close
                after = close.after()
                if after is After.RECONNECT:
                    if confirmed:
                        self._backoff.reset()
                    delay = self._backoff.next_delay(close)
                    log.info("%s: %s; reconnecting in %.2f s", self._target.display, close.describe(), delay)
                    await trio.sleep(delay)
                    continue
                log.warning("%s: %s", self._target.display, close.describe())
                self._stop(close, finished=after is After.STOP)
                if after is After.STOP:
                    return
                refused = self._core.presented
                while self._core.token == refused:
                    await self._changed.wait()
                self._stopped = None

    async def _connect_and_serve(self) -> tuple[CloseInfo, bool]:
        self._set_state(ConnectionState.CONNECTING)
        token = self._core.token
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        stream: trio.abc.Stream | None = None
        result: tuple[CloseInfo, bool] | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(self._connect_timeout):
                        stream = await self._target.open_stream()
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            self._target.host_header,
                            self._target.resource,
                            extra_headers=headers,
                            max_message_size=self._max_message_size,
                        )
                except (OSError, trio.TooSlowError, HandshakeError) as exc:
                    nursery.cancel_scope.cancel()
                    return CloseInfo(ABNORMAL_CLOSURE, f"could not connect: {exc!r}"), False
                result = await self._serve(ws, nursery)
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            # trio-websocket raises a refused handshake from its reader task, inside the nursery.
            rejected = group.exceptions[0]
            assert isinstance(rejected, ConnectionRejected)
            result = CloseInfo(ABNORMAL_CLOSURE, "handshake refused", http_status=rejected.status_code), False
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            self._set_state(ConnectionState.CLOSED)
        # mypy takes the nursery for one that never swallows an exception (trio types open_nursery() so), but the
        # heartbeat's cancellation of it ends there, with no result.
        if result is None:
            # The heartbeat cancelled the connection's nursery.
            result = CloseInfo(ABNORMAL_CLOSURE, self._abort_reason or "connection aborted"), self._core.confirmed  # type: ignore[unreachable]
        return result

    async def _serve(self, ws: WebSocketConnection, nursery: trio.Nursery) -> tuple[CloseInfo, bool]:
        outgoing, queued = trio.open_memory_channel[str](_OUTGOING_QUEUE)
        self._ws, self._outgoing = ws, outgoing
        self._connection_scope = nursery.cancel_scope
        self._abort_reason = None
        nursery.start_soon(self._write, ws, queued)
        nursery.start_soon(self._heartbeat)
        self._set_state(ConnectionState.OPEN)
        log.info("%s: connected", self._target.display)
        try:
            await self._apply(self._core.connected())
            while True:
                await self._apply(self._core.receive(await ws.get_message()))
        except ConnectionClosed as exc:
            if self._closing:
                # aclose() is finishing the close handshake, which needs the reader task in this nursery; it
                # cancels the client when done.
                await trio.sleep_forever()
            reason = exc.reason
            code, text = (reason.code, reason.reason or "") if reason is not None else (ABNORMAL_CLOSURE, "")
            return CloseInfo(code, text, error=self._core.server_error), self._core.confirmed
        finally:
            self._ws = self._outgoing = self._connection_scope = None
            outgoing.close()
            # Also when cancelled: waiters and statuses learn that this connection is gone (nothing here awaits).
            await self._apply(self._core.disconnected())

    async def _write(self, ws: WebSocketConnection, queued: trio.MemoryReceiveChannel[str]) -> None:
        # The one task that writes messages, so that a caller cancelled mid-send never leaves half a frame.
        async with queued:
            async for text in queued:
                try:
                    await ws.send_message(text)
                except ConnectionClosed:
                    return

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self._heartbeat_interval)
            await self._apply(self._core.heartbeat())

    async def _apply(self, outputs: list[Output]) -> None:
        # One batch of outputs belongs to the connection that was current when the core produced it.
        outgoing = self._outgoing
        for output in outputs:
            match output:
                case Send(text=text):
                    if outgoing is None:
                        continue
                    try:
                        await outgoing.send(text)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # That connection ended; the core sends again on the next one what must outlive it.
                        outgoing = None
                case Deliver(channel=name, event=event):
                    self._channels[name]._deliver(event)
                case StatusChanged():
                    self._channels[output.channel]._status_changed(output)
                case Resolve(key=key):
                    for waiter in self._waiters.pop(key, ()):
                        waiter.resolve(output)
                case Abort(reason=reason):
                    self._abort_reason = reason
                    if self._connection_scope is not None:
                        self._connection_scope.cancel()

    async def _request(self, key: WaitKey, outputs: list[Output]) -> None:
        waiter = _Waiter()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            await self._apply(outputs)
            if not waiter.done.is_set():
                self._check_running()
                await waiter.done.wait()
            waiter.result()
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]

    async def _wait_open(self) -> None:
        while self._state is not ConnectionState.OPEN:
            self._check_running()
            await self._changed.wait()

    def _check_running(self) -> None:
        if self._finished or self._stopped is not None:
            raise ClientClosed(self._stopped or CloseInfo(CloseCode.NORMAL, "the client was closed"))

    def _stop(self, close: CloseInfo, *, finished: bool) -> None:
        """The client stops (for good, or until a new token): waiters raise ClientClosed, streams end."""
        self._stopped = close
        self._finished = self._finished or finished
        waiters, self._waiters = self._waiters, {}
        for pending in waiters.values():
            for waiter in pending:
                waiter.resolve(ClientClosed(close))
        # Closed by its owner, a stream just ends; stopped by the server, it says why.
        error = None if self._closing else ClientClosed(close)
        for channel in self._channels.values():
            channel._end_streams(error)
        self._wake()

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        self._state = state
        self._wake()
        for callback in self._state_callbacks:
            callback(state)

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    backoff: Backoff | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    max_message_size: int = MAX_MESSAGE_SIZE,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """Run a client for the body of an `async with`; its tasks live in this context's nursery.

    `url`: `ws://host:port/realtime` (or `wss://`), or a base URL `http://host:port` as the reference's
    `createClient` takes it (then `/realtime` is appended). `token` goes in an `Authorization: Bearer` header.
    The client connects in the background; operations wait for the connection. A ping goes out every
    `heartbeat_interval` seconds, and a connection that answers nothing within one interval is dropped and
    reconnected. On exit the connection is closed with 1000. Raises ValueError for a URL of another form.
    """
    client = Client(
        url,
        token=token,
        heartbeat_interval=heartbeat_interval,
        backoff=backoff,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        max_message_size=max_message_size,
        ssl_context=ssl_context,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        sole = _sole_exception(group)
        if sole is None:
            raise
        # One failure (the body's, or a callback's inside the connection's nursery): raise it as itself, as
        # trio-websocket's open_websocket does, rather than wrapped in a group per nursery it crossed.
        raise sole from None


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return None if isinstance(exc, BaseExceptionGroup) else exc


async def publish(
    url: str,
    token: str,
    channel: str | None = None,
    payload: Any = None,
    *,
    messages: Iterable[tuple[str, Any]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = PUBLISH_TIMEOUT,
) -> int:
    """Broadcast from a backend: `POST /api/broadcast` with `token` (of one of the server's `auth.service_roles`).

    Either one message, `publish(url, token, "broadcast:orders", {"id": 7})`, or a batch of at most 100 `(channel,
    payload)` pairs, `publish(url, token, messages=[...])`, which the server publishes whole or not at all. `url` is
    the server as `open_client` takes it (`http://host:8080`, whose path the API's is appended to, or the
    `ws://host:8080/realtime` endpoint, whose path is dropped). Returns how many messages the server handed to every
    node.

    Raises ValueError for a URL of another form or for both or neither of `channel` and `messages`; PublishError
    when the server refuses (any status but 202); OSError when it cannot be reached; trio.TooSlowError after
    `timeout` seconds.
    """
    if (channel is None) == (messages is None):
        raise ValueError("give either channel (and payload) or messages, not both")
    body = orjson.dumps(
        {"channel": channel, "payload": payload}
        if messages is None
        else {"messages": [{"channel": name, "payload": value} for name, value in messages]}
    )
    parts = urllib.parse.urlsplit(url)
    base = parts.path.rstrip("/") if parts.scheme in ("http", "https") else ""
    target = _Target.parse(urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", "")), ssl_context)
    status, headers, answer = await _http_post(
        attrs.evolve(target, resource=base + "/api/broadcast"), token, body, timeout
    )
    try:
        decoded = orjson.loads(answer)
    except orjson.JSONDecodeError:
        decoded = None
    if status == 202 and isinstance(decoded, dict) and isinstance(decoded.get("published"), int):
        return int(decoded["published"])
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if not isinstance(error, dict):
        text = answer[:200].decode("utf-8", "replace")
        raise PublishError(status, "HTTP_ERROR", f"not a fluxrt API answer (is {url} a fluxrt server?): {text}")
    retry = headers.get("retry-after")
    raise PublishError(
        status,
        str(error.get("code")),
        str(error.get("message")),
        float(retry) if retry is not None and retry.isdigit() else None,
    )


async def _http_post(target: _Target, token: str, body: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One POST on a connection of its own: status, lower-cased headers and body of the answer."""
    exchange = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=target.resource,
        headers=[
            ("host", target.host_header),
            ("authorization", f"Bearer {token}"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ],
    )
    with trio.fail_after(timeout):
        stream = await target.open_stream()
        async with stream:
            await stream.send_all(
                (exchange.send(request) or b"")
                + (exchange.send(h11.Data(data=body)) or b"")
                + (exchange.send(h11.EndOfMessage()) or b"")
            )
            response: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                try:
                    event = exchange.next_event()
                except h11.RemoteProtocolError as exc:
                    raise OSError(f"{target.host_header} answered with malformed HTTP: {exc}") from None
                if event is h11.NEED_DATA:
                    exchange.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    if response is None:
        raise OSError(f"{target.host_header} closed the connection without answering")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}
    return response.status_code, headers, b"".join(chunks)
