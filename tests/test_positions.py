"""Positions in a table channel's stream (protocol/positions.py), as plain values: snapshots, cuts, the text a client
holds, and the windows a replay reads. The property test at the end plays transactions against a model of
PostgreSQL's snapshots (`GetSnapshotData`: xmax is the latest completed xid + 1, xip the running xids below it) read
by two nodes whose changefeeds took their snapshots at different moments, and reads the replay's windows with the
changefeed's own window definition (postgres/changelog.py), as SQL would."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrt_trio.protocol.positions import (
    MAX_POSITION,
    NO_LIMIT,
    Cut,
    Snapshot,
    TablePosition,
    replay_windows,
)

# ---- Snapshot ------------------------------------------------------------------------------------------------


def test_a_snapshot_parses_from_and_writes_pg_snapshot_text():
    assert Snapshot.parse("10:20:15,12") == Snapshot(10, 20, frozenset({12, 15}))
    assert Snapshot.parse("10:20:15,12").text() == "10:20:12,15"
    assert Snapshot.parse("7:7:") == Snapshot(7, 7)
    # Snapshots with no transaction in progress, the common case, share one empty set (216 bytes apiece otherwise).
    assert Snapshot.parse("7:7:").xip is Snapshot.parse("8:9:").xip
    assert Snapshot(7, 7).text() == "7:7:"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:2",
        "1:2:3:4",
        "0:5:",
        "5:4:",
        "5:10:4",
        "5:10:10",
        "5:10:12",
        "a:10:",
        "5:b:",
        "5:10:6,,7",
        "5:10:6,",
        "-1:10:",
        f"1:{2**63}:",
        f"{2**64}:{2**64 + 1}:",
    ],
)
def test_a_snapshot_that_postgresql_would_not_write_is_refused(text):
    with pytest.raises(ValueError):
        Snapshot.parse(text)


def test_a_snapshot_sees_what_finished_before_it():
    snapshot = Snapshot(10, 20, frozenset({12, 15}))
    assert snapshot.sees(3) and snapshot.sees(9)
    assert snapshot.sees(10) and snapshot.sees(13) and snapshot.sees(19)
    assert not snapshot.sees(12) and not snapshot.sees(15)
    assert not snapshot.sees(20) and not snapshot.sees(21)


def test_a_later_snapshot_includes_an_earlier_one():
    earlier = Snapshot(10, 20, frozenset({12, 15}))
    # 12 finished, 20 and 21 began and 20 finished.
    later = Snapshot(15, 22, frozenset({15, 21}))
    assert later.includes(earlier)
    assert not earlier.includes(later)
    assert earlier.includes(earlier)
    # Still running below the other's xmax what the other saw finished: not later.
    assert not Snapshot(13, 22, frozenset({13})).includes(earlier)
    # A smaller xmax never includes a larger one, even with nothing committed in between.
    assert not Snapshot(5, 5).includes(Snapshot(5, 6, frozenset({5})))


# ---- Cut -----------------------------------------------------------------------------------------------------


PREV = Snapshot(10, 20, frozenset({12}))
CUR = Snapshot(20, 25, frozenset({22}))
"""a window: 12 and 20..24 but 22 committed in it"""


def test_a_cut_covers_its_prev_and_its_window_up_to_an_id():
    cut = Cut(PREV, CUR, 100)
    assert cut.covers(5, 1) and cut.covers(13, 10_000)
    assert cut.covers(12, 100) and not cut.covers(12, 101)
    assert cut.covers(21, 99) and not cut.covers(21, 150)
    assert not cut.covers(22, 1)
    assert not cut.covers(25, 1)
    whole = Cut.after_window(CUR)
    assert whole.covers(12, 10_000) and whole.covers(24, 10_000) and not whole.covers(22, 1)


def test_a_cut_includes_earlier_cuts_of_its_window_and_cuts_of_earlier_windows():
    assert Cut(PREV, CUR, 100).includes(Cut(PREV, CUR, 100))
    assert Cut(PREV, CUR, 100).includes(Cut(PREV, CUR, 50))
    assert not Cut(PREV, CUR, 50).includes(Cut(PREV, CUR, 100))
    assert Cut.after_window(CUR).includes(Cut(PREV, CUR, 100))
    assert Cut(CUR, Snapshot(22, 30, frozenset({22})), 0).includes(Cut(PREV, CUR, 10**9))
    assert not Cut(PREV, CUR, 10**9).includes(Cut.after_window(CUR))
    assert not Cut.after_window(PREV).includes(Cut(PREV, CUR, 1))


# ---- TablePosition -------------------------------------------------------------------------------------------


def position(relid: int = 16384, upto: int = 7) -> TablePosition:
    return TablePosition(relid, Cut(PREV, CUR, upto))


def test_a_position_is_written_and_read_back():
    text = position().text()
    assert text == "t1~16384~10:20:12~20:25:22~7"
    assert TablePosition.parse(text) == position()
    whole = TablePosition(5, Cut.after_window(CUR))
    assert TablePosition.parse(whole.text()) == whole


@pytest.mark.parametrize(
    "since",
    [
        None,
        7,
        1.5,
        True,
        ["t1~16384~10:20:12~20:25:22~7"],
        {"id": "t1~16384~10:20:12~20:25:22~7"},
        "",
        "garbage",
        "12345",
        "t2~16384~10:20:12~20:25:22~7",
        "t1~16384~10:20:12~20:25:22",
        "t1~16384~10:20:12~20:25:22~7~8",
        "t1~0~10:20:12~20:25:22~7",
        "t1~-5~10:20:12~20:25:22~7",
        "t1~x~10:20:12~20:25:22~7",
        "t1~16384~10:20:12~20:25:22~-1",
        # Beyond what the database holds: an oid has 32 bits, ids and xids are below 2**63.
        f"t1~{2**32}~10:20:12~20:25:22~7",
        f"t1~{2**32 + 16384}~10:20:12~20:25:22~7",
        f"t1~16384~10:20:12~20:25:22~{2**63 - 1}",
        f"t1~16384~10:20:12~20:25:22~{2**64}",
        f"t1~16384~10:20:12~20:{2**63}:22~7",
        f"t1~16384~10:{2**64 + 20}:12~20:{2**64 + 25}:22~7",
        "t1~16384~10:20:12~20:25:22~x",
        "t1~16384~10:20:30~20:25:22~7",
        "t1~16384~20:10:~20:25:22~7",
        # cur must include prev: 12 cannot be finished in prev and running again in cur.
        "t1~16384~10:20:~12:25:12~7",
        "t1~16384~20:25:22~10:20:12~7",
    ],
)
def test_a_malformed_position_is_none(since):
    assert TablePosition.parse(since) is None


def test_an_oversized_position_is_none_before_it_is_parsed():
    many = ",".join(str(x) for x in range(11, 20 + MAX_POSITION))
    text = f"t1~16384~10:{20 + MAX_POSITION}:{many}~{20 + MAX_POSITION}:{25 + MAX_POSITION}:~7"
    assert len(text) > MAX_POSITION
    assert TablePosition.parse(text) is None
    assert TablePosition.parse("t1~16384~10:20:12~20:25:22~" + "7" * MAX_POSITION) is None


# ---- replay_windows ------------------------------------------------------------------------------------------

NEXT = Snapshot(24, 30, frozenset({24, 27}))
LAST = Snapshot(30, 31)


def test_the_same_window_read_further_is_the_ids_in_between():
    assert replay_windows(Cut(PREV, CUR, 5), Cut(PREV, CUR, 9)) == [(PREV, CUR, 5, 9)]
    assert replay_windows(Cut(PREV, CUR, 9), Cut(PREV, CUR, 9)) == []
    assert replay_windows(Cut.after_window(CUR), Cut.after_window(CUR)) == []


def test_later_windows_are_the_rest_of_the_clients_then_whole_ones_then_the_start_of_the_last():
    assert replay_windows(Cut(PREV, CUR, 5), Cut(NEXT, LAST, 40)) == [
        (PREV, CUR, 5, NO_LIMIT),
        (CUR, NEXT, 0, NO_LIMIT),
        (NEXT, LAST, 0, 40),
    ]
    assert replay_windows(Cut(PREV, CUR, 5), Cut.after_window(LAST)) == [
        (PREV, CUR, 5, NO_LIMIT),
        (CUR, LAST, 0, NO_LIMIT),
    ]
    assert replay_windows(Cut.after_window(CUR), Cut(CUR, NEXT, 40)) == [(CUR, NEXT, 0, 40)]
    assert replay_windows(Cut.after_window(CUR), Cut(CUR, NEXT, 0)) == []


# ---- the property: a model of PostgreSQL's transactions and snapshots ----------------------------------------


@attrs.frozen
class Change:
    xid: int
    id: int
    written_at: int
    """the step of the history that wrote it"""


@attrs.frozen
class Taken:
    """A snapshot one node's changefeed took, and when."""

    snapshot: Snapshot
    at: int


