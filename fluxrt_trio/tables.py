"""Table channels: the checks a `table:` subscribe needs, and delivery of change windows to subscribers.

Each table is delivered in its own lane, so that one table's authorization never holds back another's changes. Per
lane, the windows that queued up meanwhile are decided together in one crossing into the database, which tells which
identities may see which row images (postgres/rls.py: one query per role where the policies allow it). `event` and
`filter` options are applied first, so filtered-out subscribers cost nothing. Every frame is encoded once per change
and column set, then handed to each recipient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import asyncpg
import attrs
import orjson
import trio

from .hub import Hub
from .postgres.bridge import Database, DatabaseUnavailable, describe, is_connection_error
from .postgres.changefeed import Change, Window
from .postgres.rls import RowSecurity
from .protocol.channels import Channel
from .protocol.filters import EVENTS, Filter, FilterError, parse_filter
from .protocol.frames import text_frame
from .protocol.identity import Identity
from .protocol.messages import Error, ErrorCode, Subscribe, encode
from .protocol.rows import as_decimal, dumps
from .protocol.session import Subscription

log = logging.getLogger("fluxrt.tables")

_CHECK = """
SELECT c.oid,
       pg_catalog.has_schema_privilege($3, n.oid, 'USAGE')
         AND pg_catalog.has_any_column_privilege($3, c.oid, 'SELECT') AS readable,
       EXISTS (SELECT 1 FROM realtime.tables t WHERE t.relid = c.oid) AS enabled,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND pg_catalog.has_column_privilege($3, c.oid, a.attnum, 'SELECT')) AS readable_columns
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""

MERGE_LIMIT = 5000
"""changes at most in one delivery of a table's queued windows"""
LANE_LIMIT = 100_000
"""changes a table may have waiting for delivery; beyond it they are dropped and its subscribers told to refetch,
rather than holding back the changefeed and with it every other table"""
YIELD_EVERY = 256
"""changes delivered between two yields to the scheduler"""


class TableSubscriber(Protocol):
    """What delivery needs of a connection."""

    conn_id: str

    @property
    def identity(self) -> Identity | None: ...

    def subscription(self, channel: str) -> Subscription | None: ...

    def deliver_nowait(self, frame: bytes) -> None: ...

    def end_subscription(self, channel: str, error: Error) -> None:
        """Send `error` and drop the subscription (for example when realtime was disabled on the table)."""


@attrs.frozen(slots=True)
class Verdict:
    """What one identity may see of one table in one window."""

    visible: frozenset[int] | None
    """indexes of visible images; None: the identity may not read the table at all"""
    readable: tuple[str, ...] | None = None
    """the columns it may read; only these keys of a row are sent"""
    error: str | None = None


