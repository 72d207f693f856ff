"""ClusterView (cluster/view.py): every node's presence members and per-user counts as one node sees them, from the
bus and from states read from Redis, with the diffs that docs/protocol.md "Several nodes" promises. Plain values, no
Redis: the property test at the end plays the bus (drops, duplicates, never reorders) and Redis (a node's state as
of its latest published batch) against NodeState, the truth a node publishes."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrt_trio.cluster import wire
from fluxrt_trio.cluster.state import NodeState
from fluxrt_trio.cluster.view import ClusterView, Delivered, Event, PresenceChanged, ReadState, Snapshot
from fluxrt_trio.protocol.presence import Diff, Meta

OWN = "a"
OTHER = "b"
INC = "0000000000000002-bb"
OLDER = "0000000000000001-bb"
NEWER = "0000000000000003-bb"
LOBBY = "presence:lobby"
HALL = "presence:hall"
NEWS = "broadcast:news"


def batch(seq: int, *ops: wire.Op, node: str = OTHER, incarnation: str = INC) -> wire.Batch:
    return wire.Batch(node, incarnation, seq, ops)


def meta(ref: str, state: dict[str, Any] | None = None) -> Meta:
    return {"ref": ref, "state": {} if state is None else state}


def joined(room: str, key: str, ref: str, state: dict[str, Any] | None = None) -> PresenceChanged:
    return PresenceChanged(room, Diff({key: [meta(ref, state)]}, {}))


def left(room: str, key: str, ref: str, state: dict[str, Any] | None = None) -> PresenceChanged:
    return PresenceChanged(room, Diff({}, {key: [meta(ref, state)]}))


def track(key: str, ref: str, state: dict[str, Any] | None = None, room: str = LOBBY) -> wire.Track:
    return wire.Track(room, key, ref, {} if state is None else state)


def untrack(key: str, ref: str, room: str = LOBBY) -> wire.Untrack:
    return wire.Untrack(room, key, ref)


def view_in_step(*ops: wire.Op, incarnation: str = INC) -> ClusterView:
    """A view that heard OTHER from its first batch on, which held `ops`."""
    view = ClusterView(OWN)
    view.receive(batch(1, *ops, incarnation=incarnation), 0.0)
    return view


def apply_diffs(rooms: dict[str, dict[str, dict[str, Meta]]], events: list[Event]) -> None:
    """What a subscriber does with the diffs: a leave removes exactly the meta it names, then a join adds a meta
    that is not there. Fails on a diff that does not fit the state it is applied to (lost or doubled)."""
    for event in events:
        if not isinstance(event, PresenceChanged):
            continue
        keys = rooms.setdefault(event.room, {})
        for key, metas in event.diff.leaves.items():
            for m in metas:
                assert keys.get(key, {}).get(m["ref"]) == m, f"leave of {key}/{m} not present in {event.room}"
                del keys[key][m["ref"]]
                if not keys[key]:
                    del keys[key]
        for key, metas in event.diff.joins.items():
            for m in metas:
                assert m["ref"] not in keys.get(key, {}), f"join of {key}/{m} already present in {event.room}"
                keys.setdefault(key, {})[m["ref"]] = m
        if not keys:
            del rooms[event.room]


def normal(state: dict[str, list[Meta]]) -> dict[str, list[Meta]]:
    """A presence state with each key's metas in ref order (the order of metas under one key is not promised:
    a state read from a Redis hash comes back in the hash's order)."""
    return {key: sorted(metas, key=lambda m: m["ref"]) for key, metas in state.items() if metas}


def presence_events(events: list[Event]) -> list[Event]:
    return [event for event in events if isinstance(event, PresenceChanged)]


# ---- one node's batches in order --------------------------------------------------------------------------------


