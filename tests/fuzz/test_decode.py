"""`messages.decode` on any input: a client message or a DecodeError naming the problem, never another exception;
valid messages round-trip through their JSON unchanged."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from hypothesis import given
from hypothesis import strategies as st

from fluxrt_trio.protocol.messages import (
    CLIENT_TYPES,
    MAX_REF_LENGTH,
    Auth,
    Broadcast,
    ClientMessage,
    DecodeError,
    Ping,
    Presence,
    Subscribe,
    Unsubscribe,
    decode,
)

from .strategies import json_values, refs, text

FIELDS = ("type", "channel", "event", "filter", "payload", "token", "ref")
# Objects shaped like client messages: known and unknown types, each field present or not with any JSON value.
shaped = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([*CLIENT_TYPES, "nope", ""]) | json_values,
        **{name: json_values | text for name in FIELDS[1:]},
    },
)


def decoded(frame: str | bytes) -> ClientMessage | DecodeError:
    try:
        return decode(frame)
    except DecodeError as exc:
        assert str(exc)
        return exc


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_frame_is_a_message_or_a_decode_error(frame: str | bytes) -> None:
    decoded(frame)


@given(json_values | shaped)
def test_any_json_is_a_message_or_a_decode_error(value: Any) -> None:
    result = decoded(orjson.dumps(value))
    if isinstance(result, DecodeError):
        ref = value.get("ref") if isinstance(value, dict) else None
        readable = isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH
        # The ref is echoed whenever it could be read, so that the client can match the error to its message.
        assert result.ref == (ref if readable else None)
    else:
        assert type(result) is CLIENT_TYPES[value["type"]]


valid = (
    st.builds(Subscribe, channel=text, event=text, filter=st.none() | text, ref=refs)
    | st.builds(Unsubscribe, channel=text, ref=refs)
    | st.builds(Broadcast, channel=text, payload=json_values, ref=refs)
    | st.builds(Presence, channel=text, event=text, payload=json_values, ref=refs)
    | st.builds(Ping, ref=refs)
    | st.builds(Auth, token=text, ref=refs)
)


@given(valid)
def test_valid_messages_round_trip(message: ClientMessage) -> None:
    wire = {"type": message.TYPE, **attrs.asdict(message)}
    assert decode(orjson.dumps(wire)) == message
    assert decode(orjson.dumps(wire).decode()) == message
