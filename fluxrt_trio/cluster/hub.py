"""The hub of a node in a cluster: the `Hub` interface over a `LocalHub` (who is subscribed here, encode-once
delivery) and Redis (what the other nodes publish and hold).

A broadcast or presence change is queued at once and never waits on Redis in the caller; a writer task publishes
what is queued as one batch per round trip (a burst is a few round trips, not one per message). Once Redis has
taken a batch it is delivered here, to this node's subscribers, exactly as the other nodes deliver it when it
reaches them on the bus: every node, this one included, delivers each broadcast once, in the order its publisher
sent it, and nobody gets what Redis did not take. While Redis is unreachable, or the queue holds
`cluster.max_backlog` bytes, broadcasts and presence changes are refused (`unavailable`) and nothing is queued.
"""

from __future__ import annotations

import collections
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import attrs
import trio

from ..hub import HubStatistics, LocalHub, Subscriber
from ..logs import ctx
from ..protocol.messages import Ack, BroadcastEvent, Error, ErrorCode, PresenceEvent
from ..protocol.presence import Meta
from . import wire
from .engine import EngineUnreachable, RedisEngine, Writes
from .state import NodeState
from .view import ClusterView, Delivered, Event, PresenceChanged, ReadState

log = logging.getLogger("fluxrt.cluster")

S = TypeVar("S", bound=Subscriber)

BATCH_OPS = 256
"""operations in one batch at most"""
BATCH_BYTES = 1024 * 1024
"""bytes of operations in one batch at most (one operation larger than this goes alone)"""
BACKOFF = (0.1, 5.0)
"""first and longest wait between attempts to reach Redis again"""
WATCH_INTERVAL = 0.25
"""seconds between looks for nodes gone silent"""


def default_node_id() -> str:
    """The host name and a random suffix: unique across restarts, readable in logs and /metrics."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


@attrs.frozen(slots=True)
class ClusterStatistics:
    node: str
    state: str
    """`connecting`, `up` or `unreachable`"""
    last_error: str | None
    nodes: int
    """nodes heard from, this one included"""
    members: dict[str, int]
    """presence metas by node"""
    backlog_bytes: int
    ops_out: int
    ops_in: int
    batches_out: int
    batches_in: int
    refused: int
    """broadcasts and presence changes answered UNAVAILABLE"""
    state_reads: int
    """times another node's state was read from Redis (it announced itself, or a batch of its was missed)"""
    reconnects: int
    publish_seconds_sum: float
    publish_seconds_count: int
    malformed: int


@attrs.define(slots=True)
class _Queued(Generic[S]):
    op: wire.Op
    data: bytes
    sender: S | None = None
    ref: str | None = None


