"""Message models and the one converter that turns JSON into them and back.

Client messages are tagged on `type`. Decoding is strict: a field of the wrong JSON type is an error, never coerced.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn, override

from .rows import encode_default

MAX_REF_LENGTH = 64


class ErrorCode(enum.StrEnum):
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    INVALID_CHANNEL = "INVALID_CHANNEL"
    SUBSCRIPTION_FAILED = "SUBSCRIPTION_FAILED"
    RATE_LIMITED = "RATE_LIMITED"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    CHANGES_MISSED = "CHANGES_MISSED"
    UNAVAILABLE = "UNAVAILABLE"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHORIZED = 4001
    TIMEOUT = 4008
    SLOW_CONSUMER = 4009
    RATE_LIMITED = 4029


# ---- client -> server ----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Subscribe:
    TYPE: ClassVar[str] = "subscribe"
    channel: str
    event: str = "*"
    filter: str | None = None
    ref: str | None = None
    since: Any = None
    """the position of the last event the client processed on the channel (any JSON value: one this server did not
    write is answered `recovered: false`, never refused)"""


@attrs.frozen(slots=True)
class Unsubscribe:
    TYPE: ClassVar[str] = "unsubscribe"
    channel: str
    ref: str | None = None


@attrs.frozen(slots=True)
class Broadcast:
    TYPE: ClassVar[str] = "broadcast"
    channel: str
    payload: Any
    ref: str | None = None


@attrs.frozen(slots=True)
class Presence:
    TYPE: ClassVar[str] = "presence"
    channel: str
    event: str
    payload: Any = None
    ref: str | None = None


@attrs.frozen(slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    ref: str | None = None


@attrs.frozen(slots=True)
class Auth:
    TYPE: ClassVar[str] = "auth"
    token: str
    ref: str | None = None


ClientMessage = Subscribe | Unsubscribe | Broadcast | Presence | Ping | Auth
CLIENT_TYPES: dict[str, type[ClientMessage]] = {
    cls.TYPE: cls for cls in (Subscribe, Unsubscribe, Broadcast, Presence, Ping, Auth)
}


# ---- server -> client ----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Ack:
    status: str
    channel: str | None = None
    ref: str | None = None
    recovered: bool | None = None
    """on the ack of a subscribe that carried `since`: whether what followed that position is replayed"""
    type: str = "ack"


@attrs.frozen(slots=True)
class Error:
    code: ErrorCode
    message: str
    channel: str | None = None
    ref: str | None = None
    type: str = "error"


@attrs.frozen(slots=True)
class Pong:
    ref: str | None = None
    type: str = "pong"


@attrs.frozen(slots=True)
class BroadcastEvent:
    channel: str
    payload: Any
    id: str | None = None
    """on `broadcast:` channels, the message's position (see Resume); table changes carry theirs in the payload"""
    type: str = "broadcast"


@attrs.frozen(slots=True)
class PresenceEvent:
    channel: str
    event: str
    payload: Any
    type: str = "presence"


ServerMessage = Ack | Error | Pong | BroadcastEvent | PresenceEvent


class DecodeError(ValueError):
    """A client message that cannot be understood. `ref` is the message's ref when one could be read."""

    def __init__(self, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.ref = ref


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_WIRE_ORDER: dict[type, list[str]] = {
    Ack: ["type", "channel", "status", "recovered", "ref"],
    Error: ["type", "code", "message", "channel", "ref"],
    Pong: ["type", "ref"],
    BroadcastEvent: ["type", "channel", "payload", "id"],
    PresenceEvent: ["type", "channel", "event", "payload"],
}


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(Any, lambda v, _: v)
    # Server messages: fields in the reference's order, `type` first; optional fields omitted when unset.
    for cls, names in _WIRE_ORDER.items():
        # The generator's own settings are all spelled out, so that the field overrides can only go to **kwargs.
        fn: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(
            cls,
            conv,
            _cattrs_omit_if_default=True,
            _cattrs_use_linecache=True,
            _cattrs_use_alias="from_converter",
            _cattrs_include_init_false=False,
            **{a.name: override(omit_if_default=a.default is None) for a in attrs.fields(cls) if a.name != "type"},
        )
        conv.register_unstructure_hook(cls, _ordered(fn, names))
    return conv


def _ordered(fn: Callable[[Any], dict[str, Any]], names: list[str]) -> Callable[[Any], dict[str, Any]]:
    def unstructure(obj: Any) -> dict[str, Any]:
        raw = fn(obj)
        raw["type"] = obj.type
        return {k: raw[k] for k in names if k in raw}

    return unstructure


converter = _make_converter()


def decode(text: str | bytes) -> ClientMessage:
    """Decode one client frame.

    Raises DecodeError naming the problem: invalid JSON, a non-object, an unknown `type`, a missing or mistyped
    field, or a `ref` that is not a string of at most 64 characters.
    """
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"message is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"message must be a JSON object, got {_json_type(raw)}")
    ref = raw.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_LENGTH):
        raise DecodeError(f"ref must be a string of at most {MAX_REF_LENGTH} characters")
    kind = raw.get("type")
    cls = CLIENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(CLIENT_TYPES)
        if kind is None:
            raise DecodeError(f"message has no type; expected one of {known}", ref)
        raise DecodeError(f"unknown message type {str(kind)[:64]!r}; expected one of {known}", ref)
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in raw:
            raise DecodeError(f"{kind}: missing field {field.name!r}", ref)
    try:
        return converter.structure(raw, cls)
    except cattrs.ClassValidationError as exc:
        raise DecodeError(f"{kind}: {_describe(exc)}", ref) from None


def _describe(exc: cattrs.ClassValidationError) -> str:
    with_notes, without_notes = exc.group_exceptions()
    problems = [f"field {note.name!r}: {inner}" for inner, note in with_notes]
    problems.extend(str(inner) for inner in without_notes)
    return "; ".join(problems)


def encode(message: ServerMessage) -> bytes:
    """Serialize a server message to compact UTF-8 JSON. Numbers read from Postgres (a `realtime.send` payload) are
    written with the digits Postgres gave them."""
    return orjson.dumps(converter.unstructure(message), default=encode_default)
