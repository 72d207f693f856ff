"""One connection's protocol state: what it is subscribed to, what it tracks, and its rate allowances.

`Session.receive` takes one client frame and returns effects for the I/O shell to carry out, in order. Checks that
need the outside world (the database, token verification, the cluster engine, what is kept to replay) come back as
requests (`CheckSubscribe`, `CheckAction`, `HandOff`, `CheckResume`, `Authenticate`) whose outcome the shell feeds
back through `answered`; the session changes no state before a check has passed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import orjson

from .channels import ChannelError, ChannelKind, ChannelName, parse_channel
from .filters import Filter, FilterError, parse_filter
from .identity import Identity
from .limits import Allowance, Verdict
from .messages import (
    Ack,
    Auth,
    Broadcast,
    CloseCode,
    DecodeError,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Presence,
    ServerMessage,
    Subscribe,
    Unsubscribe,
    decode,
)

MAX_GRANTS = 1024
"""(channel, action) pairs a session remembers as allowed; past it, they are asked about again"""
MAX_ECHOED_CHANNEL = 300
"""longest invalid channel name an INVALID_CHANNEL error repeats in its `channel` (a valid one is at most 265)"""


@attrs.frozen(slots=True)
class SessionLimits:
    max_subscriptions: int = 100
    message_rate_limit: int = 100
    """broadcast and presence (and anything unparseable) per minute"""
    max_presence_state_size: int = 4096


@attrs.frozen(slots=True)
class TableGrant:
    """What the check of a table subscribe saw: the table (by oid) and, for a subscribe without `since`, the
    database snapshot the check read. The change log's ending rows (DROP, RENAME, DISABLE) are read after the fact,
    within the changefeed's lag; these tell which of them concern the subscription (`delivery.ended_by`)."""

    relid: int
    seen: str | None = None
    """the snapshot as `pg_snapshot` text (`positions.Snapshot.parse` reads it): kept for as long as the
    subscription lasts and read only when an ending row comes, and as text it takes about 12 bytes per transaction
    in progress against some 120 parsed (100 in progress: 1,170 bytes against 12,376, tracemalloc). None for a
    resumed subscription (recovered): it was promised every change since its position, so an ending row it had not
    seen yet ends it even when the check already saw that row's outcome"""


@attrs.frozen(slots=True)
class Subscription:
    channel: ChannelName
    event: str = "*"
    filter: str | None = None
    grant: TableGrant | None = None
    """a table subscription's check (None for other kinds, and where no check was made)"""
    condition: Filter | None = attrs.field(init=False, eq=False, repr=False)
    """`filter` parsed; None without a filter and for one that does not parse (table subscribes refuse those)"""

    def __attrs_post_init__(self) -> None:
        condition = None
        if self.filter is not None:
            with contextlib.suppress(FilterError):
                condition = parse_filter(self.filter)
        object.__setattr__(self, "condition", condition)


# ---- effects -------------------------------------------------------------------------------------------------
#
# Requests (CheckSubscribe, CheckAction, HandOff, CheckResume, Authenticate) ask the outside world something; the
# shell answers each through `Session.answered`, which returns the effects that follow. Each request carries the ref
# of the message it serves, so the answer (an ack or an error) can echo it.


@attrs.frozen(slots=True)
class Reply:
    message: ServerMessage


@attrs.frozen(slots=True)
class CheckSubscribe:
    """May this identity subscribe to `channel`? Outcome: None, or the refusal to send.

    `renewal`: the subscription exists and the identity changed; a refusal ends it with FORBIDDEN."""

    request: Subscribe
    channel: ChannelName
    renewal: bool = False

    @property
    def ref(self) -> str | None:
        return self.request.ref


@attrs.frozen(slots=True)
class CheckAction:
    """May this identity `action` (`broadcast`, `track`) on `channel`? Outcome: None, or the refusal to send.
    `payload` is what is broadcast, or the presence state to track."""

    channel: ChannelName
    action: str
    ref: str | None
    payload: Any


