"""The hub of a node in a cluster: the `Hub` interface over a `LocalHub` (who is subscribed here, encode-once
delivery) and Redis (what the other nodes publish and hold).

A broadcast or presence change is queued at once and never waits on Redis in the caller; a writer task publishes
what is queued as a batch at once, up to MAX_IN_FLIGHT batches waiting for Redis's answer, and what queues behind
them goes in the next (a burst is a few batches, not one per message). Once Redis has
taken a batch it is delivered here, to this node's subscribers, exactly as the other nodes deliver it when it
reaches them on the bus: every node, this one included, delivers each broadcast once, in the order its publisher
sent it, and nobody gets what Redis did not take. While Redis is unreachable, or the queue and the batches in
flight hold `cluster.max_backlog` bytes, broadcasts and presence changes are refused (`unavailable`) and nothing is
queued.

A node delivers its own broadcasts when their batch comes back to it on the bus, not when Redis answers the
transaction: then every node delivers every broadcast of a channel in one order, Redis's, which is also the order of
their ids in the channel's history stream. A client's position (the id of the last message it processed) therefore
means "everything up to here" on every node, which is what a resume needs (`resumable` and `replay`).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Literal, TypeVar

import attrs
import trio

from ..hub import HubStatistics, LocalHub, Subscriber, send_replay
from ..logs import ctx
from ..protocol.frames import text_frame
from ..protocol.history import History, Position
from ..protocol.messages import Ack, BroadcastEvent, Error, ErrorCode, PresenceEvent, encode
from ..protocol.presence import Meta
from . import wire
from .engine import EngineUnreachable, Published, RedisEngine, Writes
from .state import NodeState
from .view import ClusterView, Delivered, Event, PresenceChanged, ReadState

log = logging.getLogger("fluxrt.cluster")

S = TypeVar("S", bound=Subscriber)

BATCH_OPS = 256
"""operations in one batch at most"""
MAX_IN_FLIGHT = 8
"""batches sent to Redis and not yet answered, at most: a message need not wait for the batch ahead of it to come
back, while a Redis that stalls holds at most this many (and `cluster.max_backlog` bytes)"""
BATCH_BYTES = 1024 * 1024
"""bytes of operations in one batch at most (one operation larger than this goes alone)"""
BACKOFF = (0.1, 5.0)
"""first and longest wait between attempts to reach Redis again"""
WATCH_INTERVAL = 0.25
"""seconds between looks for nodes gone silent"""
STASH_WAIT = 10.0
"""seconds a history read for a resuming client waits for its subscription (which follows at once) before it is
dropped: the connection closed meanwhile"""

_POSITION = re.compile(r"b2~([0-9]{1,20})-([0-9]{1,20})")


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
    history_reads: int = 0
    """histories read from Redis for clients that resume"""
    resume_gaps: int = 0
    """resumes found resumable that got CHANGES_MISSED instead of their replay (the node lost the seam)"""
    resumes_pending: int = 0
    """history reads kept for a subscription that has not followed yet (dropped after STASH_WAIT)"""


@attrs.define(slots=True)
class _Queued(Generic[S]):
    op: wire.Op
    data: bytes
    sender: S | None = None
    ref: str | None = None
    logged: int | None = None
    """the change id of a `realtime.send`"""


@attrs.define(slots=True)
class _Flight(Generic[S]):
    """A batch sent to Redis and not yet answered."""

    seq: int
    items: list[_Queued[S]]
    size: int
    """bytes of its operations, counted in the backlog until Redis answers"""
    sent: float
    """by the hub's clock"""
    deadline: float
    """by Trio's clock: when Redis's answer is late"""


@attrs.define(slots=True)
class _Unechoed(Generic[S]):
    """The broadcasts of a batch of this node's, delivered here when the batch comes back on the bus."""

    items: list[_Queued[S]]
    ids: Sequence[str | None] | None = None
    """their stream ids, once Redis has answered the transaction"""