def test_track_retrack_and_untrack_give_the_diffs_of_the_protocol() -> None:
    view = ClusterView(OWN)
    assert view.receive(batch(1, track("alice", "r1", {"s": "on"})), 0.0) == [joined(LOBBY, "alice", "r1", {"s": "on"})]
    assert view.presence_state(LOBBY) == {"alice": [meta("r1", {"s": "on"})]}

    # A re-track is one diff: the old meta leaves and the new joins, with the same ref.
    assert view.receive(batch(2, track("alice", "r1", {"s": "away"})), 0.0) == [
        PresenceChanged(LOBBY, Diff({"alice": [meta("r1", {"s": "away"})]}, {"alice": [meta("r1", {"s": "on"})]}))
    ]
    assert view.presence_state(LOBBY) == {"alice": [meta("r1", {"s": "away"})]}

    assert view.receive(batch(3, untrack("alice", "r1")), 0.0) == [left(LOBBY, "alice", "r1", {"s": "away"})]
    assert view.presence_state(LOBBY) == {}
    assert view.rooms() == set()


def test_untrack_of_what_is_not_tracked_gives_no_diff() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(2, untrack("alice", "r2"), untrack("bob", "r1"), untrack("alice", "r1", HALL)), 0) == []
    assert view.presence_state(LOBBY) == {"alice": [meta("r1")]}


def test_ops_of_a_batch_apply_in_order_and_broadcasts_are_delivered_among_them() -> None:
    view = ClusterView(OWN)
    events = view.receive(
        batch(
            1,
            wire.Broadcast("broadcast:x", {"n": 1}),
            track("alice", "r1"),
            track("alice", "r2", room=HALL),
            untrack("alice", "r1"),
            wire.Broadcast("broadcast:x", {"n": 2}),
            wire.UserCount("alice", 2),
        ),
        0.0,
    )
    assert events == [
        Delivered("broadcast:x", {"n": 1}),
        joined(LOBBY, "alice", "r1"),
        joined(HALL, "alice", "r2"),
        left(LOBBY, "alice", "r1"),
        Delivered("broadcast:x", {"n": 2}),
    ]
    assert view.rooms() == {HALL}
    assert view.users_elsewhere("alice") == 2


def test_one_key_on_two_nodes_is_one_key_with_the_metas_of_both() -> None:
    view = ClusterView(OWN)
    view.receive(batch(1, track("alice", "ra", {"on": "a"}), node=OWN), 0.0)
    view.receive(batch(1, track("alice", "rb", {"on": "b"}), track("bob", "rb2"), node=OTHER), 0.0)
    view.receive(batch(1, track("alice", "rc", {"on": "c"}), node="c"), 0.0)
    assert view.presence_state(LOBBY) == {
        "alice": [meta("ra", {"on": "a"}), meta("rb", {"on": "b"}), meta("rc", {"on": "c"})],
        "bob": [meta("rb2")],
    }
    assert view.nodes == [OWN, OTHER, "c"]
    assert view.members() == {OWN: 1, OTHER: 2, "c": 1}
    # One node's untrack takes only its own meta away.
    assert view.receive(batch(2, untrack("alice", "rb"), node=OTHER), 0.0) == [left(LOBBY, "alice", "rb", {"on": "b"})]
    assert view.presence_state(LOBBY)["alice"] == [meta("ra", {"on": "a"}), meta("rc", {"on": "c"})]


def test_the_same_ref_under_one_key_on_two_nodes_stays_two_metas() -> None:
    view = ClusterView(OWN)
    view.receive(batch(1, track("alice", "r1", {"n": 1}), node=OWN), 0.0)
    view.receive(batch(1, track("alice", "r1", {"n": 2}), node=OTHER), 0.0)
    assert view.presence_state(LOBBY) == {"alice": [meta("r1", {"n": 1}), meta("r1", {"n": 2})]}


def test_a_batch_seen_again_is_skipped() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(2, untrack("alice", "r1")), 0.0) == [left(LOBBY, "alice", "r1")]
    assert view.receive(batch(2, untrack("alice", "r1")), 0.0) == []
    assert view.receive(batch(1, track("alice", "r1")), 0.0) == []
    assert view.presence_state(LOBBY) == {}


# ---- a missed batch ---------------------------------------------------------------------------------------------


