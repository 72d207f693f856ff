"""The Trio side of one connection: HTTP routing and handshake, the API for backends, the reader loop, and carrying
out session effects.

One nursery owns each connection: its body is the reader loop, and the outbox starts its writer task in it only
while there is a backlog. Leaving the nursery is the one way a connection ends; `release` then gives back
everything it held.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any, Protocol, cast

import attrs
import h11
import orjson
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from . import api, http
from .admission import Admission, address_key
from .auth import AuthError, Verifier
from .checks import ChannelChecks
from .config import Config
from .hub import Hub
from .logs import ctx
from .metrics import Counters
from .outbox import Flusher, Outbox
from .protocol.channels import ChannelKind, ChannelName
from .protocol.frames import PING, text_frame
from .protocol.identity import Identity
from .protocol.inbound import FrameGuard
from .protocol.messages import Ack, CloseCode, Error, ErrorCode, PresenceEvent, ServerMessage, encode
from .protocol.session import (
    Authenticate,
    CheckAction,
    CheckResume,
    CheckSubscribe,
    Close,
    Effect,
    HandOff,
    IdentityChanged,
    Join,
    Leave,
    Outcome,
    Publish,
    RecheckLater,
    Replay,
    Reply,
    Request,
    Resumable,
    SendPresenceState,
    Session,
    SessionLimits,
    Subscription,
    Track,
    Untrack,
    message_ref,
)
from .supervisor import Supervisor
from .tls import TlsRefused, TlsSocket, Transport

log = logging.getLogger("fluxrt.connection")

RECHECK_BACKOFF = (1.0, 30.0)
"""seconds between attempts at renewal checks that still cannot reach the database once it is back: first, most"""
CLOSE_TIMEOUT = 2.0
"""seconds the peer has to answer our close frame and read what we sent before the socket is dropped"""
MAX_REQUEST_HEAD = 16 * 1024
BODY_READ_SIZE = 64 * 1024
"""bytes asked of the kernel per read of an API request's body (realtime.read_buffer_size is for WebSocket frames)"""

INVALID_TOKEN = "Invalid or expired token"
DISCARD_LIMIT = 1024 * 1024
"""bytes read and dropped after a protocol violation before the socket is closed anyway"""
_DISCARDED = bytearray(64 * 1024)
"""where bytes read only to be dropped go: one buffer for every connection, as no read of it is awaited"""
_REQUESTS = (CheckSubscribe, CheckAction, HandOff, CheckResume, Authenticate)


@attrs.frozen(slots=True)
class ConnectionSettings:
    """The settings a connection reads, from the configuration. A reload replaces the host's; a connection reads
    them anew for each use, so that new limits apply to open connections too."""

    ws_path: str
    realtime_enabled: bool
    allowed_origins: tuple[str, ...]
    allow_anonymous: bool
    handshake_timeout: float
    """seconds a client has to send a complete HTTP request"""
    read_buffer_size: int
    max_message_size: int
    write_buffer_size: int
    session_limits: SessionLimits
    trusted_proxies: tuple[http.Network, ...]
    """peers whose X-Forwarded-For names the client (server.trusted_proxies)"""
    service_roles: tuple[str, ...]
    """token roles the HTTP API takes (auth.service_roles)"""
    api_publish_timeout: float
    """seconds an API request waits for its broadcasts to be handed to every node"""

    @classmethod
    def from_config(cls, config: Config) -> ConnectionSettings:
        rt = config.realtime
        return cls(
            ws_path=config.server.path,
            realtime_enabled=rt.enabled,
            allowed_origins=config.server.allowed_origins,
            allow_anonymous=config.auth.allow_anonymous,
            handshake_timeout=config.server.handshake_timeout,
            read_buffer_size=rt.read_buffer_size,
            max_message_size=rt.max_message_size,
            write_buffer_size=rt.write_buffer_size,
            trusted_proxies=http.trusted_networks(config.server.trusted_proxies),
            service_roles=config.auth.service_roles,
            api_publish_timeout=config.api.publish_timeout,
            session_limits=SessionLimits(
                max_subscriptions=rt.max_subscriptions_per_connection,
                message_rate_limit=rt.message_rate_limit,
                max_presence_state_size=rt.max_presence_state_size,
            ),
        )


