"""Delivery of change windows to `table:` subscribers: the lanes, the database crossing, and handing frames out.

Each table is delivered in its own lane, so that one table's authorization never holds back another's changes. Per
lane, the windows that queued up meanwhile are decided together in one crossing into the database, which tells which
identities may see which row images (postgres/rls.py: one query per role where the policies allow it). What to
decide and who gets which frame is planned by protocol/delivery.py; this module only waits and hands out.

Resume (docs/protocol.md): a subscriber that asked for what followed a position is kept out of its table's live
delivery until a replay marker, queued in the table's lane behind every change already read, reaches the head of
the lane. The replay then reads from the change log exactly what lies between the position and the marker (the
same windows the changefeed reads, so each replayed event carries an exact position), delivers it through the same
authorization as live changes, and hands the subscriber to live delivery: every event once, in order. A position
that this node's reads have not yet passed (it came from a node that is ahead) waits until they have.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from .metrics import Counters
from .postgres import changelog
from .postgres.bridge import AuthorizerPool, DatabaseUnavailable
from .postgres.rls import RowSecurity, TableQuestion, decide_tables
from .protocol import delivery
from .protocol.changes import LoggedBroadcastError, RowChange, Window, logged_broadcast
from .protocol.channels import ChannelName, parse_channel
from .protocol.delivery import DeliveryPlanner, Ended, Missed, TablePlan, TableSubscriber, Visibility
from .protocol.positions import Cut, Snapshot, TablePosition, replay_windows
from .protocol.session import Subscription

log = logging.getLogger("fluxrt.tables")

MERGE_LIMIT = 5000
"""changes at most in one delivery of a table's queued windows"""
LANE_LIMIT = 100_000
"""changes a table may have waiting for delivery; beyond it they are dropped and its subscribers told to refetch,
rather than holding back the changefeed and with it every other table"""
REPLAY_WAIT = 10.0
"""seconds a replay waits for this node's reads to pass the client's position (written by a node that is ahead);
then the client is told CHANGES_MISSED and gets the live stream"""
RETAINED_FOR = 0.5
"""seconds an answer about a table's oid and the log's pruning horizon serves the resume checks"""
PAGE_CACHE_FOR = 15.0
"""seconds a page read for a replay serves other replays of the same window: clients reconnecting with jittered
backoff arrive over seconds (1,000 took 10 s on a loaded 2-core box in bench/resume.py, where 5 s let a third of
the storm read the window again), and a window of the log never changes once read"""
PAGE_CACHE_BYTES = 32 * 1024 * 1024
"""row image bytes the replay page cache holds at most"""
REPLAY_GATHER = 0.02
"""seconds a replay marker at the head of a lane waits for more: a storm of reconnects is served by few reads"""
REPLAY_MISSED = (
    "changes after your position could not all be replayed (they were pruned, or the database was unavailable); "
    "refetch what you show"
)


class Subscriptions(Protocol):
    """Where table subscribers are found (the hub)."""

    def subscribers(self, channel: str) -> Sequence[TableSubscriber]: ...

    def channels(self, kind: str) -> list[str]: ...


@attrs.frozen(slots=True)
class _Replay:
    """A replay marker: `subscriber` gets what `until` covers beyond `since`, then the live stream; for
    `subscription` only (one that has since been replaced or ended gets nothing of it)."""

    subscriber: TableSubscriber
    subscription: Subscription
    relid: int
    since: Cut
    until: Cut


@attrs.define(slots=True)
class _Parked:
    """A replay whose position this node's reads have not passed yet."""

    channel: str
    subscriber: TableSubscriber
    subscription: Subscription
    position: TablePosition
    deadline: float


@attrs.define
class _Lane:
    pending: list[RowChange | _Replay] = attrs.field(factory=list)
    ready: trio.Event = attrs.field(factory=trio.Event)
    busy: bool = False


