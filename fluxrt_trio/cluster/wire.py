"""The bus between nodes: what one node publishes to the others, as one Redis pub/sub message per batch.

A batch carries the publishing node's id, its incarnation (new at every start, so a restarted node is never taken
for its former self), a sequence number that grows by one per batch, and operations in the order they happened.
The sequence numbers let a receiver notice a batch it missed (pub/sub delivers at most once) and re-read that node's
state instead of drifting.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson


@attrs.frozen(slots=True)
class Broadcast:
    channel: str
    payload: Any


@attrs.frozen(slots=True)
class Track:
    room: str
    key: str
    ref: str
    state: dict[str, Any]


@attrs.frozen(slots=True)
class Untrack:
    room: str
    key: str
    ref: str


@attrs.frozen(slots=True)
class UserCount:
    """How many connections user `sub` holds on the publishing node now (an absolute value: replaying it is
    harmless)."""

    sub: str
    count: int


@attrs.frozen(slots=True)
class Announce:
    """The node's state was (re)written to Redis: read it afresh."""


@attrs.frozen(slots=True)
class Goodbye:
    """The node is shutting down: forget its members and connections now."""


Op = Broadcast | Track | Untrack | UserCount | Announce | Goodbye


@attrs.frozen(slots=True)
class Batch:
    node: str
    incarnation: str
    seq: int
    ops: tuple[Op, ...]


class WireError(ValueError):
    """A bus message that is not a batch of this format (another program on the channel, or a newer version)."""


def encode_op(op: Op) -> bytes:
    """One operation as it goes into a batch: encoded once, when it is queued, so the queue knows its size."""
    match op:
        case Broadcast(channel=channel, payload=payload):
            return orjson.dumps(["b", channel, payload])
        case Track(room=room, key=key, ref=ref, state=state):
            return orjson.dumps(["t", room, key, ref, state])
        case Untrack(room=room, key=key, ref=ref):
            return orjson.dumps(["u", room, key, ref])
        case UserCount(sub=sub, count=count):
            return orjson.dumps(["c", sub, count])
        case Announce():
            return b'["a"]'
        case Goodbye():
            return b'["g"]'


def encode_batch(node: str, incarnation: str, seq: int, ops: list[bytes]) -> bytes:
    """A batch from operations that `encode_op` encoded."""
    header = orjson.dumps({"v": 1, "n": node, "i": incarnation, "s": seq})
    return header[:-1] + b',"o":[' + b",".join(ops) + b"]}"


def encode(batch: Batch) -> bytes:
    return encode_batch(batch.node, batch.incarnation, batch.seq, [encode_op(op) for op in batch.ops])


def decode(data: bytes) -> Batch:
    """Raises WireError for anything but a batch this version wrote."""
    try:
        raw = orjson.loads(data)
        if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw["v"] != 1:
            raise WireError("not a fluxrt batch of version 1")
        node, incarnation, seq, ops = raw["n"], raw["i"], raw["s"], raw["o"]
        if not (isinstance(node, str) and isinstance(incarnation, str) and type(seq) is int and isinstance(ops, list)):
            raise WireError("malformed batch header")
        return Batch(node, incarnation, seq, tuple(_op(op) for op in ops))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"malformed batch: {exc}") from None


def _op(raw: Any) -> Op:
    match raw:
        case ["b", str(channel), payload]:
            return Broadcast(channel, payload)
        case ["t", str(room), str(key), str(ref), dict(state)]:
            return Track(room, key, ref, state)
        case ["u", str(room), str(key), str(ref)]:
            return Untrack(room, key, ref)
        case ["c", str(sub), int(count)] if type(count) is int and count >= 0:
            return UserCount(sub, count)
        case ["a"]:
            return Announce()
        case ["g"]:
            return Goodbye()
    raise WireError(f"unknown operation {str(raw)[:80]}")


def member_field(room: str, key: str, ref: str) -> bytes:
    """The Redis hash field of one presence meta of a node (JSON: a `sub` may hold any character)."""
    return orjson.dumps([room, key, ref])


def parse_member_field(field: bytes) -> tuple[str, str, str]:
    """Raises WireError for a field that `member_field` did not write."""
    try:
        match orjson.loads(field):
            case [str(room), str(key), str(ref)]:
                return room, key, ref
    except orjson.JSONDecodeError:
        pass
    raise WireError(f"malformed presence field {field[:80]!r}")