def test_a_gap_asks_for_the_state_and_buffers_until_restore_then_applies_what_came_after_the_snapshot() -> None:
    view = view_in_step(track("alice", "r1"), wire.UserCount("alice", 1))
    # Batch 2 (bob joins) is lost; batch 3 reveals the gap.
    assert view.receive(batch(3, track("carol", "r3")), 1.0) == [ReadState(OTHER)]
    # Nothing of the buffered batches is applied before the state is read: no diff, no ReadState again.
    assert view.receive(batch(4, untrack("alice", "r1")), 2.0) == []
    assert view.receive(batch(5, track("dave", "r5"), wire.Broadcast("broadcast:x", 5)), 3.0) == []
    assert view.presence_state(LOBBY) == {"alice": [meta("r1")]}

    # Redis holds the state as of batch 4 (the reader got it after 4 was published): 3 and 4 are in it.
    snapshot = Snapshot(INC, 4, {LOBBY: {"bob": {"r2": {}}, "carol": {"r3": {}}}}, {"bob": 1})
    events = view.restore(OTHER, snapshot, 4.0)
    assert events == [
        PresenceChanged(LOBBY, Diff({"bob": [meta("r2")], "carol": [meta("r3")]}, {"alice": [meta("r1")]})),
        joined(LOBBY, "dave", "r5"),
        Delivered("broadcast:x", 5),
    ]
    assert normal(view.presence_state(LOBBY)) == {"bob": [meta("r2")], "carol": [meta("r3")], "dave": [meta("r5")]}
    assert view.users_elsewhere("alice") == 0
    assert view.users_elsewhere("bob") == 1

    # In step again: the next batch applies at once, an old one is skipped.
    assert view.receive(batch(4, untrack("bob", "r2")), 5.0) == []
    assert view.receive(batch(6, untrack("bob", "r2")), 5.0) == [left(LOBBY, "bob", "r2")]


def test_buffered_batches_at_or_below_the_snapshot_are_skipped_and_duplicates_once() -> None:
    view = view_in_step()
    assert view.receive(batch(3, track("alice", "r1")), 0.0) == [ReadState(OTHER)]
    view.receive(batch(3, track("alice", "r1")), 0.0)
    view.receive(batch(4, wire.Broadcast("broadcast:x", 4)), 0.0)
    view.receive(batch(5, wire.Broadcast("broadcast:x", 5), track("bob", "r2")), 0.0)
    view.receive(batch(5, wire.Broadcast("broadcast:x", 5), track("bob", "r2")), 0.0)
    events = view.restore(OTHER, Snapshot(INC, 4, {LOBBY: {"alice": {"r1": {}}}}, {}), 0.0)
    # The state covers batches 3 and 4; 4's broadcast is not state and did arrive, so it is delivered; 5 once.
    assert events == [
        joined(LOBBY, "alice", "r1"),
        Delivered("broadcast:x", 4),
        Delivered("broadcast:x", 5),
        joined(LOBBY, "bob", "r2"),
    ]


def test_buffered_broadcasts_at_or_below_the_snapshot_keep_their_ids_and_duplicate_marks() -> None:
    # A node back from a Redis outage offers the realtime.sends it held; another node published them first, so its
    # batch marks them DUPLICATE. Heard while its state was being read, they must still not be delivered twice.
    view = view_in_step()
    assert view.receive(batch(3, wire.Announce()), 0.0) == [ReadState(OTHER)]
    sends = batch(4, wire.Broadcast(NEWS, 1, wire.DUPLICATE), wire.Broadcast(NEWS, 2, "1700000000000-0"))
    assert view.receive(sends, 0.0) == []
    events = view.restore(OTHER, Snapshot(INC, 4, {}, {}), 0.0)
    assert events == [Delivered(NEWS, 1, wire.DUPLICATE), Delivered(NEWS, 2, "1700000000000-0")]


def test_a_gap_in_what_was_buffered_asks_again() -> None:
    view = view_in_step()
    assert view.receive(batch(3), 0.0) == [ReadState(OTHER)]
    view.receive(batch(5, track("alice", "r1")), 0.0)  # 4 lost as well
    assert view.restore(OTHER, Snapshot(INC, 3, {}, {}), 0.0) == [ReadState(OTHER)]
    assert view.presence_state(LOBBY) == {}
    assert view.restore(OTHER, Snapshot(INC, 5, {LOBBY: {"alice": {"r1": {}}}}, {}), 0.0) == [
        joined(LOBBY, "alice", "r1")
    ]


