"""The listener, admission, the root nursery and graceful shutdown."""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import KeysView
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import trio

from . import __version__, api, http, metrics, status, tls
from .admission import Admission, address_key
from .auth import Verifier
from .checks import ChannelChecks
from .config import Config
from .connection import Connection, ConnectionSettings
from .hub import Hub, LocalHub
from .logs import ctx
from .outbox import Flusher
from .postgres.service import DatabaseService
from .protocol.channels import ChannelKind, ChannelName
from .protocol.messages import CloseCode
from .protocol.session import Subscription
from .supervisor import Supervisor
from .tables import TableChannels

if TYPE_CHECKING:
    from .cluster.hub import ClusterHub

log = logging.getLogger("fluxrt.server")

# Running out of descriptors or memory is a load condition: wait and accept again instead of dying.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BATCH = 128
_LISTEN_BACKLOG = 65535
"""asked of listen(); the kernel caps it at net.core.somaxconn (4096 by default on Linux 5.4+). A connect storm
beyond the queue loses SYNs, which clients send again only 1 s and 3 s later, while the node may have nothing left
to do (bench/RESULTS.md, "Connect storm", session 9)."""
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def listen_backlog() -> int:
    """The listen backlog the kernel grants: what fluxrt asks, capped by net.core.somaxconn where Linux says it."""
    try:
        return min(_LISTEN_BACKLOG, int(_SOMAXCONN.read_text()))
    except (OSError, ValueError):
        return _LISTEN_BACKLOG


