"""Counters for `/metrics`, kept as plain integers so the hot path pays one addition, exposed in Prometheus text.

prometheus_client is imported at the first scrape: with what it pulls in (http.server, email) it costs a twentieth
of the start-up time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from .hub import HubStatistics

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    from .cluster.hub import ClusterStatistics


@attrs.define
class Counters:
    messages_in: int = 0
    """client messages received"""
    messages_out: int = 0
    """frames sent to one connection (replies, presence syncs); fan-out deliveries come from the hub"""
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    closes: collections.Counter[int] = attrs.field(factory=collections.Counter)
    slow_consumer_closes: int = 0
    rejected_connections: collections.Counter[str] = attrs.field(factory=collections.Counter)
    api_requests: collections.Counter[tuple[str, int]] = attrs.field(factory=collections.Counter)
    """HTTP API requests answered, by (endpoint, status)"""
    api_published: int = 0
    """messages of `POST /api/broadcast` handed to every node (answered 202)"""
    tls_handshake_failures: int = 0
    """TLS handshakes refused or abandoned by the client (plain HTTP to the TLS port included)"""


class _Collector:
    def __init__(
        self,
        counters: Counters,
        connections: Callable[[], int],
        hub: Callable[[], HubStatistics],
        uptime: Callable[[], float],
        changefeed_lag: Callable[[], float | None],
        tasks: Callable[[], int],
        cluster: Callable[[], ClusterStatistics] | None,
        connections_limit: Callable[[], int],
        certificate_expiry: Callable[[], float | None],
    ) -> None:
        self._certificate_expiry = certificate_expiry
        self._cluster = cluster
        self._connections_limit = connections_limit
        self._counters = counters
        self._connections = connections
        self._hub = hub
        self._uptime = uptime
        self._changefeed_lag = changefeed_lag
        self._tasks = tasks

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self._counters
        stats = self._hub()
        yield GaugeMetricFamily("fluxrt_connections", "Open WebSocket connections", value=self._connections())
        yield GaugeMetricFamily(
            "fluxrt_connections_limit",
            "Connections this node admits (realtime.max_connections); beyond it handshakes are refused",
            value=self._connections_limit(),
        )
        subs = GaugeMetricFamily("fluxrt_subscriptions", "Subscriptions by channel kind", labels=["kind"])
        for kind, n in sorted(stats.subscriptions.items()):
            subs.add_metric([kind], n)
        yield subs
        yield GaugeMetricFamily(
            "fluxrt_presence_rooms", "Presence rooms with someone in them", value=stats.presence_rooms
        )
        yield GaugeMetricFamily(
            "fluxrt_history_messages",
            "Broadcasts kept for clients that resume (realtime.history_size per channel, realtime.history_ttl)",
            value=stats.history_messages,
        )
        yield GaugeMetricFamily(
            "fluxrt_history_bytes", "Bytes of the broadcasts kept for clients that resume", value=stats.history_bytes
        )
        yield CounterMetricFamily("fluxrt_messages_in", "Client messages received", value=c.messages_in)
        yield CounterMetricFamily(
            "fluxrt_messages_out", "Frames sent to clients", value=c.messages_out + stats.delivered
        )
        yield CounterMetricFamily("fluxrt_events_published", "Events published to channels", value=stats.published)
        errors = CounterMetricFamily("fluxrt_errors", "Error messages sent to clients, by code", labels=["code"])
        for code, n in sorted(c.errors.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily(
            "fluxrt_closes", "Connections closed by the server, by close code", labels=["code"]
        )
        for close_code, n in sorted(c.closes.items()):
            closes.add_metric([str(close_code)], n)
        yield closes
        yield CounterMetricFamily(
            "fluxrt_slow_consumer_closes",
            "Connections closed because their outgoing queue overflowed",
            value=c.slow_consumer_closes,
        )
        rejected = CounterMetricFamily(
            "fluxrt_rejected_connections", "Connections refused at admission, by reason", labels=["reason"]
        )
        for reason, n in sorted(c.rejected_connections.items()):
            rejected.add_metric([reason], n)
        yield rejected
        requests = CounterMetricFamily(
            "fluxrt_api_requests",
            "HTTP API requests answered, by endpoint (broadcast, presence, stats) and status",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), n in sorted(c.api_requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        yield CounterMetricFamily(
            "fluxrt_api_messages_published",
            "Messages of POST /api/broadcast handed to every node (their requests answered 202)",
            value=c.api_published,
        )
        # Counted where asyncpg raises, for the whole process (every server in it shares the database driver).
        from .postgres.bridge import errors as database_errors

        by_class = CounterMetricFamily(
            "fluxrt_database_errors",
            "Database errors met (and retried or reported), by SQLSTATE class: 08 connection, 53 resources, ...",
            labels=["sqlstate_class"],
        )
        for sqlstate_class, n in sorted(database_errors.items()):
            by_class.add_metric([sqlstate_class], n)
        yield by_class
        yield GaugeMetricFamily("fluxrt_uptime_seconds", "Seconds since the server started", value=self._uptime())
        yield GaugeMetricFamily(
            "fluxrt_tasks",
            "Trio tasks in the process: about one per connection, plus the server's own",
            value=self._tasks(),
        )
        lag = self._changefeed_lag()
        if lag is not None:
            yield GaugeMetricFamily(
                "fluxrt_changefeed_lag_seconds",
                "Seconds since the changefeed last read every committed change: an upper bound on the age of the "
                "oldest change not yet read",
                value=lag,
            )
        yield CounterMetricFamily(
            "fluxrt_tls_handshake_failures",
            "TLS handshakes that failed: refused by the server or abandoned by the client, plain HTTP included",
            value=c.tls_handshake_failures,
        )
        expiry = self._certificate_expiry()
        if expiry is not None:
            yield GaugeMetricFamily(
                "fluxrt_tls_certificate_expiry_timestamp_seconds",
                "When the certificate served to new connections (server.tls_cert_file, as last loaded) expires, "
                "in Unix seconds",
                value=expiry,
            )
        if self._cluster is not None:
            yield from _cluster_metrics(self._cluster())


def _cluster_metrics(
    stats: ClusterStatistics,
) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    yield GaugeMetricFamily(
        "fluxrt_cluster_engine_up",
        "1 while the cluster engine (Redis) is reachable; 0 while broadcasts and presence changes are refused",
        value=1 if stats.state == "up" else 0,
    )
    yield GaugeMetricFamily("fluxrt_cluster_nodes", "Nodes this node hears from, itself included", value=stats.nodes)
    members = GaugeMetricFamily("fluxrt_cluster_presence_members", "Presence metas by node", labels=["node"])
    for node, n in sorted(stats.members.items()):
        members.add_metric([node], n)
    yield members
    yield GaugeMetricFamily(
        "fluxrt_cluster_backlog_bytes", "Bytes queued for Redis and not yet taken by it", value=stats.backlog_bytes
    )
    yield CounterMetricFamily("fluxrt_cluster_messages_out", "Operations published to the bus", value=stats.ops_out)
    yield CounterMetricFamily(
        "fluxrt_cluster_messages_in", "Operations received from other nodes on the bus", value=stats.ops_in
    )
    yield CounterMetricFamily("fluxrt_cluster_batches_out", "Batches published to the bus", value=stats.batches_out)
    yield CounterMetricFamily("fluxrt_cluster_batches_in", "Batches received from other nodes", value=stats.batches_in)
    yield CounterMetricFamily(
        "fluxrt_cluster_unavailable",
        "Broadcasts refused with UNAVAILABLE (engine unreachable or backlog full); refused presence changes are in "
        'fluxrt_errors_total{code="UNAVAILABLE"} with them',
        value=stats.refused,
    )
    yield CounterMetricFamily(
        "fluxrt_cluster_state_reads",
        "Other nodes' states read from Redis (a node announced itself, or one of its batches was missed)",
        value=stats.state_reads,
    )
    yield CounterMetricFamily(
        "fluxrt_cluster_reconnects", "Times the node reached Redis again after losing it", value=stats.reconnects
    )
    yield CounterMetricFamily(
        "fluxrt_cluster_malformed", "Messages on the bus that were not fluxrt batches", value=stats.malformed
    )
    yield CounterMetricFamily(
        "fluxrt_cluster_history_reads",
        "Broadcast histories read from Redis for clients that resume",
        value=stats.history_reads,
    )
    yield CounterMetricFamily(
        "fluxrt_cluster_resume_gaps",
        "Resumes answered recovered that got CHANGES_MISSED instead of their replay (the node lost Redis, or another "
        "node's broadcasts came late, between the read and the subscription)",
        value=stats.resume_gaps,
    )
    yield GaugeMetricFamily(
        "fluxrt_cluster_resumes_pending",
        "History reads kept for a resuming client whose subscription has not followed yet",
        value=stats.resumes_pending,
    )
    yield SummaryMetricFamily(
        "fluxrt_cluster_publish_seconds",
        "Round trips of publishing one batch to Redis (the bus latency this node adds)",
        count_value=stats.publish_seconds_count,
        sum_value=stats.publish_seconds_sum,
    )


def exposition(
    counters: Counters,
    connections: Callable[[], int],
    hub: Callable[[], HubStatistics],
    uptime: Callable[[], float],
    changefeed_lag: Callable[[], float | None],
    tasks: Callable[[], int],
    cluster: Callable[[], ClusterStatistics] | None = None,
    *,
    connections_limit: Callable[[], int],
    certificate_expiry: Callable[[], float | None] = lambda: None,
) -> bytes:
    """The Prometheus text exposition of everything above, and the process's own metrics (`process_*`: resident
    memory, CPU seconds, open and maximum file descriptors; on Linux)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collector: Any = _Collector(
        counters, connections, hub, uptime, changefeed_lag, tasks, cluster, connections_limit, certificate_expiry
    )
    registry.register(collector)
    ProcessCollector(registry=registry)
    return generate_latest(registry)
