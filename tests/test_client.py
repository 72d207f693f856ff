"""The Python client, fluxrt_trio.client: its pure parts fed values (no sockets, no clock), then the client against
a real server (and PostgreSQL for table channels) over real sockets."""

from __future__ import annotations

import functools
import random
import socket
from collections.abc import Callable
from typing import Any
from unittest.mock import ANY

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from fluxrt_trio.client import (
    After,
    Backoff,
    BroadcastEvent,
    Change,
    ChannelStatus,
    Client,
    ClientClosed,
    ClientCore,
    CloseInfo,
    ConnectionState,
    Deliver,
    Error,
    EventsDropped,
    Listeners,
    PresenceUpdate,
    RequestInterrupted,
    Resolve,
    Resubscribed,
    Send,
    ServerError,
    StatusChanged,
    open_client,
)
from fluxrt_trio.protocol.channels import ChannelKind
from fluxrt_trio.protocol.messages import (
    Ack,
    Auth,
    ErrorCode,
    Ping,
    Pong,
    Presence,
    PresenceEvent,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
)
from fluxrt_trio.protocol.messages import BroadcastEvent as WireBroadcast

from .support.clients import url
from .support.config import token
from .support.database import users_table
from .support.servers import start

SUBSCRIBING, SUBSCRIBED = ChannelStatus.SUBSCRIBING, ChannelStatus.SUBSCRIBED


def fast() -> Backoff:
    """Reconnect within a fraction of a second, so that restart tests are quick."""
    return Backoff(base=0.05, cap=0.2)


def sent(outputs: list[Any]) -> list[Any]:
    """The client messages among `outputs`, decoded by the server's own decoder."""
    return [decode(output.text) for output in outputs if isinstance(output, Send)]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# ---- backoff and close policy ------------------------------------------------------------------------------------


class _Highest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_up_to_the_cap_and_resets():
    backoff = Backoff(base=0.5, cap=4.0, rng=_Highest())
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    backoff.attempts = 100_000
    assert backoff.next_delay() == 4.0
    # Close 4029 asked for a back-off: rate_limited seconds on top.
    assert backoff.next_delay(CloseInfo(4029)) == 9.0
    assert backoff.next_delay(CloseInfo(1001)) == 4.0


def test_backoff_jitter_is_full_uniform_between_zero_and_the_bound():
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(5))
    backoff.attempts = 3
    delays = []
    for _ in range(2000):
        delays.append(backoff.next_delay())
        backoff.attempts = 3
    assert all(0.0 <= d <= 8.0 for d in delays)
    # Full jitter: the whole range is used, not just the top of it.
    assert min(delays) < 0.2 and max(delays) > 7.8
    assert 3.6 < sum(delays) / len(delays) < 4.4


@pytest.mark.parametrize(
    ("close", "after"),
    [
        (CloseInfo(1000), After.STOP),
        (CloseInfo(1001), After.RECONNECT),
        (CloseInfo(1006), After.RECONNECT),
        (CloseInfo(1009), After.STOP),
        (CloseInfo(1011), After.RECONNECT),
        (CloseInfo(4001), After.NEW_TOKEN),
        (CloseInfo(4008), After.RECONNECT),
        (CloseInfo(4009), After.RECONNECT),
        (CloseInfo(4029), After.RECONNECT),
        (CloseInfo(1002), After.STOP),
        (CloseInfo(1008), After.STOP),
        (CloseInfo(1012), After.RECONNECT),
        (CloseInfo(1006, http_status=503), After.RECONNECT),
        (CloseInfo(1006, http_status=404), After.STOP),
        (CloseInfo(1006, http_status=403), After.STOP),
    ],
)
def test_close_codes_follow_protocol_md(close, after):
    assert close.after() is after


def test_close_descriptions_say_what_to_do():
    refused = CloseInfo(4001, "unauthorized", error=Error(ErrorCode.UNAUTHORIZED, "Invalid or expired token"))
    assert "UNAUTHORIZED: Invalid or expired token" in refused.describe()
    assert "call set_auth() with a new token" in refused.describe()
    assert "max_message_size" in CloseInfo(1009).describe()
    assert "allowed_origins" in CloseInfo(1006, http_status=403).describe()


# ---- the core ----------------------------------------------------------------------------------------------------


def subscribed(core: ClientCore, name: str, **options: Any) -> str:
    """Connect `core`, subscribe it to `name` and ack; returns the subscribe's ref."""
    core.add_channel(name, **options)
    core.subscribe(name)
    (message,) = sent(core.connected() if not core.open else core.subscribe(name))
    core.receive(encode(Ack("subscribed", name, message.ref)))
    return message.ref


def test_subscribe_waits_for_a_connection_and_is_acked_by_ref():
    core = ClientCore()
    core.add_channel("table:public.users", event="INSERT", filter="id=eq.1")
    assert core.subscribe("table:public.users") == [StatusChanged("table:public.users", SUBSCRIBING)]
    (message,) = sent(core.connected())
    assert message == Subscribe("table:public.users", "INSERT", "id=eq.1", ref=message.ref)
    # A reply to something else changes nothing.
    assert core.receive(encode(Ack("subscribed", "table:public.users", "other"))) == []
    assert core.receive(encode(Ack("subscribed", "table:public.users", message.ref))) == [
        StatusChanged("table:public.users", SUBSCRIBED),
        Resolve(("subscribe", "table:public.users")),
    ]