@attrs.define
class Database:
    """xids and change ids as PostgreSQL hands them out; snapshots as `GetSnapshotData` takes them."""

    next_xid: int = 3
    next_id: int = 1
    latest_completed: int = 2
    running: list[int] = attrs.Factory(list)
    committed: dict[int, int] = attrs.Factory(dict)
    """xid -> the step it committed at"""
    writes: list[Change] = attrs.Factory(list)
    step: int = 0

    def snapshot(self) -> Snapshot:
        xmax = self.latest_completed + 1
        xip = frozenset(x for x in self.running if x < xmax)
        return Snapshot(min(xip, default=xmax), xmax, xip)

    def apply(self, action: str, pick: int) -> None:
        self.step += 1
        if action == "begin" or not self.running:
            self.running.append(self.next_xid)
            self.next_xid += 1
            return
        xid = self.running[pick % len(self.running)]
        if action == "write":
            self.writes.append(Change(xid, self.next_id, self.step))
            self.next_id += 1
            return
        self.running.remove(xid)
        self.latest_completed = max(self.latest_completed, xid)
        if action == "commit":
            self.committed[xid] = self.step

    @property
    def log(self) -> list[Change]:
        """realtime.changes: what committed transactions wrote (an aborted one's rows are gone)."""
        return [c for c in self.writes if c.xid in self.committed]


