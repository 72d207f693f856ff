"""The bus between nodes: what one node publishes to the others, as one Redis pub/sub message per batch.

A batch carries the publishing node's id, its incarnation (new at every start, so a restarted node is never taken
for its former self), a sequence number that grows by one per batch, and operations in the order they happened.
The sequence numbers let a receiver notice a batch it missed (pub/sub delivers at most once) and re-read that node's
state instead of drifting.

With broadcast history on, Redis adds `"x"` after the operations: the id it gave each broadcast of the batch in its
channel's history stream, in order (see engine.py). Nodes that do not know `x` ignore it, so nodes of the version
before can run beside these during a rolling upgrade.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import orjson

from ..protocol.rows import encode_default

STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
"""a Redis stream id, `<milliseconds>-<sequence>`"""
DUPLICATE = "-"
"""the id in `x` of a `realtime.send` that another node published first: no node delivers this copy"""


@attrs.frozen(slots=True)
class Broadcast:
    channel: str
    payload: Any
    id: str | None = None
    """the message's id in the channel's history stream, from the batch's `x` (None when history is off), or
    DUPLICATE"""


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
            # A realtime.send's payload keeps the digits Postgres wrote.
            return orjson.dumps(["b", channel, payload], default=encode_default)
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


BATCH_END = b"]}"
"""what follows the operations of a batch that carries no stream ids"""
IDS_START = b'],"x":'
"""what follows the operations of a batch that carries stream ids: then the ids as a JSON list of strings, and `}`"""


def batch_head(node: str, incarnation: str, seq: int) -> bytes:
    """What comes before the operations of a batch, which are joined by commas and followed by BATCH_END."""
    header = orjson.dumps({"v": 1, "n": node, "i": incarnation, "s": seq})
    return header[:-1] + b',"o":['


def encode_batch(node: str, incarnation: str, seq: int, ops: list[bytes]) -> bytes:
    """A batch from operations that `encode_op` encoded."""
    return batch_head(node, incarnation, seq) + b",".join(ops) + BATCH_END


def encode(batch: Batch) -> bytes:
    """A batch, with `x` when one of its broadcasts has an id (as Redis writes it)."""
    ids = [op.id for op in batch.ops if isinstance(op, Broadcast)]
    data = encode_batch(batch.node, batch.incarnation, batch.seq, [encode_op(op) for op in batch.ops])
    if all(stream_id is None for stream_id in ids):
        return data
    return data[: -len(BATCH_END)] + IDS_START + orjson.dumps([stream_id or "" for stream_id in ids]) + b"}"


def decode_op(data: bytes) -> Op:
    """One operation as `encode_op` wrote it; raises WireError for anything else."""
    try:
        return _op(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise WireError(f"malformed operation: {exc}") from None


def decode(data: bytes) -> Batch:
    """Raises WireError for anything but a batch this version wrote."""
    try:
        raw = orjson.loads(data)
        if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw["v"] != 1:
            raise WireError("not a fluxrt batch of version 1")
        node, incarnation, seq, ops = raw["n"], raw["i"], raw["s"], raw["o"]
        if not (isinstance(node, str) and isinstance(incarnation, str) and type(seq) is int and isinstance(ops, list)):
            raise WireError("malformed batch header")
        decoded = [_op(op) for op in ops]
        if "x" in raw:
            decoded = _with_ids(decoded, raw["x"])
        return Batch(node, incarnation, seq, tuple(decoded))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"malformed batch: {exc}") from None


def _with_ids(ops: list[Op], ids: Any) -> list[Op]:
    """The broadcasts among `ops` given their ids, in order ("": none)."""
    broadcasts = sum(isinstance(op, Broadcast) for op in ops)
    if not isinstance(ids, list) or len(ids) != broadcasts:
        raise WireError("malformed stream ids")
    given = iter(ids)
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Broadcast):
            stream_id = next(given)
            if not (isinstance(stream_id, str) and (stream_id in ("", DUPLICATE) or STREAM_ID.fullmatch(stream_id))):
                raise WireError(f"malformed stream id {str(stream_id)[:40]}")
            op = Broadcast(op.channel, op.payload, stream_id or None)
        out.append(op)
    return out


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
