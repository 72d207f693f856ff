"""decode and encode against docs/protocol.md's client and server message tables."""

from __future__ import annotations

import orjson
import pytest

from fluxrt_trio.protocol.messages import (
    MAX_REF_LENGTH,
    Ack,
    Auth,
    Broadcast,
    BroadcastEvent,
    CloseCode,
    DecodeError,
    Error,
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


def js(value: object) -> str:
    return orjson.dumps(value).decode()


def decode_error(value: object | str) -> DecodeError:
    text = value if isinstance(value, str) else js(value)
    with pytest.raises(DecodeError) as info:
        decode(text)
    return info.value


# ---- decode: every client type -------------------------------------------------------------------------------


def test_subscribe_from_the_reference():
    assert decode('{\n  "type": "subscribe",\n  "channel": "table:public.users"\n}') == Subscribe(
        "table:public.users", event="*", filter=None, ref=None
    )


def test_subscribe_with_extensions():
    message = decode(
        js(
            {
                "type": "subscribe",
                "channel": "table:public.todos",
                "event": "UPDATE",
                "filter": "user_id=eq.42",
                "ref": "1",
            }
        )
    )
    assert message == Subscribe("table:public.todos", event="UPDATE", filter="user_id=eq.42", ref="1")


def test_unsubscribe():
    assert decode(js({"type": "unsubscribe", "channel": "table:public.users"})) == Unsubscribe("table:public.users")
    assert decode(js({"type": "unsubscribe", "channel": "broadcast:x", "ref": "u"})) == Unsubscribe("broadcast:x", "u")


def test_broadcast_from_the_reference():
    text = js({"type": "broadcast", "channel": "broadcast:chat", "payload": {"message": "Hello World", "user": "john"}})
    assert decode(text) == Broadcast("broadcast:chat", {"message": "Hello World", "user": "john"})


@pytest.mark.parametrize("payload", [None, 0, 1.5, "text", True, [], [1, "a", None], {}, {"nested": {"a": [1, 2]}}])
def test_broadcast_payload_is_any_json_value(payload):
    message = decode(js({"type": "broadcast", "channel": "broadcast:chat", "payload": payload}))
    assert isinstance(message, Broadcast)
    assert message.payload == payload
    assert type(message.payload) is type(payload)


def test_presence_track_and_untrack():
    track = decode(
        js({"type": "presence", "channel": "presence:room", "event": "track", "payload": {"status": "online"}})
    )
    assert track == Presence("presence:room", "track", {"status": "online"})
    untrack = decode(js({"type": "presence", "channel": "presence:room", "event": "untrack", "ref": "r"}))
    assert untrack == Presence("presence:room", "untrack", None, "r")


def test_ping_from_the_reference():
    assert decode('{\n  "type": "ping"\n}') == Ping()
    assert decode(js({"type": "ping", "ref": "p1"})) == Ping("p1")


def test_auth():
    assert decode(js({"type": "auth", "token": "a.b.c", "ref": "x"})) == Auth("a.b.c", "x")


def test_decode_accepts_bytes():
    assert decode(b'{"type":"ping","ref":"b"}') == Ping("b")


def test_extra_fields_are_ignored():
    message = decode(
        js({"type": "subscribe", "channel": "table:public.users", "config": {"x": 1}, "id": 7, "private": True})
    )
    assert message == Subscribe("table:public.users")
    assert decode(js({"type": "ping", "payload": [1, 2]})) == Ping()


def test_null_filter_means_no_filter():
    assert decode(js({"type": "subscribe", "channel": "table:a.b", "filter": None})).filter is None


# ---- ref -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["", "1", "a" * MAX_REF_LENGTH, "é" * 64, "ref with spaces"])
def test_ref_of_at_most_64_characters_is_kept(ref):
    assert MAX_REF_LENGTH == 64
    assert decode(js({"type": "ping", "ref": ref})) == Ping(ref)
    assert decode(js({"type": "unsubscribe", "channel": "broadcast:x", "ref": ref})).ref == ref


def test_ref_of_65_characters_is_an_error():
    exc = decode_error({"type": "ping", "ref": "a" * 65})
    assert "ref" in str(exc)
    assert "64" in str(exc)
    assert exc.ref is None  # an invalid ref is never echoed


@pytest.mark.parametrize("ref", [1, 1.5, True, False, ["r"], {"r": 1}])
def test_non_string_ref_is_an_error(ref):
    exc = decode_error({"type": "ping", "ref": ref})
    assert "ref must be a string" in str(exc)
    assert exc.ref is None


def test_ref_is_kept_on_errors_after_it_was_read():
    assert decode_error({"type": "subscribe", "ref": "r1"}).ref == "r1"
    assert decode_error({"type": "subscribe", "channel": 5, "ref": "r2"}).ref == "r2"
    assert decode_error({"type": "nonsense", "ref": "r3"}).ref == "r3"
    assert decode_error({"ref": "r4"}).ref == "r4"


# ---- strictness ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "field", "got"),
    [
        ({"type": "subscribe", "channel": 5}, "channel", "a number"),
        ({"type": "subscribe", "channel": 1.5}, "channel", "a number"),
        ({"type": "subscribe", "channel": True}, "channel", "a boolean"),
        ({"type": "subscribe", "channel": None}, "channel", "null"),
        ({"type": "subscribe", "channel": ["table:a.b"]}, "channel", "an array"),
        ({"type": "subscribe", "channel": {"name": "table:a.b"}}, "channel", "an object"),
        ({"type": "subscribe", "channel": "table:a.b", "event": 1}, "event", "a number"),
        ({"type": "subscribe", "channel": "table:a.b", "filter": 42}, "filter", "a number"),
        ({"type": "unsubscribe", "channel": 42}, "channel", "a number"),
        ({"type": "broadcast", "channel": 42, "payload": {}}, "channel", "a number"),
        ({"type": "presence", "channel": "presence:r", "event": 1}, "event", "a number"),
        ({"type": "presence", "channel": False, "event": "track"}, "channel", "a boolean"),
        ({"type": "auth", "token": 12345}, "token", "a number"),
        ({"type": "auth", "token": None}, "token", "null"),
    ],
)
def test_mistyped_fields_are_errors_never_coerced(message, field, got):
    exc = decode_error(message)
    text = str(exc)
    assert text.startswith(f"{message['type']}: ")
    assert f"field {field!r}" in text
    assert f"expected a string, got {got}" in text


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "subscribe"}, "channel"),
        ({"type": "unsubscribe"}, "channel"),
        ({"type": "broadcast", "payload": {}}, "channel"),
        ({"type": "broadcast", "channel": "broadcast:x"}, "payload"),
        ({"type": "presence", "channel": "presence:r"}, "event"),
        ({"type": "presence", "event": "track", "payload": {}}, "channel"),
        ({"type": "auth"}, "token"),
    ],
)
def test_missing_field_is_named(message, field):
    assert str(decode_error(message)) == f"{message['type']}: missing field {field!r}"


