"""Both ways of deciding row-level security (one query per role, one identity at a time) against live `SET ROLE` +
`SELECT`, over every policy shape docs/architecture.md lists: the three must give the same answer for every identity and
row, and each table must have taken the path expected of it (else the comparison would prove nothing)."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from fluxrt_trio.postgres.bridge import AUTHORIZER_ROLE, AUTHORIZER_SESSION
from fluxrt_trio.postgres.rls import RowSecurity

from . import pg
from .support.database import in_asyncio

ALICE = "11111111-1111-1111-1111-111111111111"
BOB = "22222222-2222-2222-2222-222222222222"

SCHEMA = """
CREATE TABLE own (id int PRIMARY KEY, user_id uuid, title text);
CREATE POLICY mine ON own FOR SELECT USING (user_id = auth.uid());
INSERT INTO own VALUES (1, '{alice}', 'a'), (2, '{bob}', 'b'), (3, NULL, 'nobody');

CREATE TABLE own_fast (id int PRIMARY KEY, user_id uuid);
CREATE POLICY mine ON own_fast FOR SELECT USING (user_id = (SELECT auth.uid()));
INSERT INTO own_fast VALUES (1, '{alice}'), (2, '{bob}');

CREATE TABLE by_sub (id int PRIMARY KEY, owner text);
CREATE POLICY mine ON by_sub FOR SELECT USING (owner = auth.jwt() ->> 'sub');
INSERT INTO by_sub VALUES (1, 'carol'), (2, '{alice}'), (3, 'dave');