class Server:
    """One fluxrt node. `serve` runs it; `shutdown` drains it; both are meant for one Trio run. It is the
    `ConnectionHost` of its connections."""

    def __init__(self, config: Config, *, hub: Hub[Connection] | None = None) -> None:
        self.config = config
        # Imported only for a cluster: one node runs no Redis code at all.
        self.cluster: ClusterHub[Connection] | None = None
        cluster = config.cluster
        if hub is None and cluster.redis_url is not None:
            from .cluster.hub import ClusterHub, default_node_id

            self.cluster = ClusterHub(
                cluster.redis_url,
                node_id=cluster.node_id or default_node_id(),
                node_timeout=cluster.node_timeout,
                prefix=cluster.prefix,
                max_backlog=cluster.max_backlog,
                history_size=config.realtime.history_size,
                history_ttl=config.realtime.history_ttl,
                log_retention=config.database.retention,
            )
            hub = self.cluster
        if hub is None:
            hub = LocalHub(history_size=config.realtime.history_size, history_ttl=config.realtime.history_ttl)
        self.hub: Hub[Connection] = hub
        self.verifier = Verifier(config.auth)
        self.tls = _load_tls(config)
        self.counters = metrics.Counters()
        rt = config.realtime
        self.settings = ConnectionSettings.from_config(config)
        self.supervisor = Supervisor(rt.heartbeat_interval, rt.connection_timeout)
        self.flusher = Flusher()
        self.api_limiter = api.RateLimiter(config.api.rate_limit, config.api.rate_burst)
        self.admission: Admission[Connection] = Admission(
            rt.max_connections,
            rt.max_connections_per_user,
            self.counters.rejected_connections,
            max_anonymous_per_address=rt.max_anonymous_per_address,
            anonymous_share=rt.anonymous_share,
            max_pending_handshakes_per_address=config.server.max_pending_handshakes_per_address,
            elsewhere=self.cluster.users_elsewhere if self.cluster is not None else None,
            counted=self.cluster.user_count if self.cluster is not None else None,
        )
        self.db: DatabaseService | None = None
        self.tables: TableChannels | None = None
        roles = tuple(dict.fromkeys((config.auth.anon_role, config.auth.default_role, *config.auth.roles)))
        db = config.database
        if db.dsn is not None:
            self.db = DatabaseService(
                db.dsn,
                authorizer_dsn=db.authorizer_dsn,
                migrate=db.migrate,
                roles=roles,
                poll_interval=db.poll_interval,
                retention=db.retention,
                max_message_size=config.realtime.max_message_size,
            )
            self.tables = TableChannels(
                self.hub,
                self.db.authorizer_pool,
                self.counters,
                log_pool=self.db.log_pool,
                request_progress=self.db.changefeed.want_progress,
                sends=self.hub.broadcast_logged,
                delivered=self.db.changefeed.delivered,
            )
            self.db.changefeed.delivering = self.tables.delivering
        self.checks = ChannelChecks(
            self.db.authorizer_pool if self.db is not None else None,
            roles,
            database_ok=self.db.wait_ok if self.db is not None else None,
        )
        self.draining = False
        self.port: int | None = None
        self.samples = status.Samples()
        self._started_at = time.monotonic()
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self._handlers = 0
        self._idle = trio.Event()
        self._listener: socket.socket | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # ---- running -------------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until `shutdown` finishes. Reports the bound port through `task_status`."""
        listener = self._listen()
        self.port = listener.getsockname()[1]
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.db is not None:
                    await stack.enter_async_context(self.db.opened())
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self.supervisor.run)
                    nursery.start_soon(self.flusher.run)
                    nursery.start_soon(self._sample)
                    if self.cluster is not None:
                        await nursery.start(self.cluster.run)
                    if self.db is not None and self.tables is not None:
                        await nursery.start(self.db.run)
                        nursery.start_soon(self.tables.run, self.db.windows)
                    nursery.start_soon(self._accept_loop, listener, nursery)
                    log.info(
                        "listening",
                        extra=ctx(
                            host=self.config.server.host,
                            port=self.port,
                            path=self.config.server.path,
                            scheme="wss" if self.tls is not None else "ws",
                            backlog=listen_backlog(),
                        ),
                    )
                    if self.tls is not None:
                        _log_certificate(self.tls)
                    task_status.started(self.port)
        finally:
            self._close_listener()

    def _listen(self) -> socket.socket:
        host = self.config.server.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, self.config.server.port))
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        return listener

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        with trio.CancelScope() as self._accept_scope:
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(_ACCEPT_BATCH):
                    try:
                        sock, address = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        log.error("accept failed, retrying in 100 ms", extra=ctx(error=os.strerror(exc.errno)))
                        await trio.sleep(0.1)
                        break
                    sock.setblocking(False)
                    if sock.family in (socket.AF_INET, socket.AF_INET6):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    # Read once per connection: a reload replaces the certificate for the connections that follow.
                    context = self.tls.context if self.tls is not None else None
                    connection = Connection(
                        self,
                        sock if context is None else tls.TlsSocket(sock, context),
                        f"{self._id_prefix}{next(self._ids):x}",
                        f"{address[0]}:{address[1]}",
                    )
                    # A trusted proxy carries many clients' handshakes at once: its own are not capped.
                    refusal = (
                        None
                        if http.is_trusted(address[0], self.settings.trusted_proxies)
                        else self.admission.begin_handshake(connection, address_key(address[0]))
                    )
                    if refusal is not None:
                        if context is None:
                            _refuse_at_once(sock, refusal)
                        else:
                            # An answer would cost the TLS handshake the refusal is there to spare.
                            sock.close()
                        continue
                    nursery.start_soon(self._handle, connection)
                await trio.lowlevel.checkpoint()

    async def _handle(self, connection: Connection) -> None:
        self._handlers += 1
        try:
            await connection.run()
        finally:
            self.admission.end_handshake(connection)
            self._handlers -= 1
            if self._handlers == 0 and self.draining:
                self._idle.set()

    async def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001, wait up to `shutdown_timeout`, then stop.

        Handshakes already in progress are answered 503.
        """
        if self.draining:
            return
        self.draining = True
        log.info("shutting down", extra=ctx(connections=len(self.connections)))
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._close_listener()
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        if self._handlers:
            with trio.move_on_after(self.config.realtime.shutdown_timeout):
                await self._idle.wait()
        if self.cluster is not None:
            await self.cluster.leave_cluster()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        log.info("stopped")

    def reload(self, config: Config) -> None:
        """Run with `config` from now on, without dropping a connection: limits, origins, keys and timeouts apply to
        open connections too. The caller keeps restart-only settings as they were (config.plan_reload).

        Raises OSError or ValueError, changing nothing, when a key or certificate file cannot be read or used.
        """
        verifier = self.verifier.rotated(config.auth)
        certificates = _load_tls(config)
        self.config = config
        self.tls = certificates
        if certificates is not None:
            _log_certificate(certificates)
        self.verifier = verifier
        self.settings = settings = ConnectionSettings.from_config(config)
        rt = config.realtime
        self.supervisor.heartbeat_interval = rt.heartbeat_interval
        self.supervisor.connection_timeout = rt.connection_timeout
        self.admission.max_connections = rt.max_connections
        self.admission.max_connections_per_user = rt.max_connections_per_user
        self.admission.max_anonymous_per_address = rt.max_anonymous_per_address
        self.admission.anonymous_share = rt.anonymous_share
        self.admission.max_pending_handshakes_per_address = config.server.max_pending_handshakes_per_address
        self.api_limiter.resize(config.api.rate_limit, config.api.rate_burst)
        for connection in self.connections:
            connection.reconfigure(settings)
        if self.db is not None:
            self.db.record_settings(rt.max_message_size)

    @property
    def connections(self) -> KeysView[Connection]:
        """The open connections (admitted and not yet released)."""
        return self.admission.connections

    def subscriptions_changed(self, channel: str) -> None:
        if self.tables is not None:
            self.tables.subscriptions_changed(channel)

    async def resumable(self, channel: ChannelName, since: Any) -> bool:
        if channel.kind is ChannelKind.TABLE:
            return self.tables is not None and await self.tables.resumable(channel, since)
        return await self.hub.resumable(channel.name, since)

    def replay(self, connection: Connection, subscription: Subscription, since: Any) -> None:
        channel = subscription.channel
        if channel.kind is ChannelKind.TABLE:
            if self.tables is not None:
                self.tables.replay(connection, subscription, since)
        else:
            self.hub.replay(channel.name, connection, since)

    # ---- admin endpoints -----------------------------------------------------------------------------------

    def database_state(self) -> str:
        return "not_configured" if self.db is None else self.db.state

    def admin(self, endpoint: str) -> tuple[int, bytes, str]:
        """Status, body and content type for `/health` or `/metrics`."""
        if endpoint == "metrics":
            body = metrics.exposition(
                self.counters,
                lambda: len(self.connections),
                self.hub.statistics,
                self.uptime,
                lambda: self.db.changefeed.lag() if self.db is not None else None,
                _task_count,
                self.cluster.cluster_statistics if self.cluster is not None else None,
                connections_limit=lambda: self.admission.max_connections,
                certificate_expiry=lambda: self.tls.certificate.not_after.timestamp() if self.tls else None,
            )
            return 200, body, "text/plain; version=0.0.4; charset=utf-8"
        database = self.database_state()
        state = self._status()
        health: dict[str, Any] = {
            "status": state,
            "connections": len(self.connections),
            "uptime_s": round(self.uptime(), 3),
            "database": database,
        }
        cluster = self._cluster_state()
        if cluster is not None:
            # Reported, but not a 503: every node would leave the balancer when the one Redis fails, and each still
            # serves its own connections and table changes.
            health["cluster"] = cluster
        if self.db is not None:
            health["changefeed"] = {
                "windows": self.db.changefeed.windows,
                "changes": self.db.changefeed.changes,
                "last_error": self.db.changefeed.last_error,
            }
        return (200 if state == "ok" else 503), orjson.dumps(health), "application/json"

    def _status(self) -> str:
        """`/health`'s status: `draining`, `degraded` (the database is unreachable) or `ok`."""
        return "draining" if self.draining else "degraded" if self.database_state() == "degraded" else "ok"

    def _cluster_state(self) -> dict[str, Any] | None:
        if self.cluster is None:
            return None
        stats = self.cluster.cluster_statistics()
        return {"state": stats.state, "node_id": stats.node, "nodes": stats.nodes, "last_error": stats.last_error}

    def snapshot(self) -> status.Snapshot:
        """The counts the status page shows, as `/metrics` would show them now."""
        subscriptions, delivered = self.hub.traffic()
        counters = self.counters
        return status.Snapshot(
            at=time.monotonic(),
            connections=len(self.connections),
            subscriptions=subscriptions,
            messages_in_total=counters.messages_in,
            messages_out_total=counters.messages_out + delivered,
            errors_total=sum(counters.errors.values()),
            slow_consumer_closes_total=counters.slow_consumer_closes,
            changefeed_lag=self.db.changefeed.lag() if self.db is not None else None,
        )

    async def _sample(self) -> None:
        """Keep a snapshot every status.SAMPLE_INTERVAL for the status page's sparklines."""
        while True:
            self.samples.add(self.snapshot())
            await trio.sleep(status.SAMPLE_INTERVAL)

    def stats(self) -> bytes:
        """`GET /api/stats`'s body (status.stats_body)."""
        cluster = self._cluster_state()
        return status.stats_body(
            self.snapshot(),
            self.samples,
            node={
                "version": __version__,
                "node_id": cluster["node_id"] if cluster is not None else None,
                "status": self._status(),
                "uptime_s": round(self.uptime(), 3),
                "tls_certificate_expires": self.tls.certificate.not_after.isoformat() if self.tls else None,
            },
            max_connections=self.admission.max_connections,
            errors_by_code=self.counters.errors,
            top=status.top_channels(self.hub.channel_sizes()),
            database=self.database_state(),
            cluster=cluster,
        )

    def uptime(self) -> float:
        return time.monotonic() - self._started_at