class TableChannels:
    """Delivery of one node's table subscriptions. Connections report subscription changes through
    `subscriptions_changed`; every frame handed out is counted in `counters.messages_out`."""

    def __init__(
        self,
        hub: Subscriptions,
        pool: AuthorizerPool,
        counters: Counters,
        *,
        row_security: RowSecurity | None = None,
        log_pool: AuthorizerPool | None = None,
        request_progress: Callable[[], None] | None = None,
        sends: Callable[[str, Any, int], None] | None = None,
        delivered: Callable[[], None] | None = None,
    ) -> None:
        self.hub = hub
        self._delivered = delivered
        """called when every lane has delivered all it was given (the changefeed then reads again at once)"""
        self._sends = sends
        """where the log's `realtime.send` messages go, in commit order: (channel, payload, change id)"""
        self.pool = pool
        self.counters = counters
        self.row_security = row_security or RowSecurity()
        self.planner = DeliveryPlanner()
        self.log_pool = log_pool
        """reads the change log for replays (None: no replays, every position is refused)"""
        self._request_progress = request_progress
        self._lanes: dict[str, _Lane] = {}
        self._nursery: trio.Nursery | None = None
        self._dispatched: Cut | None = None
        """how far the windows handed to the lanes go: every change it covers is delivered or queued"""
        self._replaying: dict[str, dict[TableSubscriber, Subscription]] = {}
        """per channel, the subscribers kept out of its live delivery until the replay of the subscription named
        here is done (while that is still their subscription)"""
        self._parked: list[_Parked] = []
        self._retained_at: dict[tuple[str, str], tuple[float, changelog.Retained]] = {}
        self._asking: dict[tuple[str, str], trio.Event] = {}
        self._pages: collections.OrderedDict[tuple[Any, ...], tuple[float, changelog.ReplayPage]] = (
            collections.OrderedDict()
        )
        self._pages_bytes = 0

    def delivering(self) -> bool:
        """Whether some lane is still delivering, or has changes waiting."""
        return any(lane.busy or lane.pending for lane in self._lanes.values())

    def subscriptions_changed(self, channel: str) -> None:
        """See `DeliveryPlanner.subscriptions_changed`."""
        self.planner.subscriptions_changed(channel)

    def _subscribers(self, channel: str) -> Sequence[TableSubscriber]:
        members = self.hub.subscribers(channel)
        if channel in self._replaying:
            return [s for s in members if not self._held(s, channel)]
        return members

    def _held(self, subscriber: TableSubscriber, channel: str) -> bool:
        """Whether `subscriber`'s current subscription to `channel` waits for its replay."""
        replaying = self._replaying.get(channel)
        if not replaying:
            return False
        waiting = replaying.get(subscriber)
        return waiting is not None and waiting is subscriber.subscription(channel)

    # ---- resume --------------------------------------------------------------------------------------------

    async def resumable(self, channel: ChannelName, since: Any) -> bool:
        """Whether `since` is a position of this table whose sequel is still in the change log."""
        position = TablePosition.parse(since)
        if position is None or self.log_pool is None:
            return False
        assert channel.schema is not None and channel.table is not None
        try:
            retained = await self._retained(channel.schema, channel.table)
            if retained.ahead(position):
                # Written after the cached answer (by a node that reads ahead), or never: ask afresh.
                retained = await self._retained(channel.schema, channel.table, fresh=True)
        except DatabaseUnavailable:
            return False
        return retained.keeps(position)

    async def _retained(self, schema: str, table: str, *, fresh: bool = False) -> changelog.Retained:
        """The table's oid and the pruning horizon, asked once for every check within RETAINED_FOR: a storm of
        reconnects costs one query per table, not one per client. An answer that is a little old errs safely: a
        replay that finds its changes pruned tells the client CHANGES_MISSED."""
        assert self.log_pool is not None
        key = (schema, table)
        while True:
            cached = self._retained_at.get(key)
            if cached is not None and not fresh and trio.current_time() - cached[0] < RETAINED_FOR:
                return cached[1]
            asking = self._asking.get(key)
            if asking is None:
                break
            await asking.wait()
        asking = self._asking[key] = trio.Event()
        try:
            answer = await self.log_pool.run(lambda conn: changelog.retained(conn, schema, table))
            if len(self._retained_at) > 10_000:
                self._retained_at.clear()
            self._retained_at[key] = (trio.current_time(), answer)
            return answer
        finally:
            del self._asking[key]
            asking.set()

    def replay(self, subscriber: TableSubscriber, subscription: Subscription, since: Any) -> None:
        """Keep `subscriber` out of the channel's live delivery, replay what followed `since` (found resumable) for
        `subscription`, then let it in. Synchronous: the caller has just joined it, and nothing is delivered in
        between. A later subscribe to the same channel replaces this one: its replay is then dropped."""
        position = TablePosition.parse(since)
        if position is None:
            return
        channel = subscription.channel.name
        self._replaying.setdefault(channel, {})[subscriber] = subscription
        self.planner.subscriptions_changed(channel)
        parked = _Parked(channel, subscriber, subscription, position, trio.current_time() + REPLAY_WAIT)
        self._parked.append(parked)
        self._schedule()

    def _schedule(self) -> None:
        """Queue the replays whose position the lanes have passed, behind what is queued; give up on those that
        waited too long."""
        now = trio.current_time()
        waiting: list[_Parked] = []
        for parked in self._parked:
            until = self._dispatched
            if until is not None and until.includes(parked.position.cut):
                lane = self._lane(parked.channel)
                position = parked.position
                lane.pending.append(
                    _Replay(parked.subscriber, parked.subscription, position.relid, position.cut, until)
                )
                lane.ready.set()
            elif now >= parked.deadline:
                log.warning(
                    "a replay waited too long for this node to read up to its position",
                    extra={"ctx_channel": parked.channel},
                )
                self._live(parked.channel, [(parked.subscriber, parked.subscription)], missed=True)
            else:
                waiting.append(parked)
        self._parked = waiting
        if waiting and self._request_progress is not None:
            self._request_progress()

    def _live(
        self, channel: str, replays: Sequence[tuple[TableSubscriber, Subscription]], *, missed: bool = False
    ) -> None:
        """Hand the subscribers of these replays to `channel`'s live delivery (told CHANGES_MISSED first when
        their replay failed), those whose replay is still theirs."""
        replaying = self._replaying.get(channel, {})
        for subscriber, subscription in replays:
            if replaying.get(subscriber) is subscription:
                del replaying[subscriber]
        if not replaying:
            self._replaying.pop(channel, None)
        self.planner.subscriptions_changed(channel)
        if missed:
            self._hand_out(Missed(_current(channel, replays), channel, REPLAY_MISSED))

    async def _replay(self, channel: str, markers: list[_Replay]) -> None:
        """Carry out consecutive replay markers of one lane. Each window of the log is read once for all the
        markers whose positions lie in the same window; each subscriber is given what follows its own position.

        Markers with nothing between them in the lane differ in their `until` only by changes to other tables
        (a change to this one would sit between them), so the last one's serves them all."""
        if not markers:
            return
        until = markers[-1].until
        # One replay per subscriber: its latest subscription's, if that is still the one waiting for it.
        latest = {marker.subscriber: marker for marker in markers}
        groups: dict[tuple[int, Snapshot, Snapshot], dict[Cut, list[tuple[TableSubscriber, Subscription]]]] = {}
        for marker in latest.values():
            subscriber, subscription = marker.subscriber, marker.subscription
            waiting = self._replaying.get(channel, {}).get(subscriber)
            if waiting is not subscription or subscriber.subscription(channel) is not subscription:
                # Unsubscribed, closed, or subscribed again since: this replay is nobody's any more.
                self._live(channel, [(subscriber, subscription)])
                continue
            since = marker.since
            groups.setdefault((marker.relid, since.prev, since.cur), {}).setdefault(since, []).append(
                (marker.subscriber, marker.subscription)
            )
        current = await self._current_relid(channel)
        for (relid, _, _), by_position in groups.items():
            missed = relid != current
            try:
                if not missed:
                    missed = await self._replay_group(channel, relid, by_position, until)
            except DatabaseUnavailable as exc:
                log.warning(
                    "a replay could not read the change log", extra={"ctx_channel": channel, "ctx_error": str(exc)}
                )
                missed = True
            except Exception:
                log.exception("a replay failed", extra={"ctx_channel": channel})
                missed = True
            for replays in by_position.values():
                self._live(channel, replays, missed=missed)

    async def _current_relid(self, channel: str) -> int | None:
        """The oid of the table `channel` names now, asked afresh: a table dropped and created again since the
        resume check must not have the old one's changes replayed to it. None when it cannot be known."""
        name = parse_channel(channel)
        if name.schema is None or name.table is None:
            return None
        try:
            return (await self._retained(name.schema, name.table, fresh=True)).relid
        except DatabaseUnavailable:
            return None

    async def _replay_group(
        self, channel: str, relid: int, by_position: dict[Cut, list[tuple[TableSubscriber, Subscription]]], until: Cut
    ) -> bool:
        """Deliver to the subscribers of each position (all in one window) the table's changes that `until` covers
        beyond it, reading the log once from the earliest; True when some were pruned before they could be read."""
        assert self.log_pool is not None
        log_pool = self.log_pool
        earliest = min(by_position, key=lambda cut: cut.upto)
        planners = {since: DeliveryPlanner() for since in by_position}

        def members(replays: list[tuple[TableSubscriber, Subscription]]) -> delivery.Subscribers:
            return lambda name: _current(channel, replays) if name == channel else ()

        replayed_for = {s: sub for replays in by_position.values() for s, sub in replays}

        def superseded(subscriber: TableSubscriber, name: str) -> bool:
            # Subscribed again (or gone) while the page was being authorized: nothing of this replay is for it.
            return subscriber.subscription(name) is not replayed_for.get(subscriber)

        for prev, cur, first, last in replay_windows(earliest, until):
            after = first
            while True:
                page = await self._replay_page(log_pool, relid, prev, cur, after, last)
                if page.missed:
                    return True
                for since, replays in by_position.items():
                    changes = [c for c in page.changes if not since.covers(c.xid, c.id)]
                    if changes:
                        await self.deliver(
                            changes, subscribers=members(replays), planner=planners[since], held=superseded
                        )
                if page.changes:
                    after = page.changes[-1].id
                if not page.full:
                    break
        return False

    async def _replay_page(
        self, log_pool: AuthorizerPool, relid: int, prev: Snapshot, cur: Snapshot, after: int, until: int
    ) -> changelog.ReplayPage:
        """A page of a window for a replay, from the cache when another replay read it lately."""
        now = trio.current_time()
        pages = self._pages
        while pages:
            at, oldest = next(iter(pages.values()))
            if now - at < PAGE_CACHE_FOR and self._pages_bytes <= PAGE_CACHE_BYTES:
                break
            pages.popitem(last=False)
            self._pages_bytes -= oldest.size
        key = (relid, prev, cur, after, until)
        cached = pages.get(key)
        if cached is not None:
            return cached[1]
        page = await log_pool.run(
            functools.partial(changelog.read_replay_page, relid=relid, prev=prev, cur=cur, after=after, until=until)
        )
        if not page.missed and page.size <= PAGE_CACHE_BYTES:
            pages[key] = (trio.current_time(), page)
            self._pages_bytes += page.size
        return page

    def _lane(self, channel: str) -> _Lane:
        lane = self._lanes.get(channel)
        if lane is None:
            assert self._nursery is not None, "run() is not running"
            lane = self._lanes[channel] = _Lane()
            self._nursery.start_soon(self._drive, channel, lane)
        return lane

    # ---- live delivery -------------------------------------------------------------------------------------

    async def run(self, windows: trio.MemoryReceiveChannel[Window]) -> None:
        """Deliver windows as the changefeed produces them: each table in its own lane, in order within it, so
        that a table whose policies are slow to decide delays only its own subscribers."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_parked)
            async for window in windows:
                if window.missed:
                    for channel in self.hub.channels("table"):
                        self._hand_out(Missed(self._subscribers(channel), channel, delivery.WINDOW_MISSED))
                for change in window.changes:
                    if change.relid == 0:
                        self._send(change)
                    else:
                        self._lane(change.channel).pending.append(change)
                for channel, lane in self._lanes.items():
                    if len(lane.pending) > LANE_LIMIT:
                        log.warning(
                            "a table's deliveries fell too far behind; its subscribers are told to refetch",
                            extra={"ctx_channel": channel, "ctx_dropped": len(lane.pending)},
                        )
                        markers = [item for item in lane.pending if isinstance(item, _Replay)]
                        lane.pending.clear()
                        self._hand_out(Missed(self._subscribers(channel), channel, delivery.FELL_BEHIND))
                        self._live(channel, [(m.subscriber, m.subscription) for m in markers], missed=True)
                    if lane.pending:
                        lane.ready.set()
                cut = window.cut()
                if cut is not None:
                    self._dispatched = cut
                    if self._parked:
                        self._schedule()

    def _send(self, change: RowChange) -> None:
        """A `realtime.send` (relid 0): handed to the broadcast side as it comes, since sends on one channel are
        already in commit order here and need no authorization (the grant to call it was the permission)."""
        try:
            channel, payload = logged_broadcast(change)
        except LoggedBroadcastError as exc:
            log.error("dropped a realtime.send row that is not a broadcast", extra={"ctx_error": str(exc)})
            return
        if self._sends is None:
            return
        try:
            self._sends(channel, payload, change.id)
        except Exception:
            # A fault of ours must not stop the changefeed's windows for every table.
            log.exception("delivering a realtime.send failed", extra={"ctx_channel": channel})

    async def _expire_parked(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self._parked:
                self._schedule()

    async def _drive(self, channel: str, lane: _Lane) -> None:
        while True:
            await lane.ready.wait()
            lane.ready = trio.Event()
            lane.busy = True
            try:
                await self._drain(channel, lane)
            finally:
                lane.busy = False
            if self._delivered is not None and not self.delivering():
                self._delivered()

    async def _drain(self, channel: str, lane: _Lane) -> None:
        """Deliver what the lane holds, in order, until it is empty."""
        while lane.pending:
            if isinstance(lane.pending[0], _Replay):
                await trio.sleep(REPLAY_GATHER)
                await self._replay(channel, _take(lane, _Replay, len(lane.pending)))
                continue
            # What queued up while the previous batch was being delivered goes out together: one
            # authorization round trip instead of one per window, so delivery catches up with the reads. But only
            # changes of one table: a batch is decided by its first change's table's policies, and the channel's
            # name may pass to another table (created after a DROP, or renamed to it) within what was queued.
            changes = _take(lane, RowChange, MERGE_LIMIT, lane.pending[0].relid)
            try:
                await self.deliver(changes)
            except Exception:
                # A fault of ours must not stop delivery; the affected subscribers are told.
                log.exception("delivering a window failed", extra={"ctx_channel": channel})
                self._hand_out(Missed(self._subscribers(channel), channel, delivery.INTERNAL_ERROR))

    async def deliver(
        self,
        changes: list[RowChange],
        *,
        subscribers: delivery.Subscribers | None = None,
        planner: DeliveryPlanner | None = None,
        held: Callable[[TableSubscriber, str], bool] | None = None,
    ) -> None:
        """Authorize and deliver `changes` (of one table, or several: one database crossing decides them all) to
        the channels' live subscribers, or to `subscribers` (a replay, planned by its own `planner`). Nothing goes
        to a subscriber `held` says must get nothing of a channel now (see `delivery.deliveries`)."""
        members = subscribers if subscribers is not None else self._subscribers
        plans = (planner or self.planner).plan(changes, members)
        decided = await self._decide(plans)
        handed = 0
        try:
            if subscribers is None and self._replaying:
                # Live frames planned before a subscriber's replay began are held back from it too.
                held = self._held
            for handout in delivery.deliveries(changes, plans, decided, members, held):
                if isinstance(handout, tuple):
                    subscriber, frame = handout
                    subscriber.deliver_nowait(frame)
                    handed += 1
                elif handout is delivery.PAUSE:
                    # Let the frames queued so far reach the kernel, so a long window to a fast reader never piles
                    # up in its outbox as if it were a slow consumer.
                    await trio.sleep(0)
                else:
                    self._hand_out(handout)
        finally:
            self.counters.messages_out += handed

    async def _decide(self, plans: dict[str, TablePlan]) -> dict[tuple[str, str], Visibility]:
        """One crossing into the database for every table of the window with identities to decide (some with no
        images: only which columns their role may read)."""
        questions = [
            TableQuestion(channel, plan.relid, plan.identities(), plan.images_json(), len(plan.images))
            for channel, plan in plans.items()
            if plan.identity_keys
        ]
        if not questions:
            return {}
        answers = await self._decide_waiting_out_outages(questions)
        decided, failed, dropped = delivery.visibilities(plans, answers)
        for channel, error in failed.items():
            # Nobody may receive the table's changes unchecked.
            log.error("authorizing changes failed", extra={"ctx_channel": channel, "ctx_error": error})
            self._hand_out(delivery.undecided(channel, plans[channel], delivery.UNDECIDED))
        for channel in dropped:
            # Its DROP row follows in the change log, and ends the same subscriptions.
            self._hand_out(delivery.undecided(channel, plans[channel], delivery.DROPPED_UNCHECKED))
        return decided

    async def _decide_waiting_out_outages(
        self, questions: Sequence[TableQuestion]
    ) -> list[tuple[str, list[delivery.Decision] | str | None]]:
        """The database's answers, however long it is away: the window's changes are already read, so giving up
        would lose them. The changefeed waits behind this window meanwhile (its queue is bounded)."""
        backoff = 0.05
        while True:
            try:
                return await self.pool.run(lambda conn: decide_tables(conn, self.row_security, questions))
            except DatabaseUnavailable as exc:
                log.warning("authorizing a window: database unavailable, retrying", extra={"ctx_error": str(exc)})
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _hand_out(self, notice: Missed | Ended) -> None:
        """Tell subscribers that changes were missed, or end their subscriptions."""
        if isinstance(notice, Ended):
            for subscriber in notice.recipients:
                subscriber.end_subscription(notice.channel, notice.error)
            return
        if notice.detail is not None:
            # The error text stays in the log: it is written by policy code and may say more than the row would.
            log.warning(
                "a policy raised for an identity", extra={"ctx_channel": notice.channel, "ctx_error": notice.detail}
            )
        error = notice.error
        frame = delivery.error_frame(error)
        for subscriber in notice.recipients:
            subscriber.deliver_nowait(frame)
        self.counters.messages_out += len(notice.recipients)
        if notice.recipients:
            self.counters.errors[error.code.value] += len(notice.recipients)


def _take(lane: _Lane, kind: type[Any], most: int, relid: int | None = None) -> list[Any]:
    """The run of items of `kind` at the head of the lane (with `relid`, only those of that table), at most `most`
    of them, taken off it."""
    n = 0
    pending = lane.pending
    while n < len(pending) and n < most and isinstance(pending[n], kind) and relid in (None, pending[n].relid):
        n += 1
    taken, lane.pending = pending[:n], pending[n:]
    return taken


def _current(channel: str, replays: Sequence[tuple[TableSubscriber, Subscription]]) -> list[TableSubscriber]:
    """The subscribers of `replays` whose subscription to `channel` is still the one replayed for."""
    return [subscriber for subscriber, subscription in replays if subscriber.subscription(channel) is subscription]
