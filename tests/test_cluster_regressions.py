"""Regression tests for the bugs that the cluster's property tests found: a state read older than what is known,
lenient decoding of counts and versions, and sentinel addresses that should have been refused."""

from __future__ import annotations

import pytest

from fluxrt_trio.cluster import wire
from fluxrt_trio.cluster.address import parse
from fluxrt_trio.cluster.engine import parse_state
from fluxrt_trio.cluster.view import ClusterView, Delivered, ReadState, Snapshot

from .test_cluster_view import INC, LOBBY, NEWER, OLDER, OTHER, OWN, batch, joined, meta, track, view_in_step
from .test_cluster_wire import batch_bytes


@pytest.mark.parametrize("count", [True, False], ids=repr)
def test_decode_refuses_a_bool_as_count(count: bool) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(batch_bytes(o=[["c", "alice", count]]))


@pytest.mark.parametrize("version", [True, 1.0], ids=repr)
def test_decode_refuses_a_version_that_is_not_the_integer_1(version: object) -> None:
    with pytest.raises(wire.WireError, match="version"):
        wire.decode(batch_bytes(v=version))


@pytest.mark.parametrize("position", ["inc ²".encode(), "inc ①".encode()], ids=repr)
def test_parse_state_with_a_non_ascii_digit_position_is_none(position: bytes) -> None:
    assert parse_state(position, {}, {}) is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://[::1/mymaster",
        "redis+sentinel://[::1]26380/mymaster",
        "redis+sentinel://s1:0/mymaster",
        "redis+sentinel://s1:65536/mymaster",
        "redis+sentinel://s1:²/mymaster",
        "redis+sentinel://s1/mymaster/²",
    ],
)
def test_a_bad_sentinel_address_is_refused_saying_why(url: str) -> None:
    with pytest.raises(ValueError, match="sentinel"):
        parse(url)


def test_the_answer_to_a_second_read_older_than_batches_applied_since_changes_nothing() -> None:
    view = ClusterView(OWN)
    assert view.receive(batch(1, wire.Announce(), incarnation=OLDER), 0.0) == [ReadState(OTHER)]
    # While that read is under way the node restarts: its new life announces itself, and the hub will read again.
    assert view.receive(batch(1, wire.Announce(), incarnation=NEWER), 0.0) == [ReadState(OTHER)]
    empty = Snapshot(NEWER, 1, {}, {})
    assert view.restore(OTHER, empty, 0.0) == []  # the first read got the new life's state
    # The second read reaches Redis (same state), then batch 2 reaches this node before the read's answer.
    assert view.receive(batch(2, track("alice", "r1"), incarnation=NEWER), 0.0) == [joined(LOBBY, "alice", "r1")]
    assert view.restore(OTHER, empty, 0.0) == []
    assert view.presence_state(LOBBY) == {"alice": [meta("r1")]}


def test_a_restore_of_an_older_incarnation_while_waiting_asks_again_at_the_next_batch() -> None:
    view = view_in_step(track("alice", "r1"), incarnation=OLDER)
    assert view.receive(batch(4, track("carol", "r3"), incarnation=NEWER), 0.0)[-1] == ReadState(OTHER)
    # Redis gave the older life's state (a failover lost the newer one's writes): the view must not wait forever.
    assert view.restore(OTHER, Snapshot(OLDER, 1, {LOBBY: {"alice": {"r1": {}}}}, {}), 0.0) == []
    assert view.receive(batch(5, incarnation=NEWER), 0.0) == [ReadState(OTHER)]
    assert view.restore(OTHER, Snapshot(NEWER, 5, {LOBBY: {"carol": {"r3": {}}}}, {}), 0.0) != []
    assert view.presence_state(LOBBY) == {"carol": [meta("r3")]}


def test_broadcasts_that_came_while_a_state_was_read_are_delivered_even_when_the_state_covers_them() -> None:
    view = view_in_step(track("alice", "r1"))
    # Batch 2 was missed: the view asks for the state and keeps what comes meanwhile.
    assert view.receive(batch(3, wire.Broadcast("broadcast:news", 3)), 0.0) == [ReadState(OTHER)]
    assert view.receive(batch(4, wire.Broadcast("broadcast:news", 4)), 0.0) == []
    # The state read is as of batch 3: its broadcast is not in it, and it did arrive; batch 4 follows the state.
    events = view.restore(OTHER, Snapshot(INC, 3, {LOBBY: {"alice": {"r1": {}}}}, {}), 0.0)
    assert events == [Delivered("broadcast:news", 3), Delivered("broadcast:news", 4)]
