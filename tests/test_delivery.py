"""protocol/delivery.py as values: which images a window needs decided, and who gets which frame once row
visibility is known. No database: what postgres/rls.py would answer is written out by hand."""

from __future__ import annotations

import datetime
from typing import Any

import attrs
import orjson

from fluxrt_trio.protocol.changes import RowChange
from fluxrt_trio.protocol.channels import parse_channel
from fluxrt_trio.protocol.delivery import (
    DROPPED_UNCHECKED,
    PAUSE,
    POLICY_RAISED,
    UNREADABLE,
    YIELD_EVERY,
    DeliveryPlanner,
    Ended,
    Missed,
    Visibility,
    deliveries,
    ended_by,
    undecided,
    visibilities,
)
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.messages import ErrorCode
from fluxrt_trio.protocol.session import Subscription, TableGrant

CHANNEL = "table:public.tasks"
AT = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
ALICE = Identity("alice", "authenticated", {"sub": "alice"})
BOB = Identity("bob", "authenticated", {"sub": "bob"})


@attrs.define(eq=False)
class Subscriber:
    conn_id: str
    identity: Identity | None
    subs: dict[str, Subscription] = attrs.field(factory=dict)

    def subscription(self, channel: str) -> Subscription | None:
        return self.subs.get(channel)

    def deliver_nowait(self, frame: bytes) -> None:
        raise AssertionError("delivery.py hands frames out; it never delivers")

    def end_subscription(self, channel: str, error: Any) -> None:
        raise AssertionError("delivery.py hands notices out; it never acts on them")


def subscriber(conn_id: str, identity: Identity, event: str = "*", filter: str | None = None) -> Subscriber:
    return Subscriber(conn_id, identity, {CHANNEL: Subscription(parse_channel(CHANNEL), event, filter)})


def change(n: int, op: str, new: dict | None = None, old: dict | None = None, table: str = "tasks") -> RowChange:
    return RowChange(n, AT, 42, "public", table, op, old, new)


def members(*subscribers: Subscriber):
    return lambda channel: [s for s in subscribers if channel in s.subs]


def frames(handouts) -> dict[str, list[dict]]:
    """conn_id -> the messages it was handed, decoded."""
    out: dict[str, list[dict]] = {}
    for handout in handouts:
        if isinstance(handout, tuple):
            who, frame = handout
            # A server frame: FIN + text opcode, then the length; the JSON follows.
            out.setdefault(who.conn_id, []).append(orjson.loads(frame[frame.index(b"{") :]))
    return out


def test_the_plan_asks_only_about_wanted_images_and_the_identities_that_want_them():
    a = subscriber("a", ALICE, filter="owner=eq.alice")
    b = subscriber("b", BOB, event="DELETE")
    changes = [change(1, "INSERT", {"id": 1, "owner": "alice"}), change(2, "INSERT", {"id": 2, "owner": "carol"})]
    plans = DeliveryPlanner().plan(changes, members(a, b))
    plan = plans[CHANNEL]
    assert plan.images == [{"id": 1, "owner": "alice"}]
    assert plan.identity_keys == [ALICE.policy_key]
    assert plan.identities() == [("authenticated", {"sub": "alice"})]
    # Nobody wants a change to a table without subscribers, or one that no filter lets through: no image is asked
    # about, only (for the filtered role) which columns it may still read.
    assert DeliveryPlanner().plan([change(3, "INSERT", {"id": 3, "owner": "carol"})], members(b)) == {}
    unwanted = DeliveryPlanner().plan([change(3, "INSERT", {"id": 3, "owner": "carol"})], members(a, b))[CHANNEL]
    assert unwanted.images == [] and unwanted.identity_keys == [ALICE.policy_key]


def test_an_update_asks_about_both_images_and_the_old_one_goes_only_to_who_saw_it():
    a, b = subscriber("a", ALICE), subscriber("b", BOB)
    changes = [change(1, "UPDATE", {"id": 1, "v": 2}, {"id": 1, "v": 1})]
    plans = DeliveryPlanner().plan(changes, members(a, b))
    assert plans[CHANNEL].images == [{"id": 1, "v": 2}, {"id": 1, "v": 1}]
    decided = {
        (CHANNEL, ALICE.policy_key): Visibility(frozenset({0, 1})),
        (CHANNEL, BOB.policy_key): Visibility(frozenset({0})),
    }
    got = frames(deliveries(changes, plans, decided, members(a, b)))
    assert got["a"][0]["payload"]["old_record"] == {"id": 1, "v": 1}
    assert "old_record" not in got["b"][0]["payload"]
    assert got["b"][0]["payload"]["record"] == {"id": 1, "v": 2}