def test_messages_have_the_reference_shape():
    core = ClientCore()
    core.connected()
    core.add_channel("broadcast:chat")
    (send,) = [o for o in core.subscribe("broadcast:chat") if isinstance(o, Send)]
    assert send.text == '{"type":"subscribe","channel":"broadcast:chat","ref":"1"}'
    _, outputs = core.broadcast("broadcast:chat", None)
    assert outputs == [Send('{"type":"broadcast","channel":"broadcast:chat","payload":null,"ref":"2"}')]


def test_a_refused_subscribe_is_a_channel_error_and_is_not_retried():
    core = ClientCore()
    core.add_channel("table:public.missing")
    core.subscribe("table:public.missing")
    (message,) = sent(core.connected())
    refusal = Error(ErrorCode.SUBSCRIPTION_FAILED, "no such table", channel="table:public.missing", ref=message.ref)
    outputs = core.receive(encode(refusal))
    assert StatusChanged("table:public.missing", ChannelStatus.CHANNEL_ERROR, refusal) in outputs
    assert Resolve(("subscribe", "table:public.missing"), error=refusal) in outputs
    core.disconnected()
    assert sent(core.connected()) == []


def test_reconnect_resubscribes_with_new_refs_and_ignores_the_old_connection():
    core = ClientCore()
    old = subscribed(core, "broadcast:chat")
    assert core.disconnected() == [StatusChanged("broadcast:chat", SUBSCRIBING)]
    (message,) = sent(core.connected())
    assert message.channel == "broadcast:chat" and message.ref != old
    assert core.receive(encode(Ack("subscribed", "broadcast:chat", old))) == []
    outputs = core.receive(encode(Ack("subscribed", "broadcast:chat", message.ref)))
    assert outputs[0] == StatusChanged("broadcast:chat", SUBSCRIBED, resumed=True)


def test_presence_is_tracked_after_the_ack_and_again_after_a_reconnect():
    core = ClientCore()
    core.add_channel("presence:lobby")
    core.subscribe("presence:lobby")
    (sub,) = sent(core.connected())
    # Tracking before the ack waits for it.
    assert core.track("presence:lobby", {"status": "online"}) == []
    (track,) = sent(core.receive(encode(Ack("subscribed", "presence:lobby", sub.ref))))
    assert track == Presence("presence:lobby", "track", {"status": "online"}, ref=track.ref)
    assert core.receive(encode(Ack("tracked", "presence:lobby", track.ref))) == [Resolve(("track", "presence:lobby"))]
    core.disconnected()
    (sub,) = sent(core.connected())
    (track,) = sent(core.receive(encode(Ack("subscribed", "presence:lobby", sub.ref))))
    assert track.payload == {"status": "online"}
    core.receive(encode(Ack("tracked", "presence:lobby", track.ref)))
    (untrack,) = sent(core.untrack("presence:lobby"))
    assert untrack == Presence("presence:lobby", "untrack", ref=untrack.ref)


def test_a_refused_track_keeps_the_state_the_server_holds():
    core = ClientCore()
    subscribed(core, "presence:lobby")
    (first,) = sent(core.track("presence:lobby", {"v": 1}))
    core.receive(encode(Ack("tracked", "presence:lobby", first.ref)))
    (second,) = sent(core.track("presence:lobby", {"v": 2}))
    refusal = Error(ErrorCode.FORBIDDEN, "no", channel="presence:lobby", ref=second.ref)
    assert core.receive(encode(refusal)) == [Resolve(("track", "presence:lobby"), error=refusal)]
    core.disconnected()
    (sub,) = sent(core.connected())
    (track,) = sent(core.receive(encode(Ack("subscribed", "presence:lobby", sub.ref))))
    assert track.payload == {"v": 1}


def test_presence_sync_and_diffs_keep_the_room_and_report_joins_and_leaves():
    core = ClientCore()
    subscribed(core, "presence:lobby")
    alice = [{"ref": "c1", "state": {"s": "online"}}]
    (sync,) = core.receive(encode(PresenceEvent("presence:lobby", "sync", {"alice": alice})))
    assert sync == Deliver("presence:lobby", PresenceUpdate("sync", None, [], {"alice": alice}))
    bob = [{"ref": "c2", "state": {}}]
    (join,) = core.receive(encode(PresenceEvent("presence:lobby", "diff", {"joins": {"bob": bob}, "leaves": {}})))
    assert join.event == PresenceUpdate("join", "bob", bob, {"alice": alice, "bob": bob})
    # A re-track: the old meta leaves and the new one joins under the same ref; the room holds only the new one.
    away = [{"ref": "c1", "state": {"s": "away"}}]
    leave, join = core.receive(
        encode(PresenceEvent("presence:lobby", "diff", {"joins": {"alice": away}, "leaves": {"alice": alice}}))
    )
    assert (leave.event.event, leave.event.key, join.event.event, join.event.key) == ("leave", "alice", "join", "alice")
    assert core.channels["presence:lobby"].presence_state == {"alice": away, "bob": bob}
    core.receive(encode(PresenceEvent("presence:lobby", "diff", {"joins": {}, "leaves": {"bob": bob}})))
    assert core.channels["presence:lobby"].presence_state == {"alice": away}


def test_table_broadcasts_become_changes_and_malformed_ones_are_ignored():
    core = ClientCore()
    subscribed(core, "table:public.users")
    payload = {"type": "UPDATE", "schema": "public", "table": "users", "old_record": {"id": 1}, "record": {"id": 2}}
    (deliver,) = core.receive(encode(WireBroadcast("table:public.users", payload)))
    assert deliver == Deliver("table:public.users", Change("UPDATE", "public", "users", {"id": 2}, {"id": 1}))
    assert core.receive(encode(WireBroadcast("table:public.users", {"type": "INSERT"}))) == []
    assert core.receive(b"not json") == []
    # Nothing for a channel this client does not hold.
    assert core.receive(encode(WireBroadcast("table:public.other", payload))) == []