def test_a_node_first_heard_after_its_first_batch_is_read_from_redis() -> None:
    view = ClusterView(OWN)
    assert view.receive(batch(9, track("alice", "r9")), 0.0) == [ReadState(OTHER)]
    assert view.presence_state(LOBBY) == {}
    assert view.restore(OTHER, Snapshot(INC, 9, {LOBBY: {"alice": {"r9": {}}}}, {"alice": 1}), 0.0) == [
        joined(LOBBY, "alice", "r9")
    ]
    assert view.users_elsewhere("alice") == 1


def test_announce_asks_for_the_state_and_buffers_until_restore() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(2, wire.Announce()), 0.0) == [ReadState(OTHER)]
    assert view.receive(batch(3, track("bob", "r2")), 0.0) == []
    events = view.restore(OTHER, Snapshot(INC, 2, {LOBBY: {"alice": {"r1": {"s": 1}}}}, {}), 0.0)
    assert events == [
        PresenceChanged(LOBBY, Diff({"alice": [meta("r1", {"s": 1})]}, {"alice": [meta("r1")]})),
        joined(LOBBY, "bob", "r2"),
    ]


def test_a_first_batch_that_announces_is_read_from_redis() -> None:
    view = ClusterView(OWN)
    assert view.receive(batch(1, wire.Announce()), 0.0) == [ReadState(OTHER)]
    assert view.restore(OTHER, Snapshot(INC, 1, {LOBBY: {"alice": {"r1": {}}}}, {}), 0.0) == [
        joined(LOBBY, "alice", "r1")
    ]


# ---- incarnations -----------------------------------------------------------------------------------------------


def test_a_batch_of_an_older_incarnation_is_ignored() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(1, untrack("alice", "r1"), incarnation=OLDER), 0.0) == []
    assert view.receive(batch(7, wire.Broadcast("broadcast:x", 1), incarnation=OLDER), 0.0) == []
    assert view.presence_state(LOBBY) == {"alice": [meta("r1")]}


def test_a_newer_incarnation_replaces_the_old_whose_members_leave() -> None:
    view = view_in_step(track("alice", "r1"), track("bob", "r2", room=HALL), wire.UserCount("alice", 1))
    events = view.receive(batch(1, track("carol", "r3"), incarnation=NEWER), 0.0)
    assert events == [left(HALL, "bob", "r2"), left(LOBBY, "alice", "r1"), joined(LOBBY, "carol", "r3")]
    assert view.presence_state(LOBBY) == {"carol": [meta("r3")]}
    assert view.users_elsewhere("alice") == 0
    # The old life is over: what it still sends is ignored.
    assert view.receive(batch(2, track("alice", "r1")), 0.0) == []


def test_a_newer_incarnation_heard_late_replaces_the_old_and_is_read_from_redis() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(4, track("carol", "r3"), incarnation=NEWER), 0.0) == [
        left(LOBBY, "alice", "r1"),
        ReadState(OTHER),
    ]
    assert view.restore(OTHER, Snapshot(NEWER, 4, {LOBBY: {"carol": {"r3": {}}}}, {}), 0.0) == [
        joined(LOBBY, "carol", "r3")
    ]


def test_a_restore_of_a_newer_incarnation_replaces_the_old() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.receive(batch(3), 0.0) == [ReadState(OTHER)]
    events = view.restore(OTHER, Snapshot(NEWER, 2, {LOBBY: {"carol": {"r3": {}}}}, {}), 0.0)
    assert events == [left(LOBBY, "alice", "r1"), joined(LOBBY, "carol", "r3")]
    # The old incarnation's batches, still on their way, change nothing; the new one's continue from its state.
    assert view.receive(batch(4, untrack("carol", "r3")), 0.0) == []
    assert view.receive(batch(2, untrack("carol", "r3"), incarnation=NEWER), 0.0) == []
    assert view.receive(batch(3, untrack("carol", "r3"), incarnation=NEWER), 0.0) == [left(LOBBY, "carol", "r3")]


def test_a_restore_of_an_older_incarnation_changes_nothing() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.restore(OTHER, Snapshot(OLDER, 9, {LOBBY: {"old": {"r0": {}}}}, {"old": 1}), 0.0) == []
    assert view.presence_state(LOBBY) == {"alice": [meta("r1")]}
    assert view.users_elsewhere("old") == 0