def test_frames_are_encoded_once_per_change_and_column_set():
    first, second, third = subscriber("1", ALICE), subscriber("2", ALICE), subscriber("3", BOB)
    changes = [change(1, "INSERT", {"id": 1, "secret": "x"})]
    plans = DeliveryPlanner().plan(changes, members(first, second, third))
    decided = {
        (CHANNEL, ALICE.policy_key): Visibility(frozenset({0})),
        (CHANNEL, BOB.policy_key): Visibility(frozenset({0}), readable=("id",)),
    }
    handouts = [h for h in deliveries(changes, plans, decided, members(first, second, third)) if h is not PAUSE]
    by_conn = {who.conn_id: frame for who, frame in handouts}
    assert by_conn["1"] is by_conn["2"]
    assert frames(handouts)["3"][0]["payload"]["record"] == {"id": 1}
    assert frames(handouts)["1"][0]["payload"]["record"] == {"id": 1, "secret": "x"}


def test_what_an_identity_may_not_see_never_reaches_it():
    a, b = subscriber("a", ALICE), subscriber("b", BOB)
    changes = [change(1, "INSERT", {"id": 1}), change(2, "DELETE", None, {"id": 2})]
    plans = DeliveryPlanner().plan(changes, members(a, b))
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset({1})), (CHANNEL, BOB.policy_key): Visibility(None)}
    got = frames(deliveries(changes, plans, decided, members(a, b)))
    assert [m["payload"]["type"] for m in got["a"]] == ["DELETE"]
    assert "b" not in got


def test_a_subscription_that_changed_while_the_window_was_decided_gets_nothing_decided_for_the_old_one():
    gone, narrowed, reidentified = subscriber("gone", ALICE), subscriber("narrowed", ALICE), subscriber("re", ALICE)
    changes = [change(1, "INSERT", {"id": 1})]
    everyone = members(gone, narrowed, reidentified)
    plans = DeliveryPlanner().plan(changes, everyone)
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset({0}))}
    del gone.subs[CHANNEL]
    narrowed.subs[CHANNEL] = Subscription(parse_channel(CHANNEL), "DELETE")
    reidentified.identity = BOB
    assert frames(deliveries(changes, plans, decided, everyone)) == {}


def test_the_planner_keeps_its_index_until_told_that_subscriptions_changed():
    a = subscriber("a", ALICE)
    late = subscriber("late", BOB)
    planner = DeliveryPlanner()
    changes = [change(1, "INSERT", {"id": 1})]
    planner.plan(changes, members(a))
    assert planner.plan(changes, members(a, late))[CHANNEL].identity_keys == [ALICE.policy_key]
    planner.subscriptions_changed(CHANNEL)
    assert planner.plan(changes, members(a, late))[CHANNEL].identity_keys == [ALICE.policy_key, BOB.policy_key]


def test_truncate_goes_to_star_and_truncate_subscribers_without_asking_the_database():
    star, inserts, truncates = (
        subscriber("star", ALICE),
        subscriber("ins", ALICE, "INSERT"),
        subscriber("tr", BOB, "TRUNCATE"),
    )
    changes = [change(1, "TRUNCATE")]
    everyone = members(star, inserts, truncates)
    plans = DeliveryPlanner().plan(changes, everyone)
    assert plans[CHANNEL].images == []
    got = frames(deliveries(changes, plans, {}, everyone))
    assert sorted(got) == ["star", "tr"]
    assert got["star"][0]["payload"]["type"] == "TRUNCATE" and "record" not in got["star"][0]["payload"]