class ConnectionHost(Protocol):
    """What a connection needs of the node it runs on (the Server, or a test's own)."""

    @property
    def settings(self) -> ConnectionSettings: ...

    @property
    def draining(self) -> bool:
        """Shutting down: new handshakes are refused with 503."""

    @property
    def verifier(self) -> Verifier: ...

    hub: Hub[Connection]
    counters: Counters
    flusher: Flusher
    supervisor: Supervisor
    admission: Admission[Connection]
    checks: ChannelChecks
    api_limiter: api.RateLimiter

    def subscriptions_changed(self, channel: str) -> None:
        """A subscription to a table channel began, ended, or changed its identity."""

    async def resumable(self, channel: ChannelName, since: Any) -> bool:
        """Whether what followed position `since` on `channel` can be replayed (docs/protocol.md, Resume)."""

    def replay(self, connection: Connection, subscription: Subscription, since: Any) -> None:
        """Send `connection` what followed `since` on the subscription's channel, then hand it to live delivery,
        each event once. Called right after the subscription joined and was acked, before anything else runs."""

    def admin(self, endpoint: str) -> tuple[int, bytes, str]:
        """Status, body and content type for `/health` or `/metrics`."""

    def stats(self) -> bytes:
        """The body of `GET /api/stats` (status.stats_body)."""


