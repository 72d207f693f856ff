"""What this node's own connections hold in the cluster, as plain values: the truth it writes to Redis and
announces again after an outage."""

from __future__ import annotations

from typing import Any

from . import wire
from .view import Members, Snapshot


class NodeState:
    """Presence metas tracked and connections per user on this node."""

    def __init__(self) -> None:
        self.members: Members = {}
        self.users: dict[str, int] = {}

    def track(self, room: str, key: str, ref: str, state: dict[str, Any]) -> wire.Track:
        self.members.setdefault(room, {}).setdefault(key, {})[ref] = state
        return wire.Track(room, key, ref, state)

    def untrack(self, room: str, key: str, ref: str) -> wire.Untrack | None:
        """None when `ref` was not tracked under `key` in `room`."""
        keys = self.members.get(room)
        refs = keys.get(key) if keys is not None else None
        if keys is None or refs is None or ref not in refs:
            return None
        del refs[ref]
        if not refs:
            del keys[key]
        if not keys:
            del self.members[room]
        return wire.Untrack(room, key, ref)

    def count(self, sub: str, count: int) -> wire.UserCount:
        """User `sub` now holds `count` connections on this node."""
        if count > 0:
            self.users[sub] = count
        else:
            self.users.pop(sub, None)
        return wire.UserCount(sub, count)

    def snapshot(self, incarnation: str, seq: int) -> Snapshot:
        members = {room: {key: dict(refs) for key, refs in keys.items()} for room, keys in self.members.items()}
        return Snapshot(incarnation, seq, members, dict(self.users))

    def metas(self) -> int:
        return sum(len(refs) for keys in self.members.values() for refs in keys.values())