CREATE TABLE by_setting (id int PRIMARY KEY, owner text);
CREATE POLICY mine ON by_setting FOR SELECT
    USING (owner = nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub');
INSERT INTO by_setting VALUES (1, 'carol'), (2, '{bob}');

CREATE TABLE teams (id int PRIMARY KEY, team_id int);
CREATE POLICY team ON teams FOR SELECT USING (team_id = ((SELECT auth.jwt()) ->> 'team')::int);
INSERT INTO teams SELECT g, g % 3 FROM generate_series(1, 9) g;

CREATE TABLE by_user (id int PRIMARY KEY, owner name);
CREATE POLICY mine ON by_user FOR SELECT USING (owner = current_user);
INSERT INTO by_user VALUES (1, 'authenticated'), (2, 'anon'), (3, '{editor}');

CREATE TABLE ored (id int PRIMARY KEY, owner text, public boolean);
CREATE POLICY b_public ON ored FOR SELECT USING (public);
CREATE POLICY a_own ON ored FOR SELECT USING (owner = auth.jwt() ->> 'sub');
INSERT INTO ored VALUES (1, 'carol', false), (2, 'dave', true), (3, 'nobody', false);

CREATE TABLE restricted (id int PRIMARY KEY, tenant text, hidden boolean);
CREATE POLICY everyone ON restricted FOR SELECT USING (true);
CREATE POLICY tenant ON restricted AS RESTRICTIVE FOR SELECT USING (tenant = auth.jwt() ->> 'tenant');
CREATE POLICY shown ON restricted AS RESTRICTIVE FOR SELECT USING (NOT hidden);
INSERT INTO restricted VALUES (1, 'a', false), (2, 'b', false), (3, 'a', true);

CREATE TABLE members (user_id uuid, team int);
CREATE POLICY mine ON members FOR SELECT USING (user_id = auth.uid());
INSERT INTO members VALUES ('{alice}', 1), ('{bob}', 2);
CREATE TABLE docs_private_members (id int PRIMARY KEY, team int);
CREATE POLICY member ON docs_private_members FOR SELECT
    USING (EXISTS (SELECT 1 FROM members m WHERE m.team = docs_private_members.team));
INSERT INTO docs_private_members VALUES (1, 1), (2, 2), (3, 3);

CREATE TABLE open_members (user_id uuid, team int);
CREATE POLICY all_rows ON open_members FOR SELECT USING (true);
INSERT INTO open_members VALUES ('{alice}', 1), ('{bob}', 2), ('{alice}', 3);
CREATE TABLE docs (id int PRIMARY KEY, team int);
CREATE POLICY member ON docs FOR SELECT
    USING (EXISTS (SELECT 1 FROM open_members m WHERE m.user_id = auth.uid() AND m.team = docs.team));
INSERT INTO docs VALUES (1, 1), (2, 2), (3, 3), (4, 4);

CREATE TABLE for_editors (id int PRIMARY KEY);
CREATE POLICY editors ON for_editors FOR SELECT TO {editor} USING (true);
CREATE POLICY members ON for_editors FOR SELECT TO authenticated USING (id = 1);
INSERT INTO for_editors VALUES (1), (2);

CREATE TABLE update_only (id int PRIMARY KEY);
CREATE POLICY upd ON update_only FOR UPDATE USING (true);
INSERT INTO update_only VALUES (1);

CREATE TABLE plain (id int PRIMARY KEY);
INSERT INTO plain VALUES (1), (2);

CREATE TABLE owned (id int PRIMARY KEY);
CREATE POLICY none ON owned FOR SELECT USING (false);
INSERT INTO owned VALUES (1);
CREATE TABLE forced (id int PRIMARY KEY);
CREATE POLICY none ON forced FOR SELECT USING (id = 2);
INSERT INTO forced VALUES (1), (2);

CREATE TABLE secret (id int PRIMARY KEY);
CREATE POLICY all_rows ON secret FOR SELECT USING (true);
INSERT INTO secret VALUES (1);

CREATE TABLE columns (id int PRIMARY KEY, owner text, ssn text);
CREATE POLICY mine ON columns FOR SELECT USING (owner = auth.jwt() ->> 'sub');
INSERT INTO columns VALUES (1, 'carol', 'x'), (2, 'dave', 'y');

CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."My Table" ("User Id" text, "select" int PRIMARY KEY);
CREATE POLICY "Mine!" ON "Odd Schema"."My Table" FOR SELECT USING ("User Id" = (SELECT auth.jwt() ->> 'sub'));
INSERT INTO "Odd Schema"."My Table" VALUES ('carol', 1), ('dave', 2);

CREATE TABLE fragile (id int PRIMARY KEY, owner text);
CREATE POLICY p ON fragile FOR SELECT
    USING (CASE WHEN auth.jwt() ->> 'sub' = 'breaker' THEN length(owner) / 0 = 1 ELSE true END);
INSERT INTO fragile VALUES (1, 'x'), (2, 'y');

CREATE TABLE volatile (id int PRIMARY KEY);
CREATE POLICY p ON volatile FOR SELECT USING (random() >= 0 AND id = 1);
INSERT INTO volatile VALUES (1), (2);

CREATE TABLE generated (id int PRIMARY KEY, owner text, shared boolean GENERATED ALWAYS AS (owner = 'everyone') STORED);
CREATE POLICY shared ON generated FOR SELECT USING (shared OR owner = auth.jwt() ->> 'sub');
INSERT INTO generated (id, owner) VALUES (1, 'everyone'), (2, 'carol'), (3, 'dave');

CREATE TABLE parted (id int, owner text) PARTITION BY LIST (id);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES IN (1, 2);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES IN (3);
CREATE POLICY mine ON parted FOR SELECT USING (owner = auth.jwt() ->> 'sub');
INSERT INTO parted VALUES (1, 'carol'), (2, 'dave'), (3, 'carol');
"""

TABLES = {
    # table: the path its policies must take for the authenticated role
    "own": "set",
    "own_fast": "set",
    "by_sub": "set",
    "by_setting": "set",
    "teams": "set",
    "by_user": "set",
    "ored": "set",
    "restricted": "set",
    "docs_private_members": "per identity",  # members' own policy reads the claims
    "docs": "set",  # an identity-dependent subquery into a table whose policy does not
    "for_editors": "set",
    "update_only": "set",
    "plain": "set",
    "owned": "set",
    "forced": "set",
    "secret": "set",
    "columns": "set",
    '"Odd Schema"."My Table"': "set",
    "fragile": "set",
    "volatile": "per identity",
    "generated": "set",
    "parted": "set",
}


def identities(editor: str, bypass: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("authenticated", {"sub": ALICE, "role": "authenticated", "team": 1, "tenant": "a"}),
        ("authenticated", {"sub": BOB, "role": "authenticated", "team": 2, "tenant": "b"}),
        ("authenticated", {"sub": "carol", "role": "authenticated", "team": "0", "tenant": "a"}),
        ("authenticated", {"sub": "dave", "role": "authenticated"}),
        ("authenticated", {"sub": "breaker", "role": "authenticated", "tenant": "b"}),
        ("authenticated", {}),
        ("anon", {"role": "anon"}),
        (editor, {"sub": "carol", "role": editor}),
        (bypass, {"sub": "dave", "role": bypass}),
    ]


async def test_set_based_and_per_identity_decisions_agree_with_live_select(db):
    editor, bypass = f"rls_editor_{db.name}", f"rls_bypass_{db.name}"
    try:
        db.sql(f"CREATE ROLE {editor} NOLOGIN; CREATE ROLE {bypass} NOLOGIN BYPASSRLS;")
        db.sql(SCHEMA.format(alice=ALICE, bob=BOB, editor=editor))
        everyone = f"anon, authenticated, {editor}, {bypass}"
        db.sql(
            f'GRANT USAGE ON SCHEMA "Odd Schema" TO {everyone};'
            f"GRANT {editor}, {bypass} TO {AUTHORIZER_ROLE};"
            f"ALTER TABLE owned OWNER TO {editor}; ALTER TABLE forced OWNER TO {editor};"
            "ALTER TABLE forced FORCE ROW LEVEL SECURITY;"
            # The editor may not call auth.uid(): live, the policies that do raise for it, and so must both paths.
            "REVOKE EXECUTE ON FUNCTION auth.uid() FROM PUBLIC;"
            f"GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, {bypass};"
        )
        for table in TABLES:
            if table != "plain":
                db.sql(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            if table == "columns":
                db.sql(f"GRANT SELECT (id, owner) ON columns TO {everyone}")
            elif table != "secret":
                db.sql(f"GRANT SELECT ON {table} TO {everyone}")
        db.sql(
            f"GRANT SELECT ON members, open_members TO {everyone};"
            "ALTER TABLE members ENABLE ROW LEVEL SECURITY; ALTER TABLE open_members ENABLE ROW LEVEL SECURITY;"
        )
        authorizer = db.dsn.replace("postgres@", f"{AUTHORIZER_ROLE}@", 1)
        who = identities(editor, bypass)
        mismatches, paths = await in_asyncio(compare, db.dsn, authorizer, who)
    finally:
        db.drop()
        pg.run_sql(db.admin, f"DROP ROLE IF EXISTS {editor}; DROP ROLE IF EXISTS {bypass}")
    assert mismatches == []
    assert paths == TABLES


async def compare(admin: str, authorizer: str, who: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], dict]:
    setup = await asyncpg.connect(admin)
    conn = await asyncpg.connect(authorizer, server_settings=AUTHORIZER_SESSION)
    mismatches: list[str] = []
    paths: dict[str, str] = {}
    shortcut: dict[str, int] = {}
    raising: set[str] = set()
    try:
        for table in TABLES:
            relid = await setup.fetchval("SELECT $1::text::regclass::oid", table)
            rows = await setup.fetch(f"SELECT to_jsonb(t)::text AS image, t.* FROM {table} t ORDER BY 2")
            keys = [orjson.loads(r["image"]) for r in rows]
            # What the trigger would capture; generated columns arrive stale or NULL and must be recomputed.
            images = [{**k, "shared": None} if table == "generated" else k for k in keys]
            answers = {}
            # Set-based twice: the first call plans (in a transaction), the second takes the one-statement path.
            for name, set_based, calls in (("planned", True, 1), ("cached", True, 2), ("per identity", False, 1)):
                security = RowSecurity(set_based=set_based)
                for _ in range(calls):
                    decided = await security.decide(conn, relid, who, orjson.dumps(images).decode(), len(images))
                # Only what delivery uses: the images each identity sees (an identity left out sees none), the
                # columns it may read of them, and whether its policy raised.
                by_identity = {n: (sorted(v or ()), r if v else None, e is not None) for n, v, r, e in decided}
                answers[name] = [by_identity.get(n, ([], None, False)) for n in range(len(who))]
                if name == "cached":
                    shortcut[table] = security.statistics().one_statement
            if any(raised for _, _, raised in answers["planned"]):
                raising.add(table)
            live = [
                (v or [], raised)
                for v, raised in [await _live(conn, table, role, claims, keys) for role, claims in who]
            ]
            paths[table] = await _path(conn, relid, who, images)
            for n, identity in enumerate(who):
                seen = {name: answer[n][0::2] for name, answer in answers.items()} | {"live": live[n]}
                readable = {name: answer[n][1] for name, answer in answers.items()}
                if len({repr(v) for v in seen.values()}) > 1 or len({repr(v) for v in readable.values()}) > 1:
                    mismatches.append(f"{table} {identity}: {seen}, readable {readable}")
    finally:
        await conn.close()
        await setup.close()
    # Where every role's policies are decided per role and none raised, the second window took the one-statement path.
    expected = {t for t, path in paths.items() if path == "set"} - raising
    assert {t for t, n in shortcut.items() if n} == expected, shortcut
    return mismatches, paths


async def _path(conn: asyncpg.Connection, relid: int, who: list, images: list[dict]) -> str:
    """How the authenticated role's policies were decided (the breaker makes a raising policy fall back)."""
    members = [(role, claims) for role, claims in who if role == "authenticated" and claims.get("sub") != "breaker"]
    security = RowSecurity()
    await security.decide(conn, relid, members, orjson.dumps(images).decode(), len(images))
    taken = security.statistics()
    return {(1, 0): "set", (0, len(members)): "per identity"}.get((taken.set_based, taken.per_identity), "mixed")


async def _live(conn: asyncpg.Connection, table: str, role: str, claims: dict, keys: list[dict]) -> tuple:
    """(visible row indexes or None when the table is not readable, whether the policy raised) from a real SELECT."""
    first = next(iter(keys[0]))
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(
                "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
                role,
                orjson.dumps(claims).decode(),
            )
            if not await conn.fetchval("SELECT has_any_column_privilege($1::regclass, 'SELECT')", table):
                return (None, False)
            quoted = '"' + first.replace('"', '""') + '"'
            got = {r[0] for r in await conn.fetch(f"SELECT {quoted} FROM {table}")}
    except asyncpg.PostgresError:
        return (None, True)
    return (sorted(i for i, k in enumerate(keys) if k[first] in got), False)


def notes_owned_by_sub(db) -> tuple[int, str, list[tuple[str, dict[str, Any]]]]:
    """A table `notes` whose rows only the `sub` in `owner` sees: its oid, the authorizer's DSN, two identities."""
    db.sql(
        "CREATE TABLE notes (id int PRIMARY KEY, owner text); ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY mine ON notes FOR SELECT USING (owner = (SELECT auth.jwt() ->> 'sub'));"
        "GRANT SELECT ON notes TO authenticated;"
    )
    relid = db.sql("SELECT 'notes'::regclass::oid")[0][0]
    authorizer = db.dsn.replace("postgres@", f"{AUTHORIZER_ROLE}@", 1)
    return relid, authorizer, [("authenticated", {"sub": "alice"}), ("authenticated", {"sub": "bob"})]


async def test_a_session_not_in_repeatable_read_is_decided_in_a_transaction_of_its_own(db):
    # Policy code can change a pooled session's default isolation; the one-statement path then declines (its catalog
    # check would not share the decisions' snapshot) and a REPEATABLE READ transaction decides, with the same answer.
    relid, authorizer, who = notes_owned_by_sub(db)
    images = orjson.dumps([{"id": 1, "owner": "alice"}, {"id": 2, "owner": "bob"}]).decode()

    async def decide_three_times(settings: dict[str, str]) -> tuple[list, int]:
        conn = await asyncpg.connect(authorizer, server_settings=settings)
        try:
            security = RowSecurity()
            for _ in range(3):
                rows = await security.decide(conn, relid, who, images, 2)
            return sorted((n, v) for n, v, _, _ in rows), security.statistics().one_statement
        finally:
            await conn.close()

    assert await in_asyncio(decide_three_times, AUTHORIZER_SESSION) == ([(0, [0]), (1, [1])], 2)
    read_committed = {**AUTHORIZER_SESSION, "default_transaction_isolation": "read committed"}
    assert await in_asyncio(decide_three_times, read_committed) == ([(0, [0]), (1, [1])], 0)


async def test_a_dropped_table_is_decided_as_none_on_every_path(db):
    # Rows logged before a DROP can be read after it: no policy is left to judge them by, so every way of deciding
    # answers None (delivery withholds them) rather than raising or judging them by nothing.
    relid, authorizer, who = notes_owned_by_sub(db)
    images = orjson.dumps([{"id": 1, "owner": "alice"}]).decode()

    async def before_and_after_drop() -> dict[str, tuple[list, Any]]:
        conn = await asyncpg.connect(authorizer, server_settings=AUTHORIZER_SESSION)
        try:
            ways = {"planned": RowSecurity(), "cached": RowSecurity(), "per identity": RowSecurity(set_based=False)}
            before = {name: await security.decide(conn, relid, who, images, 1) for name, security in ways.items()}
            await ways["cached"].decide(conn, relid, who, images, 1)
            ways["planned"] = RowSecurity()
            db.sql("DROP TABLE notes")
            after = {name: await security.decide(conn, relid, who, images, 1) for name, security in ways.items()}
            return {name: (sorted((n, v) for n, v, _, _ in before[name] if v), after[name]) for name in ways}
        finally:
            await conn.close()

    decided = await in_asyncio(before_and_after_drop)
    assert decided == {name: ([(0, [0])], None) for name in ("planned", "cached", "per identity")}
