"""Row-level security in delivery: a table whose policies are slow to decide holds back only its own subscribers,
and a policy change takes effect in the next window (the cached plans follow the catalog)."""

from __future__ import annotations

from .support.clients import connect, recv, request, subscribe
from .support.config import token
from .support.servers import start
from .support.waiting import nothing_before_pong


def notes(policy: str) -> str:
    """A realtime table `notes` (id, owner) whose rows the policy `mine` admits."""
    return (
        "CREATE TABLE notes (id int PRIMARY KEY, owner text); ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
        f"CREATE POLICY mine ON notes FOR SELECT USING ({policy});"
        "GRANT SELECT ON notes TO authenticated; SELECT enable_realtime('notes');"
    )


async def test_a_slow_table_does_not_hold_back_another(start_server, db):
    db.sql(
        "CREATE TABLE slow (id int PRIMARY KEY); ALTER TABLE slow ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY p ON slow FOR SELECT USING (pg_sleep(1.5) IS NOT NULL);"
        "CREATE TABLE fast (id int PRIMARY KEY);"
        "GRANT SELECT ON slow, fast TO authenticated; SELECT enable_realtime('slow'); SELECT enable_realtime('fast');"
    )
    server = await start(start_server, db)
    async with connect(server, tok=token("reader")) as ws:
        await subscribe(ws, "table:public.slow")
        await subscribe(ws, "table:public.fast")
        await db.execute("INSERT INTO slow VALUES (1)")
        await db.execute("INSERT INTO fast VALUES (2)")
        first, second = await recv(ws), await recv(ws)
    # slow committed first, yet fast is not kept waiting behind its authorization.
    assert [first["channel"], second["channel"]] == ["table:public.fast", "table:public.slow"]


async def test_a_new_policy_applies_to_the_next_change(start_server, db):
    db.sql(notes("owner = (SELECT auth.jwt() ->> 'sub')"))
    server = await start(start_server, db)
    async with connect(server, tok=token("alice")) as alice, connect(server, tok=token("bob")) as bob:
        await subscribe(alice, "table:public.notes")
        await subscribe(bob, "table:public.notes")
        await db.execute("INSERT INTO notes VALUES (1, 'alice')")
        assert (await recv(alice))["payload"]["record"]["id"] == 1
        await db.execute("CREATE POLICY shared ON notes FOR SELECT USING (owner = 'everyone')")
        await db.execute("INSERT INTO notes VALUES (2, 'everyone')")
        assert (await recv(alice))["payload"]["record"]["id"] == 2
        # Bob's first change is 2: a table's changes arrive in commit order, so 1 would have come before it.
        assert (await recv(bob))["payload"]["record"]["id"] == 2
        await db.execute("DROP POLICY mine ON notes")
        await db.execute("INSERT INTO notes VALUES (3, 'alice')")
        await db.execute("INSERT INTO notes VALUES (4, 'everyone')")
        assert (await recv(alice))["payload"]["record"]["id"] == 4


async def test_who_receives_follows_every_subscription_change_between_two_changes(start_server, db):
    # The lookup of a table's subscribers is kept across windows: joining, leaving, changing a filter and changing
    # the token must each show in the very next change.
    db.sql(notes("owner = (SELECT auth.jwt() ->> 'sub')"))
    server = await start(start_server, db)
    async with connect(server, tok=token("alice")) as alice, connect(server, tok=token("bob")) as bob:
        await subscribe(alice, "table:public.notes")
        await db.execute("INSERT INTO notes VALUES (1, 'alice')")
        assert (await recv(alice))["payload"]["record"]["id"] == 1
        await subscribe(bob, "table:public.notes")  # joins after the lookup was made
        await db.execute("INSERT INTO notes VALUES (2, 'bob')")
        assert (await recv(bob))["payload"]["record"]["id"] == 2
        await subscribe(alice, "table:public.notes", filter="id=eq.4")  # a filter now
        await db.execute("INSERT INTO notes VALUES (3, 'alice'), (4, 'alice')")
        assert (await recv(alice))["payload"]["record"]["id"] == 4
        await request(bob, type="auth", token=token("alice"))  # bob's connection is alice's now
        await db.execute("INSERT INTO notes VALUES (5, 'alice'), (6, 'bob')")
        assert (await recv(bob))["payload"]["record"]["id"] == 5
        await request(bob, type="unsubscribe", channel="table:public.notes")
        await db.execute("INSERT INTO notes VALUES (7, 'alice')")
        # 5 and 7 do not pass alice's filter; a later change to row 4 does, and comes after them in commit order.
        await db.execute("UPDATE notes SET owner = 'alice' WHERE id = 4")
        assert (await recv(alice))["payload"]["type"] == "UPDATE"
        # 7 has been delivered by now: a frame of it for bob would be ahead of his pong.
        await nothing_before_pong(bob)


async def test_a_policy_the_rewrite_refuses_is_decided_per_identity_and_said_once(start_server, db, caplog):
    db.sql(
        "CREATE FUNCTION public.is_mine(owner text) RETURNS boolean LANGUAGE sql STABLE"
        " AS $$ SELECT owner = (SELECT auth.jwt() ->> 'sub') $$;" + notes("public.is_mine(owner)")
    )
    caplog.set_level("INFO", logger="fluxrt.rls")
    server = await start(start_server, db)
    async with connect(server, tok=token("alice")) as alice, connect(server, tok=token("bob")) as bob:
        await subscribe(alice, "table:public.notes")
        await subscribe(bob, "table:public.notes")
        for n in range(1, 4):
            await db.execute(f"INSERT INTO notes VALUES ({n}, 'alice')")
            assert (await recv(alice))["payload"]["record"]["id"] == n
        await db.execute("INSERT INTO notes VALUES (4, 'bob')")
        # Bob's first change is 4: a table's changes arrive in commit order, so 1 to 3 would have come before it.
        assert (await recv(bob))["payload"]["record"]["id"] == 4
    said = [r for r in caplog.records if "decided one identity at a time" in r.getMessage()]
    assert len(said) == 1
    assert said[0].ctx_table == "public.notes" and "public.is_mine" in said[0].ctx_reason