@attrs.define(slots=True)
class _Stashed:
    """What a resuming client gets from Redis, kept from `resumable` for the `replay` that follows."""

    frames: list[bytes]
    last: Position
    """the position of the last of them (or the client's own when there are none): the node's history gives what
    came after"""
    epoch: int
    settle: int
    deadline: float
    users: int = 1
    """resumes from the same position on the same channel share one read"""


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
        history_size: int = 0,
        history_ttl: float = 300.0,
        log_retention: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Positions are stream ids here: the LocalHub keeps no history of its own.
        self.local: LocalHub[S] = LocalHub()
        self.history = History(history_size, history_ttl) if history_size > 0 else None
        """the broadcasts this node delivered lately, with their stream ids: what came between a resuming client's
        read of Redis and its subscription"""
        self.node = node_id
        self.node_timeout = node_timeout
        self.max_backlog = max_backlog
        # Ordered by start time, so that a node hearing two lives of one node id keeps the newer.
        self.incarnation = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
        self.engine = RedisEngine(
            redis_url,
            prefix=prefix,
            node=node_id,
            node_timeout=node_timeout,
            history_size=history_size,
            history_ttl=history_ttl,
            log_retention=log_retention,
        )
        self.view = ClusterView(node_id)
        self.state = NodeState()
        self._clock = clock
        self._queue: collections.deque[_Queued[S]] = collections.deque()
        self._queued_bytes = 0
        self._held: collections.deque[_Queued[S]] = collections.deque()
        """`realtime.send`s read while Redis is away, to offer once it is back (at most `max_backlog` bytes)"""
        self._held_bytes = 0
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
        self._in_flight: collections.deque[_Flight[S]] = collections.deque()
        """this node's batches sent to Redis and not answered yet, in seq order (Redis answers in that order)"""
        self._sent = trio.Event()
        """set (and replaced) when a batch is sent"""
        self._refreshed = -math.inf
        """when (Trio's clock) a batch last refreshed the expiry of this node's keys in Redis"""
        self._answered = trio.Event()
        """set (and replaced) when Redis answers a batch"""
        self._counts = collections.Counter[str]()
        self._publish_seconds = 0.0
        self._unechoed: dict[int, _Unechoed[S]] = {}
        """by batch seq: this node's broadcasts that Redis has (or is taking) and the bus has not brought back"""
        self._echo_seq = 0
        """the last of this node's batches heard back on the bus"""
        self._echoes = trio.Event()
        """set (and replaced) when one is heard, or when the node loses Redis"""
        self._echo_wanted = 0
        """a batch with this seq is wanted at once, even an empty one (see `_bus_caught_up`)"""
        self._epoch = 0
        """grows whenever the node (re)connects or loses Redis: what it heard on the bus is whole within one"""
        self._settle = 0
        """grows whenever another node's state must be read: broadcasts from it may then come late or not at all"""
        self._restoring = False
        self._stash: dict[tuple[str, str], _Stashed] = {}

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

    def channel_sizes(self) -> Iterator[tuple[str, int]]:
        return self.local.channel_sizes()

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
        if reason is None and self._queued_bytes + len(data) > self.max_backlog and self._queued_bytes:
            reason = "the cluster engine (Redis) is too slow: the outgoing backlog is full"
        if reason is not None:
            self._counts["refused"] += 1
            if sender is not None:
                sender.reply_nowait(_unavailable(reason, channel, ref, sent=False))
            return 0
        self._enqueue(_Queued(op, data, sender, ref))
        return 0

    def broadcast_logged(self, channel: str, payload: Any, key: int) -> None:
        """A `realtime.send`: offered to Redis like a broadcast; the first node's offer is published and the
        others' are not (engine.PUBLISH_BROADCASTS), so every node delivers it once, from the bus, with its stream
        id. Read while Redis is away, it is held and offered when Redis is back."""
        op = wire.Broadcast(channel, payload)
        item: _Queued[S] = _Queued(op, wire.encode_op(op), logged=key)
        if self._phase == "up" and not self._leaving:
            self._enqueue(item)
        else:
            self._hold(item)

    def _hold(self, item: _Queued[S]) -> None:
        self._held.append(item)
        self._held_bytes += len(item.data)
        while self._held_bytes > self.max_backlog and len(self._held) > 1:
            dropped = self._held.popleft()
            self._held_bytes -= len(dropped.data)
            self._counts["sends_dropped"] += 1
            if self._counts["sends_dropped"] == 1:
                # Other nodes that reach Redis still publish them; this node's subscribers miss them.
                log.error(
                    "realtime.send messages read while Redis was away exceeded cluster.max_backlog; dropping the"
                    " oldest (clients that resume get them from another node's publication, if any)",
                    extra=ctx(node=self.node),
                )

    async def resumable(self, channel: str, since: Any) -> bool:
        """Read what followed `since` from the channel's history stream in Redis, and wait until this node has heard
        on the bus everything published before that read; keep it for `replay`. False when `since` is not a stream
        id in the history (trimmed, expired, malformed), when what followed it is older than `history_ttl`, or when
        Redis cannot be asked."""
        position = _parse(since)
        if position is None or self.history is None:
            return False
        assert isinstance(since, str)
        self._sweep_stash()
        key = (channel, since)
        stashed = self._stash.get(key)
        if stashed is not None and stashed.epoch == self._epoch:
            stashed.users += 1
            return True
        if self._phase != "up":
            return False
        epoch, settle = self._epoch, self._settle
        stream_id = since.removeprefix("b2~")
        # The stream is trimmed roughly (MAXLEN ~): as on one node, a client that missed more than history_size
        # messages cannot resume.
        count = self.history.size + 2
        self._counts["history_reads"] += 1
        try:
            now_ms, entries = await self.engine.read_history(channel, stream_id, count)
            await self._bus_caught_up(epoch)
        except EngineUnreachable:
            return False
        if self._epoch != epoch or not entries or entries[0][0] != stream_id or len(entries) >= count:
            return False
        later = entries[1:]
        if later and _parse_id(later[0][0])[0] < now_ms - self.history.ttl * 1000:
            return False
        frames = []
        for entry_id, data in later:
            try:
                op = wire.decode_op(data)
            except wire.WireError:
                return False
            if not isinstance(op, wire.Broadcast) or op.channel != channel:
                return False
            frames.append(text_frame(encode(BroadcastEvent(channel, op.payload, f"b2~{entry_id}"))))
        last = _parse_id(later[-1][0]) if later else position
        stashed = self._stash.get(key)
        if stashed is not None and stashed.epoch == epoch:
            stashed.users += 1
        else:
            self._stash[key] = _Stashed(frames, last, epoch, settle, self._clock() + STASH_WAIT)
        return True

    def replay(self, channel: str, subscriber: S, since: Any) -> None:
        """Send `subscriber` what `resumable` read for it, then what this node delivered after that; CHANGES_MISSED
        instead when this node may not have every message in between (it lost Redis, or another node's
        broadcasts came late while its state was read)."""
        key = (channel, since) if isinstance(since, str) else None
        stashed = self._stash.get(key) if key is not None else None
        frames: list[bytes] | None = None
        if stashed is not None and key is not None:
            stashed.users -= 1
            if stashed.users <= 0:
                del self._stash[key]
            settled = stashed.settle == self._settle and not (self._reads or self._restoring)
            if stashed.epoch == self._epoch and settled and self.history is not None:
                later = self.history.after(channel, stashed.last, self._clock())
                if later is not None:
                    frames = stashed.frames + later
        if frames is None:
            self._counts["resume_gaps"] += 1
        send_replay(subscriber, channel, frames)

    async def _bus_caught_up(self, epoch: int) -> None:
        """Until this node has heard back a batch of its own published after now: everything published to the bus
        before then has reached it. Raises EngineUnreachable when that takes longer than a call to Redis may, or
        the node loses Redis meanwhile."""
        wanted = self._seq + 1
        self._echo_wanted = max(self._echo_wanted, wanted)
        self._wake.set()
        with trio.move_on_after(2 * self.engine.call_timeout):
            while self._echo_seq < wanted and self._epoch == epoch:
                await self._echoes.wait()
        if self._echo_seq < wanted or self._epoch != epoch:
            raise EngineUnreachable("this node's own batch did not come back from Redis in time")

    def _sweep_stash(self) -> None:
        now = self._clock()
        for key, stashed in list(self._stash.items()):
            if stashed.deadline < now:
                del self._stash[key]

    def track(self, channel: str, key: str, ref: str, state: dict[str, Any]) -> None:
        self._changed(self.state.track(channel, key, ref, state))

    def untrack(self, channel: str, key: str, ref: str) -> None:
        self._changed(self.state.untrack(channel, key, ref))

    def presence_state(self, channel: str) -> dict[str, list[Meta]]:
        return self.view.presence_state(channel)

    def traffic(self) -> tuple[dict[str, int], int]:
        return self.local.traffic()

    def statistics(self) -> HubStatistics:
        local = self.local.statistics()
        history = self.history
        if history is not None:
            history.sweep(self._clock())
        return attrs.evolve(
            local,
            presence_rooms=len(self.view.rooms()),
            history_messages=history.messages if history is not None else 0,
            history_bytes=history.bytes if history is not None else 0,
        )

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
        if self._phase == "up" and len(self._queue) == 1 and len(self._in_flight) < MAX_IN_FLIGHT:
            # Sent in the caller's step: waking the writer would cost the message a scheduling round of the node.
            self._send(self._take())
        else:
            self._wake.set()

    # ---- running -------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node in the cluster until cancelled: connect, announce, publish and receive; when Redis
        fails, refuse what needs it and try again with backoff. Never raises for Redis."""
        delay = BACKOFF[0]
        async with self.engine.opened():
            task_status.started()
            try:
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
            finally:
                # Cancelled (the server stops): whatever is still in flight or queued gets its answer too.
                self._abandon("this node is shutting down")

    def _down(self, reason: str) -> None:
        if self._phase != "unreachable":
            log.warning("cluster engine unreachable", extra=ctx(node=self.node, reason=reason))
        self._phase = "unreachable"
        self._last_error = reason
        self._new_epoch()
        self._abandon(reason)

    def _abandon(self, reason: str) -> None:
        """Answer everything this node handed to Redis or queued for it, now that the link is gone: each broadcast
        once, in seq order."""
        # Redis took these (it answered their transaction); their echo will not come now.
        for seq in sorted(seq for seq, unechoed in self._unechoed.items() if unechoed.ids is not None):
            unechoed = self._unechoed.pop(seq)
            self._deliver_own(unechoed.items, unechoed.ids)
        # Sent and not answered: Redis may have run them. Broadcasts whose batch came back on the bus meanwhile
        # were delivered and acked: Redis did take them.
        flights = list(self._in_flight)
        self._in_flight.clear()
        for flight in flights:
            echoed = self._unechoed.pop(flight.seq, None) is None
            failed = [item for item in flight.items if not (echoed and isinstance(item.op, wire.Broadcast))]
            self._fail(failed, f"the cluster engine (Redis) did not confirm it ({reason})", sent=True)
        self._unechoed.clear()
        queued = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._fail(queued, "the cluster engine (Redis) became unreachable", sent=False)
        self._answered.set()
        self._answered = trio.Event()

    def _fail(self, items: list[_Queued[S]], reason: str, *, sent: bool) -> None:
        """Answer the broadcasts among `items` with UNAVAILABLE; this node's own subscribers see its presence
        changes among them at once (the other nodes when Redis is back). `sent`: they went to Redis, which did not
        confirm them, so they may have reached other nodes."""
        for item in items:
            op = item.op
            if item.logged is not None:
                # Committed in the database: offered again when Redis is back (once published, never twice).
                self._hold(item)
            elif isinstance(op, wire.Broadcast) and item.sender is not None:
                self._counts["refused"] += 1
                item.sender.reply_nowait(_unavailable(reason, op.channel, item.ref, sent=sent))
        changes = [item.op for item in items if not isinstance(item.op, wire.Broadcast)]
        if changes:
            self._handle(self.view.apply_own(self.incarnation, changes, self._clock()))

    def _new_epoch(self) -> None:
        self._epoch += 1
        self._stash.clear()
        self._echoes.set()
        self._echoes = trio.Event()

    async def _connected(self) -> None:
        """Announce this node's state, read everyone's, then serve until Redis fails."""
        self._new_epoch()
        self._seq += 1
        snapshot = self.state.snapshot(self.incarnation, self._seq)
        # From the snapshot on, changes are queued: they follow it on the bus once the node is up.
        self._announcing = True
        try:
            announce = wire.encode_batch(self.node, self.incarnation, self._seq, [wire.encode_op(wire.Announce())])
            await self.engine.rewrite(snapshot, announce)
            self._refreshed = trio.current_time()
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
        if was != "connecting":
            # Counted once the node is back, not per attempt: a Redis that stays away does not make it climb.
            self._counts["reconnects"] += 1
        self._phase = "up"
        self._was_up = True
        self._last_error = None
        held, self._held, self._held_bytes = self._held, collections.deque(), 0
        self._queue.extendleft(reversed(held))
        self._queued_bytes += sum(len(item.data) for item in held)
        log.info(
            "cluster engine connected" if was == "connecting" else "cluster engine reachable again",
            extra=ctx(node=self.node, nodes=len(self.view.nodes)),
        )
        for channel in self.local.channels("presence"):
            self.local.publish_nowait(channel, PresenceEvent(channel, "sync", self.view.presence_state(channel)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.engine.serve, self._heard)
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._confirm_loop)
            nursery.start_soon(self._read_states)
            nursery.start_soon(self._watch)

    async def _write_loop(self) -> None:
        """Send what is queued as soon as there is room in flight; an empty batch after a heartbeat of silence.
        Returns when the node is leaving and nothing is queued."""
        last = trio.current_time()
        while True:
            while True:
                if self._leaving and not self._queue:
                    return
                if len(self._in_flight) < MAX_IN_FLIGHT and (
                    self._queue or self._echo_wanted > self._seq or trio.current_time() - last >= self.heartbeat
                ):
                    break
                self._wake = trio.Event()
                with trio.move_on_at(last + self.heartbeat):
                    await self._wake.wait()
            self._send(self._take())
            last = trio.current_time()
            # Let the callers of this tick queue more before the next batch.
            await trio.lowlevel.checkpoint()

    def _take(self) -> list[_Queued[S]]:
        items: list[_Queued[S]] = []
        size = 0
        while self._queue and len(items) < BATCH_OPS:
            item = self._queue[0]
            if items and size + len(item.data) > BATCH_BYTES:
                break
            items.append(self._queue.popleft())
            size += len(item.data)
        return items

    def _send(self, items: list[_Queued[S]]) -> None:
        """One batch to Redis (an empty one is a heartbeat), behind those in flight."""
        self._seq += 1
        seq = self._seq
        broadcasts = [item for item in items if isinstance(item.op, wire.Broadcast)]
        if broadcasts:
            # Before it is sent: the echo may be read before Redis's answer.
            self._unechoed[seq] = _Unechoed(broadcasts)
        published = [
            Published(item.op.channel if self.history is not None else None, item.logged)
            if isinstance(item.op, wire.Broadcast)
            else None
            for item in items
        ]
        head = wire.batch_head(self.node, self.incarnation, seq)
        now = trio.current_time()
        # A refresh at least every heartbeat while batches flow (an idle node's heartbeat is one too).
        refresh = now - self._refreshed >= self.heartbeat
        if refresh:
            self._refreshed = now
        position = f"{self.incarnation} {seq}"
        writes = Writes.of([item.op for item in items])
        self.engine.submit(head, [item.data for item in items], published, position, writes, refresh=refresh)
        deadline = now + self.engine.call_timeout
        self._in_flight.append(_Flight(seq, items, sum(len(item.data) for item in items), self._clock(), deadline))
        self._sent.set()
        self._sent = trio.Event()

    async def _confirm_loop(self) -> None:
        """Take Redis's answers in seq order; one that does not come within a call's timeout of its batch being
        sent makes the engine unreachable (and every batch in flight is answered by `_abandon`)."""
        while True:
            while not self._in_flight:
                await self._sent.wait()
            flight = self._in_flight[0]
            with trio.move_on_at(flight.deadline):
                ids = await self.engine.confirmed()
                self._confirm(self._in_flight.popleft(), ids)
                continue
            raise EngineUnreachable("Redis did not answer in time")

    def _confirm(self, flight: _Flight[S], ids: list[str | None]) -> None:
        """Redis took the batch: count it, note its stream ids for its echo, show its presence changes here."""
        self._queued_bytes -= flight.size
        self._publish_seconds += self._clock() - flight.sent
        self._counts["batches_out"] += 1
        self._counts["ops_out"] += len(flight.items)
        unechoed = self._unechoed.get(flight.seq)
        if unechoed is not None:
            unechoed.ids = ids or [None] * len(unechoed.items)
        others = tuple(item.op for item in flight.items if not isinstance(item.op, wire.Broadcast))
        self._handle(self.view.receive(wire.Batch(self.node, self.incarnation, flight.seq, others), self._clock()))
        if self._queue or self._echo_wanted > self._seq:
            # There is room in flight for what waits.
            self._wake.set()
        self._answered.set()
        self._answered = trio.Event()

    def _heard(self, data: bytes) -> None:
        """One message from the bus, in the bus's order (called by the engine's reader as it reads it)."""
        try:
            batch = wire.decode(data)
        except wire.WireError as exc:
            self._counts["malformed"] += 1
            if self._counts["malformed"] == 1:
                log.warning("ignored a malformed message on the bus", extra=ctx(reason=str(exc)))
            return
        now = self._clock()
        if batch.node == self.node:
            if batch.incarnation == self.incarnation:
                self._echo = now
                self._echoed(batch)
            elif batch.incarnation > self.incarnation:
                log.error(
                    "another node runs with this node's cluster.node_id: give each node its own",
                    extra=ctx(node=self.node),
                )
            return
        self._counts["batches_in"] += 1
        self._counts["ops_in"] += len(batch.ops)
        self._handle(self.view.receive(batch, now))

    def _echoed(self, batch: wire.Batch) -> None:
        """One of this node's batches came back: deliver its broadcasts here, with the ids Redis gave them."""
        # max: a transaction that a stalled Redis ran late, after the node reconnected, comes back late too.
        self._echo_seq = max(self._echo_seq, batch.seq)
        self._echoes.set()
        self._echoes = trio.Event()
        for seq in sorted(seq for seq in self._unechoed if seq <= batch.seq):
            unechoed = self._unechoed.pop(seq)
            if seq == batch.seq:
                self._deliver_own(unechoed.items, [op.id for op in batch.ops if isinstance(op, wire.Broadcast)])
            else:
                # Its echo was lost (the bus dropped one message and not the connection): delivered late.
                self._deliver_own(unechoed.items, unechoed.ids)

    def _deliver_own(self, items: list[_Queued[S]], ids: Sequence[str | None] | None) -> None:
        for index, item in enumerate(items):
            op = item.op
            assert isinstance(op, wire.Broadcast)
            stream_id = ids[index] if ids is not None and index < len(ids) else None
            if stream_id == wire.DUPLICATE:
                # A realtime.send another node published first: delivered here from its batch.
                continue
            self._deliver(op.channel, op.payload, stream_id, exclude=item.sender)
            if item.sender is not None and item.ref is not None:
                item.sender.reply_nowait(Ack("sent", op.channel, item.ref))

    def _deliver(self, channel: str, payload: Any, stream_id: str | None, exclude: S | None = None) -> None:
        """A broadcast to this node's subscribers, and into its history when it has an id. One older than a
        broadcast of the channel already delivered here (of a batch heard while its node's state was read) goes out
        without its id: a client's position must never move back, or a resume from it would send the newer ones
        again."""
        if stream_id == wire.DUPLICATE:
            return
        if stream_id is not None and self.history is not None:
            frame = text_frame(encode(BroadcastEvent(channel, payload, f"b2~{stream_id}")))
            if self.history.add(channel, _parse_id(stream_id), self._clock(), frame):
                self.local.deliver(channel, frame, exclude=exclude)
                return
        self.local.publish_nowait(channel, BroadcastEvent(channel, payload), exclude=exclude)

    async def _read_states(self) -> None:
        while True:
            await self._reads_wake.wait()
            self._reads_wake = trio.Event()
            nodes, self._reads = sorted(self._reads), set()
            self._restoring = True
            try:
                for node in nodes:
                    self._counts["state_reads"] += 1
                    snapshot = await self.engine.read_state(node)
                    self._handle(self.view.restore(node, snapshot, self._clock()))
            finally:
                self._restoring = False

    async def _watch(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = self._clock()
            if now - self._echo > self.silence:
                raise EngineUnreachable(
                    f"this node's own batches stopped coming back from Redis for {now - self._echo:.1f}s"
                )
            self._handle(self.view.expire(now, self.silence))
            if self.history is not None:
                self.history.sweep(now)
            self._sweep_stash()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case Delivered(channel=channel, payload=payload, id=stream_id):
                    self._deliver(channel, payload, stream_id)
                case PresenceChanged(room=room, diff=diff):
                    self.local.publish_nowait(room, PresenceEvent(room, "diff", diff.payload()))
                case ReadState(node=node) if node == self.node:
                    self.view.restore(node, self.state.snapshot(self.incarnation, self._seq), self._clock())
                case ReadState(node=node):
                    self._settle += 1
                    self._reads.add(node)
                    self._reads_wake.set()

    async def leave_cluster(self) -> None:
        """Say goodbye (the other nodes drop this node's members at once) and remove its state; best effort,
        within a second."""
        if self._leaving:
            return
        self._leaving = True
        self._wake.set()
        with trio.move_on_after(1):
            # The goodbye comes after the last batch: what is queued goes, and Redis answers everything sent.
            while self._phase == "up" and (self._queue or self._in_flight):
                await self._answered.wait()
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
            history_reads=c["history_reads"],
            resume_gaps=c["resume_gaps"],
            resumes_pending=len(self._stash),
        )


def _parse(since: Any) -> Position | None:
    """A position this cluster wrote (`b2~<stream id>`), or None."""
    if not isinstance(since, str):
        return None
    match = _POSITION.fullmatch(since)
    return (int(match[1]), int(match[2])) if match is not None else None


def _parse_id(stream_id: str) -> Position:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence)


def _unavailable(reason: str, channel: str, ref: str | None, *, sent: bool) -> Error:
    outcome = (
        "it may have reached other nodes but not this one"
        if sent
        else "nothing was delivered to any node; retry with backoff"
    )
    return Error(ErrorCode.UNAVAILABLE, f"{reason}: {outcome}", channel=channel, ref=ref)