def test_disabled_unreadable_and_policy_errors_become_notices():
    a, b = subscriber("a", ALICE), subscriber("b", BOB)
    everyone = members(a, b)
    changes = [change(1, "INSERT", {"id": 1}), change(2, "UNREADABLE"), change(3, "DISABLE")]
    plans = DeliveryPlanner().plan(changes, everyone)
    decided = {
        (CHANNEL, ALICE.policy_key): Visibility(frozenset({0})),
        (CHANNEL, BOB.policy_key): Visibility(frozenset(), error="division by zero"),
    }
    notices = [h for h in deliveries(changes, plans, decided, everyone) if not isinstance(h, tuple)]
    unreadable, disabled, policy = notices
    assert isinstance(unreadable, Missed) and unreadable.recipients == [a, b] and unreadable.message == UNREADABLE
    assert unreadable.error.code is ErrorCode.CHANGES_MISSED and unreadable.error.channel == CHANNEL
    assert isinstance(disabled, Ended) and disabled.recipients == [a, b]
    assert disabled.error.code is ErrorCode.SUBSCRIPTION_FAILED
    assert "enable_realtime('public.tasks')" in disabled.error.message
    # Only the identity the policy raised for is told, and the policy's text stays out of the message.
    assert isinstance(policy, Missed) and policy.recipients == [b] and policy.message == POLICY_RAISED
    assert policy.detail == "division by zero" and "division" not in policy.error.message


def granted(grant: TableGrant | None) -> Subscription:
    return Subscription(parse_channel(CHANNEL), grant=grant)


def test_an_ending_row_ends_only_subscriptions_checked_against_its_table_before_it_committed():
    # The row's transaction 120 had not committed when the check read snapshot 110:130:120 (it was in progress).
    drop = attrs.evolve(change(9, "DROP"), xid=120)
    assert ended_by(granted(TableGrant(42, "110:130:120")), drop)
    assert ended_by(granted(TableGrant(42, "100:110:")), drop)
    # Checked after it committed: the check saw the table dropped and created again, or disabled and enabled again.
    assert not ended_by(granted(TableGrant(42, "110:130:")), drop)
    assert not ended_by(granted(TableGrant(42, "121:121:")), drop)
    # Checked against another table of that name (the one created after the DROP): never, whenever it was checked.
    assert not ended_by(granted(TableGrant(43, "100:110:")), drop)
    assert not ended_by(granted(TableGrant(43)), drop)
    # Resumed (no snapshot kept): every ending row of its table; made without a check: every ending row.
    assert ended_by(granted(TableGrant(42)), drop)
    assert ended_by(granted(None), drop)


def test_an_ending_row_spares_the_subscriptions_of_a_table_created_again_under_its_name():
    old, new = subscriber("old", ALICE), subscriber("new", BOB)
    old.subs[CHANNEL] = granted(TableGrant(42, "100:110:"))
    new.subs[CHANNEL] = granted(TableGrant(43, "121:121:"))
    changes = [attrs.evolve(change(1, "DROP"), xid=120)]
    everyone = members(old, new)
    (ended,) = deliveries(changes, DeliveryPlanner().plan(changes, everyone), {}, everyone)
    assert isinstance(ended, Ended) and ended.recipients == [old]
    assert "public.tasks was dropped" in ended.error.message


def test_a_table_created_under_the_name_gets_none_of_the_old_ones_last_changes():
    # Read after the new table's subscriber was acked, within the changefeed's lag: table 42's rows are not table
    # 43's, and its TRUNCATE must not empty what the new table's subscriber shows.
    old, new = subscriber("old", ALICE), subscriber("new", ALICE)
    old.subs[CHANNEL] = granted(TableGrant(42, "100:110:"))
    new.subs[CHANNEL] = granted(TableGrant(43, "121:121:"))
    changes = [change(1, "INSERT", {"id": 1}), change(2, "TRUNCATE")]
    everyone = members(old, new)
    plans = DeliveryPlanner().plan(changes, everyone)
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset({0}))}
    got = frames(deliveries(changes, plans, decided, everyone))
    assert [m["payload"]["type"] for m in got["old"]] == ["INSERT", "TRUNCATE"] and "new" not in got