# ---- nodes that stop ------------------------------------------------------------------------------------------


def test_goodbye_makes_the_members_leave_and_forgets_the_node() -> None:
    view = view_in_step(track("alice", "r1"), track("bob", "r2", room=HALL), wire.UserCount("alice", 2))
    events = view.receive(batch(2, track("carol", "r3"), wire.Goodbye()), 0.0)
    everyone = {"alice": [meta("r1")], "carol": [meta("r3")]}
    assert events == [joined(LOBBY, "carol", "r3"), left(HALL, "bob", "r2"), PresenceChanged(LOBBY, Diff({}, everyone))]
    assert view.nodes == []
    assert view.rooms() == set()
    assert view.users_elsewhere("alice") == 0


def test_restore_none_forgets_the_node() -> None:
    view = view_in_step(track("alice", "r1"), wire.UserCount("alice", 1))
    assert view.receive(batch(5), 0.0) == [ReadState(OTHER)]
    assert view.restore(OTHER, None, 0.0) == [left(LOBBY, "alice", "r1")]
    assert view.nodes == []
    assert view.users_elsewhere("alice") == 0
    assert view.restore(OTHER, None, 0.0) == []


def test_forget_makes_the_members_leave() -> None:
    view = view_in_step(track("alice", "r1"))
    assert view.forget(OTHER) == [left(LOBBY, "alice", "r1")]
    assert view.forget(OTHER) == []
    assert view.forget("never-heard") == []


def test_expire_forgets_nodes_silent_for_longer_than_silence_but_never_this_one() -> None:
    view = ClusterView(OWN)
    view.receive(batch(1, track("mine", "ra"), node=OWN), 0.0)
    view.receive(batch(1, track("alice", "rb"), node=OTHER), 0.0)
    view.receive(batch(1, track("carol", "rc"), node="c"), 0.0)
    view.receive(batch(2, node="c"), 8.0)  # a heartbeat
    assert view.expire(10.0, 10.0) == []  # silent for exactly `silence`: not yet
    assert view.expire(10.5, 10.0) == [left(LOBBY, "alice", "rb")]
    assert view.nodes == [OWN, "c"]
    assert view.expire(1000.0, 10.0) == [left(LOBBY, "carol", "rc")]
    assert view.nodes == [OWN]
    assert view.presence_state(LOBBY) == {"mine": [meta("ra")]}


def test_a_node_waiting_for_its_state_is_still_heard_through_its_batches() -> None:
    view = view_in_step(track("alice", "r1"))
    view.receive(batch(3), 1.0)  # a gap: reading
    view.receive(batch(4), 9.0)
    assert view.expire(15.0, 10.0) == []
    assert view.expire(19.5, 10.0) == [left(LOBBY, "alice", "r1")]


def test_restore_counts_as_hearing_from_the_node() -> None:
    view = ClusterView(OWN)
    view.restore(OTHER, Snapshot(INC, 3, {LOBBY: {"alice": {"r1": {}}}}, {}), 5.0)
    assert view.expire(14.0, 10.0) == []
    assert view.expire(15.5, 10.0) == [left(LOBBY, "alice", "r1")]


# ---- restore --------------------------------------------------------------------------------------------------


def test_restore_gives_the_differences_a_changed_state_leaving_and_joining_again() -> None:
    view = view_in_step(
        track("same", "r1", {"v": 1}),
        track("changed", "r2", {"v": 1}),
        track("gone", "r3"),
        track("gone-room", "r4", room=HALL),
        wire.UserCount("alice", 2),
        wire.UserCount("bob", 1),
    )
    view.receive(batch(3), 0.0)
    snapshot = Snapshot(
        INC,
        3,
        {
            LOBBY: {"same": {"r1": {"v": 1}}, "changed": {"r2": {"v": 2}}, "new": {"r5": {}}},
            "presence:new": {"x": {"r6": {}}},
        },
        {"alice": 3, "carol": 1, "zero": 0},
    )
    events = view.restore(OTHER, snapshot, 0.0)
    assert events == [
        left(HALL, "gone-room", "r4"),
        PresenceChanged(
            LOBBY,
            Diff(
                {"changed": [meta("r2", {"v": 2})], "new": [meta("r5")]},
                {"changed": [meta("r2", {"v": 1})], "gone": [meta("r3")]},
            ),
        ),
        joined("presence:new", "x", "r6"),
    ]
    assert view.rooms() == {LOBBY, "presence:new"}
    assert [view.users_elsewhere(sub) for sub in ("alice", "bob", "carol", "zero")] == [3, 0, 1, 0]


