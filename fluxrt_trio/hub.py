"""Who is subscribed to what, and delivery to them: encode once, hand the same frame bytes to every recipient.

`Hub` is the interface the rest of the server uses; `LocalHub` is the single-node implementation; `cluster.hub`'s
`ClusterHub` implements it over Redis, with a `LocalHub` for this node's subscribers.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import attrs

from .protocol.frames import text_frame
from .protocol.history import History, Position
from .protocol.messages import Ack, BroadcastEvent, Error, ErrorCode, PresenceEvent, ServerMessage, encode
from .protocol.presence import Diff, Meta, PresenceRoom

MISSED = "broadcasts on this channel were missed and cannot be replayed; refetch what you show"
"""the CHANGES_MISSED message of a broadcast replay that found a gap"""


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
    history_messages: int = 0
    """broadcasts kept to replay to clients that resume"""
    history_bytes: int = 0
    """bytes of the frames kept for replay"""


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

    def channel_sizes(self) -> Iterator[tuple[str, int]]:
        """Every channel with subscribers on this node, and how many (for the status page's top channels)."""

    def publish_nowait(self, channel: str, message: ServerMessage, *, exclude: S | None = None) -> int:
        """Deliver `message` to every subscriber of `channel` but `exclude`; return the event's position."""

    def broadcast(self, channel: str, payload: Any, *, sender: S | None = None, ref: str | None = None) -> int:
        """Relay a client broadcast to every subscriber of `channel` but its sender; return its position. The hub
        answers the sender: `ack` `sent` (with `ref`, once handed to every node) or `UNAVAILABLE` (delivered
        nowhere)."""

    def broadcast_logged(self, channel: str, payload: Any, key: int) -> None:
        """Deliver a `realtime.send` read from the change log (`key`: its change id) to every subscriber of
        `channel`, as a broadcast with its position. Every node reads the log: each send reaches each node's
        subscribers once, whichever nodes read it."""

    def unavailable(self) -> str | None:
        """Why a broadcast or a presence change cannot reach the other nodes now (then it must be refused), or
        None."""

    async def resumable(self, channel: str, since: Any) -> bool:
        """Whether what followed position `since` on broadcast channel `channel` is still in its history. May wait
        (a cluster reads it from Redis); `replay` follows at once when it says yes."""

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

    def traffic(self) -> tuple[dict[str, int], int]:
        """Subscriptions by kind and frames delivered, as in `statistics`, without what else it costs (a cluster's
        presence rooms, sweeping the history): the status page samples them every few seconds."""


def _kind(channel: str) -> str:
    return channel.partition(":")[0]


_POSITION = re.compile(r"b1~([0-9a-f]{12})~([1-9][0-9]{0,18})")


class LocalHub(Generic[S]):
    """The hub of one node: plain dictionaries, no I/O of its own.

    With `history_size` > 0 every broadcast carries its position `b1~<incarnation>~<n>` (`n` counts this hub's
    events) and the last `history_size` of each channel, for at most `history_ttl` seconds, are kept to replay. The
    incarnation is new with every hub, so a position from a node that has restarted since is never taken for one of
    this node's (it is answered `recovered: false`)."""

    def __init__(
        self,
        *,
        history_size: int = 0,
        history_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channels: dict[str, dict[S, None]] = {}
        self._rooms: dict[str, PresenceRoom] = {}
        self._by_kind: dict[str, int] = {"table": 0, "presence": 0, "broadcast": 0}
        self._position = 0
        self._delivered = 0
        self.history = History(history_size, history_ttl) if history_size > 0 else None
        self.incarnation = secrets.token_hex(6)
        self._clock = clock

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

    def channel_sizes(self) -> Iterator[tuple[str, int]]:
        return ((name, len(members)) for name, members in self._channels.items())

    def publish_nowait(self, channel: str, message: ServerMessage, *, exclude: S | None = None) -> int:
        self._position += 1
        if channel in self._channels:
            self._fan_out(channel, text_frame(encode(message)), exclude)
        return self._position

    def deliver(self, channel: str, frame: bytes, *, exclude: S | None = None) -> int:
        """`publish_nowait` of a message already encoded as `frame`."""
        self._position += 1
        self._fan_out(channel, frame, exclude)
        return self._position

    def _fan_out(self, channel: str, frame: bytes, exclude: S | None) -> None:
        members = self._channels.get(channel)
        if not members:
            return
        # A copy: a recipient closing itself must not change the dict under this loop.
        recipients = list(members)
        for subscriber in recipients:
            if subscriber is not exclude:
                subscriber.deliver_nowait(frame)
        self._delivered += len(recipients) - (exclude in members)

    def broadcast(self, channel: str, payload: Any, *, sender: S | None = None, ref: str | None = None) -> int:
        """Relay a client broadcast to every other subscriber, and keep it in the channel's history."""
        history = self.history
        if history is None:
            position = self.publish_nowait(channel, BroadcastEvent(channel, payload), exclude=sender)
        else:
            position = self._position + 1
            frame = text_frame(encode(BroadcastEvent(channel, payload, f"b1~{self.incarnation}~{position}")))
            history.add(channel, (0, position), self._clock(), frame)
            self.deliver(channel, frame, exclude=sender)
        if sender is not None and ref is not None:
            sender.reply_nowait(Ack("sent", channel, ref))
        return position

    def broadcast_logged(self, channel: str, payload: Any, key: int) -> None:
        """A `realtime.send`: delivered and kept in history as a client broadcast without a sender is."""
        self.broadcast(channel, payload)

    def unavailable(self) -> str | None:
        """One node is always available to itself."""
        return None

    async def resumable(self, channel: str, since: Any) -> bool:
        """True when `since` is a position of this hub's and every broadcast of `channel` after it is kept. Never
        waits."""
        position = self._parse(since)
        return position is not None and self._after(channel, position) is not None

    def replay(self, channel: str, subscriber: S, since: Any) -> None:
        """Send `subscriber` the kept broadcasts of `channel` after `since`, as their frames; CHANGES_MISSED
        if some are gone after all (not when `resumable` said yes just before, as nothing runs in between)."""
        position = self._parse(since)
        frames = self._after(channel, position) if position is not None else None
        send_replay(subscriber, channel, frames)
        self._delivered += len(frames or ())

    def _after(self, channel: str, position: Position) -> list[bytes] | None:
        """The frames kept of `channel` after `position`; None when some are gone, or history is off."""
        if self.history is None:
            return None
        return self.history.after(channel, position, self._clock())

    def _parse(self, since: Any) -> Position | None:
        if not isinstance(since, str) or self.history is None:
            return None
        match = _POSITION.fullmatch(since)
        if match is None or match[1] != self.incarnation or int(match[2]) > self._position:
            return None
        return (0, int(match[2]))

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

    def traffic(self) -> tuple[dict[str, int], int]:
        return dict(self._by_kind), self._delivered

    def statistics(self) -> HubStatistics:
        history = self.history
        if history is not None:
            history.sweep(self._clock())
        return HubStatistics(
            channels=len(self._channels),
            subscriptions=dict(self._by_kind),
            presence_rooms=len(self._rooms),
            published=self._position,
            delivered=self._delivered,
            history_messages=history.messages if history is not None else 0,
            history_bytes=history.bytes if history is not None else 0,
        )


def send_replay(subscriber: Subscriber, channel: str, frames: list[bytes] | None) -> None:
    """A replay: `frames` in order, or (None) CHANGES_MISSED for `channel`."""
    if frames is None:
        subscriber.reply_nowait(Error(ErrorCode.CHANGES_MISSED, MISSED, channel=channel))
        return
    for frame in frames:
        subscriber.deliver_nowait(frame)
