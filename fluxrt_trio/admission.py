"""Who may hold a connection, as plain counts: the node's limit, the per-user limit, the anonymous connections' share
of the node and their per-address limit, and the handshakes under way per address."""

from __future__ import annotations

import collections
import ipaddress
import socket
from collections.abc import Callable, KeysView
from typing import Generic, TypeVar

from .protocol.identity import Identity

C = TypeVar("C")

_IPV6_PREFIX = 64
"""IPv6 peers are grouped by /64: one subscriber line usually gets a whole /64, so counting single addresses would
give one attacker 2^64 budgets"""


def address_key(host: str) -> str:
    """The source a connection is counted under: an IPv4 address as it is (an IPv4-mapped IPv6 one as IPv4), an IPv6
    address by its /64 network; anything else (a name, a Unix socket) as given."""
    try:
        # Most peers: an IPv4 address that `inet_pton` accepts is already in the one form `str` would give it
        # (no leading zeros, four decimal parts), at a 25th of `ipaddress`'s cost; it runs twice per handshake.
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    else:
        return host
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_PREFIX), strict=False))
    return str(address)


def anonymous_places(anonymous_share: float, max_connections: int) -> int:
    """How many anonymous connections a node takes: `anonymous_share` of `max_connections`, rounded down."""
    # The small epsilon keeps 0.7 * 10 from flooring to 6 through binary rounding.
    return int(anonymous_share * max_connections + 1e-9)


def is_anonymous(identity: Identity) -> bool:
    """No `sub` to count the connection under: no token, or a token without `sub` (such as a public anon key, which
    every visitor holds)."""
    return identity.sub is None