def test_long_windows_pause_for_the_scheduler():
    a = subscriber("a", ALICE)
    changes = [change(n, "INSERT", {"id": n}) for n in range(2 * YIELD_EVERY + 1)]
    plans = DeliveryPlanner().plan(changes, members(a))
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset(range(len(changes))))}
    handouts = list(deliveries(changes, plans, decided, members(a)))
    assert handouts.count(PAUSE) == 2
    assert len(handouts) == len(changes) + 2
    assert handouts.index(PAUSE) == YIELD_EVERY


def test_visibilities_reads_the_database_answer_and_names_the_tables_that_failed_or_were_dropped():
    a, b = subscriber("a", ALICE), subscriber("b", BOB)
    changes = [
        change(1, "INSERT", {"id": 1}),
        change(2, "INSERT", {"id": 2}, table="other"),
        change(3, "INSERT", {"id": 3}, table="gone"),
    ]
    other, gone = "table:public.other", "table:public.gone"
    b.subs[other] = Subscription(parse_channel(other))
    b.subs[gone] = Subscription(parse_channel(gone))
    plans = DeliveryPlanner().plan(changes, members(a, b))
    answers = [(CHANNEL, [(1, [0], ["id"], None)]), (other, "permission denied"), (gone, None)]
    decided, failed, dropped = visibilities(plans, answers)
    assert decided == {(CHANNEL, BOB.policy_key): Visibility(frozenset({0}), ("id",))}
    assert failed == {other: "permission denied"}
    assert dropped == [gone]


def test_withheld_changes_are_named_only_to_the_subscribers_of_their_table():
    # The old table's changes are read after a new table took its name: its subscribers were checked against the
    # new table and never get the old one's changes, so they are not told some were withheld either.
    old, new, unchecked = subscriber("old", ALICE), subscriber("new", BOB), subscriber("unchecked", BOB)
    old.subs[CHANNEL] = attrs.evolve(old.subs[CHANNEL], grant=TableGrant(42, "10:10:"))
    new.subs[CHANNEL] = attrs.evolve(new.subs[CHANNEL], grant=TableGrant(43, "20:20:"))
    gone = subscriber("gone", ALICE)
    everyone = members(old, new, unchecked, gone)
    plans = DeliveryPlanner().plan([change(1, "INSERT", {"id": 1})], everyone)
    gone.subs.clear()
    missed = undecided(CHANNEL, plans[CHANNEL], DROPPED_UNCHECKED)
    assert missed == Missed([old, unchecked], CHANNEL, DROPPED_UNCHECKED)
    assert missed.error.code is ErrorCode.CHANGES_MISSED


SECRET_FILTERED = "secret=eq.1"
"""a filter on `secret`, the column whose SELECT the tests below take away after subscribing"""


def test_a_filter_on_a_column_the_role_may_no_longer_read_ends_the_subscription_and_selects_nothing():
    # The oracle: the filter went on choosing rows by `secret` while `record` no longer showed it.
    hidden, open_ = subscriber("hidden", ALICE, filter=SECRET_FILTERED), subscriber("open", BOB)
    other = subscriber("other", BOB, filter="id=eq.1")
    everyone = members(hidden, open_, other)
    changes = [change(1, "INSERT", {"id": 1, "secret": 1}), change(2, "INSERT", {"id": 2, "secret": 2})]
    plans = DeliveryPlanner().plan(changes, everyone)
    decided = {
        (CHANNEL, ALICE.policy_key): Visibility(frozenset({0, 1}), readable=("id",)),
        (CHANNEL, BOB.policy_key): Visibility(frozenset({0, 1}), readable=("id",)),
    }
    handouts = list(deliveries(changes, plans, decided, everyone))
    ended = [h for h in handouts if isinstance(h, Ended)]
    assert len(ended) == 1 and ended[0].recipients == [hidden] and ended[0].channel == CHANNEL
    assert ended[0].error.code is ErrorCode.SUBSCRIPTION_FAILED
    assert ended[0].error.message == (
        "invalid filter: role authenticated may no longer read column secret of public.tasks;"
        " subscribe again without it"
    )
    # Told before any frame of the window, and handed none; the others get theirs, without the column.
    assert handouts.index(ended[0]) == 0
    got = frames(handouts)
    assert "hidden" not in got
    assert [m["payload"]["record"] for m in got["open"]] == [{"id": 1}, {"id": 2}]
    assert [m["payload"]["record"] for m in got["other"]] == [{"id": 1}]


