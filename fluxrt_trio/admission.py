"""Who may hold a connection: the node's connection limit and the per-user limit, as plain counts."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

from .protocol.identity import Identity

C = TypeVar("C")


class Admission(Generic[C]):
    """The open connections of a node (any hashable objects) and their users' counts. Limits may change at any
    time (reload); what is already admitted stays."""

    def __init__(
        self, max_connections: int, max_connections_per_user: int, rejected: collections.Counter[str] | None = None
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
        self.connections: set[C] = set()
        self.rejected = rejected if rejected is not None else collections.Counter()
        """refusals by reason (`node_limit`, `user_limit`), for /metrics"""
        self.per_user: collections.Counter[str] = collections.Counter()

    def admit(self, connection: C, identity: Identity) -> str | None:
        """Count a new connection in, or return why it is refused (too many on the node or for the user)."""
        if len(self.connections) >= self.max_connections:
            self.rejected["node_limit"] += 1
            return f"too many connections on this node (realtime.max_connections = {self.max_connections})"
        sub = identity.sub
        if sub is not None and self.per_user[sub] >= self.max_connections_per_user:
            self.rejected["user_limit"] += 1
            return f"too many connections for this user (at most {self.max_connections_per_user})"
        self.connections.add(connection)
        if sub is not None:
            self.per_user[sub] += 1
        return None

    def readmit(self, old: Identity, new: Identity) -> str | None:
        """Move a connection's per-user count from `old` to `new`, or return why the new user is refused (the
        connection then stays counted under `old`)."""
        if old.sub == new.sub:
            return None
        limit = self.max_connections_per_user
        if new.sub is not None and self.per_user[new.sub] >= limit:
            return f"too many connections for this user (at most {limit}); the current token stays in use"
        self._uncount(old)
        if new.sub is not None:
            self.per_user[new.sub] += 1
        return None

    def release(self, connection: C, identity: Identity) -> None:
        """Count a connection out. Idempotent."""
        if connection in self.connections:
            self.connections.discard(connection)
            self._uncount(identity)

    def _uncount(self, identity: Identity) -> None:
        sub = identity.sub
        if sub is not None:
            self.per_user[sub] -= 1
            if self.per_user[sub] <= 0:
                del self.per_user[sub]
