"""Identical subscribe checks waiting together share one query (fluxrt_trio/postgres/shared.py), and sharing never
answers a check from before it arrived nor across roles: a REVOKE is honoured by every check that comes after it."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from fluxrt_trio.postgres.authorize import ChannelAuthorizer
from fluxrt_trio.postgres.bridge import AuthorizerPool, asyncio_loop, authorizer_dsn, close_connection, connect
from fluxrt_trio.postgres.bridge import on_connection as run_on
from fluxrt_trio.postgres.shared import SharedQueries


class FakeQuery:
    """A query that, once started, waits for `send` before calling `sent()` and for `answer` before answering."""

    def __init__(self, value: object) -> None:
        self.value = value
        self.send = trio.Event()
        self.answer = trio.Event()
        self.started = 0

    async def __call__(self, sent) -> object:
        self.started += 1
        await self.send.wait()
        sent()
        await self.answer.wait()
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


async def test_waiting_checks_with_one_key_share_one_query_and_other_keys_never_do():
    shared: SharedQueries[tuple[str, str], object] = SharedQueries()
    anon, authenticated = FakeQuery("anon's answer"), FakeQuery("authenticated's answer")
    answers: list[tuple[str, object]] = []

    async def check(role: str, query: FakeQuery) -> None:
        answers.append((role, await shared.run(("public.items", role), query)))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(check, "anon", anon)
            nursery.start_soon(check, "authenticated", authenticated)
        await trio.testing.wait_all_tasks_blocked()
        for query in (anon, authenticated):
            query.send.set()
            query.answer.set()
    assert anon.started == 1 and authenticated.started == 1 and shared.queries == 2
    assert sorted(answers) == [("anon", "anon's answer")] * 3 + [("authenticated", "authenticated's answer")] * 3


async def test_a_check_arriving_after_the_query_was_sent_runs_its_own():
    shared: SharedQueries[str, object] = SharedQueries()
    before, after = FakeQuery("granted"), FakeQuery("revoked")
    answers: dict[str, object] = {}

    async def check(name: str, query: FakeQuery) -> None:
        answers[name] = await shared.run("key", query)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check, "first", before)
        await trio.testing.wait_all_tasks_blocked()
        before.send.set()
        await trio.testing.wait_all_tasks_blocked()
        # The first query is out (the REVOKE could commit now): a new check must not ride on it.
        nursery.start_soon(check, "second", after)
        await trio.testing.wait_all_tasks_blocked()
        assert after.started == 1
        after.send.set()
        after.answer.set()
        before.answer.set()
    assert answers == {"first": "granted", "second": "revoked"}


async def test_an_error_reaches_every_check_that_shared_the_query():
    shared: SharedQueries[str, object] = SharedQueries()
    failing = FakeQuery(LookupError("no such role"))
    errors: list[BaseException] = []

    async def check() -> None:
        with pytest.raises(LookupError) as caught:
            await shared.run("key", failing)
        errors.append(caught.value)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(check)
        await trio.testing.wait_all_tasks_blocked()
        failing.send.set()
        failing.answer.set()
    assert len(errors) == 3 and failing.started == 1


async def test_when_the_first_check_is_cancelled_the_others_ask_again():
    shared: SharedQueries[str, object] = SharedQueries()
    abandoned, second = FakeQuery("never"), FakeQuery("answer")
    answers: list[object] = []

    async def rider() -> None:
        answers.append(await shared.run("key", second))

    leader_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_in, leader_scope, shared, abandoned)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(rider)
        nursery.start_soon(rider)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        second.send.set()
        second.answer.set()
    assert answers == ["answer", "answer"] and second.started == 1 and abandoned.started == 1


async def _run_in(scope: trio.CancelScope, shared: SharedQueries[str, object], query: FakeQuery) -> None:
    with scope:
        await shared.run("key", query)


# On the database: the one pooled connection is held waiting on an advisory lock (a barrier PostgreSQL reports in
# pg_locks), so checks queue for it, as thousands do in a connect storm.
TABLE_SQL = """
CREATE TABLE items (id int PRIMARY KEY);
GRANT SELECT ON items TO authenticated;
SELECT enable_realtime('items');
"""


async def _hold_the_pool(db, pool: AuthorizerPool, nursery: trio.Nursery):
    """Take advisory lock 7 on an admin connection and leave the pool's one connection waiting for it; returns the
    admin connection (unlock it to free the pool)."""
    admin = await connect(db.dsn)
    await run_on(admin, lambda c: c.execute("SELECT pg_advisory_lock(7)"))
    nursery.start_soon(pool.run, lambda c: c.execute("SELECT pg_advisory_lock(7), pg_advisory_unlock(7)"))
    while not await run_on(
        admin, lambda c: c.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    ):
        await trio.sleep(0.01)  # polling a condition PostgreSQL reports, not timing anything
    return admin


async def _together(db, pool: AuthorizerPool, *tasks: Callable[[], Awaitable[object]]) -> None:
    """Start `tasks` while the pool's one connection is held, so that they all wait for it at once; then free it."""
    async with trio.open_nursery() as nursery:
        admin = await _hold_the_pool(db, pool, nursery)
        for task in tasks:
            nursery.start_soon(task)
        await trio.testing.wait_all_tasks_blocked(0.05)
        await run_on(admin, lambda c: c.execute("SELECT pg_advisory_unlock(7)"))
    await close_connection(admin)


