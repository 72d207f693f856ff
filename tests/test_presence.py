"""PresenceRoom: keys with one meta per tracking connection, and the diffs that docs/protocol.md's Presence section
sends."""

from __future__ import annotations

from fluxrt_trio.protocol.presence import Diff, PresenceRoom


def test_empty_room():
    room = PresenceRoom()
    assert room.state() == {}
    assert len(room) == 0
    assert not room.is_tracked("alice", "c1")


def test_track_joins():
    room = PresenceRoom()
    diff = room.track("alice", "c1", {"status": "online"})
    assert diff == Diff({"alice": [{"ref": "c1", "state": {"status": "online"}}]}, {})
    assert diff.payload() == {"joins": {"alice": [{"ref": "c1", "state": {"status": "online"}}]}, "leaves": {}}
    assert room.state() == {"alice": [{"ref": "c1", "state": {"status": "online"}}]}
    assert room.is_tracked("alice", "c1")
    assert len(room) == 1


def test_retrack_is_one_diff_with_old_meta_leaving_and_new_joining_with_the_same_ref():
    room = PresenceRoom()
    room.track("alice", "c1", {"status": "online"})
    diff = room.track("alice", "c1", {"status": "away"})
    assert diff.payload() == {
        "joins": {"alice": [{"ref": "c1", "state": {"status": "away"}}]},
        "leaves": {"alice": [{"ref": "c1", "state": {"status": "online"}}]},
    }
    assert diff.joins["alice"][0]["ref"] == diff.leaves["alice"][0]["ref"] == "c1"
    # The room holds only the new meta.
    assert room.state() == {"alice": [{"ref": "c1", "state": {"status": "away"}}]}


def test_untrack_leaves():
    room = PresenceRoom()
    room.track("alice", "c1", {"status": "online"})
    diff = room.untrack("alice", "c1")
    assert diff is not None
    assert diff.payload() == {"joins": {}, "leaves": {"alice": [{"ref": "c1", "state": {"status": "online"}}]}}
    assert room.state() == {}
    assert len(room) == 0
    assert not room.is_tracked("alice", "c1")


def test_untrack_of_something_not_tracked_is_none():
    room = PresenceRoom()
    assert room.untrack("alice", "c1") is None
    room.track("alice", "c1", {})
    assert room.untrack("alice", "c2") is None
    assert room.untrack("bob", "c1") is None
    assert room.state() == {"alice": [{"ref": "c1", "state": {}}]}
    assert room.untrack("alice", "c1") is not None
    assert room.untrack("alice", "c1") is None  # only once


def test_one_user_with_three_tabs_is_one_key_with_three_metas():
    room = PresenceRoom()
    for ref, page in (("tab1", "home"), ("tab2", "docs"), ("tab3", "chat")):
        diff = room.track("alice", ref, {"page": page})
        assert diff.payload() == {"joins": {"alice": [{"ref": ref, "state": {"page": page}}]}, "leaves": {}}
    assert len(room) == 1
    assert room.state() == {
        "alice": [
            {"ref": "tab1", "state": {"page": "home"}},
            {"ref": "tab2", "state": {"page": "docs"}},
            {"ref": "tab3", "state": {"page": "chat"}},
        ]
    }
    # Closing one tab leaves only that meta; the key stays.
    diff = room.untrack("alice", "tab2")
    assert diff is not None
    assert diff.payload() == {"joins": {}, "leaves": {"alice": [{"ref": "tab2", "state": {"page": "docs"}}]}}
    assert room.state() == {
        "alice": [{"ref": "tab1", "state": {"page": "home"}}, {"ref": "tab3", "state": {"page": "chat"}}]
    }
    # Re-tracking one tab touches only that tab.
    diff = room.track("alice", "tab3", {"page": "settings"})
    assert diff.payload() == {
        "joins": {"alice": [{"ref": "tab3", "state": {"page": "settings"}}]},
        "leaves": {"alice": [{"ref": "tab3", "state": {"page": "chat"}}]},
    }
    assert room.state()["alice"] == [
        {"ref": "tab1", "state": {"page": "home"}},
        {"ref": "tab3", "state": {"page": "settings"}},
    ]
    room.untrack("alice", "tab1")
    room.untrack("alice", "tab3")
    assert room.state() == {}
    assert len(room) == 0


def test_several_keys():
    room = PresenceRoom()
    room.track("alice", "c1", {"n": 1})
    room.track("bob", "c2", {"n": 2})
    room.track("anon:c3", "c3", {"n": 3})
    assert room.state() == {
        "alice": [{"ref": "c1", "state": {"n": 1}}],
        "bob": [{"ref": "c2", "state": {"n": 2}}],
        "anon:c3": [{"ref": "c3", "state": {"n": 3}}],
    }
    assert len(room) == 3
    room.untrack("bob", "c2")
    assert set(room.state()) == {"alice", "anon:c3"}
    assert len(room) == 2


def test_state_is_a_snapshot_of_the_key_lists():
    room = PresenceRoom()
    room.track("alice", "c1", {})
    snapshot = room.state()
    room.track("alice", "c2", {})
    room.track("bob", "c3", {})
    assert snapshot == {"alice": [{"ref": "c1", "state": {}}]}