def test_broadcast_payload_null_is_present_not_missing():
    assert decode(js({"type": "broadcast", "channel": "broadcast:x", "payload": None})).payload is None


@pytest.mark.parametrize("text", ["", "nope", "{", '{"type":"ping"', "{'type':'ping'}", '{"type":"ping"}}', "NaN"])
def test_invalid_json(text):
    assert str(decode_error(text)).startswith("message is not valid JSON")


def test_invalid_utf8_is_invalid_json():
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode(b'{"type":"ping","ref":"\xff"}')


@pytest.mark.parametrize(
    ("value", "got"),
    [([], "an array"), ([{"type": "ping"}], "an array"), ("ping", "a string"), (1, "a number"), (None, "null")],
)
def test_non_object(value, got):
    assert str(decode_error(js(value))) == f"message must be a JSON object, got {got}"


def test_missing_type():
    exc = decode_error({"channel": "table:a.b"})
    assert "no type" in str(exc)
    for known in ("subscribe", "unsubscribe", "broadcast", "presence", "ping", "auth"):
        assert known in str(exc)


@pytest.mark.parametrize("kind", ["hello", "Subscribe", "PING", "ack", "pong", "error", 5, True, ["ping"]])
def test_unknown_type(kind):
    exc = decode_error({"type": kind, "channel": "table:a.b"})
    assert "unknown message type" in str(exc)
    assert "expected one of subscribe, unsubscribe, broadcast, presence, ping, auth" in str(exc)


def test_decode_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode("[]")


