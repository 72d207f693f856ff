"""Which subscriber of a table gets which frame of a window of row changes. Pure: values in, values out.

Delivering a window takes three steps around one database crossing:

1. `DeliveryPlanner.plan` picks, per table, the row images some subscriber wants once `event` and `filter` are
   applied (`eq` and `in` filters by lookup, so a change costs its matching subscribers, not a check per
   subscriber), and the identities (role and claims) that must be asked about them.
2. Row-level security decides which identity sees which image (postgres/rls.py); `visibilities` reads its answer.
3. `deliveries` yields each frame for each subscriber, encoded once per change and column set, and the errors
   some subscribers must be told. A frame is checked against the subscriber's state at that moment, so what was
   decided for a subscription that ended or changed while the window was being decided never reaches it.

A filter on a column its role may no longer read (SELECT revoked after subscribing) would go on choosing rows by
that column's hidden values. So every window with a change to a table asks, for each role with filtered
subscriptions, which columns it may read (one identity per role: privileges are per role), whether or not any filter
matched; such subscriptions are ended before any frame of the window goes out, at a moment that does not depend on
the hidden values.

The Trio side (tables.py) runs the crossing and hands out what `deliveries` yields.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import attrs

from .changes import RowChange
from .frames import text_frame
from .identity import Identity
from .messages import Error, ErrorCode, encode
from .positions import Snapshot
from .rows import as_decimal, dumps
from .session import Subscription

log = logging.getLogger("fluxrt.delivery")

YIELD_EVERY = 256
"""changes between two pauses in `deliveries`, where the caller lets the scheduler run"""

WINDOW_MISSED = (
    "changes on this table were lost while fluxrt could not reach the database for longer than the change log's "
    "retention; refetch what you show"
)
FELL_BEHIND = "changes to this table could not be authorized fast enough; refetch what you show"
INTERNAL_ERROR = "an internal error lost changes on this table; refetch what you show"
UNREADABLE = "a change to this table could not be read; refetch what you show"
UNDECIDED = "changes to this table could not be authorized; refetch what you show"
DROPPED_UNCHECKED = (
    "changes to this table committed before it was dropped were withheld: its row-level security policies were "
    "dropped with it, so they could not be authorized"
)
POLICY_RAISED = (
    "a row-level security policy raised an error for your identity; changes in this window were withheld; "
    "refetch what you show"
)


class TableSubscriber(Protocol):
    """What delivery needs of a connection."""

    @property
    def identity(self) -> Identity | None: ...

    def subscription(self, channel: str) -> Subscription | None: ...

    def deliver_nowait(self, frame: bytes) -> None: ...

    def end_subscription(self, channel: str, error: Error) -> None:
        """Send `error` and drop the subscription (for example when realtime was disabled on the table)."""


Subscribers = Callable[[str], Sequence[TableSubscriber]]
"""The subscribers of a channel on this node (the hub's `subscribers`)."""


# ---- what a subscription lets through ------------------------------------------------------------------------


def wants(sub: Subscription, op: str, image: dict[str, Any] | None) -> bool:
    """Whether the subscription's `event` and `filter` let this change through. A filter that does not parse
    (table subscribes refuse those first) lets nothing through."""
    if sub.event not in ("*", op):
        return False
    if sub.filter is None:
        return True
    condition = sub.condition
    if condition is None:
        return False
    try:
        return condition.matches(image)
    except Exception:
        # One subscriber's odd filter must not cost anyone else the window.
        log.exception("filter failed", extra={"ctx_filter": sub.filter})
        return False


def filters_hidden(sub: Subscription, readable: tuple[str, ...] | None) -> bool:
    """Whether the subscription filters on a column outside `readable` (None: every column is readable)."""
    condition = sub.condition
    return readable is not None and condition is not None and condition.column not in readable


def still_wanted(
    subscriber: TableSubscriber,
    channel: str,
    planned: Subscription,
    identity_key: str | None,
    op: str,
    image: dict[str, Any] | None,
    readable: tuple[str, ...] | None = None,
    relid: int | None = None,
) -> bool:
    """Whether a frame planned for `planned` may still go to `subscriber` now: it may have unsubscribed, changed its
    options or its identity since. Never through a filter on a column outside `readable`, nor a change of table
    `relid` to a subscription checked against another table of the channel's name (one created, or renamed to that
    name, after this one was dropped or renamed away: the changefeed reads this one's last changes within its lag)."""
    current = subscriber.subscription(channel)
    if current is None or filters_hidden(current, readable):
        return False
    if relid is not None and current.grant is not None and current.grant.relid != relid:
        return False
    if identity_key is not None:
        identity = subscriber.identity
        if identity is None or identity.policy_key != identity_key:
            return False
    if current is planned:
        return True
    return wants(current, op, image) if op != "TRUNCATE" else current.event in ("*", "TRUNCATE")


Entry = tuple[TableSubscriber, Subscription, str]
"""a subscriber, the subscription planned for, and its identity's policy key"""


class FilterIndex:
    """A table's subscriptions grouped by identity, and filtered ones by filter: `column=eq.value` and `in` are found
    by looking the row's value up, so a change costs its matching subscribers, not one check per subscriber of the
    table. What the index finds is still checked with the filter itself; it only narrows."""

    def __init__(self, channel: str, members: Iterable[TableSubscriber]) -> None:
        self.groups: dict[str, list[tuple[TableSubscriber, Subscription]]] = {}
        """identity key -> its subscribers (with the subscription planned for)"""
        self.identities: dict[str, Identity] = {}
        self.unfiltered_events: set[str] = set()
        self.unfiltered_keys: list[str] = []
        """identity keys of the subscribers without a filter"""
        self.scanned: list[Entry] = []
        self.by_value: dict[str, dict[tuple[str, Any], list[Entry]]] = {}
        self.filter_columns: dict[tuple[str, str], list[Entry]] = {}
        """(role, filter column) -> the subscriptions filtering on it"""
        self.filter_roles: dict[str, str] = {}
        """role with filtered subscriptions -> one of its identity keys, whose readable columns stand for the role's"""
        unfiltered: dict[str, None] = {}
        for subscriber in members:
            sub = subscriber.subscription(channel)
            identity = subscriber.identity
            if sub is None or identity is None:
                continue
            key = identity.policy_key
            self.identities[key] = identity
            self.groups.setdefault(key, []).append((subscriber, sub))
            entry = (subscriber, sub, key)
            if sub.filter is None:
                unfiltered[key] = None
                self.unfiltered_events.add(sub.event)
                continue
            condition = sub.condition
            if condition is not None:
                self.filter_columns.setdefault((identity.role, condition.column), []).append(entry)
                self.filter_roles.setdefault(identity.role, key)
            if condition is None or condition.op not in ("eq", "in"):
                self.scanned.append(entry)
                continue
            values = condition.value if isinstance(condition.value, tuple) else (condition.value,)
            column = self.by_value.setdefault(condition.column, {})
            for value_key in {value_key for value in values for value_key in _filter_keys(value)}:
                column.setdefault(value_key, []).append(entry)
        self.unfiltered_keys = list(unfiltered)

    def filtered(self, image: dict[str, Any] | None) -> Iterator[Entry]:
        """The filtered subscriptions that may let `image` through (each at most once); check them with `wants`."""
        if image is not None:
            for column, table in self.by_value.items():
                if column in image:
                    key = _value_key(image[column])
                    if key is not None:
                        yield from table.get(key, ())
        yield from self.scanned


def _value_key(value: Any) -> tuple[str, Any] | None:
    """What a row's value is equal to, in the terms of filters.py: booleans, strings, and numbers by value."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, str):
        return ("s", value)
    number = as_decimal(value)
    return ("n", number) if number is not None else None


def _filter_keys(text: str) -> list[tuple[str, Any]]:
    """Every `_value_key` that a filter's value text is equal to."""
    keys: list[tuple[str, Any]] = [("s", text)]
    if text in ("true", "false"):
        keys.append(("b", text == "true"))
    number = as_decimal(text)
    if number is not None:
        keys.append(("n", number))
    return keys


# ---- planning ------------------------------------------------------------------------------------------------


@attrs.define
class TablePlan:
    """One table's part of a window: the images to decide and the identities to decide them for."""

    relid: int
    members: Sequence[TableSubscriber]
    index: FilterIndex
    images: list[dict[str, Any] | None] = attrs.field(factory=list)
    image_index: dict[int, int] = attrs.field(factory=dict)
    """change index in the window -> where its deciding image is in `images`"""
    old_index: dict[int, int] = attrs.field(factory=dict)
    """for UPDATE changes, where the old row image is in `images`"""
    truncate_recipients: list[tuple[TableSubscriber, Subscription]] = attrs.field(factory=list)
    identity_keys: list[str] = attrs.field(factory=list)
    """the identities some change of this window concerns, in the order they are decided"""
    _registered: set[str] = attrs.field(factory=set)
    _unfiltered_registered: bool = False

    def wanted(self, op: str, image: dict[str, Any] | None) -> bool:
        """Whether any subscriber wants this change; registers the identities of those who do."""
        hit = False
        index = self.index
        if index.unfiltered_events & {op, "*"}:
            hit = True
            if not self._unfiltered_registered:
                self._unfiltered_registered = True
                for key in index.unfiltered_keys:
                    self._register(key)
        for _subscriber, sub, key in index.filtered(image):
            if wants(sub, op, image):
                hit = True
                self._register(key)
        return hit

    def check_filter_columns(self) -> None:
        """Register one identity of each role with filtered subscriptions, so that the window tells which columns
        the role may still read, whether or not its filters matched."""
        for key in self.index.filter_roles.values():
            self._register(key)

    def _register(self, key: str) -> None:
        if key not in self._registered:
            self._registered.add(key)
            self.identity_keys.append(key)

    def identities(self) -> list[tuple[str, dict[str, Any]]]:
        """(role, claims) of each identity to decide, in `identity_keys` order."""
        identities = self.index.identities
        return [(identities[k].role, identities[k].claims) for k in self.identity_keys]

    def images_json(self) -> str:
        return dumps(self.images).decode()


class DeliveryPlanner:
    """Plans the windows of one node. Each table's `FilterIndex` is kept across windows until a subscription to the
    table changes (`subscriptions_changed`)."""

    def __init__(self) -> None:
        self._indexes: dict[str, FilterIndex] = {}

    def subscriptions_changed(self, channel: str) -> None:
        """A subscription to `channel` began, ended or changed (options, or the identity behind it): the next
        window looks its subscribers up afresh. Without this call a new subscriber would be missed (a stale entry
        is harmless: every frame is checked against the subscriber's current state)."""
        self._indexes.pop(channel, None)

    def plan(self, changes: list[RowChange], subscribers: Subscribers) -> dict[str, TablePlan]:
        """The tables of `changes` that someone wants something of, each with what must be decided."""
        plans: dict[str, TablePlan] = {}
        for index, change in enumerate(changes):
            if change.op in ENDING or change.op == "UNREADABLE":
                continue
            channel = change.channel
            plan = plans.get(channel)
            if plan is None:
                members = subscribers(channel)
                if not members:
                    continue
                lookup = self._indexes.get(channel)
                if lookup is None:
                    lookup = self._indexes[channel] = FilterIndex(channel, members)
                plan = plans[channel] = TablePlan(change.relid, members, lookup)
                plan.check_filter_columns()
            if change.op == "TRUNCATE":
                plan.truncate_recipients = [
                    (s, sub)
                    for s in plan.members
                    if (sub := s.subscription(channel)) and sub.event in ("*", "TRUNCATE")
                ]
                continue
            image = change.image
            if plan.wanted(change.op, image):
                plan.image_index[index] = len(plan.images)
                plan.images.append(image)
                if change.op == "UPDATE":
                    plan.old_index[index] = len(plan.images)
                    plan.images.append(change.old)
        return {
            channel: plan
            for channel, plan in plans.items()
            if plan.images or plan.truncate_recipients or plan.identity_keys
        }


# ---- what the database decided -------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Visibility:
    """What one identity may see of one table in one window."""

    visible: frozenset[int] | None
    """indexes of visible images; None: the identity may not read the table at all"""
    readable: tuple[str, ...] | None = None
    """the columns it may read; only these keys of a row are sent"""
    error: str | None = None
    """what a policy raised for this identity"""


Decision = tuple[int, list[int] | None, list[str] | None, str | None]
"""(identity index, visible image indexes, readable columns, error), as postgres/rls.py returns them"""


def visibilities(
    plans: dict[str, TablePlan], decided: Iterable[tuple[str, list[Decision] | str | None]]
) -> tuple[dict[tuple[str, str], Visibility], dict[str, str], list[str]]:
    """Per (channel, identity key), what the identity may see; the tables whose decision failed as a whole, with
    the error; and the channels whose table was dropped before it could be decided (None instead of rows: its
    policies went with it). Nobody may receive the changes of either unchecked."""
    result: dict[tuple[str, str], Visibility] = {}
    failed: dict[str, str] = {}
    dropped: list[str] = []
    for channel, rows in decided:
        if rows is None:
            dropped.append(channel)
            continue
        if isinstance(rows, str):
            failed[channel] = rows
            continue
        keys = plans[channel].identity_keys
        for n, visible, readable, error in rows:
            result[(channel, keys[n])] = Visibility(
                frozenset(visible) if visible is not None else None,
                tuple(readable) if readable is not None else None,
                error,
            )
    return result, failed, dropped


def undecided(channel: str, plan: TablePlan, reason: str) -> Missed:
    """Tell the subscribers of `plan`'s table that its changes in the window were withheld for `reason`: not those
    whose check saw another table of the channel's name (created after this one was dropped, or renamed to it),
    who were never to get this table's changes (see `still_wanted`)."""
    recipients = [
        subscriber
        for subscriber in plan.members
        if (sub := subscriber.subscription(channel)) is not None
        and (sub.grant is None or sub.grant.relid == plan.relid)
    ]
    return Missed(recipients, channel, reason)


# ---- what to hand out ----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Missed:
    """Tell `recipients` that changes of `channel` were lost (`CHANGES_MISSED`): they should refetch."""

    recipients: Sequence[TableSubscriber]
    channel: str
    message: str
    detail: str | None = None
    """for the log only (a policy's error text may say more than the row would)"""

    @property
    def error(self) -> Error:
        return Error(ErrorCode.CHANGES_MISSED, self.message, channel=self.channel)


@attrs.frozen(slots=True)
class Ended:
    """End the subscription of each of `recipients` with `error`: realtime was disabled on the table, or they filter
    on a column their role may no longer read."""

    recipients: Sequence[TableSubscriber]
    channel: str
    error: Error


PAUSE = None
"""yielded every `YIELD_EVERY` changes: let the frames queued so far reach the kernel"""

Handout = tuple[TableSubscriber, bytes] | Missed | Ended | None


def deliveries(
    changes: list[RowChange],
    plans: dict[str, TablePlan],
    decided: dict[tuple[str, str], Visibility],
    subscribers: Subscribers,
    held: Callable[[TableSubscriber, str], bool] | None = None,
) -> Iterator[Handout]:
    """Everything to hand out for `changes`, in order: (subscriber, frame) pairs, `Missed`, `Ended`, and `PAUSE`.

    Only the identities that may see an image are visited (one user's change costs its own subscribers, not a
    check per subscriber of the table). An UPDATE's old row goes only to those who could see it too. Subscriptions
    filtering on a column their role may no longer read are ended first, and get nothing of the window.
    `held(subscriber, channel)`: true for a subscriber that must get nothing of the channel now (its resume replay
    is pending), whatever was planned for it."""
    seen_by: dict[str, dict[int, list[str]]] = {}
    readable_by_role: dict[tuple[str, str], tuple[str, ...]] = {}
    for (channel, identity_key), visibility in decided.items():
        by_image = seen_by.setdefault(channel, {})
        for seen in visibility.visible or ():
            by_image.setdefault(seen, []).append(identity_key)
        if visibility.readable is not None:
            role = plans[channel].index.identities[identity_key].role
            readable_by_role[(channel, role)] = visibility.readable
    for channel, table_plan in plans.items():
        yield from _hidden_filters(channel, table_plan, readable_by_role)
    frames: dict[tuple[int, tuple[str, ...] | None, bool], bytes] = {}
    for index, change in enumerate(changes):
        if index and index % YIELD_EVERY == 0:
            yield PAUSE
        channel = change.channel
        if change.op in ENDING:
            error = Error(ErrorCode.SUBSCRIPTION_FAILED, ending_reason(change), channel=channel)
            ended = [s for s in subscribers(channel) if (sub := s.subscription(channel)) and ended_by(sub, change)]
            yield Ended(ended, channel, error)
            continue
        if change.op == "UNREADABLE":
            yield Missed(subscribers(channel), channel, UNREADABLE)
            continue
        plan = plans.get(channel)
        if plan is None:
            continue
        if change.op == "TRUNCATE":
            truncated = text_frame(dumps(change_message(channel, change, None)))
            for subscriber, sub in plan.truncate_recipients:
                wanted = still_wanted(subscriber, channel, sub, None, change.op, None, relid=change.relid)
                if wanted and (held is None or not held(subscriber, channel)):
                    yield subscriber, truncated
            continue
        at = plan.image_index.get(index)
        if at is None:
            continue
        image = change.image
        old_at = plan.old_index.get(index)
        for identity_key in seen_by.get(channel, {}).get(at, ()):
            visibility = decided[(channel, identity_key)]
            old_visible = old_at is None or (visibility.visible is not None and old_at in visibility.visible)
            for subscriber, sub in plan.index.groups[identity_key]:
                if not wants(sub, change.op, image):
                    continue
                if not still_wanted(
                    subscriber, channel, sub, identity_key, change.op, image, visibility.readable, change.relid
                ):
                    continue
                if held is not None and held(subscriber, channel):
                    continue
                key = (index, visibility.readable, old_visible)
                frame = frames.get(key)
                if frame is None:
                    message = change_message(channel, change, visibility.readable, old_visible)
                    frame = frames[key] = text_frame(dumps(message))
                yield subscriber, frame
    for (channel, identity_key), visibility in decided.items():
        if visibility.error is not None:
            recipients = [
                s for s in plans[channel].members if s.identity is not None and s.identity.policy_key == identity_key
            ]
            yield Missed(recipients, channel, POLICY_RAISED, detail=visibility.error)


def _hidden_filters(
    channel: str, plan: TablePlan, readable_by_role: dict[tuple[str, str], tuple[str, ...]]
) -> Iterator[Ended]:
    """The subscriptions of `plan` whose filter column their role may no longer read, to be ended."""
    for (role, column), entries in plan.index.filter_columns.items():
        readable = readable_by_role.get((channel, role))
        if readable is None or column in readable:
            continue
        recipients = [
            subscriber
            for subscriber, sub, key in entries
            if subscriber.subscription(channel) is sub
            and subscriber.identity is not None
            and subscriber.identity.policy_key == key
            # What the role may read of the window's table says nothing of another one of the channel's name.
            and (sub.grant is None or sub.grant.relid == plan.relid)
        ]
        if recipients:
            table = channel.partition(":")[2]
            reason = (
                f"invalid filter: role {role} may no longer read column {column} of {table}; subscribe again without it"
            )
            yield Ended(recipients, channel, Error(ErrorCode.SUBSCRIPTION_FAILED, reason, channel=channel))


def error_frame(error: Error) -> bytes:
    return text_frame(encode(error))


# ---- the messages --------------------------------------------------------------------------------------------


ENDING = ("DISABLE", "DROP", "RENAME")
"""change-log ops that end the subscriptions to their table's channel (those `ended_by` says they concern)"""


def ended_by(sub: Subscription, change: RowChange) -> bool:
    """Whether `change` (an op of ENDING) ends `sub`. Not when the subscription's check was about another table of
    the same name (the one created after a DROP, or after a RENAME away), nor when its check already saw the
    change's outcome (subscribed after realtime was disabled and enabled again, or after a table was renamed away
    and back): the changefeed reads such rows after the subscribe was acked. A subscription made without a check
    (`grant` None) is ended by every such change."""
    grant = sub.grant
    if grant is None:
        return True
    if grant.relid != change.relid:
        return False
    return grant.seen is None or not _snapshot(grant.seen).sees(change.xid)


@functools.lru_cache(maxsize=64)
def _snapshot(text: str) -> Snapshot:
    # An ending row is read against every subscription of its channel, most of them made by a few shared checks.
    return Snapshot.parse(text)


def ending_reason(change: RowChange) -> str:
    """What ended the subscriptions to `change`'s table (an op of ENDING), and what to do about it."""
    qualified = f"{change.schema}.{change.table}"
    if change.op == "DROP":
        return (
            f"table {qualified} was dropped; once it exists again, run SELECT enable_realtime('{qualified}') "
            "and subscribe again"
        )
    if change.op == "RENAME":
        renamed = change.new or {}
        to = f"{renamed.get('schema')}.{renamed.get('table')}"
        return f"table {qualified} was renamed to {to}; subscribe to table:{to}"
    root = (change.new or {}).get("partition_of")
    if root is not None:
        return (
            f"table {qualified} became a partition of {root}: its changes are published on table:{root}; "
            "subscribe there"
        )
    return f"realtime was disabled for {qualified}; run SELECT enable_realtime('{qualified}') and subscribe again"


def change_message(
    channel: str, change: RowChange, readable: tuple[str, ...] | None, old_visible: bool = True
) -> dict[str, Any]:
    """The `broadcast` message for one change, with only the `readable` columns (all when None)."""
    payload: dict[str, Any] = {"type": change.op, "schema": change.schema, "table": change.table}
    if change.old is not None and change.op in ("UPDATE", "DELETE") and old_visible:
        payload["old_record"] = _only(change.old, readable)
    if change.new is not None and change.op in ("INSERT", "UPDATE"):
        payload["record"] = _only(change.new, readable)
    elif change.op == "TRUNCATE" and change.new is not None and "partition" in change.new:
        payload["partition"] = change.new["partition"]
    payload["timestamp"] = change.created_at.isoformat().replace("+00:00", "Z")
    # Its position (protocol/positions.py), for resume; a change built without one (a test's) falls back to its id.
    payload["id"] = change.position or str(change.id)
    return {"type": "broadcast", "channel": channel, "payload": payload}


def _only(row: dict[str, Any], readable: tuple[str, ...] | None) -> dict[str, Any]:
    """The row with only the readable columns (an allow-list: renamed or dropped columns never slip through)."""
    if readable is None:
        return row
    allowed = set(readable)
    return {k: v for k, v in row.items() if k in allowed}