def test_restore_of_the_state_already_known_gives_no_diff() -> None:
    view = view_in_step(track("alice", "r1", {"v": 1}))
    view.receive(batch(2, wire.Announce()), 0.0)
    assert view.restore(OTHER, Snapshot(INC, 2, {LOBBY: {"alice": {"r1": {"v": 1}}}}, {}), 0.0) == []


def test_restore_of_an_unknown_node_joins_its_members() -> None:
    view = ClusterView(OWN)
    events = view.restore(OTHER, Snapshot(INC, 5, {LOBBY: {"alice": {"r1": {}, "r2": {"x": 1}}}}, {"alice": 2}), 0.0)
    assert events == [PresenceChanged(LOBBY, Diff({"alice": [meta("r1"), meta("r2", {"x": 1})]}, {}))]
    assert view.users_elsewhere("alice") == 2
    assert view.receive(batch(5, untrack("alice", "r1")), 0.0) == []
    assert view.receive(batch(6, untrack("alice", "r1")), 0.0) == [left(LOBBY, "alice", "r1")]


def test_restore_skips_empty_rooms_and_keys_of_a_snapshot() -> None:
    view = ClusterView(OWN)
    assert view.restore(OTHER, Snapshot(INC, 1, {LOBBY: {}, HALL: {"alice": {}}}, {}), 0.0) == []
    assert view.rooms() == set()


# ---- this node's own changes while Redis is away ----------------------------------------------------------------


def test_apply_own_shows_this_nodes_changes_at_once_until_its_state_is_restored() -> None:
    view = ClusterView(OWN)
    view.receive(batch(1, track("mine", "r1"), node=OWN, incarnation=INC), 0.0)
    assert view.apply_own(INC, [track("mine", "r2"), untrack("mine", "r1"), wire.UserCount("mine", 1)], 5.0) == [
        joined(LOBBY, "mine", "r2"),
        left(LOBBY, "mine", "r1"),
    ]
    assert view.presence_state(LOBBY) == {"mine": [meta("r2")]}
    assert view.users_elsewhere("mine") == 0
    # Redis is back: the node's state, written whole, replaces what was applied; only the difference shows.
    events = view.restore(OWN, Snapshot(INC, 2, {LOBBY: {"mine": {"r2": {}, "r3": {}}}}, {"mine": 1}), 6.0)
    assert events == [joined(LOBBY, "mine", "r3")]
    assert view.receive(batch(3, untrack("mine", "r3"), node=OWN, incarnation=INC), 7.0) == [left(LOBBY, "mine", "r3")]


def test_apply_own_before_anything_was_published_starts_this_nodes_replica() -> None:
    view = ClusterView(OWN)
    assert view.apply_own(INC, [track("mine", "r1")], 0.0) == [joined(LOBBY, "mine", "r1")]
    assert view.nodes == [OWN]
    assert view.expire(1000.0, 10.0) == []
    assert view.restore(OWN, Snapshot(INC, 1, {LOBBY: {"mine": {"r1": {}}}}, {}), 1.0) == []


# ---- connections per user ---------------------------------------------------------------------------------------


def test_users_elsewhere_sums_the_other_nodes_and_counts_zero_as_gone() -> None:
    view = ClusterView(OWN)
    view.receive(batch(1, wire.UserCount("alice", 5), node=OWN), 0.0)
    view.receive(batch(1, wire.UserCount("alice", 2), wire.UserCount("bob", 1), node=OTHER), 0.0)
    view.receive(batch(1, wire.UserCount("alice", 3), node="c"), 0.0)
    assert view.users_elsewhere("alice") == 5
    assert view.users_elsewhere("bob") == 1
    assert view.users_elsewhere("nobody") == 0
    # Counts are absolute: the latest replaces, 0 removes.
    view.receive(batch(2, wire.UserCount("alice", 1), wire.UserCount("bob", 0), node=OTHER), 0.0)
    assert view.users_elsewhere("alice") == 4
    assert view.users_elsewhere("bob") == 0
    view.receive(batch(2, wire.UserCount("alice", 0), node="c"), 0.0)
    assert view.users_elsewhere("alice") == 1
    # Counts change nothing in presence.
    assert view.rooms() == set()