@attrs.frozen(slots=True)
class HandOff:
    """Can a presence change (`action`: `track`, `untrack`) on `channel` reach every node now? Outcome: None, or
    the refusal to send (UNAVAILABLE: the cluster engine is unreachable). Asked after the channel checks, just
    before the change is made, so that a refused change is not recorded."""

    channel: ChannelName
    action: str
    ref: str | None
    payload: Any


@attrs.frozen(slots=True)
class CheckResume:
    """Can what followed `since` on the channel be replayed? Asked once a subscribe carrying `since` passed its
    checks. Outcome: Resumable."""

    subscribe: CheckSubscribe
    grant: TableGrant | None = None
    """what the subscribe's check saw, kept for the subscription"""

    @property
    def ref(self) -> str | None:
        return self.subscribe.ref

    @property
    def since(self) -> Any:
        return self.subscribe.request.since


@attrs.frozen(slots=True)
class Resumable:
    """The outcome of a CheckResume: False when the position is malformed, for another channel, or older than what
    is kept (the client refetches)."""

    recovered: bool


@attrs.frozen(slots=True)
class Authenticate:
    """Verify `token`. Outcome: the new Identity, or the refusal to send (the identity stays)."""

    token: str
    ref: str | None


@attrs.frozen(slots=True)
class Unavailable:
    """The outcome of a renewal `CheckSubscribe` that could not reach the database: neither allowed nor refused."""

    reason: str


Request = CheckSubscribe | CheckAction | HandOff | CheckResume | Authenticate
Outcome = Identity | Error | Unavailable | Resumable | TableGrant | None
"""what the shell found: None (allowed), an Error to send (refused), a verified Identity (Authenticate),
Unavailable (a renewal check that could not be made), or the TableGrant of an allowed table subscribe"""


@attrs.frozen(slots=True)
class Join:
    subscription: Subscription


@attrs.frozen(slots=True)
class Replay:
    """Send `subscription` what followed position `since` (which its CheckResume found resumable), then the live
    stream, each event once."""

    subscription: Subscription
    since: Any


@attrs.frozen(slots=True)
class SendPresenceState:
    channel: ChannelName


@attrs.frozen(slots=True)
class Leave:
    channel: ChannelName


@attrs.frozen(slots=True)
class Publish:
    """Broadcast `payload` on `channel`. The hub answers the client (ack `sent` when `ref` is set, or
    UNAVAILABLE), since only it knows when the message has reached every node."""

    channel: ChannelName
    payload: Any
    ref: str | None = None


@attrs.frozen(slots=True)
class Track:
    channel: ChannelName
    key: str
    ref: str
    """the presence meta's ref (the connection id), not a message ref"""
    state: dict[str, Any]


@attrs.frozen(slots=True)
class Untrack:
    channel: ChannelName
    key: str
    ref: str


@attrs.frozen(slots=True)
class IdentityChanged:
    """The connection runs under a new identity from now on: its token expiry and its table subscriptions
    (`channels`) must be looked at afresh."""

    channels: tuple[str, ...]


@attrs.frozen(slots=True)
class RecheckLater:
    """Some renewal checks could not reach the database: once it is back, carry out `Session.rechecks()`."""


@attrs.frozen(slots=True)
class Close:
    code: CloseCode
    reason: str


Effect = (
    Reply
    | CheckSubscribe
    | CheckAction
    | HandOff
    | CheckResume
    | Authenticate
    | Join
    | Replay
    | SendPresenceState
    | Leave
    | Publish
    | Track
    | Untrack
    | IdentityChanged
    | RecheckLater
    | Close
)


def error(code: ErrorCode, message: str, *, channel: str | None = None, ref: str | None = None) -> list[Effect]:
    return [Reply(Error(code, message, channel=channel, ref=ref))]


def message_ref(effects: list[Effect]) -> str | None:
    """The ref of the client message that `effects` answer (they all answer the same one), for a reply the shell
    makes itself, such as INTERNAL_ERROR."""
    for effect in effects:
        if isinstance(effect, Reply) and isinstance(effect.message, Ack | Error | Pong):
            return effect.message.ref
        if isinstance(effect, CheckSubscribe | CheckAction | HandOff | CheckResume | Authenticate):
            return effect.ref
    return None