def visible_in_snapshot(xid: int, snapshot: Snapshot) -> bool:
    """pg_visible_in_snapshot, for a transaction that committed, written apart from Snapshot.sees."""
    if xid < snapshot.xmin:
        return True
    return xid < snapshot.xmax and xid not in snapshot.xip


def read_window(log: list[Change], prev: Snapshot, cur: Snapshot, after: int, until: int) -> list[Change]:
    """The changefeed's window (changelog._WINDOW, _REPLAY) as SQL reads it: committed after `prev` (xid at or
    above its xmax, or in its xip) and visible in `cur`, ids in (after, until], in id order."""
    rows = [
        c
        for c in log
        if ((prev.xmax <= c.xid < cur.xmax) or c.xid in prev.xip)
        and visible_in_snapshot(c.xid, cur)
        and after < c.id <= until
    ]
    return sorted(rows, key=lambda c: c.id)


def covered(log: list[Change], cut: Cut) -> set[Change]:
    """What a client that received the stream up to `cut` has: everything visible in `prev`, and of the window
    (prev, cur) what came up to `upto` in id order."""
    window = set(read_window(log, cut.prev, cut.cur, 0, cut.upto))
    return {c for c in log if visible_in_snapshot(c.xid, cut.prev)} | window


def cuts_of(log: list[Change], taken: list[Taken]) -> list[tuple[Cut, int]]:
    """Every position a node reading windows between its snapshots hands out: the cut after each change of each
    window (an event's payload.id, or where a page of a window ended), and after each whole window; each with the
    step at which its `cur` was taken."""
    cuts = [(Cut.after_window(taken[0].snapshot), taken[0].at)]
    for before, after in itertools.pairwise(taken):
        for change in read_window(log, before.snapshot, after.snapshot, 0, NO_LIMIT):
            cuts.append((Cut(before.snapshot, after.snapshot, change.id), after.at))
        cuts.append((Cut.after_window(after.snapshot), after.at))
    return cuts


ACTIONS = st.sampled_from(["begin", "begin", "write", "write", "write", "commit", "commit", "abort", "a", "b"])
HISTORY = st.lists(st.tuples(ACTIONS, st.integers(0, 7)), min_size=10, max_size=60)


@settings(max_examples=300, deadline=None, database=None)
@given(HISTORY)
def test_replay_windows_between_two_cuts_hold_exactly_what_one_covers_beyond_the_other(history):
    database = Database()
    nodes: dict[str, list[Taken]] = {"a": [Taken(database.snapshot(), 0)], "b": [Taken(database.snapshot(), 0)]}
    for action, pick in history:
        if action in nodes:
            database.step += 1
            nodes[action].append(Taken(database.snapshot(), database.step))
        else:
            database.apply(action, pick)
    log = database.log
    cuts = cuts_of(log, nodes["a"]) + cuts_of(log, nodes["b"])
    coverage = {cut: frozenset(covered(log, cut)) for cut, _ in cuts}
    for since, since_at in cuts:
        # A node that read a snapshot taken after the client's position was handed out can always replay it.
        for taken in nodes["a"] + nodes["b"]:
            if taken.at >= since_at:
                assert Cut.after_window(taken.snapshot).includes(since)
        for until, _ in cuts:
            if until.includes(since):
                check_replay(database, since, until, coverage)


def check_replay(database: Database, since: Cut, until: Cut, coverage: dict[Cut, frozenset[Change]]) -> None:
    log = database.log
    assert coverage[since] <= coverage[until]
    replayed: list[tuple[Change, Cut]] = []
    for prev, cur, after, last in replay_windows(since, until):
        replayed += [(c, Cut(prev, cur, c.id)) for c in read_window(log, prev, cur, after, last)]
    changes = [c for c, _ in replayed]
    assert len(changes) == len(set(changes)), "a change replayed twice"
    assert set(changes) == coverage[until] - coverage[since]

    # Each replayed event's own position is exact: a client resuming from it gets exactly the rest.
    for k, (change, cut) in enumerate(replayed):
        assert covered(log, cut) == coverage[since] | set(changes[: k + 1]), change
        assert TablePosition.parse(TablePosition(16384, cut).text()) == TablePosition(16384, cut)
        assert until.includes(cut)

    # Commit order where it matters: a change written after another's transaction committed (as a second write
    # to the same row waits for the first) comes after it.
    for k, first in enumerate(changes):
        for second in changes[:k]:
            assert not database.committed[first.xid] < second.written_at, (first, second)