class TableChannels:
    """Table subscriptions of one node: admission checks and delivery."""

    def __init__(
        self, hub: Hub, database: Database, allowed_roles: Iterable[str], *, row_security: RowSecurity | None = None
    ) -> None:
        self.hub = hub
        self.database = database
        self.allowed_roles = frozenset(allowed_roles)
        self.row_security = row_security or RowSecurity()
        self.delivered = 0
        self._indexes: dict[str, _FilterIndex] = {}
        """per channel, its subscribers grouped for lookup; dropped whenever one of them changes"""

    def subscriptions_changed(self, channel: str) -> None:
        """A subscription to `channel` began, ended or changed (options, or the identity behind it): the next
        window looks its subscribers up afresh. Connections call this; without it, a new subscriber would be missed
        (a stale entry is harmless: every frame is checked against the subscriber's current state)."""
        self._indexes.pop(channel, None)

    # ---- subscribe -----------------------------------------------------------------------------------------

    async def check_subscribe(self, identity: Identity, channel: Channel, request: Subscribe) -> Error | None:
        """The checks of PROTOCOL.md "Subscribe checks, in order" after the format; None when it may proceed."""
        name, ref = channel.name, request.ref

        def refuse(code: ErrorCode, message: str) -> Error:
            return Error(code, message, channel=name, ref=ref)

        qualified = f"{channel.schema}.{channel.table}"
        role = identity.role
        if role not in self.allowed_roles:
            return refuse(
                ErrorCode.FORBIDDEN,
                f"role {role!r} may not be assumed by fluxrt; allowed: {', '.join(sorted(self.allowed_roles))} "
                "(add it to auth.roles)",
            )
        try:
            row = await self.database.run(lambda c: c.fetchrow(_CHECK, channel.schema, channel.table, role))
        except DatabaseUnavailable as exc:
            return refuse(ErrorCode.SUBSCRIPTION_FAILED, f"database unavailable, try again later ({exc})")
        except asyncpg.UndefinedObjectError:
            return refuse(ErrorCode.FORBIDDEN, f"role {role!r} does not exist in the database")
        if row is None:
            return refuse(ErrorCode.SUBSCRIPTION_FAILED, f"table {qualified} does not exist")
        if not row["readable"]:
            return refuse(
                ErrorCode.FORBIDDEN, f"role {role} may not read {qualified}: GRANT SELECT ON {qualified} TO {role}"
            )
        if not row["enabled"]:
            return refuse(
                ErrorCode.SUBSCRIPTION_FAILED,
                f"realtime is not enabled for {qualified}: run SELECT enable_realtime('{qualified}')",
            )
        if request.event not in EVENTS:
            return refuse(
                ErrorCode.SUBSCRIPTION_FAILED,
                f"invalid event {request.event[:64]!r}: expected one of {', '.join(EVENTS)}",
            )
        if request.filter is not None:
            try:
                flt = parse_filter(request.filter)
            except FilterError as exc:
                return refuse(ErrorCode.SUBSCRIPTION_FAILED, str(exc))
            if flt.column not in row["columns"]:
                return refuse(
                    ErrorCode.SUBSCRIPTION_FAILED, f"invalid filter: {qualified} has no column {flt.column!r}"
                )
            if flt.column not in row["readable_columns"]:
                return refuse(
                    ErrorCode.SUBSCRIPTION_FAILED,
                    f"invalid filter: role {role} may not read column {flt.column!r} of {qualified}",
                )
        return None

    # ---- delivery ------------------------------------------------------------------------------------------

    async def run(self, windows: trio.MemoryReceiveChannel[Window]) -> None:
        """Deliver windows as the changefeed produces them: each table in its own lane, in order within it, so
        that a table whose policies are slow to decide delays only its own subscribers."""
        lanes: dict[str, _Lane] = {}
        async with trio.open_nursery() as nursery:
            async for window in windows:
                if window.missed:
                    self._changes_missed(
                        "changes on this table were lost while fluxrt could not reach the database for longer than "
                        "the change log's retention; refetch what you show"
                    )
                for change in window.changes:
                    channel = f"table:{change.schema}.{change.table}"
                    lane = lanes.get(channel)
                    if lane is None:
                        lane = lanes[channel] = _Lane()
                        nursery.start_soon(self._drive, channel, lane)
                    lane.pending.append(change)
                for channel, lane in lanes.items():
                    if len(lane.pending) > LANE_LIMIT:
                        lost = len(lane.pending)
                        lane.pending.clear()
                        log.warning(
                            "a table's deliveries fell too far behind; its subscribers are told to refetch",
                            extra={"ctx_channel": channel, "ctx_dropped": lost},
                        )
                        self._tell(
                            self.hub.subscribers(channel),  # type: ignore[arg-type]
                            channel,
                            ErrorCode.CHANGES_MISSED,
                            "changes to this table could not be authorized fast enough; refetch what you show",
                        )
                    if lane.pending:
                        lane.ready.set()

    async def _drive(self, channel: str, lane: _Lane) -> None:
        while True:
            await lane.ready.wait()
            lane.ready = trio.Event()
            while lane.pending:
                # What queued up while the previous batch was being delivered goes out together: one
                # authorization round trip instead of one per window, so delivery catches up with the reads.
                changes, lane.pending = lane.pending[:MERGE_LIMIT], lane.pending[MERGE_LIMIT:]
                try:
                    await self.deliver(changes)
                except Exception:
                    # A fault of ours must not stop delivery; the affected subscribers are told.
                    log.exception("delivering a window failed", extra={"ctx_channel": channel})
                    self._tell(
                        self.hub.subscribers(channel),  # type: ignore[arg-type]
                        channel,
                        ErrorCode.CHANGES_MISSED,
                        "an internal error lost changes on this table; refetch what you show",
                    )

    async def deliver(self, changes: list[Change]) -> None:
        """Authorize and deliver `changes` (of one table, or several: one database crossing decides them all)."""
        plans = self._plan(changes)
        verdicts = await self._authorize(plans) if plans else {}
        for (channel, identity_key), verdict in verdicts.items():
            for at in verdict.visible or ():
                plans[channel].seen_by.setdefault(at, []).append(identity_key)
        frames: dict[tuple[int, tuple[str, ...] | None], bytes] = {}
        for index, change in enumerate(changes):
            if index and index % YIELD_EVERY == 0:
                # Let the frames queued so far reach the kernel, so a long window to a fast reader never piles up
                # in its outbox as if it were a slow consumer.
                await trio.sleep(0)
            channel = f"table:{change.schema}.{change.table}"
            if change.op == "DISABLE":
                self._disabled(channel, change)
                continue
            if change.op == "UNREADABLE":
                self._tell(
                    self.hub.subscribers(channel),  # type: ignore[arg-type]
                    channel,
                    ErrorCode.CHANGES_MISSED,
                    "a change to this table could not be read; refetch what you show",
                )
                continue
            plan = plans.get(channel)
            if plan is None:
                continue
            if change.op == "TRUNCATE":
                frame = text_frame(dumps(_message(channel, change, None)))
                for subscriber, sub in plan.truncate_recipients:
                    if _still(subscriber, channel, sub, None, change.op, None):
                        subscriber.deliver_nowait(frame)
                        self.delivered += 1
                continue
            at = plan.image_index.get(index)
            if at is None:
                continue
            image = change.old if change.op == "DELETE" else change.new
            # Only the identities that may see this image are visited (one user's change costs its own
            # subscribers, not a check per subscriber of the table).
            for identity_key in plan.seen_by.get(at, ()):
                verdict = verdicts[(channel, identity_key)]
                for subscriber, sub in plan.index.groups[identity_key]:
                    if not _wants(sub, change.op, image):
                        continue
                    # The subscriber may have unsubscribed, changed its options or its identity while the window
                    # was being authorized: what was decided for the old state must not reach the new one.
                    if not _still(subscriber, channel, sub, identity_key, change.op, image):
                        continue
                    # An UPDATE's old row goes only to those who could see it: a row moved into someone's view must
                    # not show them what it held before.
                    old_at = plan.old_index.get(index)
                    old_visible = old_at is None or old_at in verdict.visible  # type: ignore[operator]
                    key = (index, verdict.readable, old_visible)
                    frame = frames.get(key)
                    if frame is None:
                        message = _message(channel, change, verdict.readable, old_visible)
                        frame = frames[key] = text_frame(dumps(message))
                    subscriber.deliver_nowait(frame)
                    self.delivered += 1
        for (channel, identity_key), verdict in verdicts.items():
            if verdict.error is not None:
                self._policy_failed(plans[channel], identity_key, channel, verdict.error)

    def _plan(self, changes: list[Change]) -> dict[str, _Plan]:
        plans: dict[str, _Plan] = {}
        for index, change in enumerate(changes):
            if change.op in ("DISABLE", "UNREADABLE"):
                continue
            channel = f"table:{change.schema}.{change.table}"
            plan = plans.get(channel)
            if plan is None:
                members: list[TableSubscriber] = self.hub.subscribers(channel)  # type: ignore[assignment]
                if not members:
                    continue
                lookup = self._indexes.get(channel)
                if lookup is None:
                    lookup = self._indexes[channel] = _FilterIndex(channel, members)
                plan = plans[channel] = _Plan(change.relid, members, lookup)
            if change.op == "TRUNCATE":
                plan.truncate_recipients = [
                    (s, sub)
                    for s in plan.members
                    if (sub := s.subscription(channel)) and sub.event in ("*", "TRUNCATE")
                ]
                continue
            image = change.old if change.op == "DELETE" else change.new
            if plan.wanted(change.op, image):
                plan.image_index[index] = len(plan.images)
                plan.images.append(image)
                if change.op == "UPDATE":
                    plan.old_index[index] = len(plan.images)
                    plan.images.append(change.old)
        return {channel: plan for channel, plan in plans.items() if plan.images or plan.truncate_recipients}

    async def _authorize(self, plans: dict[str, _Plan]) -> dict[tuple[str, str], Verdict]:
        """One crossing into the database: each table's row-level security decided on its own (postgres/rls.py: one
        statement in the steady state), so that one table's failure costs only that table."""
        calls = [
            (channel, plan.relid, plan.identities(), dumps(plan.images).decode(), len(plan.images))
            for channel, plan in plans.items()
            if plan.images
        ]
        if not calls:
            return {}

        async def work(conn: asyncpg.Connection) -> list[tuple[str, list[Any] | str]]:
            results: list[tuple[str, list[Any] | str]] = []
            for channel, relid, identities, images, n_images in calls:
                try:
                    rows = await self.row_security.decide(conn, relid, identities, images, n_images)
                except asyncpg.PostgresError as exc:
                    if is_connection_error(exc):
                        raise
                    results.append((channel, describe(exc)))
                else:
                    results.append((channel, [tuple(r) for r in rows]))
            return results

        results = await self._patiently(work)
        verdicts = {}
        for channel, rows in results:
            if isinstance(rows, str):
                # Authorization failed for the whole table (dropped meanwhile, the function broken): nobody
                # may receive its changes unchecked.
                log.error("authorizing changes failed", extra={"ctx_channel": channel, "ctx_error": rows})
                self._tell(
                    plans[channel].members,
                    channel,
                    ErrorCode.CHANGES_MISSED,
                    "changes to this table could not be authorized; refetch what you show",
                )
                continue
            keys = plans[channel].identity_keys
            for n, visible, readable, error in rows:
                verdicts[(channel, keys[n])] = Verdict(
                    frozenset(visible) if visible is not None else None,
                    tuple(readable) if readable is not None else None,
                    error,
                )
        return verdicts

    async def _patiently(self, work: Any) -> Any:
        """Run `work` on the database, waiting out unavailability: the window's changes are already read, so
        giving up would lose them. The changefeed waits behind this window meanwhile (its queue is bounded)."""
        backoff = 0.05
        while True:
            try:
                return await self.database.run(work)
            except DatabaseUnavailable as exc:
                log.warning("authorizing a window: database unavailable, retrying", extra={"ctx_error": str(exc)})
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # ---- errors to subscribers -----------------------------------------------------------------------------

    def _changes_missed(self, message: str) -> None:
        for channel in self.hub.channels("table"):
            self._tell(self.hub.subscribers(channel), channel, ErrorCode.CHANGES_MISSED, message)  # type: ignore[arg-type]

    def _disabled(self, channel: str, change: Change) -> None:
        qualified = f"{change.schema}.{change.table}"
        for subscriber in self.hub.subscribers(channel):
            subscriber.end_subscription(  # type: ignore[attr-defined]
                channel,
                Error(
                    ErrorCode.SUBSCRIPTION_FAILED,
                    f"realtime was disabled for {qualified}; run SELECT enable_realtime('{qualified}') "
                    "and subscribe again",
                    channel=channel,
                ),
            )

    def _policy_failed(self, plan: _Plan, identity_key: str, channel: str, error: str) -> None:
        # The error text stays in the log: it is written by policy code and may say more than the row would.
        log.warning("a policy raised for an identity", extra={"ctx_channel": channel, "ctx_error": error})
        recipients = [s for s in plan.members if s.identity is not None and _identity_key(s.identity) == identity_key]
        self._tell(
            recipients,
            channel,
            ErrorCode.CHANGES_MISSED,
            "a row-level security policy raised an error for your identity; changes in this window were withheld; "
            "refetch what you show",
        )

    def _tell(self, recipients: Iterable[TableSubscriber], channel: str, code: ErrorCode, message: str) -> None:
        frame = text_frame(encode(Error(code, message, channel=channel)))
        for subscriber in recipients:
            subscriber.deliver_nowait(frame)


