"""Delivery of change windows to `table:` subscribers: the lanes, the database crossing, and handing frames out.

Each table is delivered in its own lane, so that one table's authorization never holds back another's changes. Per
lane, the windows that queued up meanwhile are decided together in one crossing into the database, which tells which
identities may see which row images (postgres/rls.py: one query per role where the policies allow it). What to
decide and who gets which frame is planned by protocol/delivery.py; this module only waits and hands out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from .metrics import Counters
from .postgres.bridge import AuthorizerPool, DatabaseUnavailable
from .postgres.rls import RowSecurity, TableQuestion, decide_tables
from .protocol import delivery
from .protocol.changes import RowChange, Window
from .protocol.delivery import DeliveryPlanner, Ended, Missed, TablePlan, TableSubscriber, Visibility

log = logging.getLogger("fluxrt.tables")

MERGE_LIMIT = 5000
"""changes at most in one delivery of a table's queued windows"""
LANE_LIMIT = 100_000
"""changes a table may have waiting for delivery; beyond it they are dropped and its subscribers told to refetch,
rather than holding back the changefeed and with it every other table"""


class Subscriptions(Protocol):
    """Where table subscribers are found (the hub)."""

    def subscribers(self, channel: str) -> Sequence[TableSubscriber]: ...

    def channels(self, kind: str) -> list[str]: ...


@attrs.define
class _Lane:
    pending: list[RowChange] = attrs.field(factory=list)
    ready: trio.Event = attrs.field(factory=trio.Event)


class TableChannels:
    """Delivery of one node's table subscriptions. Connections report subscription changes through
    `subscriptions_changed`; every frame handed out is counted in `counters.messages_out`."""

    def __init__(
        self, hub: Subscriptions, pool: AuthorizerPool, counters: Counters, *, row_security: RowSecurity | None = None
    ) -> None:
        self.hub = hub
        self.pool = pool
        self.counters = counters
        self.row_security = row_security or RowSecurity()
        self.planner = DeliveryPlanner()

    def subscriptions_changed(self, channel: str) -> None:
        """See `DeliveryPlanner.subscriptions_changed`."""
        self.planner.subscriptions_changed(channel)

    def _subscribers(self, channel: str) -> Sequence[TableSubscriber]:
        return self.hub.subscribers(channel)

    async def run(self, windows: trio.MemoryReceiveChannel[Window]) -> None:
        """Deliver windows as the changefeed produces them: each table in its own lane, in order within it, so
        that a table whose policies are slow to decide delays only its own subscribers."""
        lanes: dict[str, _Lane] = {}
        async with trio.open_nursery() as nursery:
            async for window in windows:
                if window.missed:
                    for channel in self.hub.channels("table"):
                        self._hand_out(Missed(self._subscribers(channel), channel, delivery.WINDOW_MISSED))
                for change in window.changes:
                    lane = lanes.get(change.channel)
                    if lane is None:
                        lane = lanes[change.channel] = _Lane()
                        nursery.start_soon(self._drive, change.channel, lane)
                    lane.pending.append(change)
                for channel, lane in lanes.items():
                    if len(lane.pending) > LANE_LIMIT:
                        log.warning(
                            "a table's deliveries fell too far behind; its subscribers are told to refetch",
                            extra={"ctx_channel": channel, "ctx_dropped": len(lane.pending)},
                        )
                        lane.pending.clear()
                        self._hand_out(Missed(self._subscribers(channel), channel, delivery.FELL_BEHIND))
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
                    self._hand_out(Missed(self._subscribers(channel), channel, delivery.INTERNAL_ERROR))

    async def deliver(self, changes: list[RowChange]) -> None:
        """Authorize and deliver `changes` (of one table, or several: one database crossing decides them all)."""
        plans = self.planner.plan(changes, self._subscribers)
        decided = await self._decide(plans)
        handed = 0
        try:
            for handout in delivery.deliveries(changes, plans, decided, self._subscribers):
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
        decided, failed = delivery.visibilities(plans, await self._decide_waiting_out_outages(questions))
        for channel, error in failed.items():
            # Nobody may receive the table's changes unchecked.
            log.error("authorizing changes failed", extra={"ctx_channel": channel, "ctx_error": error})
            self._hand_out(Missed(plans[channel].members, channel, delivery.UNDECIDED))
        return decided

    async def _decide_waiting_out_outages(
        self, questions: Sequence[TableQuestion]
    ) -> list[tuple[str, list[delivery.Decision] | str]]:
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