class Connection:
    """One client socket, from the first HTTP byte to the last WebSocket frame."""

    __slots__ = (
        "_ended",
        "_nursery",
        "_opened_at",
        "_partial",
        "_rechecking",
        "closed",
        "conn_id",
        "host",
        "last_seen",
        "outbox",
        "peer",
        "session",
        "sock",
        "ws",
    )

    def __init__(self, host: ConnectionHost, sock: Transport, conn_id: str, peer: str) -> None:
        self.host = host
        self.sock = sock
        self.conn_id = conn_id
        self.peer = peer
        self.session: Session | None = None
        self.ws: WSConnection | None = None
        self.outbox: Outbox | None = None
        self.closed = False
        self.last_seen = trio.current_time()
        self._opened_at: float | None = None
        self._ended: tuple[int, str, str] | None = None
        """close code, reason, and who closed first ("server", "client" or "network")"""
        self._nursery: trio.Nursery | None = None
        self._rechecking = False
        self._partial: list[str] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve this socket until it ends; never raises for anything the peer does."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.outbox = Outbox(self.sock, self.host.settings.write_buffer_size, nursery, self.host.flusher)
                # Closing sets this nursery's deadline (`_finish_close`): the reader, the writer and the drain
                # below all end by then. No cancel scope of the reader's own: each costs ~650 bytes per connection.
                try:
                    trailing = await self._handshake()
                    if trailing is not None:
                        await self._websocket(trailing)
                    else:
                        # An HTTP answer, or none: end the stream after it (over TLS with close_notify, whose
                        # absence a client reading to the end takes for a truncation).
                        self.outbox.close(b"")
                except Exception:
                    log.exception("connection failed", extra=ctx(conn=self.conn_id))
                    self.close(CloseCode.INTERNAL_ERROR, "internal error")
                # The reader is done; give what is queued a bounded time to leave, then stop the writer.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.outbox.wait_drained()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self.release()
            self._log_closed()
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def _log_closed(self) -> None:
        if self._opened_at is None:
            return
        code, reason, by = self._ended or (1006, "connection lost without a close frame", "network")
        log.info(
            "connection closed",
            extra=ctx(
                conn=self.conn_id,
                code=code,
                reason=reason,
                by=by,
                duration_s=round(trio.current_time() - self._opened_at, 3),
            ),
        )

    def release(self) -> None:
        """Give back subscriptions, presence and admission counts. Idempotent."""
        session, self.session = self.session, None
        if session is None:
            return
        for effect in session.close():
            self._apply_local(effect)
        self.host.admission.release(self, session.identity)

    async def _handshake(self) -> bytes | None:
        """Route the HTTP request; after a WebSocket upgrade return the bytes already read past it, else None.

        Kept apart from the reader loop so that nothing of the HTTP exchange stays alive with the connection.
        """
        try:
            request, exchange, trailing = await self._read_request()
        finally:
            self.host.admission.end_handshake(self)
        if request is None:
            return None
        host, settings = self.host, self.host.settings
        decision = http.route(
            request,
            ws_path=settings.ws_path,
            realtime_enabled=settings.realtime_enabled,
            draining=host.draining,
            allowed_origins=settings.allowed_origins,
            admin_allowed=not isinstance(self.sock, TlsSocket) or self.sock.admin_allowed,
        )
        if isinstance(decision, http.Admin):
            status, body, content_type = host.admin(decision.endpoint)
            self._send_http(http.response_bytes(exchange, status, body, content_type, head=request.method == b"HEAD"))
            return None
        if isinstance(decision, http.StatusPage):
            page = decision.page
            self._send_http(
                http.response_bytes(
                    exchange,
                    304 if decision.not_modified else 200,
                    page.body,
                    "text/html; charset=utf-8",
                    page.headers,
                    head=request.method == b"HEAD",
                    cache_control="no-cache",
                )
            )
            return None
        if isinstance(decision, api.ApiRequest):
            await self._api(exchange, decision)
            return None
        if isinstance(decision, http.Refuse):
            if decision.endpoint is not None:
                host.counters.api_requests[decision.endpoint, decision.status] += 1
            self._send_http(
                http.response_bytes(exchange, decision.status, decision.body, decision.content_type, decision.headers)
            )
            if decision.endpoint is not None:
                await self._skip_body(exchange)
            return None
        self._send_http(http.switching_protocols(decision.accept))
        self.ws = _WebSocket()
        identity = self._authenticate(decision.token)
        if identity is None:
            return trailing
        client = http.client_address(request.headers, self.peer.rpartition(":")[0], settings.trusted_proxies)
        refusal = host.admission.admit(self, identity, address_key(client))
        if refusal is not None:
            log.info("connection refused", extra=ctx(conn=self.conn_id, peer=self.peer, reason=refusal))
            self.reply_nowait(Error(ErrorCode.RATE_LIMITED, refusal))
            self.close(CloseCode.RATE_LIMITED, "too many connections")
            return trailing
        self.session = Session(self.conn_id, identity, settings.session_limits)
        host.supervisor.watch(self)
        self._opened_at = trio.current_time()
        log.info(
            "connection opened", extra=ctx(conn=self.conn_id, peer=self.peer, sub=identity.sub, role=identity.role)
        )
        return trailing

    def _authenticate(self, token: str | None) -> Identity | None:
        verifier = self.host.verifier
        if token is None:
            if self.host.settings.allow_anonymous:
                return verifier.anonymous()
            reason = "no token given and auth.allow_anonymous is false"
        else:
            try:
                return verifier.verify(token)
            except AuthError as exc:
                reason = str(exc)
        log.info("refused token", extra=ctx(conn=self.conn_id, peer=self.peer, reason=reason))
        self.reply_nowait(Error(ErrorCode.UNAUTHORIZED, INVALID_TOKEN))
        self.close(CloseCode.UNAUTHORIZED, "unauthorized")
        return None

    # ---- the API for backends (api.py) ---------------------------------------------------------------------

    async def _api(self, exchange: h11.Connection, call: api.ApiRequest) -> None:
        """Answer one request of the API, counted by endpoint and status; never raises for what the client does."""
        try:
            outcome = await self._api_outcome(exchange, call)
        except Exception:
            # A fault of ours: the client gets a 500 rather than a connection closed without an answer.
            log.exception("internal error answering an API request", extra=ctx(conn=self.conn_id))
            outcome = api.ApiError(500, ErrorCode.INTERNAL_ERROR, "internal error while answering this request")
        if outcome is None:
            return
        if isinstance(outcome, api.ApiError):
            status, body, headers = outcome.status, outcome.body(), outcome.headers
            log.info(
                "api request refused",
                extra=ctx(
                    conn=self.conn_id, peer=self.peer, endpoint=call.endpoint, status=status, reason=outcome.message
                ),
            )
        else:
            (status, body), headers = outcome, ()
        self.host.counters.api_requests[call.endpoint, status] += 1
        self._send_http(http.response_bytes(exchange, status, body, "application/json", headers))
        await self._skip_body(exchange)

    async def _api_outcome(
        self, exchange: h11.Connection, call: api.ApiRequest
    ) -> tuple[int, bytes] | api.ApiError | None:
        """Status and body of the answer, the refusal, or None when the client went away before sending it all."""
        host, settings = self.host, self.host.settings
        try:
            identity = host.verifier.verify(call.token)
        except AuthError as exc:
            log.info("refused API token", extra=ctx(conn=self.conn_id, peer=self.peer, reason=str(exc)))
            return api.unauthorized(INVALID_TOKEN)
        refusal = api.check_role(identity.role, settings.service_roles) or host.api_limiter.take(
            call.token, trio.current_time()
        )
        if refusal is not None:
            return refusal
        if call.endpoint == "presence":
            channel = api.presence_channel(call.query)
            if isinstance(channel, api.ApiError):
                return channel
            return 200, api.presence_body(channel.name, host.hub.presence_state(channel.name))
        if call.endpoint == "stats":
            return 200, host.stats()
        body = await self._read_body(exchange, call.content_length, settings.max_message_size)
        if body is None or isinstance(body, api.ApiError):
            return body
        messages = api.parse_broadcast(body, settings.max_message_size)
        if isinstance(messages, api.ApiError):
            return messages
        return await self._publish(messages)

    async def _read_body(
        self, exchange: h11.Connection, declared: int | None, max_message_size: int
    ) -> bytes | api.ApiError | None:
        """The request's body, read within server.handshake_timeout and at most `api.max_body_size` bytes (a larger
        Content-Length is refused before anything is read); None when the client went away."""
        limit = api.max_body_size(max_message_size)
        if declared is not None and declared > limit:
            return api.body_too_large(declared, max_message_size)
        if exchange.client_is_waiting_for_100_continue:
            self._send_http(exchange.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self.host.settings.handshake_timeout):
            while True:
                try:
                    event = exchange.next_event()
                except h11.RemoteProtocolError as exc:
                    return api.ApiError(400, ErrorCode.INVALID_MESSAGE, f"malformed HTTP request body: {exc}")
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:
                        return api.body_too_large(size, max_message_size)
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(parts)
                elif event is h11.NEED_DATA:
                    data = await self._recv(BODY_READ_SIZE)
                    if not data:
                        return None
                    exchange.receive_data(data)
                else:
                    return None
        return api.ApiError(
            408, ErrorCode.INVALID_MESSAGE, "the request body did not arrive within server.handshake_timeout"
        )

    async def _skip_body(self, exchange: h11.Connection) -> None:
        """After answering: read and drop what is left of the request's body (at most DISCARD_LIMIT bytes, within
        CLOSE_TIMEOUT), since closing a socket with unread bytes resets it, which can discard the answer on its
        way to the client."""
        if exchange.their_state is not h11.SEND_BODY:
            return
        left = DISCARD_LIMIT
        with trio.move_on_after(CLOSE_TIMEOUT):
            while left > 0:
                try:
                    event = exchange.next_event()
                except h11.RemoteProtocolError:
                    return
                if isinstance(event, h11.Data):
                    left -= len(event.data)
                elif event is h11.NEED_DATA:
                    data = await self._recv(BODY_READ_SIZE)
                    if not data:
                        return
                    exchange.receive_data(data)
                else:
                    return

    async def _publish(self, messages: list[api.Message]) -> tuple[int, bytes] | api.ApiError:
        """Broadcast `messages` as clients' broadcasts are, and wait until each is handed to every node."""
        hub = self.host.hub
        reason = hub.unavailable()
        if reason is not None:
            return api.unavailable(f"{reason}: nothing of the request was published; retry with backoff")
        answers = _Answers(self.conn_id, len(messages))
        # The hub calls only what a Subscriber has on a sender (its reply), never what is a Connection's own.
        sender = cast(Connection, answers)
        for index, message in enumerate(messages):
            hub.broadcast(message.channel.name, message.payload, sender=sender, ref=str(index))
        with trio.move_on_after(self.host.settings.api_publish_timeout):
            await answers.done.wait()
        if answers.failure is not None:
            failure = answers.failure
            others = " (the request's other messages may have been delivered)" if len(messages) > 1 else ""
            return api.unavailable(f"{failure.channel}: {failure.message}{others}")
        if answers.waiting:
            return api.unavailable(
                f"{answers.waiting} of {len(messages)} messages were not handed to every node within "
                "api.publish_timeout; they may still be delivered"
            )
        self.host.counters.api_published += len(messages)
        return 202, api.published_body(len(messages))

    # ---- HTTP ----------------------------------------------------------------------------------------------

    async def _read_request(self) -> tuple[h11.Request | None, h11.Connection, bytes]:
        exchange = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        secured = not isinstance(self.sock, TlsSocket)
        with trio.move_on_after(self.host.settings.handshake_timeout):
            if isinstance(self.sock, TlsSocket):
                try:
                    await self.sock.handshake()
                except TlsRefused as exc:
                    self._tls_failed(str(exc))
                    return None, exchange, b""
                secured = True
            while True:
                try:
                    event = exchange.next_event()
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    body = orjson.dumps({"error": "bad_request", "message": f"malformed HTTP request: {exc}"})
                    with contextlib.suppress(h11.LocalProtocolError):
                        self._send_http(http.response_bytes(exchange, status, body, "application/json"))
                    return None, exchange, b""
                if isinstance(event, h11.Request):
                    trailing, _ = exchange.trailing_data
                    return event, exchange, bytes(trailing)
                if event is h11.NEED_DATA:
                    data = await self._recv()
                    if not data:
                        return None, exchange, b""
                    exchange.receive_data(data)
                else:
                    return None, exchange, b""
        if not secured:
            self._tls_failed("the TLS handshake did not complete within server.handshake_timeout")
        return None, exchange, b""

    def _tls_failed(self, reason: str) -> None:
        self.host.counters.tls_handshake_failures += 1
        log.info("TLS handshake failed", extra=ctx(conn=self.conn_id, peer=self.peer, reason=reason))

    def _send_http(self, data: bytes) -> None:
        assert self.outbox is not None
        self.outbox.send_nowait(data)

    async def _recv(self, size: int | None = None) -> bytes:
        """Read what the kernel has (at most `size` bytes, default realtime.read_buffer_size), waiting for it if
        needed; b"" at end of stream or on a socket error."""
        sock = self.sock
        while True:
            data = _read_now(sock, size or self.host.settings.read_buffer_size)
            if data is not None:
                # A client that keeps the buffer full must still let other connections run.
                await trio.lowlevel.checkpoint()
                return data
            await trio.lowlevel.wait_readable(sock)

    # ---- WebSocket -----------------------------------------------------------------------------------------

    async def _websocket(self, trailing: bytes) -> None:
        ws = self.ws
        assert ws is not None
        guard = FrameGuard()
        sock = self.sock
        data: bytes | None = trailing
        while True:
            if data:
                self.last_seen = trio.current_time()
                max_size = self.host.settings.max_message_size
                # Headers are measured before wsproto sees them: it reports a frame only as its payload arrives.
                refused = guard.feed(data, max_size)
                if refused is not None:
                    # The frames before the oversized one are still served.
                    if refused:
                        ws.receive_data(data[:refused])
                        await self._handle_events()
                    self.close(CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes")
                    await self._discard()
                    return
                ws.receive_data(data)
                if not await self._handle_events():
                    await self._discard()
                    return
            if ws.state is ConnectionState.CLOSED:
                return
            # `_recv`, inlined: an idle connection waits here, and neither the last chunk nor a coroutine frame
            # of its own (~450 bytes together) should stay alive while it does.
            data = _read_now(sock, self.host.settings.read_buffer_size)
            if data is None:
                await trio.lowlevel.wait_readable(sock)
            elif not data:
                return
            else:
                # A client that keeps the buffer full must still let other connections run.
                await trio.lowlevel.checkpoint()

    async def _discard(self) -> None:
        """After a protocol violation: drop what the client still sends, unparsed, until it closes, DISCARD_LIMIT
        bytes have come, or the close deadline (CLOSE_TIMEOUT) ends the reader.

        Nothing more is parsed: wsproto keeps every byte it is fed after a parse error, and the rest of an
        oversized frame is of no use. Reading a little rather than closing at once gives the close frame time to
        reach a client that is still sending: closing a socket with unread bytes sends a reset, which can discard
        it on the way.
        """
        sock = self.sock
        left = DISCARD_LIMIT
        while left > 0:
            try:
                read = sock.recv_into(_DISCARDED)
                if not read:
                    return
                left -= read
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            await trio.lowlevel.checkpoint()

    async def _handle_events(self) -> bool:
        """Act on what wsproto parsed; False once it found a protocol violation, after which it parses nothing."""
        ws = self.ws
        assert ws is not None
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if ws.state is not ConnectionState.OPEN:
                    continue
                # The FrameGuard has already bounded the message's size.
                if not event.message_finished:
                    # A binary message is refused whole: its bytes are not kept.
                    if isinstance(event, TextMessage):
                        if self._partial is None:
                            self._partial = []
                        self._partial.append(event.data)
                    continue
                parts, self._partial = self._partial, None
                await self._message(event, parts)
            elif isinstance(event, Ping):
                self._send_raw(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    # The client closes: echo its close, unless we had closed first.
                    if self._ended is None:
                        self._ended = (event.code, event.reason or "", "client")
                    self._finish_close(ws.send(event.response()))
                elif ws.state is not ConnectionState.CLOSED:
                    # A protocol error found by wsproto (bad UTF-8, bad framing): close with its code.
                    self.close(event.code, event.reason or "protocol error")
                    return False
        return True

    async def _message(self, event: TextMessage | BytesMessage, parts: list[str] | None) -> None:
        session = self.session
        if session is None or self.closed:
            return
        self.host.counters.messages_in += 1
        now = trio.current_time()
        if isinstance(event, BytesMessage):
            effects = session.binary_frame(now)
        else:
            text = "".join([*parts, event.data]) if parts else event.data
            effects = session.receive(text, now)
        try:
            await self._apply(effects)
        except Exception:
            # A fault of ours while handling one message: say so, and keep serving the connection.
            log.exception("internal error handling a message", extra=ctx(conn=self.conn_id))
            ref = message_ref(effects)
            self.reply_nowait(Error(ErrorCode.INTERNAL_ERROR, "internal error while handling this message", ref=ref))

    # ---- effects -------------------------------------------------------------------------------------------

    async def _apply(self, effects: list[Effect]) -> None:
        """Carry out `effects` in order; a request's answer goes back to the session, and what it returns is
        carried out next, before the rest."""
        session = self.session
        if session is None:
            return
        # A stack, the next effect last: a request's answers go on top and run before the rest.
        pending = effects[::-1]
        while pending:
            effect = pending.pop()
            if isinstance(effect, _REQUESTS):
                outcome = await self._ask(session, effect)
                if self.session is not session:
                    # The connection closed (and released its session) while the check ran.
                    return
                pending.extend(reversed(session.answered(effect, outcome)))
            else:
                self._apply_local(effect)

    async def _ask(self, session: Session, request: Request) -> Outcome:
        match request:
            case CheckSubscribe(renewal=True):
                identity = session.identity
                try:
                    outcome = await self.host.checks.subscribe(identity, request)
                    # A newer token came meanwhile (a re-check retried after an outage runs beside the reader):
                    # its own re-check of this subscription decides, not this stale answer.
                    return outcome if session.identity is identity else None
                except Exception:
                    # The token already changed: a subscription that cannot be checked under it ends, and the
                    # others are still checked, rather than one failure leaving them all unchecked.
                    log.exception("re-checking a subscription failed", extra=ctx(conn=self.conn_id))
                    return Error(ErrorCode.INTERNAL_ERROR, "it could not be checked (internal error)")
            case CheckSubscribe():
                return await self.host.checks.subscribe(session.identity, request)
            case CheckAction():
                return await self.host.checks.action(session.identity, request)
            case CheckResume(subscribe=check, since=since):
                return Resumable(await self.host.resumable(check.channel, since))
            case HandOff(channel=channel, ref=ref):
                reason = self.host.hub.unavailable()
                if reason is None:
                    return None
                return Error(
                    ErrorCode.UNAVAILABLE,
                    f"{reason}: the presence change was not made; retry with backoff",
                    channel=channel.name,
                    ref=ref,
                )
            case Authenticate(token=token, ref=ref):
                try:
                    identity = self.host.verifier.verify(token)
                except AuthError as exc:
                    log.info("refused token refresh", extra=ctx(conn=self.conn_id, reason=str(exc)))
                    return Error(ErrorCode.UNAUTHORIZED, INVALID_TOKEN, ref=ref)
                refusal = self.host.admission.readmit(self, session.identity, identity)
                return Error(ErrorCode.RATE_LIMITED, refusal, ref=ref) if refusal is not None else identity

    async def _recheck_when_back(self, session: Session) -> None:
        """Ask again the renewal checks that could not reach the database, once the changefeed reads again, and
        with backoff while they still cannot (the authorizer's login may fail where the changefeed's does not)."""
        delay, most = RECHECK_BACKOFF
        try:
            while self.session is session and session.rechecks_pending:
                await self.host.checks.database_back()
                await self._apply(session.rechecks())
                if session.rechecks_pending:
                    await trio.sleep(delay)
                    delay = min(delay * 2, most)
        except Exception:
            log.exception("re-checking subscriptions failed", extra=ctx(conn=self.conn_id))
        finally:
            self._rechecking = False

    def _table_changed(self, channel: ChannelName) -> None:
        if channel.kind is ChannelKind.TABLE:
            self.host.subscriptions_changed(channel.name)

    def _apply_local(self, effect: Effect) -> None:
        hub = self.host.hub
        match effect:
            case Reply(message=message):
                self.reply_nowait(message)
            case Join(subscription=sub):
                hub.join(sub.channel.name, self)
                self._table_changed(sub.channel)
            case Leave(channel=channel):
                hub.leave(channel.name, self)
                self._table_changed(channel)
            case Replay(subscription=subscription, since=since):
                self.host.replay(self, subscription, since)
            case SendPresenceState(channel=channel):
                self.reply_nowait(PresenceEvent(channel.name, "sync", hub.presence_state(channel.name)))
            case Publish(channel=channel, payload=payload, ref=ref):
                hub.broadcast(channel.name, payload, sender=self, ref=ref)
            case Track(channel=channel, key=key, ref=ref, state=state):
                hub.track(channel.name, key, ref, state)
            case Untrack(channel=channel, key=key, ref=ref):
                hub.untrack(channel.name, key, ref)
            case IdentityChanged(channels=channels):
                self.host.supervisor.identity_changed(self)
                for name in channels:
                    self.host.subscriptions_changed(name)
            case RecheckLater():
                if not self._rechecking and self._nursery is not None and self.session is not None:
                    self._rechecking = True
                    self._nursery.start_soon(self._recheck_when_back, self.session)
            case Close(code=code, reason=reason):
                self.close(code, reason)
            case _:
                raise AssertionError(f"effect {effect!r} needs the async path")

    # ---- output --------------------------------------------------------------------------------------------

    def reply_nowait(self, message: ServerMessage) -> None:
        """Send `message` to this client (a reply, a sync), counted in messages out and errors by code."""
        counters = self.host.counters
        counters.messages_out += 1
        if isinstance(message, Error):
            counters.errors[message.code.value] += 1
        self.deliver_nowait(text_frame(encode(message)))

    def _send_raw(self, data: bytes) -> None:
        assert self.outbox is not None
        self.outbox.send_nowait(data)

    def deliver_nowait(self, frame: bytes) -> None:
        """Hub entry point: queue a frame; a connection whose queue overflows is closed 4009."""
        outbox = self.outbox
        if outbox is not None and not outbox.send_nowait(frame):
            self.host.counters.slow_consumer_closes += 1
            log.info("slow consumer", extra=ctx(conn=self.conn_id, backlog=outbox.backlog))
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outgoing queue overflowed", discard_backlog=True)

    def close(self, code: int, reason: str, *, discard_backlog: bool = False) -> None:
        """Start closing: send the close frame after what is queued, then give the peer CLOSE_TIMEOUT to answer.

        The connection stops taking messages at once. Safe to call from any task, any number of times.
        """
        if self.closed:
            return
        self.closed = True
        self.host.counters.closes[int(code)] += 1
        if self._ended is None:
            self._ended = (int(code), reason, "server")
        frame = b""
        if self.ws is not None:
            try:
                frame = self.ws.send(CloseConnection(code=int(code), reason=reason))
            except LocalProtocolError:
                frame = b""
        self._finish_close(frame, discard_backlog=discard_backlog)

    def _finish_close(self, frame: bytes, *, discard_backlog: bool = False) -> None:
        self.closed = True
        assert self.outbox is not None
        self.outbox.close(frame, discard_backlog=discard_backlog)
        if self._nursery is not None:
            scope = self._nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_TIMEOUT)
        # Leave the channels at once: a closing connection receives nothing more.
        self.release()

    # ---- table delivery (see tables.py) --------------------------------------------------------------------

    @property
    def identity(self) -> Identity | None:
        return self.session.identity if self.session is not None else None

    def subscription(self, channel: str) -> Subscription | None:
        return self.session.subscriptions.get(channel) if self.session is not None else None

    def end_subscription(self, channel: str, error: Error) -> None:
        """Tell the client why, then drop the subscription; the connection stays open."""
        if self.session is None or self.closed:
            return
        self.reply_nowait(error)
        for effect in self.session.drop(channel):
            self._apply_local(effect)

    def reconfigure(self, settings: ConnectionSettings) -> None:
        """Apply reloaded limits to this open connection."""
        if self.session is not None:
            self.session.set_limits(settings.session_limits)
        if self.outbox is not None:
            self.outbox.limit = settings.write_buffer_size

    # ---- supervision (see supervisor.py) -------------------------------------------------------------------

    @property
    def expires_at(self) -> float | None:
        return self.session.identity.expires_at if self.session is not None else None

    def ping(self) -> None:
        self.deliver_nowait(PING)

    def idle_timeout(self, idle: float) -> None:
        self.close(CloseCode.TIMEOUT, f"connection timeout: nothing received for {idle:.0f}s")

    def token_expired(self) -> None:
        self.reply_nowait(Error(ErrorCode.UNAUTHORIZED, "token expired"))
        self.close(CloseCode.UNAUTHORIZED, "token expired")


def _read_now(sock: Transport, size: int) -> bytes | None:
    """What the kernel has for `sock`, at most `size` bytes, without waiting: None when it has nothing yet, b"" at
    end of stream or on a socket error.

    A function of its own so that the readers' coroutines never see an exception: one raised in a coroutine's frame
    (`BlockingIOError`, at every wait) gives the frame a frame object, ~250 bytes that then live as long as the
    coroutine, that is, as long as the connection. Waiting is the caller's, outside any `except` block, where the
    exception, its traceback and their frames would stay alive as long as the wait.
    """
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class _WebSocket(WSConnection):
    """wsproto's server-side connection without its own event queue: only `receive_data(None)` (a transport lost,
    never said here: the reader returns instead) puts events there, and an empty deque is 760 bytes per connection."""

    def __init__(self) -> None:
        super().__init__(ConnectionType.SERVER)
        self._events = _NO_EVENTS


_NO_EVENTS: collections.deque[Any] = collections.deque(maxlen=0)
"""always empty: what is appended to it is dropped"""


class _Answers:
    """The sender of an API request's broadcasts, as the hub sees it: it collects the hub's answer to each (its
    `ref` is the message's index) and is done once every one is `sent`, or at the first `UNAVAILABLE`."""

    __slots__ = ("conn_id", "done", "failure", "waiting")

    def __init__(self, conn_id: str, count: int) -> None:
        self.conn_id = conn_id
        self.waiting = count
        self.failure: Error | None = None
        self.done = trio.Event()

    def deliver_nowait(self, frame: bytes) -> None:
        """Never called: the sender subscribes to nothing."""

    def reply_nowait(self, message: ServerMessage) -> None:
        if isinstance(message, Error):
            if self.failure is None:
                self.failure = message
            self.done.set()
        elif isinstance(message, Ack) and message.status == "sent":
            self.waiting -= 1
            if self.waiting == 0:
                self.done.set()