def test_a_hidden_filter_is_ended_whether_or_not_the_window_matched_it():
    # When the subscription ends must not depend on the hidden values either: a window whose rows the filter does
    # not match still asks which columns the role may read, and ends it the same way.
    hidden = subscriber("hidden", ALICE, filter=SECRET_FILTERED)
    changes = [change(1, "INSERT", {"id": 1, "secret": 2})]
    plans = DeliveryPlanner().plan(changes, members(hidden))
    assert plans[CHANNEL].images == [] and plans[CHANNEL].identities() == [("authenticated", {"sub": "alice"})]
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset(), readable=("id",))}
    handouts = list(deliveries(changes, plans, decided, members(hidden)))
    assert [type(h) for h in handouts] == [Ended] and handouts[0].recipients == [hidden]


def test_columns_the_old_table_hides_do_not_end_the_filters_of_a_table_created_under_its_name():
    # What the role may read of table 42 (the window's) says nothing of table 43, which the second subscription's
    # check saw: its filter on `secret` is not ended by the old table's last changes.
    old = subscriber("old", ALICE, filter=SECRET_FILTERED)
    new = subscriber("new", ALICE, filter=SECRET_FILTERED)
    old.subs[CHANNEL] = attrs.evolve(old.subs[CHANNEL], grant=TableGrant(42, "100:110:"))
    new.subs[CHANNEL] = attrs.evolve(new.subs[CHANNEL], grant=TableGrant(43, "121:121:"))
    changes = [change(1, "INSERT", {"id": 1, "secret": 2})]
    plans = DeliveryPlanner().plan(changes, members(old, new))
    decided = {(CHANNEL, ALICE.policy_key): Visibility(frozenset(), readable=("id",))}
    handouts = list(deliveries(changes, plans, decided, members(old, new)))
    assert [type(h) for h in handouts] == [Ended] and handouts[0].recipients == [old]


def test_one_identity_per_role_is_asked_about_columns_and_stands_for_the_role():
    carol = Identity("carol", "authenticated", {"sub": "carol"})
    a, b = subscriber("a", ALICE, filter=SECRET_FILTERED), subscriber("b", BOB, filter="secret=gt.0")
    c = subscriber("c", carol, filter="id=eq.7")
    changes = [change(1, "INSERT", {"id": 1, "secret": 5})]
    plans = DeliveryPlanner().plan(changes, members(a, b, c))
    # Alice stands for the role; Bob is asked because his filter matched; Carol's did not.
    assert plans[CHANNEL].identity_keys == [ALICE.policy_key, BOB.policy_key]
    decided = {(CHANNEL, BOB.policy_key): Visibility(frozenset({0}), readable=("id",))}
    handouts = list(deliveries(changes, plans, decided, members(a, b, c)))
    (ended,) = [h for h in handouts if isinstance(h, Ended)]
    assert ended.recipients == [a, b]
    assert frames(handouts) == {}


def test_a_readable_filter_column_is_left_alone_and_a_changed_subscription_gets_nothing_the_hidden_one_chose():
    kept, changed = subscriber("kept", ALICE, filter=SECRET_FILTERED), subscriber("changed", ALICE, filter="id=eq.1")
    everyone = members(kept, changed)
    changes = [change(1, "INSERT", {"id": 1, "secret": 1})]
    plans = DeliveryPlanner().plan(changes, everyone)
    readable = {(CHANNEL, ALICE.policy_key): Visibility(frozenset({0}), readable=("id", "secret"))}
    assert sorted(frames(deliveries(changes, plans, readable, everyone))) == ["changed", "kept"]
    # Resubscribed with a filter on the hidden column while the window was decided: not ended for the planned
    # subscription (the next window's index has the new one), but handed nothing the hidden column chose.
    changed.subs[CHANNEL] = Subscription(parse_channel(CHANNEL), "*", SECRET_FILTERED)
    hidden = {(CHANNEL, ALICE.policy_key): Visibility(frozenset({0}), readable=("id",))}
    handouts = list(deliveries(changes, plans, hidden, everyone))
    assert [h.recipients for h in handouts if isinstance(h, Ended)] == [[kept]]
    assert frames(handouts) == {}
