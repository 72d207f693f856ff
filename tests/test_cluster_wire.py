"""The cluster's formats without Redis: the bus batch (cluster/wire.py), the presence hash field, and what
cluster/engine.py writes to and reads back from a node's keys (`Writes.of`, `parse_state`)."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrt_trio.cluster import wire
from fluxrt_trio.cluster.engine import Writes, parse_state
from fluxrt_trio.cluster.view import Snapshot
from fluxrt_trio.protocol.rows import decode_image

# Strings orjson can write (no lone surrogates), including NUL, quotes, backslashes and non-BMP characters.
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
ODD = ["", "\x00", 'a"b', "a\\b", '"],["x', "é", "日本", "🙂", "a\x00b\"c'\\d\U0010ffff", "\n\t", " "]

EVERY_OP: list[wire.Op] = [
    wire.Broadcast("broadcast:chat", {"message": "hi", "n": [1, 2.5, None, True]}),
    wire.Broadcast("broadcast:x", None),
    wire.Broadcast("broadcast:x", "just text"),
    wire.Track("presence:lobby", "alice", "r1", {"status": "online", "nested": {"a": [1]}}),
    wire.Track("presence:lobby", "anon:\x00", "r\"2'", {}),
    wire.Untrack("presence:lobby", "alice", "r1"),
    wire.UserCount("alice", 3),
    wire.UserCount("alice", 0),
    wire.Announce(),
    wire.Goodbye(),
]


def batch_bytes(**fields: Any) -> bytes:
    """A batch of version 1 as JSON, with `fields` replacing or adding (a value of ... removes the field)."""
    raw: dict[str, Any] = {"v": 1, "n": "node-a", "i": "0001-aa", "s": 7, "o": []}
    raw.update(fields)
    return orjson.dumps({k: v for k, v in raw.items() if v is not ...})


# ---- batches ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", EVERY_OP, ids=repr)
def test_every_op_round_trips_alone(op: wire.Op) -> None:
    batch = wire.Batch("node-a", "0001-aa", 1, (op,))
    assert wire.decode(wire.encode(batch)) == batch


def test_a_batch_of_every_op_round_trips_in_order() -> None:
    batch = wire.Batch("node-é\x00", "0001-aa", 42, tuple(EVERY_OP))
    assert wire.decode(wire.encode(batch)) == batch


def test_an_empty_batch_is_a_heartbeat_that_round_trips() -> None:
    batch = wire.Batch("node-a", "0001-aa", 3, ())
    assert wire.decode(wire.encode(batch)) == batch


def test_encode_batch_takes_ops_encoded_once() -> None:
    data = wire.encode_batch("n", "i", 5, [wire.encode_op(op) for op in EVERY_OP])
    assert data == wire.encode(wire.Batch("n", "i", 5, tuple(EVERY_OP)))
    # Plain JSON: another program on the channel can read it.
    assert orjson.loads(data)["s"] == 5


ops = st.one_of(
    st.builds(wire.Broadcast, text, st.dictionaries(text, text | st.integers(-(2**63), 2**63 - 1), max_size=3)),
    st.builds(wire.Track, text, text, text, st.dictionaries(text, text, max_size=3)),
    st.builds(wire.Untrack, text, text, text),
    st.builds(wire.UserCount, text, st.integers(0, 2**63 - 1)),
    st.just(wire.Announce()),
    st.just(wire.Goodbye()),
)


@settings(deadline=None, database=None)
@given(text, text, st.integers(0, 2**63 - 1), st.lists(ops, max_size=6))
def test_any_batch_round_trips(node: str, incarnation: str, seq: int, batch_ops: list[wire.Op]) -> None:
    batch = wire.Batch(node, incarnation, seq, tuple(batch_ops))
    assert wire.decode(wire.encode(batch)) == batch


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'{"v":1,"n":"a"',
        b"[]",
        b"null",
        b'"a batch"',
        b"1",
    ],
    ids=repr,
)
def test_decode_refuses_what_is_not_json_or_not_an_object(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(data)


@pytest.mark.parametrize("version", [..., 0, 2, "1", None, [1], {"v": 1}], ids=repr)
def test_decode_refuses_other_versions(version: Any) -> None:
    with pytest.raises(wire.WireError, match="version"):
        wire.decode(batch_bytes(v=version))


@pytest.mark.parametrize(
    "fields",
    [
        {"n": ...},
        {"i": ...},
        {"s": ...},
        {"o": ...},
        {"n": 1},
        {"n": None},
        {"i": 1},
        {"i": ["x"]},
        {"s": "7"},
        {"s": 7.0},
        {"s": True},
        {"s": None},
        {"o": {}},
        {"o": "[]"},
        {"o": None},
    ],
    ids=repr,
)
def test_decode_refuses_a_malformed_header(fields: dict[str, Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(batch_bytes(**fields))


@pytest.mark.parametrize(
    "op",
    [
        ["x"],
        [],
        "t",
        None,
        {"op": "t"},
        ["A"],
        ["a", 1],
        ["g", None],
        ["b", "c"],
        ["b", 1, {}],
        ["b", "c", {}, "extra"],
        ["t", "room", "key", "ref"],
        ["t", "room", "key", "ref", []],
        ["t", "room", "key", "ref", "state"],
        ["t", "room", "key", 1, {}],
        ["t", "room", None, "ref", {}],
        ["t", 1, "key", "ref", {}],
        ["u", "room", "key"],
        ["u", "room", "key", 1],
        ["c", "sub"],
        ["c", "sub", -1],
        ["c", "sub", -(2**63)],
        ["c", "sub", 1.0],
        ["c", "sub", "1"],
        ["c", "sub", None],
        ["c", 1, 1],
    ],
    ids=repr,
)
def test_decode_refuses_unknown_or_malformed_ops(op: Any) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(batch_bytes(o=[["a"], op]))


@settings(deadline=None, database=None)
@given(st.binary(max_size=120))
def test_decode_raises_nothing_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode(data)


def test_stream_ids_and_duplicates_reach_the_broadcasts_in_order() -> None:
    ops = [wire.Broadcast("broadcast:a", 1), wire.UserCount("bob", 1), wire.Broadcast("broadcast:a", 2)]
    data = wire.encode_batch("node-a", "0001-aa", 7, [wire.encode_op(op) for op in ops])
    data = data[: -len(wire.BATCH_END)] + wire.IDS_START + b'["1-0","' + wire.DUPLICATE.encode() + b'"]}'
    assert wire.decode(data).ops == (
        wire.Broadcast("broadcast:a", 1, "1-0"),
        wire.UserCount("bob", 1),
        wire.Broadcast("broadcast:a", 2, wire.DUPLICATE),
    )


def test_a_payload_read_from_postgres_keeps_its_digits_on_the_bus() -> None:
    op = wire.Broadcast("broadcast:a", decode_image('{"price": 1.10, "big": 123456789012345678901234567890}'))
    assert wire.encode_op(op) == b'["b","broadcast:a",{"price":1.10,"big":123456789012345678901234567890}]'


def test_decode_ignores_fields_it_does_not_know() -> None:
    assert wire.decode(batch_bytes(extra={"later": True})) == wire.Batch("node-a", "0001-aa", 7, ())


# ---- the presence hash field ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ODD, ids=repr)
def test_member_field_round_trips_any_character(value: str) -> None:
    for room, key, ref in [(value, "k", "r"), ("presence:x", value, "r"), ("presence:x", "k", value)]:
        assert wire.parse_member_field(wire.member_field(room, key, ref)) == (room, key, ref)


@settings(deadline=None, database=None)
@given(text, text, text, text, text, text)
def test_member_fields_differ_when_their_parts_differ(a: str, b: str, c: str, x: str, y: str, z: str) -> None:
    # JSON keeps the three parts apart whatever they hold: ("a,b", "c") and ("a", "b,c") are two fields.
    assert wire.parse_member_field(wire.member_field(a, b, c)) == (a, b, c)
    assert (wire.member_field(a, b, c) == wire.member_field(x, y, z)) == ((a, b, c) == (x, y, z))


@pytest.mark.parametrize(
    "field",
    [b"", b"room\x00key\x00ref", b'["r","k"]', b'["r","k","f","x"]', b'["r","k",1]', b'{"r":1}', b"\xff", b"null"],
    ids=repr,
)
def test_parse_member_field_refuses_what_member_field_did_not_write(field: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_member_field(field)


# ---- engine: the writes that go with a batch --------------------------------------------------------------------


def test_writes_of_maps_presence_and_counts_and_ignores_the_rest() -> None:
    writes = Writes.of(
        [
            wire.Broadcast("broadcast:x", {"a": 1}),
            wire.Track("presence:r", "alice", "r1", {"s": "on"}),
            wire.Untrack("presence:r", "bob", "r2"),
            wire.UserCount("alice", 2),
            wire.UserCount("bob", 0),
            wire.Announce(),
            wire.Goodbye(),
        ]
    )
    assert writes.members == {
        wire.member_field("presence:r", "alice", "r1"): orjson.dumps({"s": "on"}),
        wire.member_field("presence:r", "bob", "r2"): None,
    }
    assert writes.users == {"alice": 2, "bob": 0}


def test_writes_of_keeps_the_last_change_of_each_field() -> None:
    field = wire.member_field("presence:r", "alice", "r1")
    track = wire.Track("presence:r", "alice", "r1", {"s": 1})
    untrack = wire.Untrack("presence:r", "alice", "r1")
    retrack = wire.Track("presence:r", "alice", "r1", {"s": 2})
    assert Writes.of([track, untrack]).members == {field: None}
    assert Writes.of([untrack, track]).members == {field: orjson.dumps({"s": 1})}
    assert Writes.of([track, retrack]).members == {field: orjson.dumps({"s": 2})}
    assert Writes.of([wire.UserCount("a", 1), wire.UserCount("a", 3), wire.UserCount("a", 0)]).users == {"a": 0}


def test_writes_of_nothing_is_empty() -> None:
    assert Writes.of([]) == Writes({}, {})
    assert Writes.of([wire.Broadcast("b", 1), wire.Announce()]) == Writes({}, {})


# ---- engine: a node's state read back ---------------------------------------------------------------------------


def stored(members: dict[tuple[str, str, str], Any]) -> dict[bytes, bytes]:
    return {wire.member_field(*field): orjson.dumps(state) for field, state in members.items()}


def test_parse_state_without_a_position_is_none() -> None:
    assert parse_state(None, stored({("r", "k", "f"): {}}), {b"alice": b"1"}) is None


@pytest.mark.parametrize("position", [b"inc", b"inc ", b"inc x", b"inc -1", b"inc 1.5", b"inc 1 2", b""], ids=repr)
def test_parse_state_with_a_malformed_position_is_none(position: bytes) -> None:
    assert parse_state(position, {}, {}) is None


def test_parse_state_reads_what_writes_of_writes() -> None:
    ops: list[wire.Op] = [
        wire.Track("presence:a", "alice", "r1", {"s": "on"}),
        wire.Track("presence:a", "alice", "r2", {}),
        wire.Track("presence:a", 'b"ob\x00', "r3", {"x": [1, None]}),
        wire.Track("presence:日本", "🙂", "r4", {"n": 1}),
        wire.UserCount("alice", 2),
        wire.UserCount("b\x00ob", 1),
    ]
    writes = Writes.of(ops)
    presence = {field: value for field, value in writes.members.items() if value is not None}
    users = {sub.encode(): str(n).encode() for sub, n in writes.users.items()}
    assert parse_state(b"0001-aa 12", presence, users) == Snapshot(
        "0001-aa",
        12,
        {
            "presence:a": {"alice": {"r1": {"s": "on"}, "r2": {}}, 'b"ob\x00': {"r3": {"x": [1, None]}}},
            "presence:日本": {"🙂": {"r4": {"n": 1}}},
        },
        {"alice": 2, "b\x00ob": 1},
    )


def test_parse_state_of_a_node_with_nothing() -> None:
    assert parse_state(b"0001-aa 1", {}, {}) == Snapshot("0001-aa", 1, {}, {})


def test_parse_state_skips_fields_and_counts_it_cannot_read() -> None:
    presence = {
        **stored({("r", "k", "good"): {"ok": True}}),
        b"not a field": b"{}",
        wire.member_field("r", "k", "list"): b"[1]",
        wire.member_field("r", "k", "null"): b"null",
        wire.member_field("r", "k", "broken"): b"{",
    }
    users = {b"alice": b"2", b"bob": b"-1", b"carol": b"x", b"dave": b"1.5", b"erin": b""}
    assert parse_state(b"inc 3", presence, users) == Snapshot(
        "inc", 3, {"r": {"k": {"good": {"ok": True}}}}, {"alice": 2}
    )