class Session:
    """The protocol state of one connection. `conn_id` is opaque and unique per connection."""

    __slots__ = (
        "_granted",
        "_messages",
        "_rechecks",
        "_subscribes",
        "conn_id",
        "identity",
        "limits",
        "subscriptions",
        "tracked",
    )

    def __init__(self, conn_id: str, identity: Identity, limits: SessionLimits) -> None:
        self.conn_id = conn_id
        self.identity = identity
        self.limits = limits
        self.subscriptions: dict[str, Subscription] = {}
        self.tracked: dict[str, dict[str, Any]] = {}
        # These two are sets kept as dicts (keys only), made at their first key: most connections never need them,
        # and even empty a dict is 64 bytes per connection (a set 216).
        self._granted: dict[tuple[str, str], None] | None = None
        """(channel, action) pairs allowed under the current identity: asked once, until the identity changes"""
        self._rechecks: dict[str, None] | None = None
        """table subscriptions whose renewal check could not reach the database, to be checked again"""
        # Made at the first message that is charged to them: a connection that never sends holds neither (~400
        # bytes).
        self._messages: Allowance | None = None
        self._subscribes: Allowance | None = None

    def set_limits(self, limits: SessionLimits) -> None:
        """Apply reloaded limits. What the connection already holds stays (subscriptions and presence beyond a
        lowered limit are kept); the new limits decide every message from now on."""
        self.limits = limits
        if self._messages is not None:
            self._messages.resize(limits.message_rate_limit)
        if self._subscribes is not None:
            self._subscribes.resize(2 * limits.max_subscriptions)

    @property
    def presence_key(self) -> str:
        """The JWT `sub`, or for an anonymous connection `anon:` + its opaque id."""
        sub = self.identity.sub
        return sub if sub is not None else f"anon:{self.conn_id}"

    def receive(self, text: str | bytes, now: float) -> list[Effect]:
        """Handle one client text frame received at `now` (seconds, monotonic)."""
        try:
            message = decode(text)
        except DecodeError as exc:
            return self._charged(self._message_allowance(), now, exc.ref) or error(
                ErrorCode.INVALID_MESSAGE, str(exc), ref=exc.ref
            )
        match message:
            case Ping(ref=ref):
                return [Reply(Pong(ref=ref))]
            case Subscribe() | Unsubscribe() | Auth():
                # Control messages share their own allowance, so that a client that spent its broadcast
                # allowance can still open channels and refresh its token.
                refusal = self._charged(self._subscribe_allowance(), now, message.ref, "subscribe/unsubscribe/auth")
            case _:
                refusal = self._charged(self._message_allowance(), now, message.ref)
        if refusal:
            return refusal
        match message:
            case Subscribe():
                return self._subscribe(message)
            case Unsubscribe():
                return self._unsubscribe(message)
            case Broadcast():
                return self._broadcast(message)
            case Presence():
                return self._presence(message)
            case Auth(token=token, ref=ref):
                return [Authenticate(token, ref)]
        raise AssertionError(f"unhandled message {message!r}")

    def binary_frame(self, now: float) -> list[Effect]:
        """A binary frame: counted like any message, then refused."""
        return self._charged(self._message_allowance(), now, None) or error(
            ErrorCode.INVALID_MESSAGE, "binary frames are not supported: send JSON in text frames"
        )

    def _message_allowance(self) -> Allowance:
        if self._messages is None:
            self._messages = Allowance(self.limits.message_rate_limit)
        return self._messages

    def _subscribe_allowance(self) -> Allowance:
        if self._subscribes is None:
            self._subscribes = Allowance(2 * self.limits.max_subscriptions)
        return self._subscribes

    def _charged(self, allowance: Allowance, now: float, ref: str | None, what: str = "") -> list[Effect]:
        verdict = allowance.charge(now)
        if verdict is Verdict.ALLOW:
            return []
        what = what or "broadcast/presence"
        if verdict is Verdict.CLOSE:
            return [
                Reply(
                    Error(
                        ErrorCode.RATE_LIMITED,
                        f"message flood: more than twice the allowance of {allowance.per_minute} {what} "
                        "messages per minute; closing",
                        ref=ref,
                    )
                ),
                Close(CloseCode.RATE_LIMITED, "message flood"),
            ]
        return error(
            ErrorCode.RATE_LIMITED,
            f"rate limit exceeded: at most {allowance.per_minute} {what} messages per minute; message dropped",
            ref=ref,
        )

    def _channel(self, name: str, ref: str | None) -> ChannelName | list[Effect]:
        try:
            return parse_channel(name)
        except ChannelError as exc:
            # A name longer than any valid one is not echoed: the error would be as large as what was sent.
            echoed = name if len(name) <= MAX_ECHOED_CHANNEL else None
            return error(ErrorCode.INVALID_CHANNEL, str(exc), channel=echoed, ref=ref)

    def _subscribe(self, message: Subscribe) -> list[Effect]:
        channel = self._channel(message.channel, message.ref)
        if isinstance(channel, list):
            return channel
        return [CheckSubscribe(message, channel)]

    def _renewal_checked(self, check: CheckSubscribe, refusal: Outcome) -> list[Effect]:
        name = check.channel.name
        # Ended meanwhile by the server (realtime disabled, or the client left): nothing left to end or check.
        if name not in self.subscriptions:
            return []
        if isinstance(refusal, Unavailable):
            # Ending subscriptions because the database is away would turn every outage into lost subscriptions;
            # meanwhile each delivery is still decided by row-level security under the new identity.
            if self._rechecks is None:
                self._rechecks = {}
            self._rechecks[name] = None
            return [RecheckLater()]
        if not isinstance(refusal, Error):
            return []
        message = f"no longer allowed under the new token: {refusal.message}"
        return [Reply(Error(ErrorCode.FORBIDDEN, message, channel=name)), *self.drop(name)]

    def answered(self, request: Request, outcome: Outcome) -> list[Effect]:
        """What follows once the shell has answered `request`: None allows it, an Error refuses it (and is sent),
        an Identity is the verified identity of an `Authenticate`."""
        match request:
            case CheckSubscribe(renewal=True):
                return self._renewal_checked(request, outcome)
            case CheckSubscribe() if not isinstance(outcome, Unavailable):
                return self._subscribe_checked(request, outcome)
            case CheckAction():
                if isinstance(outcome, Error):
                    return [Reply(outcome)]
                granted = self._granted
                if granted is None or len(granted) >= MAX_GRANTS:
                    # Past MAX_GRANTS, all are forgotten: a client may broadcast to any number of topics it is
                    # not subscribed to.
                    self._granted = granted = {}
                granted[request.channel.name, request.action] = None
                return self._allowed(request)
            case HandOff():
                if isinstance(outcome, Error):
                    return [Reply(outcome)]
                return self._handed_off(request)
            case CheckResume(subscribe=check, grant=grant) if isinstance(outcome, Resumable):
                # Not recovered, nothing is replayed and the client refetches: as after a subscribe without `since`,
                # the check's snapshot tells which ending rows came before it.
                if grant is not None and outcome.recovered:
                    grant = TableGrant(grant.relid)
                return self._subscribed(check, outcome.recovered, grant)
            case Authenticate():
                if isinstance(outcome, Identity):
                    return self._authenticated(outcome, request.ref)
                if isinstance(outcome, Error):
                    return [Reply(outcome)]
        raise AssertionError(f"{request!r} cannot be answered with {outcome!r}")

    def _subscribe_checked(self, check: CheckSubscribe, outcome: Outcome) -> list[Effect]:
        if isinstance(outcome, Error):
            return [Reply(outcome)]
        grant = outcome if isinstance(outcome, TableGrant) else None
        request, channel = check.request, check.channel
        name = channel.name
        if name not in self.subscriptions and len(self.subscriptions) >= self.limits.max_subscriptions:
            return error(
                ErrorCode.SUBSCRIPTION_FAILED,
                f"subscription limit reached: at most {self.limits.max_subscriptions} channels per connection; "
                "unsubscribe from one first",
                channel=name,
                ref=request.ref,
            )
        if request.since is None:
            previous = self.subscriptions.get(name)
            if previous is not None and previous.grant is not None:
                # The subscription goes on with other options: what would have ended it still does (changes made
                # while realtime was disabled and enabled again since its first check were never captured).
                grant = previous.grant
            return self._subscribed(check, None, grant)
        if channel.kind is ChannelKind.PRESENCE:
            # Presence has no history: the sync that follows is the whole state, so nothing is missing.
            return self._subscribed(check, True, grant)
        return [CheckResume(check, grant)]

    def _subscribed(self, check: CheckSubscribe, recovered: bool | None, grant: TableGrant | None) -> list[Effect]:
        """Join, ack (with `recovered` when the subscribe carried `since`), then what the client missed, then (for
        presence) the sync. Nothing waits in between, so the replay meets the live stream without a gap."""
        request, channel = check.request, check.channel
        name = channel.name
        subscription = Subscription(channel, request.event, request.filter, grant)
        self.subscriptions[name] = subscription
        effects: list[Effect] = [Join(subscription), Reply(Ack("subscribed", name, request.ref, recovered))]
        if recovered and channel.kind is not ChannelKind.PRESENCE:
            effects.append(Replay(subscription, request.since))
        if channel.kind is ChannelKind.PRESENCE:
            effects.append(SendPresenceState(channel))
        return effects

    def _unsubscribe(self, message: Unsubscribe) -> list[Effect]:
        channel = self._channel(message.channel, message.ref)
        if isinstance(channel, list):
            return channel
        return [*self._drop(channel), Reply(Ack("unsubscribed", channel.name, message.ref))]

    def _drop(self, channel: ChannelName) -> list[Effect]:
        # Leave first: a connection that unsubscribes does not hear its own presence leave.
        effects: list[Effect] = []
        if self.subscriptions.pop(channel.name, None) is not None:
            effects.append(Leave(channel))
        if self.tracked.pop(channel.name, None) is not None:
            effects.append(Untrack(channel, self.presence_key, self.conn_id))
        return effects

    def drop(self, name: str) -> list[Effect]:
        """Drop a subscription the server ended (for example a table whose realtime was disabled)."""
        subscription = self.subscriptions.get(name)
        return self._drop(subscription.channel) if subscription else []

    def close(self) -> list[Effect]:
        """Everything the connection holds, released: every presence left, every subscription ended."""
        effects: list[Effect] = []
        for subscription in list(self.subscriptions.values()):
            effects.extend(self._drop(subscription.channel))
        return effects

    def _broadcast(self, message: Broadcast) -> list[Effect]:
        channel = self._channel(message.channel, message.ref)
        if isinstance(channel, list):
            return channel
        if channel.kind is not ChannelKind.BROADCAST:
            return error(
                ErrorCode.INVALID_CHANNEL,
                f"cannot broadcast on {channel.name}: broadcast messages go to broadcast:{{topic}} channels",
                channel=channel.name,
                ref=message.ref,
            )
        return self._ask(CheckAction(channel, "broadcast", message.ref, message.payload))

    def _ask(self, check: CheckAction) -> list[Effect]:
        """The check, unless this identity was already allowed the same action on the same channel."""
        if self._granted is not None and (check.channel.name, check.action) in self._granted:
            return self._allowed(check)
        return [check]

    def _allowed(self, check: CheckAction) -> list[Effect]:
        if check.action == "broadcast":
            return [Publish(check.channel, check.payload, check.ref)]
        return [HandOff(check.channel, "track", check.ref, check.payload)]

    def _handed_off(self, request: HandOff) -> list[Effect]:
        channel, name, ref = request.channel, request.channel.name, request.ref
        if request.action == "untrack":
            effects: list[Effect] = [Reply(Ack("untracked", name, ref))] if ref is not None else []
            if self.tracked.pop(name, None) is not None:
                effects.append(Untrack(channel, self.presence_key, self.conn_id))
            return effects
        if name not in self.subscriptions:
            # Ended by the server while the check ran.
            return self._not_subscribed(name, "track", ref)
        # The ack goes first, then the diff that every subscriber (this one included) receives.
        self.tracked[name] = request.payload
        effects = [Reply(Ack("tracked", name, ref))] if ref is not None else []
        effects.append(Track(channel, self.presence_key, self.conn_id, request.payload))
        return effects

    def _not_subscribed(self, name: str, event: str, ref: str | None) -> list[Effect]:
        return error(
            ErrorCode.SUBSCRIPTION_FAILED,
            f"not subscribed to {name}: subscribe to the channel before presence {event}",
            channel=name,
            ref=ref,
        )

    def _presence(self, message: Presence) -> list[Effect]:
        channel = self._channel(message.channel, message.ref)
        if isinstance(channel, list):
            return channel
        name, ref = channel.name, message.ref
        if channel.kind is not ChannelKind.PRESENCE:
            return error(
                ErrorCode.INVALID_CHANNEL,
                f"cannot track presence on {name}: presence goes to presence:{{room}} channels",
                channel=name,
                ref=ref,
            )
        if message.event not in ("track", "untrack"):
            return error(
                ErrorCode.INVALID_MESSAGE,
                f"presence: event must be 'track' or 'untrack', got {message.event[:64]!r}",
                channel=name,
                ref=ref,
            )
        if name not in self.subscriptions:
            return self._not_subscribed(name, message.event, ref)
        if message.event == "untrack":
            if name in self.tracked:
                return [HandOff(channel, "untrack", ref, None)]
            return [Reply(Ack("untracked", name, ref))] if ref is not None else []
        state = message.payload
        if not isinstance(state, dict):
            return error(
                ErrorCode.INVALID_MESSAGE,
                "presence: track needs a payload that is a JSON object (the state to share)",
                channel=name,
                ref=ref,
            )
        size = len(orjson.dumps(state))
        if size > self.limits.max_presence_state_size:
            return error(
                ErrorCode.INVALID_MESSAGE,
                f"presence: state is {size} bytes as compact JSON; the limit is "
                f"{self.limits.max_presence_state_size} (realtime.max_presence_state_size)",
                channel=name,
                ref=ref,
            )
        return self._ask(CheckAction(channel, "track", ref, state))

    def _authenticated(self, identity: Identity, ref: str | None) -> list[Effect]:
        """Adopt a freshly verified identity: ack, then presence tracked under the old key moves to the new one,
        then every table subscription is checked again under it (those no longer allowed end with FORBIDDEN)."""
        old_key = self.presence_key
        self.identity = identity
        self._granted = None
        effects: list[Effect] = [Reply(Ack("authorized", ref=ref))]
        if self.presence_key != old_key:
            for name, state in self.tracked.items():
                channel = self.subscriptions[name].channel
                effects.append(Untrack(channel, old_key, self.conn_id))
                effects.append(Track(channel, self.presence_key, self.conn_id, state))
        tables = [sub for sub in self.subscriptions.values() if sub.channel.kind is ChannelKind.TABLE]
        effects.append(IdentityChanged(tuple(sub.channel.name for sub in tables)))
        # Every table is checked afresh below, pending re-checks of an earlier identity included.
        self._rechecks = None
        effects.extend(_renewal(sub) for sub in tables)
        return effects

    @property
    def rechecks_pending(self) -> bool:
        """Some table subscriptions kept through an unanswered renewal check wait to be checked again."""
        return bool(self._rechecks)

    def rechecks(self) -> list[Effect]:
        """The renewal checks that could not reach the database, asked again, for the subscriptions still held."""
        names, self._rechecks = self._rechecks or {}, None
        return [_renewal(self.subscriptions[name]) for name in sorted(names) if name in self.subscriptions]


def _renewal(sub: Subscription) -> CheckSubscribe:
    return CheckSubscribe(Subscribe(sub.channel.name, sub.event, sub.filter), sub.channel, renewal=True)