# ---- the property: a receiver that follows an owner through a lossy bus ends where the owner is ----------------


@attrs.define
class Owner:
    """A node publishing its NodeState changes as batches, and what Redis holds of it after each."""

    state: NodeState = attrs.field(factory=NodeState)
    incarnation: str = "0000000000000001-aa"
    seq: int = 0
    gone: bool = False
    """said goodbye: its state is no longer in Redis and it publishes nothing until it starts again"""
    published: list[wire.Batch] = attrs.field(factory=list)
    """every batch published, of every incarnation, in the order Redis published them"""
    history: list[Snapshot | None] = attrs.field(factory=list)
    """what Redis held of the node right after each published batch"""

    def publish(self, ops: list[wire.Op]) -> None:
        self.seq += 1
        self.published.append(wire.Batch(OTHER, self.incarnation, self.seq, tuple(ops)))
        self.history.append(None if self.gone else self.state.snapshot(self.incarnation, self.seq))

    def goodbye(self) -> None:
        self.state = NodeState()
        self.gone = True
        self.publish([wire.Goodbye()])

    def restart(self, n: int) -> None:
        """A new life of the node, with nothing (its connections were lost) and a first batch that announces."""
        self.state = NodeState()
        self.gone = False
        self.incarnation = f"{n + 1:016x}-aa"
        self.seq = 0
        self.publish([wire.Announce()])


# Few rooms, keys and refs, so that the same meta is tracked, changed and untracked often.
ROOMS = [LOBBY, HALL]
KEYS = ["alice", "c\x00\"'"]
REFS = ["r1", "r2"]
SUBS = ["alice", "bob"]
SILENCE = 100.0


def held_by(snapshot: Snapshot | None) -> tuple[dict[str, dict[str, list[Meta]]], dict[str, int]]:
    """The presence (room -> key -> metas, in ref order) and the connection counts of a node's state."""
    if snapshot is None:
        return {}, {}
    rooms = {
        room: normal({key: [meta(ref, state) for ref, state in refs.items()] for key, refs in keys.items()})
        for room, keys in snapshot.members.items()
    }
    return {room: state for room, state in rooms.items() if state}, {s: n for s, n in snapshot.users.items() if n}


def seen_by(view: ClusterView) -> tuple[dict[str, dict[str, list[Meta]]], dict[str, int]]:
    rooms = {room: normal(view.presence_state(room)) for room in ROOMS}
    users = {sub: view.users_elsewhere(sub) for sub in SUBS}
    return {room: state for room, state in rooms.items() if state}, {s: n for s, n in users.items() if n}


owner_ops = st.one_of(
    st.tuples(
        st.just("track"),
        st.sampled_from(ROOMS),
        st.sampled_from(KEYS),
        st.sampled_from(REFS),
        st.fixed_dictionaries({}, optional={"v": st.integers(0, 2)}),
    ),
    st.tuples(st.just("untrack"), st.sampled_from(ROOMS), st.sampled_from(KEYS), st.sampled_from(REFS)),
    st.tuples(st.just("count"), st.sampled_from(SUBS), st.integers(0, 3)),
)