def test_unsolicited_channel_errors_changes_missed_goes_on_others_end_the_subscription():
    core = ClientCore()
    subscribed(core, "table:public.users")
    missed = Error(ErrorCode.CHANGES_MISSED, "refetch", channel="table:public.users")
    assert core.receive(encode(missed)) == [Deliver("table:public.users", missed)]
    assert core.channels["table:public.users"].status is SUBSCRIBED
    forbidden = Error(ErrorCode.FORBIDDEN, "no longer allowed", channel="table:public.users")
    outputs = core.receive(encode(forbidden))
    assert outputs[0] == StatusChanged("table:public.users", ChannelStatus.CHANNEL_ERROR, forbidden)
    # About the connection itself: kept for the close that follows.
    assert core.receive(encode(Error(ErrorCode.UNAUTHORIZED, "Invalid or expired token"))) == []
    assert core.server_error == Error(ErrorCode.UNAUTHORIZED, "Invalid or expired token")
    # A newer server's error code still reads.
    assert core.receive(b'{"type":"error","code":"NEW_CODE","message":"m"}') == []
    assert core.server_error.code == "NEW_CODE"


def test_a_broadcast_in_flight_is_interrupted_by_a_lost_connection():
    core = ClientCore()
    core.connected()
    core.add_channel("broadcast:chat")
    ref, outputs = core.broadcast("broadcast:chat", {"m": 1})
    assert len(sent(outputs)) == 1
    (resolve,) = core.disconnected()
    assert resolve.key == ("broadcast", ref) and "may or may not have been delivered" in resolve.interrupted
    with pytest.raises(TypeError):
        core.broadcast("broadcast:chat", {1j})
    core.add_channel("table:public.users")
    with pytest.raises(ValueError, match="broadcast:\\{topic\\}"):
        core.broadcast("table:public.users", 1)


def test_heartbeat_pings_and_aborts_a_connection_that_went_silent():
    core = ClientCore()
    assert core.heartbeat() == []
    core.connected()
    assert sent(core.heartbeat()) == [Ping()]
    core.receive(encode(Pong()))
    assert sent(core.heartbeat()) == [Ping()]
    (abort,) = core.heartbeat()
    assert "nothing received" in abort.reason


def test_a_refused_token_leaves_the_previous_one_in_use():
    core = ClientCore(token="a")
    core.connected()
    ref, outputs = core.set_auth("b")
    assert sent(outputs) == [Auth("b", ref=ref)]
    refusal = Error(ErrorCode.UNAUTHORIZED, "Invalid or expired token", ref=ref)
    assert core.receive(encode(refusal)) == [Resolve(("auth", ref), error=refusal)]
    assert core.token == "a"
    ref, outputs = core.set_auth("c")
    core.receive(encode(Ack("authorized", ref=ref)))
    assert (core.token, core.presented) == ("c", "c")


def test_unsubscribe_interrupts_a_pending_subscribe_and_is_acked():
    core = ClientCore()
    core.connected()
    core.add_channel("broadcast:chat")
    core.subscribe("broadcast:chat")
    outputs = core.unsubscribe("broadcast:chat")
    assert StatusChanged("broadcast:chat", ChannelStatus.CLOSED) in outputs
    assert any(o.key == ("subscribe", "broadcast:chat") and o.interrupted for o in outputs if isinstance(o, Resolve))
    (message,) = sent(outputs)
    assert message == Unsubscribe("broadcast:chat", ref=message.ref)


# ---- resume (docs/protocol.md "Resume") ----------------------------------------------------------------------------


def row(id: str | None) -> dict[str, Any]:
    """A table change's payload, with `id` as its position (None: an event without one)."""
    payload = {"type": "INSERT", "schema": "public", "table": "users", "record": {"n": id}}
    return payload if id is None else {**payload, "id": id}


def resubscribe(core: ClientCore, name: str) -> Subscribe:
    """Lose the connection and open the next one; returns the subscribe it sends for `name`."""
    core.disconnected()
    return next(message for message in sent(core.connected()) if message.channel == name)


def acked(core: ClientCore, message: Subscribe, recovered: bool | None = None) -> StatusChanged:
    """The status change the ack of `message` makes (with `recovered`, or without the field when None)."""
    return next(
        output
        for output in core.receive(encode(Ack("subscribed", message.channel, message.ref, recovered=recovered)))
        if isinstance(output, StatusChanged)
    )


def test_each_channel_keeps_the_id_of_the_last_event_it_delivered():
    core = ClientCore()
    subscribed(core, "table:public.users")
    subscribed(core, "broadcast:chat")
    subscribed(core, "presence:lobby")
    for id in ("t1", "t2", None):
        core.receive(encode(WireBroadcast("table:public.users", row(id))))
    core.receive(encode(WireBroadcast("broadcast:chat", {"m": 1}, id="b1")))
    (deliver,) = core.receive(encode(WireBroadcast("broadcast:chat", {"m": 2})))
    assert deliver == Deliver("broadcast:chat", BroadcastEvent("broadcast:chat", {"m": 2}))
    core.receive(encode(PresenceEvent("presence:lobby", "sync", {})))
    positions = {name: channel.position for name, channel in core.channels.items()}
    # An event without an id keeps the last one; presence has no positions.
    assert positions == {"table:public.users": "t2", "broadcast:chat": "b1", "presence:lobby": None}