@attrs.define
class _Lane:
    pending: list[Change] = attrs.field(factory=list)
    ready: trio.Event = attrs.field(factory=trio.Event)


class _FilterIndex:
    """A table's subscriptions grouped by identity, and filtered ones by filter: `column=eq.value` and `in` are found
    by looking the row's value up, so a change costs its matching subscribers, not one check per subscriber of the
    table. What the index finds is still checked with the filter itself; it only narrows. Kept across windows until
    a subscription to the table changes."""

    def __init__(self, channel: str, members: list[TableSubscriber]) -> None:
        self.groups: dict[str, list[tuple[TableSubscriber, Subscription]]] = {}
        """identity key -> its subscribers (with the subscription planned for)"""
        self.identities: dict[str, Identity] = {}
        self.unfiltered_events: set[str] = set()
        self.unfiltered: list[tuple[TableSubscriber, Subscription, str]] = []
        self.unfiltered_keys: list[str] = []
        """identity keys of the subscribers without a filter"""
        self.scanned: list[tuple[TableSubscriber, Subscription, str]] = []
        self.by_value: dict[str, dict[tuple[str, Any], list[tuple[TableSubscriber, Subscription, str]]]] = {}
        unfiltered: dict[str, None] = {}
        for subscriber in members:
            sub = subscriber.subscription(channel)
            identity = subscriber.identity
            if sub is None or identity is None:
                continue
            key = _identity_key(identity)
            self.identities[key] = identity
            self.groups.setdefault(key, []).append((subscriber, sub))
            entry = (subscriber, sub, key)
            if sub.filter is None:
                unfiltered[key] = None
                self.unfiltered.append(entry)
                self.unfiltered_events.add(sub.event)
                continue
            try:
                flt = _filter(sub.filter)
            except FilterError:
                self.scanned.append(entry)
                continue
            if flt.op not in ("eq", "in"):
                self.scanned.append(entry)
                continue
            values = flt.value if isinstance(flt.value, tuple) else (flt.value,)
            column = self.by_value.setdefault(flt.column, {})
            for value_key in {value_key for value in values for value_key in _filter_keys(value)}:
                column.setdefault(value_key, []).append(entry)
        self.unfiltered_keys = list(unfiltered)

    def filtered(self, image: dict[str, Any] | None) -> Iterator[tuple[TableSubscriber, Subscription, str]]:
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