STEPS = {
    # The owner changes things and publishes them as one batch (none: a heartbeat).
    "publish": st.tuples(st.just("publish"), st.lists(owner_ops, max_size=4)),
    # The bus hands the receiver the next batch, or loses it, or (beyond what Redis does) hands it twice.
    "deliver": st.tuples(st.just("deliver"), st.sampled_from(["once", "once", "once", "lost", "twice"])),
    # The receiver's pending read of the owner's state reaches Redis, then comes back.
    "read": st.just(("read",)),
    "restore": st.just(("restore",)),
    # The owner reconnects after an outage (announces itself again), restarts (a new incarnation) or leaves.
    "life": st.tuples(st.sampled_from(["announce", "restart", "goodbye"])),
}
# Weighted towards what happens most: changes and deliveries.
steps = st.sampled_from(["publish"] * 3 + ["deliver"] * 4 + ["read", "read", "restore", "restore", "life"]).flatmap(
    STEPS.__getitem__
)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(steps, min_size=10, max_size=80), st.integers(0, 3))
def test_a_receiver_through_a_lossy_bus_follows_the_owner_with_consistent_diffs(
    plan: list[tuple[Any, ...]], joined_late: int
) -> None:
    """Whenever the receiver is not waiting for a state, it holds the owner's state as of the newest batch or state
    it took; at the end it holds the owner's state; its diffs add up to what it holds."""
    owner = Owner()
    owner.publish([wire.Announce()])
    # The receiver subscribes after `joined_late` of the owner's batches were published.
    for _ in range(joined_late):
        owner.publish([])
    receiver = ClusterView(OWN)
    delivered = joined_late
    newest: int | None = None
    """index in `owner.published` of the newest batch or state the receiver took"""
    wanted = False
    read: tuple[int, Snapshot | None] | None = None
    """the state read from Redis and the index of the batch it is as of, on its way back"""
    emitted: list[Event] = []
    restarts = 0
    clock = 0.0

    def handle(events: list[Event]) -> None:
        nonlocal wanted
        for event in events:
            if isinstance(event, ReadState):
                assert event.node == OTHER
                wanted = True
        emitted.extend(events)

    def deliver(index: int) -> None:
        nonlocal newest
        handle(receiver.receive(owner.published[index], clock))
        newest = index if newest is None else max(newest, index)

    def restore() -> None:
        nonlocal read, newest
        assert read is not None
        (index, snapshot), read = read, None
        handle(receiver.restore(OTHER, snapshot, clock))
        newest = index if newest is None else max(newest, index)

    for step in plan:
        clock += 1.0
        match step:
            case ("publish", ops) if not owner.gone:
                changes: list[wire.Op] = []
                for op in ops:
                    match op:
                        case ("track", room, key, ref, state):
                            changes.append(owner.state.track(room, key, ref, state))
                        case ("untrack", room, key, ref):
                            change = owner.state.untrack(room, key, ref)
                            if change is not None:
                                changes.append(change)
                        case ("count", sub, n):
                            changes.append(owner.state.count(sub, n))
                owner.publish(changes)
            case ("deliver", how) if delivered < len(owner.published):
                delivered += 1
                for _ in range({"once": 1, "lost": 0, "twice": 2}[how]):
                    deliver(delivered - 1)
            case ("read",) if wanted and read is None:
                # The hub reads once for any number of ReadState asked before the read started.
                wanted, read = False, (len(owner.published) - 1, owner.history[-1])
            case ("restore",) if read is not None:
                restore()
            case ("announce",) if not owner.gone:
                owner.publish([wire.Announce()])
            case ("restart",):
                restarts += 1
                owner.restart(restarts)
            case ("goodbye",) if not owner.gone:
                owner.goodbye()
        if not wanted and read is None:
            assert seen_by(receiver) == held_by(None if newest is None else owner.history[newest]), step

    # The end: whatever read is under way completes, then the bus delivers the rest and a last heartbeat in order,
    # and any state asked for is read and given back. A node gone without a goodbye heard expires.
    if read is not None:
        restore()
    if not owner.gone:
        owner.publish([])
    while delivered < len(owner.published):
        delivered += 1
        deliver(delivered - 1)
    for _ in range(3):
        if wanted:
            wanted, read = False, (len(owner.published) - 1, owner.history[-1])
            restore()
    assert not wanted, "restoring the state as of the latest batch keeps asking for it"
    if owner.gone:
        handle(receiver.expire(clock + SILENCE + 1, SILENCE))
        assert receiver.nodes == []

    assert seen_by(receiver) == held_by(owner.history[-1])
    assert receiver.rooms() == set(owner.state.members)

    # The diffs, applied in order to nothing, give what the receiver holds: none lost, none doubled.
    rooms: dict[str, dict[str, dict[str, Meta]]] = {}
    apply_diffs(rooms, presence_events(emitted))
    for room in ROOMS:
        held = {key: list(metas.values()) for key, metas in rooms.get(room, {}).items()}
        assert normal(held) == normal(receiver.presence_state(room)), room