def test_since_goes_only_with_a_resubscribe_after_a_lost_connection():
    core = ClientCore()
    subscribed(core, "table:public.users")
    core.receive(encode(WireBroadcast("table:public.users", row("7"))))
    # Subscribing again on the live connection would replay what was delivered: no since.
    (again,) = sent(core.subscribe("table:public.users"))
    assert again.since is None
    assert core.receive(encode(Ack("subscribed", again.channel, again.ref))) == [Resolve(("subscribe", again.channel))]
    message = resubscribe(core, "table:public.users")
    assert message == Subscribe("table:public.users", ref=message.ref, since="7")
    assert acked(core, message, recovered=True) == StatusChanged(
        "table:public.users", SUBSCRIBED, resumed=True, recovered=True
    )
    assert core.channels["table:public.users"].position == "7"


def test_recovered_false_or_missing_is_not_recovered_and_forgets_the_position():
    for answer in (False, None):
        core = ClientCore()
        subscribed(core, "broadcast:chat")
        core.receive(encode(WireBroadcast("broadcast:chat", 1, id="9")))
        message = resubscribe(core, "broadcast:chat")
        assert message.since == "9"
        assert acked(core, message, recovered=answer) == StatusChanged(
            "broadcast:chat", SUBSCRIBED, resumed=True, recovered=False
        )
        assert core.channels["broadcast:chat"].position is None
        assert resubscribe(core, "broadcast:chat").since is None


def test_a_resubscribe_without_a_stored_id_sends_no_since_and_did_not_recover():
    core = ClientCore()
    subscribed(core, "broadcast:chat")
    message = resubscribe(core, "broadcast:chat")
    assert message.since is None
    # Even if a server said otherwise: nothing was asked for.
    assert acked(core, message, recovered=True).recovered is False


def test_the_position_survives_several_reconnects_and_moves_on_with_later_events():
    core = ClientCore()
    subscribed(core, "table:public.users")
    core.receive(encode(WireBroadcast("table:public.users", row("3"))))
    assert resubscribe(core, "table:public.users").since == "3"
    lost = resubscribe(core, "table:public.users")  # the previous one was never acked
    assert lost.since == "3"
    assert acked(core, lost, recovered=True).recovered is True
    third = resubscribe(core, "table:public.users")
    assert third.since == "3"
    acked(core, third, recovered=True)
    core.receive(encode(WireBroadcast("table:public.users", row("4"))))
    assert resubscribe(core, "table:public.users").since == "4"


def test_a_token_change_keeps_the_position():
    core = ClientCore(token="a")
    subscribed(core, "table:public.users")
    core.receive(encode(WireBroadcast("table:public.users", row("5"))))
    ref, _ = core.set_auth("b")
    core.receive(encode(Ack("authorized", ref=ref)))
    assert resubscribe(core, "table:public.users").since == "5"
    # Closed with 4001, then a new token before the next connection.
    core.set_auth("c")
    assert resubscribe(core, "table:public.users").since == "5"


def test_an_explicit_since_goes_with_the_first_subscribe_and_is_checked():
    core = ClientCore()
    core.add_channel("broadcast:chat")
    assert core.subscribe("broadcast:chat", since="kept") == [StatusChanged("broadcast:chat", SUBSCRIBING)]
    (message,) = sent(core.connected())
    assert message.since == "kept"
    assert acked(core, message, recovered=True) == StatusChanged(
        "broadcast:chat", SUBSCRIBED, resumed=True, recovered=True
    )
    core.add_channel("presence:lobby")
    with pytest.raises(ValueError, match="presence has no history"):
        core.subscribe("presence:lobby", since="1")
    with pytest.raises(TypeError, match="since must be a string"):
        core.subscribe("broadcast:chat", since=5)  # type: ignore[arg-type]


def test_the_position_is_forgotten_when_the_subscription_ends():
    core = ClientCore()
    subscribed(core, "table:public.users")
    core.receive(encode(WireBroadcast("table:public.users", row("1"))))
    core.unsubscribe("table:public.users")
    assert core.channels["table:public.users"].position is None
    (fresh,) = sent(core.subscribe("table:public.users"))
    assert fresh.since is None, "a new subscription starts afresh"
    acked(core, fresh)
    core.receive(encode(WireBroadcast("table:public.users", row("2"))))
    missed = Error(ErrorCode.CHANGES_MISSED, "refetch", channel="table:public.users")
    core.receive(encode(missed))
    assert core.channels["table:public.users"].position == "2", "CHANGES_MISSED keeps the subscription"
    core.receive(encode(Error(ErrorCode.FORBIDDEN, "no", channel="table:public.users")))
    assert core.channels["table:public.users"].position is None


