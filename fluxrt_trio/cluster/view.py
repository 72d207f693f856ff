"""What a node knows of the cluster, as plain values: every node's presence members and per-user connection counts,
kept from the batches on the bus and from the states the nodes write to Redis.

`ClusterView.receive` takes a batch and returns what follows from it (broadcasts to deliver here, presence diffs,
and the nodes whose state must be read again because a batch of theirs was missed). No I/O, no clock: times are
passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from ..protocol.presence import Diff, Meta, PresenceRoom
from . import wire

Members = dict[str, dict[str, dict[str, dict[str, Any]]]]
"""room -> key -> ref -> state"""


@attrs.frozen(slots=True)
class Snapshot:
    """One node's state as it wrote it to Redis, up to and including batch `seq`."""

    incarnation: str
    seq: int
    members: Members
    users: dict[str, int]


@attrs.frozen(slots=True)
class Delivered:
    """A broadcast published on another node, to deliver to this node's subscribers."""

    channel: str
    payload: Any
    id: str | None = None
    """its id in the channel's history stream (wire.Broadcast.id)"""


@attrs.frozen(slots=True)
class PresenceChanged:
    room: str
    diff: Diff


@attrs.frozen(slots=True)
class ReadState:
    """The state of `node` must be read from Redis and given to `ClusterView.restore`."""

    node: str


Event = Delivered | PresenceChanged | ReadState


class _Replica:
    __slots__ = ("heard", "incarnation", "pending", "reread", "rooms", "seq", "users")

    def __init__(self, incarnation: str, heard: float) -> None:
        self.incarnation = incarnation
        self.seq = 0
        self.heard = heard
        self.rooms: dict[str, PresenceRoom] = {}
        self.users: dict[str, int] = {}
        self.pending: list[wire.Batch] | None = None
        """batches received while the node's state is being read; None when in step"""
        self.reread = False
        """the state read was older than what is known: read it again at the next batch"""