def _load_tls(config: Config) -> tls.TlsSettings | None:
    """The TLS context `server.tls_*` name, freshly read from the files; None without TLS.

    Raises ValueError naming the file when one cannot be read or used.
    """
    server = config.server
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    return tls.load(server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file)


def _log_certificate(settings: tls.TlsSettings) -> None:
    """Name the certificate now served; a warning when clients would refuse it (it is served all the same: the
    one before it may be no better, and a renewal can follow with a reload)."""
    certificate = settings.certificate
    log.info(
        "TLS certificate loaded",
        extra=ctx(
            subject=certificate.subject,
            expires=certificate.not_after.isoformat(),
            client_certificates="required for /metrics and /api" if settings.client_ca else "not asked",
        ),
    )
    problem = certificate.problem(datetime.datetime.now(datetime.UTC))
    if problem is not None:
        log.warning("clients will refuse the TLS certificate", extra=ctx(subject=certificate.subject, problem=problem))


def _task_count() -> int:
    """Every task of this Trio run, found by walking the task tree from the root (for the soak's leak check)."""
    count, tasks = 0, [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return count


def _refuse_at_once(sock: socket.socket, message: str) -> None:
    """Answer 503 if the socket takes it without waiting, and close it: a flood from one address costs an accept,
    a send and a close, never a task or a timer."""
    body = orjson.dumps({"error": "too_many_handshakes", "message": message})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\ncache-control: no-store\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.send(head.encode() + body)
    sock.close()