async def test_a_reconnected_client_resumes_each_channel_and_tells_streams_and_callbacks(nursery):
    # A scripted server: connection 0 sends events; later ones resume the table channel (recovered, and one event
    # replayed) and answer the broadcast channel as a server without resume does.
    connections: list[Any] = []
    subscribes: list[list[Subscribe]] = []

    async def script(request: WebSocketRequest) -> None:
        ws = await request.accept()
        index = len(connections)
        connections.append(ws)
        subscribes.append([])
        try:
            while True:
                message = decode(await ws.get_message())
                if isinstance(message, Auth):
                    await ws.send_message(encode(Ack("authorized", ref=message.ref)).decode())
                if not isinstance(message, Subscribe):
                    continue
                subscribes[index].append(message)
                table = message.channel == "table:public.users"
                recovered = True if table and message.since is not None else None
                await ws.send_message(encode(Ack("subscribed", message.channel, message.ref, recovered)).decode())
                events = {
                    (0, True): [WireBroadcast(message.channel, row("t1")), WireBroadcast(message.channel, row("t2"))],
                    (0, False): [WireBroadcast(message.channel, {"m": 1}, id="b1")],
                    (1, True): [WireBroadcast(message.channel, row("t3"))],
                }
                for event in events.get((index, table), []):
                    await ws.send_message(encode(event).decode())
        except ConnectionClosed:
            pass

    server = await nursery.start(functools.partial(serve_websocket, script, "127.0.0.1", 0, ssl_context=None))
    address = f"ws://127.0.0.1:{server.port}/realtime"
    async with open_client(address, token="first", backoff=fast()) as client:
        users, chat = client.channel("table:public.users"), client.channel("broadcast:chat")
        told: list[Resubscribed] = []
        chat.on("resubscribed", told.append)
        with users.events() as changes, chat.events() as news, trio.fail_after(5):
            await users.subscribe()
            await chat.subscribe()
            assert [(await changes.__anext__()).id for _ in range(2)] == ["t1", "t2"]
            assert (await news.__anext__()).id == "b1"
            assert (users.position, chat.position) == ("t2", "b1")

            await connections[0].aclose(1001)
            assert await changes.__anext__() == Resubscribed(recovered=True)
            assert (await changes.__anext__()).id == "t3"
            assert await news.__anext__() == Resubscribed(recovered=False)
            assert told == [Resubscribed(recovered=False)]
            assert {m.channel: m.since for m in subscribes[1]} == {"table:public.users": "t2", "broadcast:chat": "b1"}
            assert (users.position, chat.position) == ("t3", None)

            await client.set_auth("second")
            await connections[1].aclose(1001)
            assert await changes.__anext__() == Resubscribed(recovered=True)
            await until(lambda: len(subscribes) == 3 and len(subscribes[2]) == 2)
            assert {m.channel: m.since for m in subscribes[2]} == {"table:public.users": "t3", "broadcast:chat": None}


def test_channel_names_and_options_are_checked_locally():
    core = ClientCore()
    with pytest.raises(ValueError, match=r"expected table:\{schema\}.\{table\}"):
        core.add_channel("table:users")
    with pytest.raises(ValueError, match="table: channels only"):
        core.add_channel("broadcast:x", filter="id=eq.1")
    core.add_channel("table:public.users", event="INSERT")
    with pytest.raises(ValueError, match="already open with event='INSERT'"):
        core.add_channel("table:public.users")


# ---- listeners and streams ---------------------------------------------------------------------------------------


def test_listeners_match_by_kind_of_event():
    listeners = Listeners("table:public.users", ChannelKind.TABLE)
    calls: list[str] = []
    listeners.add("INSERT", lambda _: calls.append("insert"))
    listeners.add("*", lambda _: calls.append("any"))
    listeners.add("error", lambda _: calls.append("error"))
    for callback in listeners.matching(Change("INSERT", "public", "users", {"id": 1})):
        callback(None)
    for callback in listeners.matching(Change("DELETE", "public", "users", old_record={"id": 1})):
        callback(None)
    for callback in listeners.matching(Error(ErrorCode.CHANGES_MISSED, "m")):
        callback(None)
    assert calls == ["insert", "any", "any", "error"]
    with pytest.raises(ValueError, match="offers INSERT, UPDATE, DELETE, TRUNCATE, \\*, error, status"):
        listeners.add("broadcast", print)

    async def coroutine(_: Any) -> None: ...

    with pytest.raises(TypeError, match=r"channel\.events\(\)"):
        listeners.add("INSERT", coroutine)


def test_presence_listeners_narrow_by_event():
    listeners = Listeners("presence:lobby", ChannelKind.PRESENCE)
    join, every = object(), object()
    listeners.add("presence", join, event="join")  # type: ignore[arg-type]
    listeners.add("presence", every)  # type: ignore[arg-type]
    assert listeners.matching(PresenceUpdate("join", "a", [], {})) == [join, every]
    assert listeners.matching(PresenceUpdate("leave", "a", [], {})) == [every]
    with pytest.raises(ValueError, match="sync, join, leave"):
        listeners.add("presence", print, event="diff")


async def test_a_stream_drops_beyond_its_buffer_and_says_how_many():
    client = Client("ws://127.0.0.1:9/realtime")
    stream = client.channel("broadcast:x").events(max_buffer=2)
    for i in range(5):
        stream.push(BroadcastEvent("broadcast:x", i))
    got = [await stream.__anext__(), await stream.__anext__()]
    stream.push(BroadcastEvent("broadcast:x", 5))
    got += [await stream.__anext__(), await stream.__anext__()]
    assert got == [
        BroadcastEvent("broadcast:x", 0),
        BroadcastEvent("broadcast:x", 1),
        EventsDropped(3),
        BroadcastEvent("broadcast:x", 5),
    ]
    # Drops at the very end are reported before the stream ends, and then the reason it ended.
    for i in range(6, 9):
        stream.push(BroadcastEvent("broadcast:x", i))
    stream.end(ServerError(Error(ErrorCode.FORBIDDEN, "no", channel="broadcast:x")))
    rest = []
    with pytest.raises(ServerError, match="FORBIDDEN"):
        async for event in stream:
            rest.append(event)
    assert rest == [BroadcastEvent("broadcast:x", 6), BroadcastEvent("broadcast:x", 7), EventsDropped(1)]