async def test_checks_share_per_role_and_a_revoke_before_a_check_is_seen(db):
    from fluxrt_trio.postgres.subscribe import TableAccessQueries

    db.sql(TABLE_SQL)
    async with asyncio_loop():
        pool = AuthorizerPool(authorizer_dsn(db.dsn), max_size=1)
        await pool.open()
        tables = TableAccessQueries(pool)
        answers: list[tuple[str, bool]] = []

        async def check(role: str) -> None:
            access = await tables.table_access("public", "items", role)
            assert access is not None and access.enabled
            answers.append((role, access.readable))

        try:
            await _together(db, pool, *[functools.partial(check, role) for role in ("anon", "authenticated") * 3])
            # One query per role, never one answer for both: anon may not read, authenticated may.
            assert tables.shared.queries == 2
            assert sorted(answers) == [("anon", False)] * 3 + [("authenticated", True)] * 3

            # A check waiting for the pool, then a REVOKE, then another identical check: the second shares the first
            # one's query, which runs after both arrived, so neither is told the old answer.
            answers.clear()
            async with trio.open_nursery() as nursery:
                admin = await _hold_the_pool(db, pool, nursery)
                nursery.start_soon(check, "authenticated")
                await trio.testing.wait_all_tasks_blocked(0.05)
                await run_on(admin, lambda c: c.execute("REVOKE SELECT ON items FROM authenticated"))
                nursery.start_soon(check, "authenticated")
                await trio.testing.wait_all_tasks_blocked(0.05)
                await run_on(admin, lambda c: c.execute("SELECT pg_advisory_unlock(7)"))
            assert answers == [("authenticated", False)] * 2 and tables.shared.queries == 3

            # Nothing is kept once answered: a GRANT now is seen by the next check at once.
            await run_on(admin, lambda c: c.execute("GRANT SELECT ON items TO authenticated"))
            answers.clear()
            await check("authenticated")
            assert answers == [("authenticated", True)]
            await close_connection(admin)
        finally:
            await pool.close()


async def test_table_subscribes_that_shared_a_query_share_the_snapshot_their_subscriptions_keep(db):
    # Each table subscription keeps the snapshot its check read (session.TableGrant), for as long as it lasts; in a
    # connect storm thousands share one query, and must not keep a copy each of its list of transactions in progress.
    from fluxrt_trio.checks import ChannelChecks
    from fluxrt_trio.protocol.channels import parse_channel
    from fluxrt_trio.protocol.identity import Identity
    from fluxrt_trio.protocol.messages import Subscribe
    from fluxrt_trio.protocol.session import CheckSubscribe, TableGrant

    db.sql(TABLE_SQL)
    async with asyncio_loop():
        pool = AuthorizerPool(authorizer_dsn(db.dsn), max_size=1)
        await pool.open()
        checks = ChannelChecks(pool, ["authenticated"])
        check = CheckSubscribe(Subscribe("table:public.items"), parse_channel("table:public.items"))
        grants: list[object] = []

        async def subscribe() -> None:
            grants.append(await checks.subscribe(Identity("u1", "authenticated"), check))

        try:
            await _together(db, pool, subscribe, subscribe, subscribe)
            assert checks._tables is not None and checks._tables.shared.queries == 1
            assert all(isinstance(grant, TableGrant) for grant in grants) and len(grants) == 3
            first = grants[0]
            assert isinstance(first, TableGrant)
            assert all(grant.seen is first.seen for grant in grants if isinstance(grant, TableGrant))
        finally:
            await pool.close()


async def test_hook_lookups_waiting_together_share_one_query(db):
    async with asyncio_loop():
        pool = AuthorizerPool(authorizer_dsn(db.dsn), max_size=1)
        await pool.open()
        hook = ChannelAuthorizer(pool)
        answers: list[bool] = []

        async def look() -> None:
            answers.append(await hook.hook_exists())

        try:
            await _together(db, pool, *[look] * 5)
            assert answers == [False] * 5 and hook.looks.queries == 1
        finally:
            await pool.close()
