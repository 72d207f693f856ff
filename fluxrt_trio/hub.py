"""Who is subscribed to what, and delivery to them: encode once, hand the same frame bytes to every recipient.

`Hub` is the interface the rest of the server uses; `LocalHub` is the single-node implementation; `cluster.hub`'s
`ClusterHub` implements it over Redis, with a `LocalHub` for this node's subscribers.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import attrs

from .protocol.frames import text_frame
from .protocol.messages import Ack, BroadcastEvent, PresenceEvent, ServerMessage, encode
from .protocol.presence import Diff, Meta, PresenceRoom


class Subscriber(Protocol):
    """A connection as the hub sees it."""

    conn_id: str

    def deliver_nowait(self, frame: bytes) -> None:
        """Queue one frame without blocking. A subscriber that cannot keep up closes itself; it never raises."""

    def reply_nowait(self, message: ServerMessage) -> None:
        """Queue an answer to this subscriber's own message (an ack or an error), as `deliver_nowait` does."""


S = TypeVar("S", bound=Subscriber)


@attrs.frozen(slots=True)
class HubStatistics:
    channels: int
    subscriptions: dict[str, int]
    """subscriptions by channel kind (`table`, `presence`, `broadcast`)"""
    presence_rooms: int
    published: int
    """events published so far; also the position of the latest one"""
    delivered: int
    """frames handed to subscribers"""


class Hub(Protocol[S]):
    """Generic in the kind of subscriber it holds, so that whoever reads `subscribers` gets what was joined."""

    def join(self, channel: str, subscriber: S) -> None:
        """Add `subscriber` to `channel`; joining twice is one subscription."""

    def leave(self, channel: str, subscriber: S) -> None:
        """Remove `subscriber` from `channel`; a no-op when it was not there."""

    def subscribers(self, channel: str) -> list[S]:
        """The subscribers of `channel` on this node."""

    def channels(self, kind: str) -> list[str]:
        """The channels of one kind (`table`, `presence`, `broadcast`) with subscribers on this node."""

    def publish_nowait(self, channel: str, message: ServerMessage, *, exclude: S | None = None) -> int:
        """Deliver `message` to every subscriber of `channel` but `exclude`; return the event's position."""

    def broadcast(self, channel: str, payload: Any, *, sender: S | None = None, ref: str | None = None) -> int:
        """Relay a client broadcast to every subscriber of `channel` but its sender; return its position. The hub
        answers the sender: `ack` `sent` (with `ref`, once handed to every node) or `UNAVAILABLE` (delivered
        nowhere)."""

    def unavailable(self) -> str | None:
        """Why a broadcast or a presence change cannot reach the other nodes now (then it must be refused), or
        None."""

    def resumable(self, channel: str, since: Any) -> bool:
        """Whether what followed position `since` on broadcast channel `channel` is still in its history."""

    def replay(self, channel: str, subscriber: S, since: Any) -> None:
        """Send `subscriber` (just joined to `channel`) the history after `since` (found resumable), so that with
        the live stream that follows it gets every message once."""

    def track(self, channel: str, key: str, ref: str, state: dict[str, Any]) -> None:
        """Track presence `ref` under `key` in `channel` and send the diff to the channel's subscribers."""

    def untrack(self, channel: str, key: str, ref: str) -> None:
        """Remove presence `ref` from `channel` and send the diff; a no-op when it was not tracked."""

    def presence_state(self, channel: str) -> dict[str, list[Meta]]:
        """Everyone present in `channel`, as sent in a presence `sync`."""

    def statistics(self) -> HubStatistics: ...


def _kind(channel: str) -> str:
    return channel.partition(":")[0]


class LocalHub(Generic[S]):
    """The hub of one node: plain dictionaries, no I/O of its own."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[S, None]] = {}
        self._rooms: dict[str, PresenceRoom] = {}
        self._by_kind: dict[str, int] = {"table": 0, "presence": 0, "broadcast": 0}
        self._position = 0
        self._delivered = 0

    def join(self, channel: str, subscriber: S) -> None:
        members = self._channels.setdefault(channel, {})
        if subscriber not in members:
            members[subscriber] = None
            self._by_kind[_kind(channel)] += 1

    def leave(self, channel: str, subscriber: S) -> None:
        members = self._channels.get(channel)
        if members is None or subscriber not in members:
            return
        del members[subscriber]
        self._by_kind[_kind(channel)] -= 1
        if not members:
            del self._channels[channel]

    def subscribers(self, channel: str) -> list[S]:
        return list(self._channels.get(channel, ()))

    def channels(self, kind: str) -> list[str]:
        prefix = kind + ":"
        return [name for name in self._channels if name.startswith(prefix)]

    def publish_nowait(self, channel: str, message: ServerMessage, *, exclude: S | None = None) -> int:
        self._position += 1
        members = self._channels.get(channel)
        if not members:
            return self._position
        frame = text_frame(encode(message))
        # A copy: a recipient closing itself must not change the dict under this loop.
        recipients = list(members)
        for subscriber in recipients:
            if subscriber is not exclude:
                subscriber.deliver_nowait(frame)
        self._delivered += len(recipients) - (exclude in members)
        return self._position

    def broadcast(self, channel: str, payload: Any, *, sender: S | None = None, ref: str | None = None) -> int:
        """Relay a client broadcast to every other subscriber."""
        position = self.publish_nowait(channel, BroadcastEvent(channel, payload), exclude=sender)
        if sender is not None and ref is not None:
            sender.reply_nowait(Ack("sent", channel, ref))
        return position

    def unavailable(self) -> str | None:
        """One node is always available to itself."""
        return None

    def resumable(self, channel: str, since: Any) -> bool:
        return False

    def replay(self, channel: str, subscriber: S, since: Any) -> None:
        return None

    def track(self, channel: str, key: str, ref: str, state: dict[str, Any]) -> None:
        room = self._rooms.setdefault(channel, PresenceRoom())
        self._send_diff(channel, room.track(key, ref, state))

    def untrack(self, channel: str, key: str, ref: str) -> None:
        room = self._rooms.get(channel)
        if room is None:
            return
        diff = room.untrack(key, ref)
        if not room:
            del self._rooms[channel]
        if diff is not None:
            self._send_diff(channel, diff)

    def _send_diff(self, channel: str, diff: Diff) -> None:
        self.publish_nowait(channel, PresenceEvent(channel, "diff", diff.payload()))

    def presence_state(self, channel: str) -> dict[str, list[Meta]]:
        room = self._rooms.get(channel)
        return room.state() if room is not None else {}

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            channels=len(self._channels),
            subscriptions=dict(self._by_kind),
            presence_rooms=len(self._rooms),
            published=self._position,
            delivered=self._delivered,
        )