def test_urls_of_other_forms_are_refused():
    with pytest.raises(ValueError, match="ws://localhost:8080/realtime"):
        Client("ftp://example.com/realtime")


# ---- against a real server ---------------------------------------------------------------------------------------


async def test_subscribe_returns_after_the_ack_and_unsubscribe_ends_it(start_server):
    server = await start_server()
    async with open_client(url(server)) as client:
        channel = client.channel("broadcast:news")
        statuses: list[ChannelStatus] = []
        channel.on("status", statuses.append)
        with trio.fail_after(5):
            assert await channel.subscribe() is channel
        assert channel.status is SUBSCRIBED and client.state is ConnectionState.OPEN
        assert server.hub.statistics().subscriptions["broadcast"] == 1
        with channel.events() as events:
            await channel.unsubscribe()
            assert [event async for event in events] == []
        assert server.hub.statistics().subscriptions["broadcast"] == 0
        assert statuses == [SUBSCRIBING, SUBSCRIBED, ChannelStatus.CLOSED]


async def test_a_refused_subscribe_raises_the_servers_code_and_message(start_server, db):
    server = await start(start_server, db)
    async with open_client(url(server)) as client:
        channel = client.channel("table:public.missing")
        errors: list[Error] = []
        channel.on("error", errors.append)
        with channel.events() as events:
            with pytest.raises(ServerError) as info, trio.fail_after(5):
                await channel.subscribe()
            assert info.value.code == "SUBSCRIPTION_FAILED" and info.value.channel == "table:public.missing"
            assert "does not exist" in str(info.value)
            assert channel.status is ChannelStatus.CHANNEL_ERROR and channel.error == info.value.error
            assert errors == [info.value.error]
            with pytest.raises(ServerError, match="does not exist"):
                await events.__anext__()


