"""Attacks on table delivery and inputs that once broke it: each test stands for a way to leak rows, forge
changes or stop a node."""

from __future__ import annotations

import trio

from . import pg
from .support.clients import connect, recv, request, send, subscribe
from .support.config import token
from .support.servers import start
from .support.waiting import nothing_arrives


async def test_policy_code_cannot_become_superuser(start_server, db):
    db.sql(
        "CREATE SCHEMA mal; GRANT USAGE ON SCHEMA mal TO PUBLIC;"
        "CREATE FUNCTION mal.evil() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
        "  PERFORM set_config('session_authorization', 'postgres', true);"
        "  RETURN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user); END $$;"
        "CREATE FUNCTION mal.reset() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
        "  RESET ROLE; RETURN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user); END $$;"
        "CREATE TABLE loot (id int PRIMARY KEY);"
        "ALTER TABLE loot ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY p1 ON loot FOR SELECT USING (id = 1 AND mal.evil());"
        "CREATE POLICY p2 ON loot FOR SELECT USING (id = 2 AND mal.reset());"
        "CREATE POLICY p3 ON loot FOR SELECT USING (id = 3);"
        "GRANT SELECT ON loot TO anon; SELECT enable_realtime('loot');"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.loot")
        for i in (1, 2, 3):
            await db.execute(f"INSERT INTO loot VALUES ({i})")
        got = []
        with trio.move_on_after(1.5):
            while True:
                message = await recv(ws)
                if message["type"] == "broadcast":
                    got.append(message["payload"]["record"]["id"])
    # Rows 1 and 2 would need a superuser session to pass their policy; row 3 passes on its own.
    assert got == [3]


async def test_a_superuser_authorizer_dsn_is_refused(start_server, db):
    db.sql("CREATE TABLE t (id int PRIMARY KEY); GRANT SELECT ON t TO anon; SELECT enable_realtime('t');")
    server = await start(start_server, db, database={"authorizer_dsn": db.dsn})
    async with connect(server) as ws:
        reply = await request(ws, type="subscribe", channel="table:public.t")
    assert reply["code"] == "SUBSCRIPTION_FAILED"
    assert "superuser" in reply["message"]


async def test_changes_cannot_be_forged_for_another_table(start_server, db):
    role = f"mallory_{db.name}"
    db.sql(
        "CREATE TABLE salaries (id int PRIMARY KEY, amount int); GRANT SELECT ON salaries TO anon;"
        "SELECT enable_realtime('salaries');"
        f"CREATE ROLE {role} LOGIN; GRANT CREATE, USAGE ON SCHEMA public TO {role};"
    )
    try:
        server = await start(start_server, db)
        async with connect(server) as ws:
            await subscribe(ws, "table:public.salaries")
            mallory = db.dsn.replace("postgres@", f"{role}@", 1)
            await trio.to_thread.run_sync(
                lambda: pg.run_sql(
                    mallory,
                    "CREATE TABLE mine (id int PRIMARY KEY, amount int);"
                    "CREATE TRIGGER forge AFTER INSERT ON mine FOR EACH ROW"
                    " EXECUTE FUNCTION realtime.capture('', 'public', 'salaries');"
                    "INSERT INTO mine VALUES (1, 1000000);",
                )
            )
            try:
                await trio.to_thread.run_sync(
                    lambda: pg.run_sql(mallory, "SELECT realtime.unregister('public.salaries'::regclass)")
                )
                raise AssertionError("unregister of a table with its trigger must fail")
            except Exception as exc:
                assert "still has its capture trigger" in str(exc)
            await nothing_arrives(ws, 1.0)
            await db.execute("INSERT INTO salaries VALUES (7, 1)")
            assert (await recv(ws))["payload"]["record"] == {"id": 7, "amount": 1}
    finally:
        db.drop()
        pg.run_sql(db.admin, f"DROP ROLE IF EXISTS {role}")


async def test_frames_decided_for_an_old_identity_never_reach_the_new_one(start_server, db):
    db.sql(
        "CREATE TABLE diary (id int PRIMARY KEY, owner text);"
        "ALTER TABLE diary ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY own ON diary FOR SELECT USING (owner = auth.jwt() ->> 'sub' AND pg_sleep(0.4) IS NOT NULL);"
        "GRANT SELECT ON diary TO authenticated; SELECT enable_realtime('diary');"
    )
    server = await start(start_server, db)
    async with connect(server, tok=token("alice")) as ws:
        await subscribe(ws, "table:public.diary")
        await db.execute("INSERT INTO diary VALUES (1, 'alice')")
        await trio.sleep(0.15)  # the window is being authorized (the policy sleeps)
        reply = await request(ws, type="auth", token=token("bob"))
        assert reply == {"type": "ack", "status": "authorized"}
        await nothing_arrives(ws, 1.0)


async def test_a_huge_integer_numeric_neither_crashes_nor_loses_digits(start_server, db):
    db.sql(
        "CREATE TABLE big (id int PRIMARY KEY, n numeric); GRANT SELECT ON big TO anon; SELECT enable_realtime('big');"
    )
    server = await start(start_server, db)
    async with connect(server) as ws:
        await subscribe(ws, "table:public.big")
        await db.execute("INSERT INTO big VALUES (1, ('1' || repeat('0', 5000))::numeric)")
        raw = await ws.get_message()
        assert '"n":1' + "0" * 5000 + "," in raw
        await db.execute("INSERT INTO big VALUES (2, 2)")
        assert (await recv(ws))["payload"]["record"] == {"id": 2, "n": 2}


async def test_an_odd_filter_costs_only_its_subscriber(start_server, db):
    db.sql("CREATE TABLE nums (id int PRIMARY KEY); GRANT SELECT ON nums TO anon; SELECT enable_realtime('nums');")
    server = await start(start_server, db)
    async with connect(server) as odd, connect(server) as plain:
        await subscribe(odd, "table:public.nums", filter="id=gt.NaN")
        await subscribe(plain, "table:public.nums")
        await db.execute("INSERT INTO nums VALUES (1)")
        assert (await recv(plain))["payload"]["record"] == {"id": 1}
        await nothing_arrives(odd)


async def test_a_dropped_role_costs_only_its_identities(start_server, db):
    ghost = f"ghost_{db.name}"
    db.sql(
        f"CREATE ROLE {ghost} NOLOGIN;"
        "CREATE TABLE posts (id int PRIMARY KEY); ALTER TABLE posts ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY members ON posts FOR SELECT TO authenticated USING (true);"
        f"CREATE POLICY ghosts ON posts FOR SELECT TO {ghost} USING (true);"
        f"GRANT SELECT ON posts TO authenticated, {ghost}; SELECT enable_realtime('posts');"
    )
    try:
        server = await start(start_server, db, auth={"roles": (ghost,)})
        async with connect(server, tok=token("g", role=ghost)) as haunted, connect(server, tok=token("m")) as member:
            await subscribe(haunted, "table:public.posts")
            await subscribe(member, "table:public.posts")
            await db.execute(f"DROP POLICY ghosts ON posts; REVOKE ALL ON posts FROM {ghost};")
            await trio.to_thread.run_sync(
                lambda: pg.run_sql(db.admin, f"REVOKE {ghost} FROM fluxrt_authorizer; DROP ROLE {ghost}")
            )
            await db.execute("INSERT INTO posts VALUES (1)")
            assert (await recv(member))["payload"]["record"] == {"id": 1}
            await send(member, type="ping")
            assert (await recv(member))["type"] == "pong"
    finally:
        db.drop()
        pg.run_sql(db.admin, f"DROP ROLE IF EXISTS {ghost}")


async def test_an_update_moving_a_row_into_view_does_not_show_its_old_content(start_server, db):
    db.sql(
        "CREATE TABLE cards (id int PRIMARY KEY, owner text, note text);"
        "ALTER TABLE cards ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY own ON cards FOR SELECT USING (owner = auth.jwt() ->> 'sub');"
        "GRANT SELECT ON cards TO authenticated; SELECT enable_realtime('cards');"
    )
    server = await start(start_server, db)
    async with connect(server, tok=token("alice")) as alice:
        await subscribe(alice, "table:public.cards")
        await db.execute("INSERT INTO cards VALUES (1, 'bob', 'bob secret'), (2, 'alice', 'mine')")
        assert (await recv(alice))["payload"]["record"]["id"] == 2
        await db.execute("UPDATE cards SET owner = 'alice', note = 'handed over' WHERE id = 1")
        moved = (await recv(alice))["payload"]
        assert moved["type"] == "UPDATE"
        assert moved["record"] == {"id": 1, "owner": "alice", "note": "handed over"}
        assert "old_record" not in moved
        await db.execute("UPDATE cards SET note = 'edited' WHERE id = 2")
        kept = (await recv(alice))["payload"]
        assert kept["old_record"] == {"id": 2, "owner": "alice", "note": "mine"}