@attrs.define
class _Plan:
    relid: int
    members: list[TableSubscriber]
    index: _FilterIndex
    images: list[dict[str, Any] | None] = attrs.field(factory=list)
    image_index: dict[int, int] = attrs.field(factory=dict)
    old_index: dict[int, int] = attrs.field(factory=dict)
    """for UPDATE changes, where the old row image is in `images`"""
    seen_by: dict[int, list[str]] = attrs.field(factory=dict)
    """image index -> identity keys that may see it"""
    truncate_recipients: list[tuple[TableSubscriber, Subscription]] = attrs.field(factory=list)
    identity_keys: list[str] = attrs.field(factory=list)
    """the identities some change of this window concerns, in the order they are authorized"""
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
            if _wants(sub, op, image):
                hit = True
                self._register(key)
        return hit

    def _register(self, key: str) -> None:
        if key not in self._registered:
            self._registered.add(key)
            self.identity_keys.append(key)

    def identities(self) -> list[tuple[str, dict[str, Any]]]:
        identities = self.index.identities
        return [(identities[k].role, identities[k].claims) for k in self.identity_keys]


_keys: dict[int, tuple[Identity, str]] = {}


def _identity_key(identity: Identity) -> str:
    """Same role and same claims: same answer from the policies. Remembered per Identity object (a connection keeps
    its object until its token changes), since it is asked for every subscriber of every change."""
    hit = _keys.get(id(identity))
    if hit is not None and hit[0] is identity:
        return hit[1]
    key = identity.role + "\x00" + orjson.dumps(identity.claims, option=orjson.OPT_SORT_KEYS).decode()
    if len(_keys) > 100_000:
        _keys.clear()
    _keys[id(identity)] = (identity, key)
    return key