class Admission(Generic[C]):
    """The open connections of a node (any hashable objects, each with its source address) and their counts. Limits
    may change at any time (reload); what is already admitted stays.

    Anonymous connections (see `is_anonymous`) have no per-user count, so they are held to two limits of their own:
    at most `anonymous_share` of `max_connections` together (the rest of the node stays free for users with a
    token), and at most `max_anonymous_per_address` from one source address (`address_key`).

    In a cluster, `elsewhere(sub)` says how many connections the user holds on the other nodes (they count against
    `max_connections_per_user` too), and `counted(sub, n)` is told every change of this node's count.
    """

    def __init__(
        self,
        max_connections: int,
        max_connections_per_user: int,
        rejected: collections.Counter[str] | None = None,
        *,
        max_anonymous_per_address: int = 50,
        anonymous_share: float = 0.5,
        max_pending_handshakes_per_address: int = 64,
        elsewhere: Callable[[str], int] | None = None,
        counted: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
        self.max_anonymous_per_address = max_anonymous_per_address
        self.anonymous_share = anonymous_share
        self.max_pending_handshakes_per_address = max_pending_handshakes_per_address
        self.elsewhere = elsewhere
        self.counted = counted
        self.rejected = rejected if rejected is not None else collections.Counter()
        """refusals by reason (`node_limit`, `user_limit`, `anonymous_share`, `anonymous_address_limit`,
        `pending_handshakes`), for /metrics"""
        self.per_user: collections.Counter[str] = collections.Counter()
        self.anonymous = 0
        """anonymous connections admitted"""
        self.anonymous_per_address: collections.Counter[str] = collections.Counter()
        self.pending_per_address: collections.Counter[str] = collections.Counter()
        """connections accepted whose handshake has not finished, by source address"""
        self._address: dict[C, str] = {}
        """every admitted connection and its source address"""
        self._pending: dict[C, str] = {}

    @property
    def connections(self) -> KeysView[C]:
        """The admitted connections."""
        return self._address.keys()

    @property
    def max_anonymous(self) -> int:
        """How many anonymous connections the node takes (`anonymous_places`)."""
        return anonymous_places(self.anonymous_share, self.max_connections)

    # ---- handshakes ----------------------------------------------------------------------------------------

    def begin_handshake(self, connection: C, address: str) -> str | None:
        """Count an accepted socket as waiting for its handshake, or return why it is refused (too many from its
        address are already waiting)."""
        limit = self.max_pending_handshakes_per_address
        if self.pending_per_address[address] >= limit:
            self.rejected["pending_handshakes"] += 1
            return (
                f"too many connections from this address are still in their handshake "
                f"(server.max_pending_handshakes_per_address = {limit}); retry shortly"
            )
        self.pending_per_address[address] += 1
        self._pending[connection] = address
        return None

    def end_handshake(self, connection: C) -> None:
        """The connection's handshake is over (upgraded, answered or abandoned). Idempotent; a connection that was
        never counted is ignored."""
        address = self._pending.pop(connection, None)
        if address is not None:
            _decrement(self.pending_per_address, address)

    # ---- admitted connections ------------------------------------------------------------------------------

    def admit(self, connection: C, identity: Identity, address: str) -> str | None:
        """Count a new connection from `address` in, or return why it is refused, naming the limit."""
        if len(self._address) >= self.max_connections:
            self.rejected["node_limit"] += 1
            return f"too many connections on this node (realtime.max_connections = {self.max_connections})"
        refusal = self._refusal(identity, address)
        if refusal is not None:
            reason, message = refusal
            self.rejected[reason] += 1
            return message
        self._address[connection] = address
        self._count(identity, address)
        return None

    def readmit(self, connection: C, old: Identity, new: Identity) -> str | None:
        """Move an admitted connection's counts from `old` to `new` (a token change), or return why `new` is refused
        (the connection then stays counted under `old`). Becoming anonymous is held to the anonymous limits; the
        connection's own place does not count against them."""
        address = self._address.get(connection)
        if address is None:
            return None
        if old.sub == new.sub:
            return None
        # The other nodes hear only the outcome, not the count dropping and coming back in between.
        counted, self.counted = self.counted, None
        try:
            self._uncount(old, address)
            refusal = self._refusal(new, address)
            self._count(old if refusal is not None else new, address)
        finally:
            self.counted = counted
        if refusal is not None:
            return f"{refusal[1]}; the current token stays in use"
        if counted is not None:
            for sub in (old.sub, new.sub):
                if sub is not None:
                    counted(sub, self.per_user[sub])
        return None

    def release(self, connection: C, identity: Identity) -> None:
        """Count a connection out. Idempotent."""
        address = self._address.pop(connection, None)
        if address is not None:
            self._uncount(identity, address)

    def _refusal(self, identity: Identity, address: str) -> tuple[str, str] | None:
        """The reason (a /metrics label) and the message of refusing `identity` from `address`, or None."""
        if is_anonymous(identity):
            if self.anonymous >= self.max_anonymous:
                return "anonymous_share", (
                    f"too many anonymous connections on this node (realtime.anonymous_share = {self.anonymous_share} "
                    f"of realtime.max_connections: at most {self.max_anonymous}); connect with a token"
                )
            if self.anonymous_per_address[address] >= self.max_anonymous_per_address:
                return "anonymous_address_limit", (
                    f"too many anonymous connections from this address (realtime.max_anonymous_per_address = "
                    f"{self.max_anonymous_per_address}); connect with a token"
                )
            return None
        sub = identity.sub
        if sub is None:
            return None
        held = self.per_user[sub]
        if self.elsewhere is not None:
            held += self.elsewhere(sub)
        if held >= self.max_connections_per_user:
            return "user_limit", (
                f"too many connections for this user (realtime.max_connections_per_user = "
                f"{self.max_connections_per_user}{', counted on every node' if self.elsewhere else ''})"
            )
        return None

    def _count(self, identity: Identity, address: str) -> None:
        if identity.sub is None:
            self.anonymous += 1
            self.anonymous_per_address[address] += 1
        else:
            self.per_user[identity.sub] += 1
            if self.counted is not None:
                self.counted(identity.sub, self.per_user[identity.sub])

    def _uncount(self, identity: Identity, address: str) -> None:
        if identity.sub is None:
            self.anonymous -= 1
            _decrement(self.anonymous_per_address, address)
        else:
            _decrement(self.per_user, identity.sub)
            if self.counted is not None:
                self.counted(identity.sub, self.per_user[identity.sub])


def _decrement(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