class ClusterView:
    """Every node's replicated state, this node's own (`own`) included: the hub applies its own batches once Redis
    has taken them, through `receive` like any other."""

    def __init__(self, own: str) -> None:
        self.own = own
        self._nodes: dict[str, _Replica] = {}

    # ---- batches -------------------------------------------------------------------------------------------

    def receive(self, batch: wire.Batch, now: float) -> list[Event]:
        """Apply one batch from the bus. A batch from an older incarnation of a node is ignored; a newer
        incarnation replaces the old one (whose members leave)."""
        events: list[Event] = []
        replica = self._nodes.get(batch.node)
        if replica is None or replica.incarnation != batch.incarnation:
            if replica is not None:
                if batch.incarnation < replica.incarnation:
                    return events
                events.extend(self._forget(batch.node))
            replica = self._nodes[batch.node] = _Replica(batch.incarnation, now)
            if batch.seq != 1:
                # Joined the stream late: what came before is in the node's state in Redis.
                replica.pending = [batch]
                events.append(ReadState(batch.node))
                return events
        replica.heard = now
        if replica.pending is not None:
            replica.pending.append(batch)
            if replica.reread:
                replica.reread = False
                events.append(ReadState(batch.node))
            return events
        if batch.seq <= replica.seq:
            return events
        if batch.seq > replica.seq + 1:
            replica.pending = [batch]
            events.append(ReadState(batch.node))
            return events
        events.extend(self._apply(batch.node, replica, batch))
        return events

    def apply_own(self, incarnation: str, ops: Sequence[wire.Op], now: float) -> list[Event]:
        """This node's own changes while Redis cannot take them: its replica follows them at once, so that its
        local subscribers see them, with no sequence number (the replica is restored from the node's state when
        Redis is back)."""
        replica = self._nodes.get(self.own)
        if replica is None:
            replica = self._nodes[self.own] = _Replica(incarnation, now)
        return self._apply_ops(self.own, replica, ops)

    def _apply(self, node: str, replica: _Replica, batch: wire.Batch) -> list[Event]:
        replica.seq = batch.seq
        return self._apply_ops(node, replica, batch.ops)

    def _apply_ops(self, node: str, replica: _Replica, ops: Iterable[wire.Op]) -> list[Event]:
        events: list[Event] = []
        for op in ops:
            match op:
                case wire.Broadcast(channel=channel, payload=payload, id=stream_id):
                    events.append(Delivered(channel, payload, stream_id))
                case wire.Track(room=room, key=key, ref=ref, state=state):
                    room_state = replica.rooms.setdefault(room, PresenceRoom())
                    events.append(PresenceChanged(room, room_state.track(key, ref, state)))
                case wire.Untrack(room=room, key=key, ref=ref):
                    events.extend(self._untrack(replica, room, key, ref))
                case wire.UserCount(sub=sub, count=count):
                    if count:
                        replica.users[sub] = count
                    else:
                        replica.users.pop(sub, None)
                case wire.Announce():
                    replica.pending = []
                    events.append(ReadState(node))
                case wire.Goodbye():
                    events.extend(self._forget(node))
                    return events
        return events

    def _untrack(self, replica: _Replica, room: str, key: str, ref: str) -> list[Event]:
        room_state = replica.rooms.get(room)
        if room_state is None:
            return []
        diff = room_state.untrack(key, ref)
        if not room_state:
            del replica.rooms[room]
        return [PresenceChanged(room, diff)] if diff is not None else []

    # ---- states read from Redis ----------------------------------------------------------------------------

    def restore(self, node: str, snapshot: Snapshot | None, now: float) -> list[Event]:
        """Replace what is known of `node` with its state as read from Redis (None: it has none, it is gone), then
        apply the batches that came after it, and deliver the broadcasts of those that came meanwhile but are older
        than the state. Returns the presence diffs between the two, and those broadcasts."""
        replica = self._nodes.get(node)
        if snapshot is None:
            return self._forget(node)
        if replica is not None and (snapshot.incarnation, snapshot.seq) < (replica.incarnation, replica.seq):
            # Older than what is known (a read that started before the batches since applied, or a Redis that lost
            # writes in a failover): keep what is known and, when waiting for a state, ask again at the next batch.
            if replica.pending is not None:
                replica.reread = True
            return []
        events: list[Event] = []
        if replica is None or replica.incarnation != snapshot.incarnation:
            events.extend(self._forget(node))
            replica = self._nodes[node] = _Replica(snapshot.incarnation, now)
            replica.pending = []
        pending = replica.pending or []
        replica.pending = None
        replica.heard = max(replica.heard, now)
        old = {room: state.state() for room, state in replica.rooms.items()}
        replica.rooms = _rooms(snapshot.members)
        replica.users = {sub: n for sub, n in snapshot.users.items() if n > 0}
        replica.seq = snapshot.seq
        for room in sorted(old.keys() | replica.rooms.keys()):
            new = replica.rooms[room].state() if room in replica.rooms else {}
            diff = _difference(old.get(room, {}), new)
            if diff is not None:
                events.append(PresenceChanged(room, diff))
        once = {batch.seq: batch for batch in pending if batch.incarnation == replica.incarnation}
        for batch in sorted(once.values(), key=lambda b: b.seq):
            if batch.seq <= replica.seq:
                # Its state changes are in the state just read; its broadcasts are not, and they did arrive. With
                # their ids: a client resumes from them, and a realtime.send another node published first
                # (wire.DUPLICATE) is not delivered again.
                events.extend(
                    Delivered(op.channel, op.payload, op.id) for op in batch.ops if isinstance(op, wire.Broadcast)
                )
            else:
                events.extend(self.receive(batch, now))
        return events

    # ---- nodes that stop -----------------------------------------------------------------------------------

    def expire(self, now: float, silence: float) -> list[Event]:
        """Forget every node but this one not heard from for more than `silence` seconds: its members leave."""
        events: list[Event] = []
        for node, replica in list(self._nodes.items()):
            if node != self.own and now - replica.heard > silence:
                events.extend(self._forget(node))
        return events

    def forget(self, node: str) -> list[Event]:
        """Drop everything known of `node`; its members leave."""
        return self._forget(node)

    def _forget(self, node: str) -> list[Event]:
        replica = self._nodes.pop(node, None)
        if replica is None:
            return []
        events: list[Event] = []
        for room, state in sorted(replica.rooms.items()):
            members = state.state()
            if members:
                events.append(PresenceChanged(room, Diff({}, members)))
        return events

    # ---- what the hub asks -----------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """Every node known, this one included when it has published."""
        return sorted(self._nodes)

    def presence_state(self, room: str) -> dict[str, list[Meta]]:
        """Everyone present in `room` on any node, as sent in a `sync`: one key holds the metas of all its nodes."""
        merged: dict[str, list[Meta]] = {}
        for node in sorted(self._nodes):
            state = self._nodes[node].rooms.get(room)
            if state is not None:
                for key, metas in state.state().items():
                    merged.setdefault(key, []).extend(metas)
        return merged

    def rooms(self) -> set[str]:
        """The rooms with someone present on any node."""
        return {room for replica in self._nodes.values() for room in replica.rooms}

    def members(self) -> dict[str, int]:
        """Presence metas by node."""
        return {
            node: sum(len(metas) for state in replica.rooms.values() for metas in state.state().values())
            for node, replica in self._nodes.items()
        }

    def users_elsewhere(self, sub: str) -> int:
        """Connections of user `sub` on every node but this one."""
        return sum(replica.users.get(sub, 0) for node, replica in self._nodes.items() if node != self.own)


def _rooms(members: Members) -> dict[str, PresenceRoom]:
    rooms: dict[str, PresenceRoom] = {}
    for room, keys in members.items():
        state = PresenceRoom()
        for key, refs in keys.items():
            for ref, meta_state in refs.items():
                state.track(key, ref, meta_state)
        if state:
            rooms[room] = state
    return rooms


def _metas(state: dict[str, list[Meta]]) -> Iterator[tuple[str, Meta]]:
    for key, metas in state.items():
        for meta in metas:
            yield key, meta


def _difference(old: dict[str, list[Meta]], new: dict[str, list[Meta]]) -> Diff | None:
    """The diff that turns room state `old` into `new`: a meta whose state changed leaves and joins again."""
    before = {(key, meta["ref"]): meta for key, meta in _metas(old)}
    after = {(key, meta["ref"]): meta for key, meta in _metas(new)}
    joins: dict[str, list[Meta]] = {}
    leaves: dict[str, list[Meta]] = {}
    for (key, ref), meta in before.items():
        if after.get((key, ref)) != meta:
            leaves.setdefault(key, []).append(meta)
    for (key, ref), meta in after.items():
        if before.get((key, ref)) != meta:
            joins.setdefault(key, []).append(meta)
    return Diff(joins, leaves) if joins or leaves else None
