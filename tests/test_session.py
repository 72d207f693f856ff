"""Session.receive and friends: values in, effects out, for every client message and every error path of
docs/protocol.md that needs no network."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fluxrt_trio.protocol.channels import parse_channel
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.messages import (
    Ack,
    CloseCode,
    Error,
    ErrorCode,
    Pong,
    Subscribe,
)
from fluxrt_trio.protocol.session import (
    MAX_GRANTS,
    Authenticate,
    CheckAction,
    CheckResume,
    CheckSubscribe,
    Close,
    HandOff,
    IdentityChanged,
    Join,
    Leave,
    Publish,
    Replay,
    Reply,
    Resumable,
    SendPresenceState,
    Session,
    SessionLimits,
    Subscription,
    TableGrant,
    Track,
    Untrack,
    message_ref,
)

CONN = "conn-1"
ANON_KEY = f"anon:{CONN}"


def make(sub: str | None = None, **limits: Any) -> Session:
    identity = Identity(sub, "anon" if sub is None else "authenticated")
    return Session(CONN, identity, SessionLimits(**limits))


def send(session: Session, message: Any, now: float = 0.0) -> list[Any]:
    """The effects of one message, as if every CheckAction and HandOff passed (those are tested on their own
    below)."""
    effects: list[Any] = []
    pending = session.receive(orjson.dumps(message), now)[::-1]
    while pending:
        effect = pending.pop()
        if isinstance(effect, CheckAction | HandOff):
            pending.extend(reversed(session.answered(effect, None)))
        else:
            effects.append(effect)
    return effects


def authenticate(session: Session, identity: Identity, ref: str | None = None) -> list[Any]:
    """The effects of a verified token refresh."""
    return session.answered(Authenticate("t", ref), identity)


def subscribe(session: Session, channel: str, now: float = 0.0, **fields: Any) -> list[Any]:
    """Subscribe and let every outside check pass."""
    effects = send(session, {"type": "subscribe", "channel": channel, **fields}, now)
    assert len(effects) == 1, effects
    [check] = effects
    assert isinstance(check, CheckSubscribe)
    return session.answered(check, None)


def the_error(effects: list[Any]) -> Error:
    assert len(effects) == 1, effects
    [reply] = effects
    assert isinstance(reply, Reply)
    assert isinstance(reply.message, Error)
    return reply.message


def assert_error(
    effects: list[Any], code: ErrorCode, *, channel: str | None = None, ref: str | None = None, says: str = ""
) -> Error:
    error = the_error(effects)
    assert error.code is code
    assert error.channel == channel
    assert error.ref == ref
    assert says in error.message
    return error


def tracked_session(sub: str | None = None, room: str = "presence:room", **limits: Any) -> Session:
    session = make(sub, **limits)
    subscribe(session, room)
    effects = send(session, {"type": "presence", "channel": room, "event": "track", "payload": {"s": 1}})
    assert len(effects) == 1 and isinstance(effects[0], Track)
    return session


# ---- subscribe -----------------------------------------------------------------------------------------------


def test_subscribe_asks_for_the_outside_checks():
    session = make()
    effects = send(session, {"type": "subscribe", "channel": "table:public.users"})
    assert effects == [CheckSubscribe(Subscribe("table:public.users"), parse_channel("table:public.users"))]
    assert session.subscriptions == {}  # nothing until the checks pass


def test_subscribe_checked_joins_and_acks():
    session = make()
    effects = send(session, {"type": "subscribe", "channel": "table:public.users", "ref": "s1"})
    [check] = effects
    channel = parse_channel("table:public.users")
    assert session.answered(check, None) == [
        Join(Subscription(channel, "*", None)),
        Reply(Ack("subscribed", "table:public.users", "s1")),
    ]
    assert session.subscriptions == {"table:public.users": Subscription(channel, "*", None)}


def test_a_table_subscription_keeps_what_its_check_saw():
    session = make()
    [check] = send(session, {"type": "subscribe", "channel": "table:public.users"})
    grant = TableGrant(42, "100:110:")
    join, _ack = session.answered(check, grant)
    assert join.subscription.grant == grant
    assert session.subscriptions["table:public.users"].grant == grant


def test_a_table_subscription_subscribed_again_with_other_options_keeps_what_its_first_check_saw():
    # Subscribed at 100:110; realtime disabled (transaction 115) and enabled again; then a new filter, checked at
    # 121:121. The subscription went on throughout and its changes while disabled were never captured: the DISABLE
    # row, read after the second ack, must still end it. So must the DROP of its table, created again meanwhile.
    session = make()
    [check] = send(session, {"type": "subscribe", "channel": "table:public.users"})
    first = TableGrant(42, "100:110:")
    session.answered(check, first)
    [again] = send(session, {"type": "subscribe", "channel": "table:public.users", "filter": "id=eq.1"})
    join, _ack = session.answered(again, TableGrant(43, "121:121:"))
    assert join.subscription.filter == "id=eq.1" and join.subscription.grant == first
    assert session.subscriptions["table:public.users"].grant == first


def test_a_resumed_table_subscription_keeps_its_table_but_not_the_checks_snapshot():
    # It was promised every change since its position: an ending row its check already saw must still end it.
    session = make()
    since = "t1~42~10:20:12~20:25:22~7"
    [check] = send(session, {"type": "subscribe", "channel": "table:public.users", "since": since})
    [resume] = session.answered(check, TableGrant(42, "100:110:"))
    assert isinstance(resume, CheckResume) and resume.grant == TableGrant(42, "100:110:")
    join, ack, replay = session.answered(resume, Resumable(True))
    assert join.subscription.grant == TableGrant(42)
    assert ack.message.recovered is True and replay == Replay(join.subscription, since)


def test_a_subscribe_with_since_that_cannot_resume_keeps_the_checks_snapshot():
    # Not recovered: nothing is replayed and the client refetches, as after a subscribe without `since`. An ending row
    # its check already saw (realtime disabled and enabled again before it), read by a lagging changefeed after the
    # ack, must not end it.
    session = make()
    since = "t1~42~10:20:12~20:25:22~7"
    [check] = send(session, {"type": "subscribe", "channel": "table:public.users", "since": since})
    grant = TableGrant(42, "100:110:")
    [resume] = session.answered(check, grant)
    join, ack = session.answered(resume, Resumable(False))
    assert ack.message.recovered is False and join.subscription.grant == grant


def test_subscribe_keeps_event_and_filter():
    session = make()
    effects = subscribe(session, "table:public.todos", event="UPDATE", filter="user_id=eq.42")
    channel = parse_channel("table:public.todos")
    assert effects[0] == Join(Subscription(channel, "UPDATE", "user_id=eq.42"))
    assert session.subscriptions["table:public.todos"] == Subscription(channel, "UPDATE", "user_id=eq.42")


def test_subscribe_to_presence_sends_the_state_after_the_ack():
    session = make()
    channel = parse_channel("presence:room")
    assert subscribe(session, "presence:room") == [
        Join(Subscription(channel)),
        Reply(Ack("subscribed", "presence:room")),
        SendPresenceState(channel),
    ]


def test_subscribe_to_broadcast():
    session = make()
    channel = parse_channel("broadcast:chat")
    assert subscribe(session, "broadcast:chat", ref="b") == [
        Join(Subscription(channel)),
        Reply(Ack("subscribed", "broadcast:chat", "b")),
    ]


def test_subscribe_refused_by_the_outside_checks():
    session = make()
    [check] = send(session, {"type": "subscribe", "channel": "table:public.secret", "ref": "r"})
    refusal = Error(ErrorCode.FORBIDDEN, "no", channel="table:public.secret", ref="r")
    assert session.answered(check, refusal) == [Reply(refusal)]
    assert session.subscriptions == {}


def test_resubscribe_is_acked_again_and_replaces_the_options():
    session = make()
    subscribe(session, "table:public.todos", event="INSERT")
    channel = parse_channel("table:public.todos")
    effects = subscribe(session, "table:public.todos", event="DELETE", filter="id=gt.5", ref="again")
    assert effects == [
        Join(Subscription(channel, "DELETE", "id=gt.5")),
        Reply(Ack("subscribed", "table:public.todos", "again")),
    ]
    assert session.subscriptions == {"table:public.todos": Subscription(channel, "DELETE", "id=gt.5")}


@pytest.mark.parametrize(
    "channel", ["table:users", "table:public.users.x", "users", "presence:", "broadcast:a b", "Table:public.users"]
)
def test_subscribe_to_a_malformed_channel(channel):
    error = assert_error(
        send(session := make(), {"type": "subscribe", "channel": channel, "ref": "r"}),
        ErrorCode.INVALID_CHANNEL,
        channel=channel,
        ref="r",
    )
    assert "expected" in error.message
    assert ":{" in error.message  # shows a format such as table:{schema}.{table}
    assert session.subscriptions == {}


def test_a_malformed_channel_longer_than_any_valid_one_is_not_echoed():
    longest = "broadcast:" + "a" * 255 + " "
    assert_error(send(make(), {"type": "subscribe", "channel": longest}), ErrorCode.INVALID_CHANNEL, channel=longest)
    huge = "broadcast:" + "a" * 200_000
    error = assert_error(send(make(), {"type": "subscribe", "channel": huge}), ErrorCode.INVALID_CHANNEL)
    assert len(error.message) < 1000


def test_subscription_limit():
    session = make(max_subscriptions=2)  # subscribe/unsubscribe allowance: 4 per minute
    subscribe(session, "broadcast:a")
    subscribe(session, "table:public.b")
    [check] = send(session, {"type": "subscribe", "channel": "presence:c", "ref": "3"})
    assert_error(
        session.answered(check, None),
        ErrorCode.SUBSCRIPTION_FAILED,
        channel="presence:c",
        ref="3",
        says="2",
    )
    assert set(session.subscriptions) == {"broadcast:a", "table:public.b"}
    # At the limit, re-subscribing to a channel it already has is still fine.
    assert subscribe(session, "broadcast:a", ref="re")[-1] == Reply(Ack("subscribed", "broadcast:a", "re"))
    # After an unsubscribe there is room again.
    send(session, {"type": "unsubscribe", "channel": "broadcast:a"}, now=120.0)
    assert subscribe(session, "presence:c", now=120.0)[1] == Reply(Ack("subscribed", "presence:c"))


# ---- unsubscribe ---------------------------------------------------------------------------------------------


def test_unsubscribe():
    session = make()
    subscribe(session, "table:public.users")
    assert send(session, {"type": "unsubscribe", "channel": "table:public.users", "ref": "u"}) == [
        Leave(parse_channel("table:public.users")),
        Reply(Ack("unsubscribed", "table:public.users", "u")),
    ]
    assert session.subscriptions == {}


def test_unsubscribe_is_acked_when_not_subscribed():
    session = make()
    assert send(session, {"type": "unsubscribe", "channel": "table:public.users"}) == [
        Reply(Ack("unsubscribed", "table:public.users"))
    ]
    subscribe(session, "broadcast:x")
    send(session, {"type": "unsubscribe", "channel": "broadcast:x"})
    assert send(session, {"type": "unsubscribe", "channel": "broadcast:x"}) == [
        Reply(Ack("unsubscribed", "broadcast:x"))
    ]


def test_unsubscribe_from_a_malformed_channel():
    assert_error(
        send(make(), {"type": "unsubscribe", "channel": "nope", "ref": "r"}),
        ErrorCode.INVALID_CHANNEL,
        channel="nope",
        ref="r",
        says="table:{schema}.{table}",
    )


def test_unsubscribe_untracks_presence():
    session = tracked_session("alice")
    channel = parse_channel("presence:room")
    assert send(session, {"type": "unsubscribe", "channel": "presence:room"}) == [
        Leave(channel),
        Untrack(channel, "alice", CONN),
        Reply(Ack("unsubscribed", "presence:room")),
    ]
    assert session.tracked == {}
    assert session.subscriptions == {}


# ---- broadcast -----------------------------------------------------------------------------------------------


def test_broadcast_without_ref_gets_nothing_back():
    session = make()
    payload = {"message": "Hello World", "user": "john"}
    assert send(session, {"type": "broadcast", "channel": "broadcast:chat", "payload": payload}) == [
        Publish(parse_channel("broadcast:chat"), payload)
    ]


def test_broadcast_with_ref_hands_the_ref_to_the_hub():
    # The hub answers `sent` (or UNAVAILABLE): only it knows when the message has reached every node.
    session = make()
    assert send(session, {"type": "broadcast", "channel": "broadcast:chat", "payload": [1, 2], "ref": "b1"}) == [
        Publish(parse_channel("broadcast:chat"), [1, 2], "b1")
    ]


def test_broadcast_null_payload_is_published():
    assert send(make(), {"type": "broadcast", "channel": "broadcast:chat", "payload": None}) == [
        Publish(parse_channel("broadcast:chat"), None)
    ]


@pytest.mark.parametrize("channel", ["table:public.users", "presence:room"])
def test_broadcast_on_a_non_broadcast_channel(channel):
    session = make()
    subscribe(session, channel)
    assert_error(
        send(session, {"type": "broadcast", "channel": channel, "payload": {}, "ref": "r"}),
        ErrorCode.INVALID_CHANNEL,
        channel=channel,
        ref="r",
        says="broadcast:{topic}",
    )


def test_broadcast_on_a_malformed_channel():
    assert_error(
        send(make(), {"type": "broadcast", "channel": "broadcast:", "payload": {}}),
        ErrorCode.INVALID_CHANNEL,
        channel="broadcast:",
        says="broadcast:{topic}",
    )


def test_broadcast_missing_payload_is_invalid_message():
    assert_error(
        send(make(), {"type": "broadcast", "channel": "broadcast:chat", "ref": "r"}),
        ErrorCode.INVALID_MESSAGE,
        ref="r",
        says="payload",
    )


# ---- presence ------------------------------------------------------------------------------------------------


def test_track_anonymous_uses_an_anon_key():
    session = make()
    subscribe(session, "presence:room")
    assert send(
        session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {"s": 1}, "ref": "t"}
    ) == [
        Reply(Ack("tracked", "presence:room", "t")),
        Track(parse_channel("presence:room"), ANON_KEY, CONN, {"s": 1}),
    ]
    assert session.tracked == {"presence:room": {"s": 1}}


def test_track_authenticated_uses_the_sub():
    session = make("alice")
    subscribe(session, "presence:room")
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {}}) == [
        Track(parse_channel("presence:room"), "alice", CONN, {})
    ]


def test_retrack_replaces_the_state():
    session = tracked_session("alice")
    effects = send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {"s": 2}})
    assert effects == [Track(parse_channel("presence:room"), "alice", CONN, {"s": 2})]
    assert session.tracked == {"presence:room": {"s": 2}}


def test_untrack():
    session = tracked_session("alice")
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "untrack", "ref": "u"}) == [
        Reply(Ack("untracked", "presence:room", "u")),
        Untrack(parse_channel("presence:room"), "alice", CONN),
    ]
    assert session.tracked == {}
    assert "presence:room" in session.subscriptions  # still subscribed


def test_untrack_when_not_tracked():
    session = make()
    subscribe(session, "presence:room")
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "untrack", "ref": "u"}) == [
        Reply(Ack("untracked", "presence:room", "u"))
    ]
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "untrack"}) == []


@pytest.mark.parametrize("channel", ["broadcast:chat", "table:public.users"])
def test_presence_on_a_non_presence_channel(channel):
    session = make()
    subscribe(session, channel)
    assert_error(
        send(session, {"type": "presence", "channel": channel, "event": "track", "payload": {}, "ref": "r"}),
        ErrorCode.INVALID_CHANNEL,
        channel=channel,
        ref="r",
        says="presence:{room}",
    )
    assert session.tracked == {}


def test_presence_on_a_malformed_channel():
    assert_error(
        send(make(), {"type": "presence", "channel": "presence:a\tb", "event": "track", "payload": {}}),
        ErrorCode.INVALID_CHANNEL,
        channel="presence:a\tb",
        says="presence:{room}",
    )


@pytest.mark.parametrize("event", ["track", "untrack"])
def test_presence_without_subscription(event):
    session = make()
    assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": event, "payload": {}, "ref": "r"}),
        ErrorCode.SUBSCRIPTION_FAILED,
        channel="presence:room",
        ref="r",
        says="subscribe",
    )
    assert session.tracked == {}


def test_presence_unknown_event():
    session = make()
    subscribe(session, "presence:room")
    assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": "sync", "payload": {}, "ref": "r"}),
        ErrorCode.INVALID_MESSAGE,
        channel="presence:room",
        ref="r",
        says="'sync'",
    )


@pytest.mark.parametrize("payload", [None, [], ["a"], "online", 42, True])
def test_presence_state_must_be_an_object(payload):
    session = make()
    subscribe(session, "presence:room")
    assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": payload}),
        ErrorCode.INVALID_MESSAGE,
        channel="presence:room",
        says="object",
    )
    assert session.tracked == {}


def test_presence_track_without_payload_is_invalid():
    session = make()
    subscribe(session, "presence:room")
    assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": "track", "ref": "r"}),
        ErrorCode.INVALID_MESSAGE,
        channel="presence:room",
        ref="r",
    )


def state_of_size(size: int) -> dict[str, str]:
    state = {"k": "x" * (size - len('{"k":""}'))}
    assert len(orjson.dumps(state)) == size
    return state


@pytest.mark.parametrize("limit", [100, 4096])
def test_presence_state_size_limit(limit):
    session = make(max_presence_state_size=limit)
    subscribe(session, "presence:room")
    fits = state_of_size(limit)
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": fits}) == [
        Track(parse_channel("presence:room"), ANON_KEY, CONN, fits)
    ]
    too_big = state_of_size(limit + 1)
    error = assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": too_big}),
        ErrorCode.INVALID_MESSAGE,
        channel="presence:room",
        says=str(limit),
    )
    assert "max_presence_state_size" in error.message
    assert session.tracked == {"presence:room": fits}  # the old state stays


def test_default_presence_state_limit_is_4_kib():
    assert SessionLimits().max_presence_state_size == 4096


def test_presence_state_size_is_measured_as_compact_json():
    session = make(max_presence_state_size=22)
    subscribe(session, "presence:room")
    state = {"a": [1, 2, 3], "b": "cc"}  # {"a":[1,2,3],"b":"cc"} is 22 bytes; as sent below it is 32
    text = '{"type": "presence", "channel": "presence:room", "event": "track", "payload": {"a": [1, 2, 3], "b": "cc"}}'
    [check] = session.receive(text, 0.0)
    [handoff] = session.answered(check, None)
    assert handoff == HandOff(parse_channel("presence:room"), "track", None, state)
    assert session.answered(handoff, None) == [Track(parse_channel("presence:room"), ANON_KEY, CONN, state)]


# ---- ping and auth -------------------------------------------------------------------------------------------


def test_ping():
    session = make()
    assert send(session, {"type": "ping"}) == [Reply(Pong())]
    assert send(session, {"type": "ping", "ref": "p"}) == [Reply(Pong("p"))]


def test_auth_asks_for_verification():
    assert send(make(), {"type": "auth", "token": "a.b.c", "ref": "r"}) == [Authenticate("a.b.c", "r")]
    assert send(make(), {"type": "auth", "token": "a.b.c"}) == [Authenticate("a.b.c", None)]


def test_authenticated_acks_without_channel():
    session = make()
    identity = Identity("alice", "authenticated")
    assert authenticate(session, identity, "r") == [Reply(Ack("authorized", None, "r")), IdentityChanged(())]
    assert session.identity == identity
    assert session.presence_key == "alice"


def test_authenticated_moves_presence_from_the_anon_key_to_the_sub():
    session = make()
    subscribe(session, "presence:a")
    subscribe(session, "presence:b")
    subscribe(session, "broadcast:c")
    send(session, {"type": "presence", "channel": "presence:a", "event": "track", "payload": {"n": 1}})
    send(session, {"type": "presence", "channel": "presence:b", "event": "track", "payload": {"n": 2}})
    assert session.presence_key == ANON_KEY
    a, b = parse_channel("presence:a"), parse_channel("presence:b")
    alice = Identity("alice", "authenticated")
    assert authenticate(session, alice) == [
        Reply(Ack("authorized")),
        Untrack(a, ANON_KEY, CONN),
        Track(a, "alice", CONN, {"n": 1}),
        Untrack(b, ANON_KEY, CONN),
        Track(b, "alice", CONN, {"n": 2}),
        IdentityChanged(()),
    ]
    assert session.presence_key == "alice"
    # A later untrack and unsubscribe use the new key.
    assert send(session, {"type": "presence", "channel": "presence:a", "event": "untrack"}) == [
        Untrack(a, "alice", CONN)
    ]
    assert send(session, {"type": "unsubscribe", "channel": "presence:b"})[:2] == [Leave(b), Untrack(b, "alice", CONN)]


def test_authenticated_as_another_user_moves_presence():
    session = tracked_session("alice")
    channel = parse_channel("presence:room")
    bob = Identity("bob", "authenticated")
    assert authenticate(session, bob, "x") == [
        Reply(Ack("authorized", None, "x")),
        Untrack(channel, "alice", CONN),
        Track(channel, "bob", CONN, {"s": 1}),
        IdentityChanged(()),
    ]


def test_token_refresh_for_the_same_user_keeps_presence():
    session = tracked_session("alice")
    refreshed = Identity("alice", "authenticated", expires_at=2e9)
    assert authenticate(session, refreshed) == [Reply(Ack("authorized")), IdentityChanged(())]
    assert session.identity.expires_at == 2e9


def test_a_new_identity_checks_every_table_subscription_again_and_ends_the_refused_ones():
    session = make("alice")
    subscribe(session, "table:public.a", filter="id=eq.1")
    subscribe(session, "table:public.b", event="INSERT")
    subscribe(session, "broadcast:c")
    bob = Identity("bob", "authenticated")
    effects = authenticate(session, bob, "r")
    a, b = parse_channel("table:public.a"), parse_channel("table:public.b")
    assert effects == [
        Reply(Ack("authorized", None, "r")),
        IdentityChanged(("table:public.a", "table:public.b")),
        CheckSubscribe(Subscribe("table:public.a", "*", "id=eq.1"), a, renewal=True),
        CheckSubscribe(Subscribe("table:public.b", "INSERT"), b, renewal=True),
    ]
    assert session.answered(effects[2], None) == []
    refusal = Error(ErrorCode.FORBIDDEN, "role bob may not read public.b", channel="table:public.b")
    assert session.answered(effects[3], refusal) == [
        Reply(
            Error(
                ErrorCode.FORBIDDEN,
                "no longer allowed under the new token: role bob may not read public.b",
                channel="table:public.b",
            )
        ),
        Leave(b),
    ]
    assert set(session.subscriptions) == {"table:public.a", "broadcast:c"}
    # A subscription the server ended while the check ran is not ended twice.
    assert session.answered(effects[3], refusal) == []


# ---- invalid messages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nope", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"ping"', "JSON object"),
        ('{"type": "dance"}', "unknown message type"),
        ('{"channel": "broadcast:x"}', "no type"),
        ('{"type": "subscribe"}', "'channel'"),
        ('{"type": "subscribe", "channel": 5}', "'channel'"),
        ('{"type": "auth", "token": 5}', "'token'"),
        ('{"type": "ping", "ref": 5}', "ref"),
        ('{"type": "ping", "ref": "' + "r" * 65 + '"}', "64"),
    ],
)
def test_invalid_messages(text, says):
    session = make()
    assert_error(session.receive(text, 0.0), ErrorCode.INVALID_MESSAGE, says=says)
    assert session.subscriptions == {}


def test_invalid_message_echoes_a_readable_ref():
    assert_error(
        make().receive('{"type": "subscribe", "ref": "r9"}', 0.0), ErrorCode.INVALID_MESSAGE, ref="r9", says="channel"
    )


def test_invalid_bytes():
    assert_error(make().receive(b"\xff\xfe", 0.0), ErrorCode.INVALID_MESSAGE, says="not valid JSON")


def test_binary_frame():
    assert_error(make().binary_frame(0.0), ErrorCode.INVALID_MESSAGE, says="binary")


# ---- rate limits ---------------------------------------------------------------------------------------------


def broadcast(session: Session, now: float = 0.0, ref: str | None = "r") -> list[Any]:
    message: dict[str, Any] = {"type": "broadcast", "channel": "broadcast:chat", "payload": 1}
    if ref is not None:
        message["ref"] = ref
    return send(session, message, now)


def published(ref: str | None = "r") -> list[Any]:
    """What `broadcast` returns when the broadcast goes out: the Publish, whose ref the hub acks."""
    return [Publish(parse_channel("broadcast:chat"), 1, ref)]


def test_broadcast_past_the_message_rate_limit_is_rate_limited():
    session = make(message_rate_limit=3)
    for i in range(3):
        assert broadcast(session, ref=str(i)) == published(str(i))
    assert_error(broadcast(session, ref="4th"), ErrorCode.RATE_LIMITED, ref="4th", says="3")
    # The bucket refills: 3 per minute is one per 20 s.
    assert broadcast(session, now=20.0, ref="later") == published("later")


def test_presence_shares_the_message_allowance():
    session = make(message_rate_limit=2)
    subscribe(session, "presence:room")
    broadcast(session)
    assert send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {}})[0] == (
        Track(parse_channel("presence:room"), ANON_KEY, CONN, {})
    )
    assert_error(
        send(session, {"type": "presence", "channel": "presence:room", "event": "untrack", "ref": "p"}),
        ErrorCode.RATE_LIMITED,
        ref="p",
    )
    assert_error(broadcast(session, ref="b"), ErrorCode.RATE_LIMITED, ref="b")
    assert session.tracked == {"presence:room": {}}  # the rate-limited untrack was dropped


def test_rate_limited_message_is_dropped():
    session = make(message_rate_limit=1)
    broadcast(session)
    effects = broadcast(session, ref=None)
    assert not any(isinstance(e, Publish) for e in effects)
    assert_error(effects, ErrorCode.RATE_LIMITED)


def test_ping_is_never_counted():
    session = make(message_rate_limit=2, max_subscriptions=1)
    for _ in range(1000):
        assert send(session, {"type": "ping"}) == [Reply(Pong())]
    assert broadcast(session, ref="1") == published("1")
    assert broadcast(session, ref="2") == published("2")
    assert subscribe(session, "broadcast:x")[-1] == Reply(Ack("subscribed", "broadcast:x"))


@pytest.mark.parametrize(
    "invalid",
    [
        lambda s: s.receive("not json", 0.0),
        lambda s: s.receive('{"type": "nope"}', 0.0),
        lambda s: s.binary_frame(0.0),
        lambda s: send(s, {"type": "broadcast", "channel": "table:public.users", "payload": 1}),
        lambda s: send(s, {"type": "broadcast", "channel": "bad", "payload": 1}),
        lambda s: send(s, {"type": "presence", "channel": "presence:r", "event": "track", "payload": {}}),
    ],
)
def test_invalid_messages_are_counted(invalid):
    session = make(message_rate_limit=3)
    for _ in range(3):
        error = the_error(invalid(session))
        assert error.code is not ErrorCode.RATE_LIMITED
    assert_error(broadcast(session), ErrorCode.RATE_LIMITED, ref="r")


def test_subscribe_and_unsubscribe_have_their_own_allowance_of_twice_the_subscription_limit():
    session = make(max_subscriptions=3, message_rate_limit=1)
    broadcast(session)
    assert_error(broadcast(session), ErrorCode.RATE_LIMITED, ref="r")  # message allowance gone
    # ... which does not stop subscribes: 2 x 3 = 6 subscribe/unsubscribe per minute.
    for i in range(3):
        assert subscribe(session, f"broadcast:{i}")[1] == Reply(Ack("subscribed", f"broadcast:{i}"))
    for i in range(3):
        assert send(session, {"type": "unsubscribe", "channel": f"broadcast:{i}"})[-1] == Reply(
            Ack("unsubscribed", f"broadcast:{i}")
        )
    assert_error(
        send(session, {"type": "subscribe", "channel": "broadcast:7", "ref": "7"}),
        ErrorCode.RATE_LIMITED,
        ref="7",
        says="subscribe",
    )
    assert_error(send(session, {"type": "unsubscribe", "channel": "broadcast:0"}), ErrorCode.RATE_LIMITED)


def test_a_client_can_open_all_its_channels_at_once():
    session = make(max_subscriptions=100, message_rate_limit=1)
    for i in range(100):
        assert subscribe(session, f"table:public.t{i}")[1] == Reply(Ack("subscribed", f"table:public.t{i}"))
    assert len(session.subscriptions) == 100
    # Subscribes do not use the message allowance.
    assert broadcast(session) == published()


def test_flooding_beyond_twice_the_allowance_closes_4029():
    session = make(message_rate_limit=5)
    results = [broadcast(session, ref=str(i)) for i in range(10)]
    assert results[:5] == [published(str(i)) for i in range(5)]
    assert all(the_error(r).code is ErrorCode.RATE_LIMITED for r in results[5:])
    effects = broadcast(session, ref="11")
    assert len(effects) == 2
    reply, close = effects
    assert reply == Reply(reply.message)
    assert reply.message.code is ErrorCode.RATE_LIMITED
    assert reply.message.ref == "11"
    assert isinstance(close, Close)
    assert close.code == CloseCode.RATE_LIMITED == 4029


def test_invalid_frames_alone_can_flood():
    session = make(message_rate_limit=2)
    for _ in range(4):
        assert the_error(session.binary_frame(0.0)).code in (ErrorCode.INVALID_MESSAGE, ErrorCode.RATE_LIMITED)
    effects = session.binary_frame(0.0)
    assert isinstance(effects[-1], Close)
    assert effects[-1].code == 4029


def test_subscribe_flood_closes_4029():
    session = make(max_subscriptions=2)  # allowance 4 per minute, flood above 8
    for i in range(8):
        assert not any(
            isinstance(e, Close) for e in send(session, {"type": "unsubscribe", "channel": f"broadcast:{i}"})
        )
    effects = send(session, {"type": "unsubscribe", "channel": "broadcast:x"})
    assert isinstance(effects[-1], Close)
    assert effects[-1].code == CloseCode.RATE_LIMITED


def test_steady_sender_at_the_rate_is_never_limited():
    session = make(message_rate_limit=60)
    for i in range(600):
        assert broadcast(session, now=float(i), ref=None) == published(None)


# ---- close and drop ------------------------------------------------------------------------------------------


def test_close_releases_everything():
    session = make("alice")
    subscribe(session, "table:public.users")
    subscribe(session, "presence:room")
    subscribe(session, "broadcast:chat")
    subscribe(session, "presence:lobby")
    send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {"s": 1}})
    effects = session.close()
    assert effects == [
        Leave(parse_channel("table:public.users")),
        Leave(parse_channel("presence:room")),
        Untrack(parse_channel("presence:room"), "alice", CONN),
        Leave(parse_channel("broadcast:chat")),
        Leave(parse_channel("presence:lobby")),
    ]
    assert session.subscriptions == {}
    assert session.tracked == {}
    assert session.close() == []


def test_close_of_an_empty_session():
    assert make().close() == []


def test_drop_ends_one_subscription():
    session = tracked_session()
    subscribe(session, "table:public.users")
    assert session.drop("table:public.users") == [Leave(parse_channel("table:public.users"))]
    assert session.drop("table:public.users") == []
    assert session.drop("presence:room") == [
        Leave(parse_channel("presence:room")),
        Untrack(parse_channel("presence:room"), ANON_KEY, CONN),
    ]
    assert session.subscriptions == {}


def test_presence_keys():
    assert make().presence_key == ANON_KEY
    assert make("4f1c2a3e-0000-4000-8000-000000000001").presence_key == "4f1c2a3e-0000-4000-8000-000000000001"
    assert Session("other", Identity(None, "anon"), SessionLimits()).presence_key == "anon:other"


def test_default_limits_match_the_protocol():
    assert SessionLimits() == SessionLimits(max_subscriptions=100, message_rate_limit=100, max_presence_state_size=4096)


def test_auth_uses_the_control_allowance_not_the_broadcast_one():
    session = make(message_rate_limit=1, max_subscriptions=1)  # control allowance: 2 per minute
    assert send(session, {"type": "broadcast", "channel": "broadcast:x", "payload": 1})[0] == Publish(
        parse_channel("broadcast:x"), 1
    )
    assert isinstance(send(session, {"type": "broadcast", "channel": "broadcast:x", "payload": 1})[0], Reply)
    # The broadcast allowance is spent; a token refresh still goes through, twice, then it is limited.
    assert send(session, {"type": "auth", "token": "t"}) == [Authenticate("t", None)]
    assert send(session, {"type": "auth", "token": "t"}) == [Authenticate("t", None)]
    [reply] = send(session, {"type": "auth", "token": "t"})
    assert reply.message.code is ErrorCode.RATE_LIMITED


def test_broadcast_and_track_ask_for_authorization_first_and_once_per_identity():
    session = make("alice")
    subscribe(session, "presence:room")
    room, topic = parse_channel("presence:room"), parse_channel("broadcast:x")
    broadcast = orjson.dumps({"type": "broadcast", "channel": "broadcast:x", "payload": 1, "ref": "b"})
    [check] = session.receive(broadcast, 0.0)
    assert check == CheckAction(topic, "broadcast", "b", 1)
    assert session.answered(check, None) == [Publish(topic, 1, "b")]
    # Allowed once: the next broadcast there is not asked about again, until the identity changes.
    assert session.receive(broadcast, 0.0) == [Publish(topic, 1, "b")]
    track = orjson.dumps({"type": "presence", "channel": "presence:room", "event": "track", "payload": {"a": 1}})
    [check] = session.receive(track, 0.0)
    assert check == CheckAction(room, "track", None, {"a": 1})
    assert session.tracked == {}
    [handoff] = session.answered(check, None)
    assert handoff == HandOff(room, "track", None, {"a": 1})
    assert session.tracked == {}  # nor before the hand-off
    assert session.answered(handoff, None) == [Track(room, "alice", CONN, {"a": 1})]
    # The track too is allowed once: the next one goes straight to the hand-off.
    assert session.receive(track, 0.0) == [HandOff(room, "track", None, {"a": 1})]
    authenticate(session, Identity("alice", "authenticated", expires_at=2e9))
    assert session.receive(broadcast, 0.0) == [CheckAction(topic, "broadcast", "b", 1)]


def test_remembered_grants_are_bounded():
    session = make("alice", message_rate_limit=10 * MAX_GRANTS)
    for n in range(MAX_GRANTS + 1):
        [check] = session.receive(orjson.dumps({"type": "broadcast", "channel": f"broadcast:t{n}", "payload": 1}), 0.0)
        session.answered(check, None)
    # Past the bound the remembered grants were forgotten and are asked about again; the newest is kept.
    first = orjson.dumps({"type": "broadcast", "channel": "broadcast:t0", "payload": 1})
    assert isinstance(session.receive(first, 0.0)[0], CheckAction)
    last = orjson.dumps({"type": "broadcast", "channel": f"broadcast:t{MAX_GRANTS}", "payload": 1})
    assert isinstance(session.receive(last, 0.0)[0], Publish)


def test_a_refused_action_changes_nothing():
    session = make("alice")
    subscribe(session, "presence:room")
    send(session, {"type": "presence", "channel": "presence:room", "event": "track", "payload": {"v": 1}})
    # A new token: the next track is asked about again.
    authenticate(session, Identity("alice", "authenticated", expires_at=2e9))
    [check] = session.receive(
        orjson.dumps({"type": "presence", "channel": "presence:room", "event": "track", "payload": {"v": 2}}), 0.0
    )
    assert check == CheckAction(parse_channel("presence:room"), "track", None, {"v": 2})
    refusal = Error(ErrorCode.FORBIDDEN, "no", channel="presence:room")
    assert session.answered(check, refusal) == [Reply(refusal)]
    assert session.tracked == {"presence:room": {"v": 1}}
    [check] = session.receive(orjson.dumps({"type": "broadcast", "channel": "broadcast:x", "payload": 1}), 0.0)
    assert session.answered(check, refusal) == [Reply(refusal)]
    # Refused is not remembered: the next one is asked about again.
    assert isinstance(
        session.receive(orjson.dumps({"type": "broadcast", "channel": "broadcast:x", "payload": 1}), 0.0)[0],
        CheckAction,
    )


@pytest.mark.parametrize("ended", ["during the check", "during the hand-off"])
def test_a_track_whose_subscription_ended_meanwhile_is_refused(ended):
    session = make("alice")
    subscribe(session, "presence:room")
    [check] = session.receive(
        orjson.dumps({"type": "presence", "channel": "presence:room", "event": "track", "payload": {}, "ref": "t"}), 0.0
    )
    if ended == "during the check":
        session.drop("presence:room")
    [handoff] = session.answered(check, None)
    assert handoff == HandOff(parse_channel("presence:room"), "track", "t", {})
    if ended == "during the hand-off":
        session.drop("presence:room")
    assert_error(
        session.answered(handoff, None),
        ErrorCode.SUBSCRIPTION_FAILED,
        channel="presence:room",
        ref="t",
        says="subscribe",
    )
    assert session.tracked == {}


# ---- hand-off: can a presence change reach every node -------------------------------------------------------

ROOM = parse_channel("presence:room")


def presence(session: Session, event: str, ref: str | None = None, payload: Any = None) -> list[Any]:
    """The effects of one presence message, every CheckAction allowed, up to the HandOff left unanswered."""
    message: dict[str, Any] = {"type": "presence", "channel": "presence:room", "event": event, "payload": payload}
    if ref is not None:
        message["ref"] = ref
    effects = session.receive(orjson.dumps(message), 0.0)
    while effects and isinstance(effects[-1], CheckAction):
        effects = effects[:-1] + session.answered(effects[-1], None)
    return effects


def unavailable(ref: str | None) -> Error:
    return Error(ErrorCode.UNAVAILABLE, "cluster engine unreachable", channel="presence:room", ref=ref)


def test_a_track_is_handed_off_after_its_check_and_acked_before_the_diff():
    session = make("alice")
    subscribe(session, "presence:room")
    [handoff] = presence(session, "track", "t", {"s": 1})
    assert handoff == HandOff(ROOM, "track", "t", {"s": 1})
    assert message_ref([handoff]) == "t"
    assert session.tracked == {}  # nothing recorded until the hand-off is answered
    assert session.answered(handoff, None) == [
        Reply(Ack("tracked", "presence:room", "t")),
        Track(ROOM, "alice", CONN, {"s": 1}),
    ]
    assert session.tracked == {"presence:room": {"s": 1}}


def test_a_track_refused_by_the_hand_off_records_nothing_and_a_later_untrack_is_answered_directly():
    session = make("alice")
    subscribe(session, "presence:room")
    [handoff] = presence(session, "track", "t", {"s": 1})
    assert session.answered(handoff, unavailable("t")) == [Reply(unavailable("t"))]
    assert session.tracked == {}
    # Nothing was tracked, so nothing needs to reach the other nodes: the untrack is acked at once.
    assert presence(session, "untrack", "u") == [Reply(Ack("untracked", "presence:room", "u"))]
    assert presence(session, "untrack") == []
    # Once the engine is back, the same track goes through.
    [handoff] = presence(session, "track", "t2", {"s": 1})
    assert session.answered(handoff, None)[-1] == Track(ROOM, "alice", CONN, {"s": 1})


def test_a_retrack_refused_by_the_hand_off_keeps_the_old_state():
    session = tracked_session("alice")
    [handoff] = presence(session, "track", "t", {"s": 2})
    assert session.answered(handoff, unavailable("t")) == [Reply(unavailable("t"))]
    assert session.tracked == {"presence:room": {"s": 1}}


def test_an_untrack_of_a_tracked_channel_is_handed_off_and_acked_before_the_untrack():
    session = tracked_session("alice")
    [handoff] = presence(session, "untrack", "u")
    assert handoff == HandOff(ROOM, "untrack", "u", None)
    assert message_ref([handoff]) == "u"
    assert session.tracked == {"presence:room": {"s": 1}}
    assert session.answered(handoff, None) == [
        Reply(Ack("untracked", "presence:room", "u")),
        Untrack(ROOM, "alice", CONN),
    ]
    assert session.tracked == {}
    [handoff] = presence(session, "track", None, {"s": 3})
    session.answered(handoff, None)
    [handoff] = presence(session, "untrack")
    assert session.answered(handoff, None) == [Untrack(ROOM, "alice", CONN)]


def test_an_untrack_refused_by_the_hand_off_keeps_the_track():
    session = tracked_session("alice")
    [handoff] = presence(session, "untrack", "u")
    assert session.answered(handoff, unavailable("u")) == [Reply(unavailable("u"))]
    assert session.tracked == {"presence:room": {"s": 1}}
    # Still tracked: the next untrack is handed off again, and a close still gives the presence back.
    assert presence(session, "untrack", "again") == [HandOff(ROOM, "untrack", "again", None)]
    assert session.close() == [Leave(ROOM), Untrack(ROOM, "alice", CONN)]


def test_an_untrack_whose_subscription_ended_during_the_hand_off_is_acked_once_without_a_second_untrack():
    session = tracked_session("alice")
    [handoff] = presence(session, "untrack", "u")
    # The server ended the subscription meanwhile, which gave the presence back.
    assert session.drop("presence:room") == [Leave(ROOM), Untrack(ROOM, "alice", CONN)]
    assert session.answered(handoff, None) == [Reply(Ack("untracked", "presence:room", "u"))]
    assert session.tracked == {}


def test_leaving_presence_is_never_handed_off():
    # An unsubscribe, a drop or a close cannot be refused: the connection gives its presence back in any case.
    session = tracked_session("alice")
    assert session.receive(b'{"type": "unsubscribe", "channel": "presence:room", "ref": "x"}', 0.0) == [
        Leave(ROOM),
        Untrack(ROOM, "alice", CONN),
        Reply(Ack("unsubscribed", "presence:room", "x")),
    ]


def test_message_ref_is_the_ref_of_the_message_the_effects_answer():
    session = make("alice")
    assert message_ref(session.receive(b'{"type":"subscribe","channel":"broadcast:a","ref":"s"}', 0.0)) == "s"
    assert message_ref(session.receive(b'{"type":"ping","ref":"p"}', 0.0)) == "p"
    assert (
        message_ref(session.receive(b'{"type":"broadcast","channel":"broadcast:a","payload":1,"ref":"b"}', 0.0)) == "b"
    )
    assert message_ref(session.receive(b'{"type":"unsubscribe","channel":"broadcast:a","ref":"u"}', 0.0)) == "u"
    assert message_ref(session.receive(b'{"nope', 0.0)) is None