# ---- encode --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (
            Ack("subscribed", "table:public.users"),
            b'{"type":"ack","channel":"table:public.users","status":"subscribed"}',
        ),
        (Ack("unsubscribed", "broadcast:x"), b'{"type":"ack","channel":"broadcast:x","status":"unsubscribed"}'),
        (Ack("sent", "broadcast:x", "r1"), b'{"type":"ack","channel":"broadcast:x","status":"sent","ref":"r1"}'),
        (Ack("authorized"), b'{"type":"ack","status":"authorized"}'),
        (Ack("authorized", ref="a"), b'{"type":"ack","status":"authorized","ref":"a"}'),
        (Pong(), b'{"type":"pong"}'),
        (Pong("p"), b'{"type":"pong","ref":"p"}'),
        (
            Error(ErrorCode.UNAUTHORIZED, "Invalid or expired token"),
            b'{"type":"error","code":"UNAUTHORIZED","message":"Invalid or expired token"}',
        ),
        (
            Error(ErrorCode.FORBIDDEN, "no", channel="table:a.b"),
            b'{"type":"error","code":"FORBIDDEN","message":"no","channel":"table:a.b"}',
        ),
        (
            Error(ErrorCode.INVALID_MESSAGE, "bad", ref="r"),
            b'{"type":"error","code":"INVALID_MESSAGE","message":"bad","ref":"r"}',
        ),
        (
            Error(ErrorCode.CHANGES_MISSED, "refetch", channel="table:a.b", ref="r"),
            b'{"type":"error","code":"CHANGES_MISSED","message":"refetch","channel":"table:a.b","ref":"r"}',
        ),
        (
            BroadcastEvent("broadcast:chat", {"message": "Hello World", "user": "john"}),
            b'{"type":"broadcast","channel":"broadcast:chat","payload":{"message":"Hello World","user":"john"}}',
        ),
        (BroadcastEvent("broadcast:chat", None), b'{"type":"broadcast","channel":"broadcast:chat","payload":null}'),
        (
            BroadcastEvent("broadcast:chat", [1, "2"]),
            b'{"type":"broadcast","channel":"broadcast:chat","payload":[1,"2"]}',
        ),
        (
            PresenceEvent("presence:room", "sync", {"alice": [{"ref": "c1", "state": {"s": 1}}]}),
            b'{"type":"presence","channel":"presence:room","event":"sync","payload":{"alice":[{"ref":"c1","state":{"s":1}}]}}',
        ),
        (
            PresenceEvent("presence:room", "diff", {"joins": {}, "leaves": {}}),
            b'{"type":"presence","channel":"presence:room","event":"diff","payload":{"joins":{},"leaves":{}}}',
        ),
    ],
)
def test_encode_exact_bytes_and_key_order(message, wire):
    assert encode(message) == wire
    assert list(orjson.loads(encode(message))) == list(orjson.loads(wire))


def test_encode_database_change_like_the_reference():
    payload = {
        "type": "UPDATE",
        "schema": "public",
        "table": "users",
        "old_record": {"id": 123, "name": "John"},
        "record": {"id": 123, "name": "John Doe"},
    }
    assert encode(BroadcastEvent("table:public.users", payload)) == (
        b'{"type":"broadcast","channel":"table:public.users","payload":{"type":"UPDATE","schema":"public",'
        b'"table":"users","old_record":{"id":123,"name":"John"},"record":{"id":123,"name":"John Doe"}}}'
    )


def test_every_error_code_encodes_as_its_name():
    for code in ErrorCode:
        assert orjson.loads(encode(Error(code, "m")))["code"] == code.name


def test_error_codes_and_close_codes_match_the_protocol():
    assert {c.value for c in ErrorCode} == {
        "UNAUTHORIZED",
        "FORBIDDEN",
        "INVALID_CHANNEL",
        "SUBSCRIPTION_FAILED",
        "RATE_LIMITED",
        "INVALID_MESSAGE",
        "INTERNAL_ERROR",
        "CHANGES_MISSED",
        "UNAVAILABLE",
    }
    assert {c.value for c in CloseCode} == {1000, 1001, 1009, 1011, 4001, 4008, 4009, 4029}
    assert CloseCode.RATE_LIMITED == 4029
    assert CloseCode.UNAUTHORIZED == 4001


def test_encode_keeps_unicode_and_big_numbers():
    wire = encode(BroadcastEvent("broadcast:é", {"n": 2**53 + 1, "s": "房间"}))
    assert wire == '{"type":"broadcast","channel":"broadcast:é","payload":{"n":9007199254740993,"s":"房间"}}'.encode()