_filters: dict[str, Filter] = {}


def _filter(text: str) -> Filter:
    flt = _filters.get(text)
    if flt is None:
        if len(_filters) > 10_000:
            _filters.clear()
        flt = _filters[text] = parse_filter(text)
    return flt


def _wants(sub: Subscription, op: str, image: dict[str, Any] | None) -> bool:
    """Whether the subscription's `event` and `filter` let this change through."""
    if sub.event not in ("*", op):
        return False
    if sub.filter is None:
        return True
    try:
        return _filter(sub.filter).matches(image)
    except Exception:
        # One subscriber's odd filter must not cost anyone else the window.
        log.exception("filter failed", extra={"ctx_filter": sub.filter})
        return False


def _still(
    subscriber: TableSubscriber,
    channel: str,
    planned: Subscription,
    identity_key: str | None,
    op: str,
    image: dict[str, Any] | None,
) -> bool:
    """Whether a frame planned for `planned` may still go to `subscriber` now."""
    current = subscriber.subscription(channel)
    if current is None:
        return False
    if identity_key is not None:
        identity = subscriber.identity
        if identity is None or _identity_key(identity) != identity_key:
            return False
    if current is planned:
        return True
    return _wants(current, op, image) if op != "TRUNCATE" else current.event in ("*", "TRUNCATE")


def _payload(change: Change, readable: tuple[str, ...] | None, old_visible: bool = True) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": change.op, "schema": change.schema, "table": change.table}
    if change.old is not None and change.op in ("UPDATE", "DELETE") and old_visible:
        payload["old_record"] = _only(change.old, readable)
    if change.new is not None and change.op in ("INSERT", "UPDATE"):
        payload["record"] = _only(change.new, readable)
    payload["timestamp"] = change.created_at.isoformat().replace("+00:00", "Z")
    payload["id"] = str(change.id)
    return payload


def _message(
    channel: str, change: Change, readable: tuple[str, ...] | None, old_visible: bool = True
) -> dict[str, Any]:
    return {"type": "broadcast", "channel": channel, "payload": _payload(change, readable, old_visible)}


def _only(row: dict[str, Any], readable: tuple[str, ...] | None) -> dict[str, Any]:
    """The row with only the readable columns (an allow-list: renamed or dropped columns never slip through)."""
    if readable is None:
        return row
    allowed = set(readable)
    return {k: v for k, v in row.items() if k in allowed}