async def test_table_changes_reach_callbacks_and_streams(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with open_client(f"http://127.0.0.1:{server.port}") as client:
        seen: list[tuple[str, Any]] = []
        users = (
            client.channel("table:public.users")
            .on("INSERT", lambda c: seen.append(("New user:", c.record["name"])))
            .on("UPDATE", lambda c: seen.append(("Updated:", (c.old_record["name"], c.record["name"]))))
            .on("DELETE", lambda c: seen.append(("Deleted:", c.old_record["name"])))
            .on("*", lambda c: seen.append(("*", c.type)))
        )
        with users.events() as changes:
            with trio.fail_after(5):
                await users.subscribe()
            await db.execute("INSERT INTO users VALUES (123, 'John Doe', 'john@example.com')")
            await db.execute("UPDATE users SET name = 'John' WHERE id = 123")
            await db.execute("DELETE FROM users WHERE id = 123")
            await db.execute("TRUNCATE users")
            with trio.fail_after(5):
                got = [await changes.__anext__() for _ in range(4)]
    assert [c.type for c in got] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    insert = got[0]
    assert (insert.schema, insert.table, insert.old_record) == ("public", "users", None)
    assert insert.record == {"id": 123, "name": "John Doe", "email": "john@example.com"}
    assert insert.id.startswith("t1~") and insert.timestamp.endswith("Z")
    assert got[3].record is None and got[3].old_record is None
    assert seen == [
        ("New user:", "John Doe"),
        ("*", "INSERT"),
        ("Updated:", ("John Doe", "John")),
        ("*", "UPDATE"),
        ("Deleted:", "John"),
        ("*", "DELETE"),
        ("*", "TRUNCATE"),
    ]


async def test_event_and_filter_narrow_a_table_channel(start_server, db):
    users_table(db)
    server = await start(start_server, db)
    async with open_client(url(server)) as client:
        deletes = client.channel("table:public.users", event="DELETE", filter="name=eq.gone")
        with deletes.events() as events:
            with trio.fail_after(5):
                await deletes.subscribe()
            await db.execute("INSERT INTO users VALUES (1, 'gone', null), (2, 'kept', null)")
            await db.execute("DELETE FROM users")
            with trio.fail_after(5):
                change = await events.__anext__()
            assert (change.type, change.old_record["id"]) == ("DELETE", 1)
            with trio.move_on_after(0.3):
                raise AssertionError(f"expected nothing more, got {await events.__anext__()}")


async def test_broadcast_between_two_clients(start_server):
    server = await start_server()
    async with open_client(url(server)) as a, open_client(url(server)) as b, open_client(url(server)) as c:
        got_a: list[BroadcastEvent] = []
        chat_a = a.channel("broadcast:chat").on("broadcast", got_a.append)
        chat_b = b.channel("broadcast:chat")
        with chat_b.events() as events, trio.fail_after(5):
            await chat_a.subscribe()
            await chat_b.subscribe()
            message = {"message": "Hello World", "user": "john"}
            await chat_a.send(message)
            # ANY: the message's position (its id), for resume.
            assert await events.__anext__() == BroadcastEvent("broadcast:chat", message, ANY)
            # The sender need not be subscribed.
            await c.channel("broadcast:chat").send([1, None])
            assert await events.__anext__() == BroadcastEvent("broadcast:chat", [1, None], ANY)
            assert got_a == [BroadcastEvent("broadcast:chat", [1, None], ANY)]
        with pytest.raises(ValueError, match="broadcast:\\{topic\\}"):
            await a.channel("presence:room").send(1)


async def test_presence_sync_join_and_leave(start_server):
    server = await start_server()
    async with (
        open_client(url(server), token=token("alice")) as alice,
        open_client(url(server), token=token("bob")) as bob,
    ):
        lobby_a = alice.channel("presence:lobby")
        with pytest.raises(ValueError, match="subscribe to presence:lobby before tracking"):
            await lobby_a.track({"status": "online"})
        with trio.fail_after(5):
            await lobby_a.subscribe()
            await lobby_a.track({"status": "online"})
        lobby_b = bob.channel("presence:lobby")
        syncs: list[PresenceUpdate] = []
        joins: list[PresenceUpdate] = []
        leaves: list[PresenceUpdate] = []
        lobby_b.on("presence", syncs.append, event="sync").on("presence", joins.append, event="join")
        lobby_b.on("presence", leaves.append, event="leave")
        with trio.fail_after(5):
            await lobby_b.subscribe()
            await until(lambda: bool(syncs))
        assert [meta["state"] for meta in syncs[0].state["alice"]] == [{"status": "online"}]
        with trio.fail_after(5):
            await lobby_b.track({"status": "here"})
            await until(lambda: any(update.key == "bob" for update in joins))
            await lobby_a.track({"status": "away"})
            await until(lambda: lobby_b.presence_state()["alice"][0]["state"] == {"status": "away"})
        assert len(lobby_b.presence_state()["alice"]) == 1
        assert [update.key for update in leaves] == ["alice"]
        with trio.fail_after(5):
            await lobby_a.untrack()
            await until(lambda: "alice" not in lobby_b.presence_state() and "alice" not in lobby_a.presence_state())
        assert [update.key for update in leaves] == ["alice", "alice"]
        assert set(lobby_b.presence_state()) == {"bob"}
        assert lobby_a.presence_state() == lobby_b.presence_state()


async def test_set_auth_refreshes_the_token_in_place_and_a_bad_one_is_refused(start_server):
    server = await start_server(auth={"leeway": 0.001})
    async with open_client(url(server), token=token("alice", ttl=1)) as client:
        channel = client.channel("broadcast:x")
        with trio.fail_after(5):
            await channel.subscribe()
            await client.set_auth(token("alice", ttl=3600))
            with pytest.raises(ServerError, match="UNAUTHORIZED"):
                await client.set_auth("garbage")
        # Past the first token's expiry: the connection lives on the refreshed one.
        await trio.sleep(1.5)
        assert client.state is ConnectionState.OPEN and client.last_close is None
        assert server.counters.closes[4001] == 0
        with trio.fail_after(5):
            await channel.subscribe()


async def test_forbidden_after_a_token_change_reaches_the_channel(start_server, db):
    db.sql(
        "CREATE ROLE fluxrt_test_client_reader NOLOGIN;"
        "CREATE TABLE ledger (id int PRIMARY KEY); GRANT SELECT ON ledger TO authenticated;"
        "SELECT enable_realtime('ledger');"
    )
    try:
        server = await start(start_server, db, auth={"roles": ("fluxrt_test_client_reader",)})
        async with open_client(url(server), token=token("erin")) as client:
            ledger = client.channel("table:public.ledger")
            errors: list[Error] = []
            ledger.on("error", errors.append)
            with ledger.events() as events, trio.fail_after(5):
                await ledger.subscribe()
                await client.set_auth(token("erin", role="fluxrt_test_client_reader"))
                with pytest.raises(ServerError) as info:
                    await events.__anext__()
            assert info.value.code == "FORBIDDEN" and "no longer allowed" in str(info.value)
            assert ledger.status is ChannelStatus.CHANNEL_ERROR and errors == [info.value.error]
    finally:
        db.sql("DROP ROLE IF EXISTS fluxrt_test_client_reader")


async def test_changes_missed_reaches_the_channel_and_the_stream_goes_on(start_server, db):
    db.sql(
        "CREATE TABLE fragile (id int PRIMARY KEY, owner text);"
        "ALTER TABLE fragile ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY p ON fragile FOR SELECT USING ("
        "  CASE WHEN auth.jwt() ->> 'sub' = 'breaker' AND owner = 'x' THEN length(owner) / 0 = 1 ELSE true END);"
        "GRANT SELECT ON fragile TO authenticated; SELECT enable_realtime('fragile');"
    )
    server = await start(start_server, db)
    async with open_client(url(server), token=token("breaker")) as client:
        fragile = client.channel("table:public.fragile")
        with fragile.events() as events, trio.fail_after(5):
            await fragile.subscribe()
            await db.execute("INSERT INTO fragile VALUES (1, 'x')")
            missed = await events.__anext__()
            assert isinstance(missed, Error) and missed.code == ErrorCode.CHANGES_MISSED
            await db.execute("INSERT INTO fragile VALUES (2, 'y')")
            change = await events.__anext__()
        assert change.record == {"id": 2, "owner": "y"}
        assert fragile.status is SUBSCRIBED


async def test_reconnect_after_a_restart_restores_subscriptions_and_presence(start_server, db):
    users_table(db)
    first = await start(start_server, db)
    backoff = fast()
    async with (
        open_client(url(first), token=token("alice"), backoff=backoff) as alice,
        open_client(url(first), token=token("bob"), backoff=fast()) as bob,
    ):
        users = alice.channel("table:public.users")
        lobby_a, lobby_b = alice.channel("presence:lobby"), bob.channel("presence:lobby")
        chat_b = bob.channel("broadcast:chat")
        updates: list[PresenceUpdate] = []
        lobby_b.on("presence", updates.append)
        with users.events() as changes, chat_b.events() as chat:
            with trio.fail_after(5):
                for channel in (users, lobby_a, lobby_b, chat_b):
                    await channel.subscribe()
                await lobby_a.track({"status": "online"})
                await until(lambda: "alice" in lobby_b.presence_state())

            # As if earlier outages had grown it: a connection the server served starts the backoff over.
            backoff.attempts = 50
            await first.shutdown()
            assert alice.last_close is None or alice.last_close.code == 1001
            updates.clear()
            second = await start(start_server, db, server={"port": first.port})

            with trio.fail_after(10):
                assert await changes.__anext__() == Resubscribed()
                assert await chat.__anext__() == Resubscribed()
                await until(lambda: lobby_b.status is SUBSCRIBED and "alice" in lobby_b.presence_state())
            assert alice.last_close.code == 1001 and bob.last_close.code == 1001
            assert 1 <= backoff.attempts < 50
            assert lobby_b.presence_state()["alice"][0]["state"] == {"status": "online"}
            assert updates[0].event == "sync"
            stats = second.hub.statistics()
            assert (stats.subscriptions["table"], stats.subscriptions["presence"]) == (1, 2)
            assert stats.subscriptions["broadcast"] == 1
            with trio.fail_after(5):
                await db.execute("INSERT INTO users VALUES (7, 'after', null)")
                assert (await changes.__anext__()).record["name"] == "after"
                await alice.channel("broadcast:chat").send("back")
                assert await chat.__anext__() == BroadcastEvent("broadcast:chat", "back", ANY)


async def test_no_reconnect_after_4001_until_a_new_token(start_server):
    server = await start_server()
    backoff = Backoff(base=0.01, cap=0.01)
    async with open_client(url(server), token="not-a-token", backoff=backoff) as client:
        channel = client.channel("broadcast:x")
        with pytest.raises(ClientClosed) as info, trio.fail_after(5):
            await channel.subscribe()
        assert info.value.close.code == 4001 and info.value.close.error.code == "UNAUTHORIZED"
        assert "call set_auth() with a new token" in str(info.value)
        # Many backoff periods later: still one attempt.
        await trio.sleep(0.3)
        assert server.counters.closes[4001] == 1 and client.state is ConnectionState.CLOSED
        with pytest.raises(ClientClosed):
            await channel.send("while stopped")
        with pytest.raises(ClientClosed):
            await client.set_auth("not-a-token")
        await client.set_auth(token("alice"))
        with trio.fail_after(5):
            await until(lambda: channel.status is SUBSCRIBED)
        assert server.counters.closes[4001] == 1


async def test_a_silent_server_is_dropped_after_a_heartbeat_and_reconnected(nursery):
    accepted: list[WebSocketRequest] = []

    async def never_answers(request: WebSocketRequest) -> None:
        ws = await request.accept()
        accepted.append(request)
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            pass

    server = await nursery.start(functools.partial(serve_websocket, never_answers, "127.0.0.1", 0, ssl_context=None))
    address = f"ws://127.0.0.1:{server.port}/realtime"
    async with open_client(address, heartbeat_interval=0.1, backoff=fast()) as client:
        await until(lambda: len(accepted) >= 2)
        assert client.last_close.code == 1006 and "nothing received" in client.last_close.reason


async def test_a_live_server_answers_the_heartbeat(start_server):
    server = await start_server()
    async with open_client(url(server), heartbeat_interval=0.05) as client:
        states: list[ConnectionState] = []
        await until(lambda: client.state is ConnectionState.OPEN)
        client.on_state(states.append)
        await trio.sleep(0.5)
        assert states == [] and server.counters.messages_in >= 5


async def test_closing_the_client_closes_its_connection_and_ends_its_streams(start_server):
    server = await start_server()
    async with open_client(url(server), close_timeout=3) as client:
        channel = client.channel("broadcast:x")
        stream = channel.events()
        with trio.fail_after(5):
            await channel.subscribe()
        assert len(server.connections) == 1
        closing = trio.current_time()
    # The server answered the close: nothing waited for close_timeout.
    assert trio.current_time() - closing < 1.0
    assert [event async for event in stream] == []
    assert client.state is ConnectionState.CLOSED
    await until(lambda: not server.connections)
    with pytest.raises(ClientClosed):
        await channel.subscribe()


async def test_an_exception_in_a_callback_propagates_out_of_open_client(start_server):
    server = await start_server()

    def explode(_: BroadcastEvent) -> None:
        raise RuntimeError("callback failed")

    async with open_client(url(server)) as sender:
        with pytest.raises(RuntimeError, match="callback failed"):
            async with open_client(url(server)) as client:
                with trio.fail_after(5):
                    await client.channel("broadcast:x").on("broadcast", explode).subscribe()
                    await sender.channel("broadcast:x").send(1)
                    await trio.sleep_forever()


async def test_a_subscribe_waits_for_a_connection_and_an_unsubscribe_interrupts_it():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there: the client keeps trying, so the subscribe can only wait.
    async with open_client(f"ws://127.0.0.1:{port}/realtime", backoff=fast()) as client:
        channel = client.channel("broadcast:x")
        outcome: list[BaseException] = []

        async def subscribe() -> None:
            try:
                await channel.subscribe()
            except RequestInterrupted as exc:
                outcome.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscribe)
                await until(lambda: channel.status is SUBSCRIBING)
                await trio.sleep(0.3)
                assert client.last_close.code == 1006 and "could not connect" in client.last_close.reason
                # Misuse is refused at once, not after a connection that may never come.
                with pytest.raises(ValueError, match="broadcast:\\{topic\\}"):
                    await client.channel("presence:room").send(1)
                await channel.unsubscribe()
        assert len(outcome) == 1 and "unsubscribed from broadcast:x first" in str(outcome[0])