class ClusterHub(Generic[S]):
    """A `Hub` that reaches every node through Redis. `run` must run (in the server's nursery) for anything to
    leave this node; `leave` says goodbye at shutdown."""

    def __init__(
        self,
        redis_url: str,
        *,
        node_id: str,
        node_timeout: float,
        prefix: str = "fluxrt",
        max_backlog: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local: LocalHub[S] = LocalHub()
        self.node = node_id
        self.node_timeout = node_timeout
        self.max_backlog = max_backlog
        # Ordered by start time, so that a node hearing two lives of one node id keeps the newer.
        self.incarnation = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
        self.engine = RedisEngine(redis_url, prefix=prefix, node=node_id, node_timeout=node_timeout)
        self.view = ClusterView(node_id)
        self.state = NodeState()
        self._clock = clock
        self._queue: collections.deque[_Queued[S]] = collections.deque()
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._reads: set[str] = set()
        self._reads_wake = trio.Event()
        self._seq = 0
        self._echo = 0.0
        self._phase: Literal["connecting", "up", "unreachable"] = "connecting"
        self._last_error: str | None = None
        self._leaving = False
        self._was_up = False
        self._announcing = False
        """the node's state is being written: changes from then on are queued, to follow it"""
        self._publishing = trio.Lock()
        """held while a batch is on its way to Redis, so that the goodbye comes after the last batch"""
        self._counts = collections.Counter[str]()
        self._publish_seconds = 0.0

    @property
    def heartbeat(self) -> float:
        """Seconds between batches when nothing else is published: a fifth of `node_timeout`."""
        return self.node_timeout / 5

    @property
    def silence(self) -> float:
        """A node not heard from for this long is gone: `node_timeout` less one heartbeat, so that its members
        have left everywhere within `node_timeout` of its last batch."""
        return self.node_timeout - self.heartbeat

    # ---- the Hub interface: subscriptions are this node's --------------------------------------------------

    def join(self, channel: str, subscriber: S) -> None:
        self.local.join(channel, subscriber)

    def leave(self, channel: str, subscriber: S) -> None:
        self.local.leave(channel, subscriber)

    def subscribers(self, channel: str) -> list[S]:
        return self.local.subscribers(channel)

    def channels(self, kind: str) -> list[str]:
        return self.local.channels(kind)

    def publish_nowait(self, channel: str, message: Any, *, exclude: S | None = None) -> int:
        """Deliver to this node's subscribers only: table changes reach every node from the change log."""
        return self.local.publish_nowait(channel, message, exclude=exclude)

    # ---- the Hub interface: what reaches every node --------------------------------------------------------

    def unavailable(self) -> str | None:
        """Why broadcasts and presence changes cannot be handed to the other nodes now, or None."""
        if self._leaving:
            return "this node is shutting down"
        if self._phase != "up":
            return "the cluster engine (Redis) is unreachable"
        if self._queued_bytes >= self.max_backlog:
            return "the cluster engine (Redis) is too slow: the outgoing backlog is full"
        return None

    def broadcast(self, channel: str, payload: Any, *, sender: S | None = None, ref: str | None = None) -> int:
        op = wire.Broadcast(channel, payload)
        data = wire.encode_op(op)
        reason = self.unavailable()
        if reason is None and self._queued_bytes + len(data) > self.max_backlog and self._queue:
            reason = "the cluster engine (Redis) is too slow: the outgoing backlog is full"
        if reason is not None:
            self._counts["refused"] += 1
            if sender is not None:
                sender.reply_nowait(_unavailable(reason, channel, ref, sent=False))
            return 0
        self._enqueue(_Queued(op, data, sender, ref))
        return 0

    def resumable(self, channel: str, since: Any) -> bool:
        return False

    def replay(self, channel: str, subscriber: S, since: Any) -> None:
        return None

    def track(self, channel: str, key: str, ref: str, state: dict[str, Any]) -> None:
        self._changed(self.state.track(channel, key, ref, state))

    def untrack(self, channel: str, key: str, ref: str) -> None:
        self._changed(self.state.untrack(channel, key, ref))

    def presence_state(self, channel: str) -> dict[str, list[Meta]]:
        return self.view.presence_state(channel)

    def statistics(self) -> HubStatistics:
        local = self.local.statistics()
        return attrs.evolve(local, presence_rooms=len(self.view.rooms()))

    # ---- connections per user ------------------------------------------------------------------------------

    def users_elsewhere(self, sub: str) -> int:
        """Connections of user `sub` on the other nodes, as last heard."""
        return self.view.users_elsewhere(sub)

    def user_count(self, sub: str, count: int) -> None:
        """User `sub` now holds `count` connections on this node."""
        self._changed(self.state.count(sub, count))

    def _changed(self, op: wire.Op | None) -> None:
        if op is None or self._leaving:
            return
        if self._phase == "up" or self._announcing:
            self._enqueue(_Queued(op, wire.encode_op(op)))
        else:
            # Kept in `state`, which the node writes whole when Redis is back; its own subscribers see it now.
            self._handle(self.view.apply_own(self.incarnation, [op], self._clock()))

    def _enqueue(self, item: _Queued[S]) -> None:
        self._queue.append(item)
        self._queued_bytes += len(item.data)
        self._wake.set()

    # ---- running -------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node in the cluster until cancelled: connect, announce, publish and receive; when Redis
        fails, refuse what needs it and try again with backoff. Never raises for Redis."""
        delay = BACKOFF[0]
        async with self.engine.opened():
            task_status.started()
            while True:
                try:
                    await self.engine.connect()
                    await self._connected()
                except* EngineUnreachable as group:
                    self._down(str(group.exceptions[0]))
                except* Exception:
                    # A fault of ours must not take the node down with it: it keeps serving its own connections.
                    log.exception("cluster engine failed", extra=ctx(node=self.node))
                    self._down("internal error (see the log)")
                if self._was_up:
                    self._was_up = False
                    delay = BACKOFF[0]
                await self.engine.close()
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                # Back well within node_timeout, so that a short outage does not make this node look dead.
                delay = min(delay * 2, BACKOFF[1], self.node_timeout / 2)

    def _down(self, reason: str) -> None:
        if self._phase != "unreachable":
            log.warning("cluster engine unreachable", extra=ctx(node=self.node, reason=reason))
        self._phase = "unreachable"
        self._last_error = reason
        queued = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._fail(queued, "the cluster engine (Redis) became unreachable", sent=False)

    def _fail(self, items: list[_Queued[S]], reason: str, *, sent: bool) -> None:
        """Answer the broadcasts among `items` with UNAVAILABLE; this node's own subscribers see its presence
        changes among them at once (the other nodes when Redis is back). `sent`: they went to Redis, which did not
        confirm them, so they may have reached other nodes."""
        for item in items:
            op = item.op
            if isinstance(op, wire.Broadcast) and item.sender is not None:
                self._counts["refused"] += 1
                item.sender.reply_nowait(_unavailable(reason, op.channel, item.ref, sent=sent))
        changes = [item.op for item in items if not isinstance(item.op, wire.Broadcast)]
        if changes:
            self._handle(self.view.apply_own(self.incarnation, changes, self._clock()))

    async def _connected(self) -> None:
        """Announce this node's state, read everyone's, then serve until Redis fails."""
        if self._counts["connects"]:
            self._counts["reconnects"] += 1
        self._counts["connects"] += 1
        self._seq += 1
        snapshot = self.state.snapshot(self.incarnation, self._seq)
        # From the snapshot on, changes are queued: they follow it on the bus once the node is up.
        self._announcing = True
        try:
            announce = wire.encode_batch(self.node, self.incarnation, self._seq, [wire.encode_op(wire.Announce())])
            await self.engine.rewrite(snapshot, announce)
            now = self._clock()
            self._echo = now
            # What changed while away arrives as a fresh sync below, not as diffs.
            self.view.restore(self.node, snapshot, now)
            others = [node for node in await self.engine.nodes() if node != self.node]
            for node in set(self.view.nodes) - set(others) - {self.node}:
                self.view.forget(node)
            for node in others:
                self.view.restore(node, await self.engine.read_state(node), self._clock())
        finally:
            self._announcing = False
        was = self._phase
        self._phase = "up"
        self._was_up = True
        self._last_error = None
        log.info(
            "cluster engine connected" if was == "connecting" else "cluster engine reachable again",
            extra=ctx(node=self.node, nodes=len(self.view.nodes)),
        )
        for channel in self.local.channels("presence"):
            self.local.publish_nowait(channel, PresenceEvent(channel, "sync", self.view.presence_state(channel)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._read_states)
            nursery.start_soon(self._watch)

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                with trio.move_on_after(self.heartbeat):
                    await self._wake.wait()
            async with self._publishing:
                if self._leaving:
                    return
                await self._publish(self._take())

    def _take(self) -> list[_Queued[S]]:
        items: list[_Queued[S]] = []
        size = 0
        while self._queue and len(items) < BATCH_OPS:
            item = self._queue[0]
            if items and size + len(item.data) > BATCH_BYTES:
                break
            items.append(self._queue.popleft())
            size += len(item.data)
        self._queued_bytes -= size
        return items

    async def _publish(self, items: list[_Queued[S]]) -> None:
        """One batch (an empty one is a heartbeat); on failure every broadcast in it is refused."""
        self._seq += 1
        seq = self._seq
        ops = [item.op for item in items]
        data = wire.encode_batch(self.node, self.incarnation, seq, [item.data for item in items])
        started = self._clock()
        try:
            await self.engine.publish(data, f"{self.incarnation} {seq}", Writes.of(ops))
        except BaseException as exc:
            # Cancelled too (another task of the phase failed): every item is answered either way.
            cause = str(exc) if isinstance(exc, EngineUnreachable) else "the engine stopped"
            self._fail(items, f"the cluster engine (Redis) did not confirm it ({cause})", sent=True)
            raise
        self._publish_seconds += self._clock() - started
        self._counts["batches_out"] += 1
        self._counts["ops_out"] += len(ops)
        # Delivered here now that Redis has it, as every other node delivers it from the bus.
        for item in items:
            op = item.op
            if isinstance(op, wire.Broadcast):
                self.local.publish_nowait(op.channel, BroadcastEvent(op.channel, op.payload), exclude=item.sender)
                if item.sender is not None and item.ref is not None:
                    item.sender.reply_nowait(Ack("sent", op.channel, item.ref))
        others = tuple(op for op in ops if not isinstance(op, wire.Broadcast))
        self._handle(self.view.receive(wire.Batch(self.node, self.incarnation, seq, others), self._clock()))

    async def _read_loop(self) -> None:
        while True:
            messages = await self.engine.receive()
            now = self._clock()
            for data in messages:
                try:
                    batch = wire.decode(data)
                except wire.WireError as exc:
                    self._counts["malformed"] += 1
                    if self._counts["malformed"] == 1:
                        log.warning("ignored a malformed message on the bus", extra=ctx(reason=str(exc)))
                    continue
                if batch.node == self.node:
                    if batch.incarnation == self.incarnation:
                        self._echo = now
                    elif batch.incarnation > self.incarnation:
                        log.error(
                            "another node runs with this node's cluster.node_id: give each node its own",
                            extra=ctx(node=self.node),
                        )
                    continue
                self._counts["batches_in"] += 1
                self._counts["ops_in"] += len(batch.ops)
                self._handle(self.view.receive(batch, now))

    async def _read_states(self) -> None:
        while True:
            await self._reads_wake.wait()
            self._reads_wake = trio.Event()
            nodes, self._reads = sorted(self._reads), set()
            for node in nodes:
                self._counts["state_reads"] += 1
                snapshot = await self.engine.read_state(node)
                self._handle(self.view.restore(node, snapshot, self._clock()))

    async def _watch(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = self._clock()
            if now - self._echo > self.silence:
                raise EngineUnreachable(
                    f"this node's own batches stopped coming back from Redis for {now - self._echo:.1f}s"
                )
            self._handle(self.view.expire(now, self.silence))

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case Delivered(channel=channel, payload=payload):
                    self.local.publish_nowait(channel, BroadcastEvent(channel, payload))
                case PresenceChanged(room=room, diff=diff):
                    self.local.publish_nowait(room, PresenceEvent(room, "diff", diff.payload()))
                case ReadState(node=node) if node == self.node:
                    self.view.restore(node, self.state.snapshot(self.incarnation, self._seq), self._clock())
                case ReadState(node=node):
                    self._reads.add(node)
                    self._reads_wake.set()

    async def leave_cluster(self) -> None:
        """Say goodbye (the other nodes drop this node's members at once) and remove its state; best effort,
        within a second."""
        if self._leaving:
            return
        self._leaving = True
        with trio.move_on_after(1):
            async with self._publishing:
                if self._phase != "up":
                    return
                self._seq += 1
                data = wire.encode_batch(self.node, self.incarnation, self._seq, [wire.encode_op(wire.Goodbye())])
                try:
                    await self.engine.leave(data)
                except EngineUnreachable as exc:
                    log.info("could not say goodbye to the cluster", extra=ctx(reason=str(exc)))

    # ---- observing -----------------------------------------------------------------------------------------

    def cluster_statistics(self) -> ClusterStatistics:
        c = self._counts
        return ClusterStatistics(
            node=self.node,
            state=self._phase,
            last_error=self._last_error,
            nodes=len(self.view.nodes),
            members=self.view.members(),
            backlog_bytes=self._queued_bytes,
            ops_out=c["ops_out"],
            ops_in=c["ops_in"],
            batches_out=c["batches_out"],
            batches_in=c["batches_in"],
            refused=c["refused"],
            state_reads=c["state_reads"],
            reconnects=c["reconnects"],
            publish_seconds_sum=self._publish_seconds,
            publish_seconds_count=c["batches_out"],
            malformed=c["malformed"],
        )


def _unavailable(reason: str, channel: str, ref: str | None, *, sent: bool) -> Error:
    outcome = (
        "it may have reached other nodes but not this one"
        if sent
        else "nothing was delivered to any node; retry with backoff"
    )
    return Error(ErrorCode.UNAVAILABLE, f"{reason}: {outcome}", channel=channel, ref=ref)
