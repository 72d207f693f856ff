"""Row-level security leak matrix: two users and a service role, each subscribed over a real socket to a table with
RLS, while rows move between users, policies change and privileges are taken away mid-stream. For each scenario,
who must see what and nobody sees more: every message each client receives is collected until a barrier (a marker
row visible to whoever may still read the table, inserted last, then a ping on every connection: its pong comes
after anything queued for it) and compared exactly.

A message is summarised as `"<op> <id>"`, plus `" old"` when it carries `old_record` and `" -secret"` when its record
lacks the `secret` column; `"error CODE"` and `"ack"` for replies. Markers have ids from 1000.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection

from . import pg
from .support.clients import connect, send, subscribe
from .support.config import token
from .support.messages import summary
from .support.servers import start
from .support.waiting import wait_until

ALICE, BOB, SERVICE = str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), str(uuid.UUID(int=3))
SUBS = {"alice": ALICE, "bob": BOB}
CHANNEL = "table:public.items"

TABLE = """
CREATE TABLE items (id int PRIMARY KEY, user_id uuid, body text, secret int, kind text NOT NULL DEFAULT 'row');
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON items FOR SELECT USING (user_id = (SELECT auth.uid()));
CREATE POLICY markers ON items FOR SELECT USING (kind = 'marker');
GRANT SELECT ON items TO authenticated, {service};
SELECT enable_realtime('items');
"""


@pytest.fixture(scope="module")
def service_role(pg_admin: str) -> Iterator[str]:
    """A role that bypasses row-level security, listed in `auth.roles` (roles are cluster-wide: one per module)."""
    name = f"leaks_service_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg.run_sql(pg_admin, f"CREATE ROLE {name} NOLOGIN BYPASSRLS")
    try:
        yield name
    finally:
        pg.run_sql(pg_admin, f"DROP ROLE IF EXISTS {name}")


def row(id: int, owner: str | None, body: str = "", secret: int | None = None) -> str:
    user = f"'{SUBS[owner]}'" if owner else "NULL"
    return f"INSERT INTO items (id, user_id, body, secret) VALUES ({id}, {user}, '{body}', {secret or 'NULL'})"


def move(id: int, owner: str) -> str:
    return f"UPDATE items SET user_id = '{SUBS[owner]}' WHERE id = {id}"


@attrs.frozen
class Sql:
    text: str


@attrs.frozen
class Auth:
    """`who` sends an `auth` with a token for its own `sub` and `role`; the scenario goes on once it was answered."""

    who: str
    role: str
    answers: tuple[str, ...]


@attrs.frozen
class Await:
    """Until `who` has received `summary` (proves a step took effect before the next one)."""

    who: str
    summary: str


@attrs.frozen
class Scenario:
    steps: tuple[Sql | Auth | Await, ...]
    expected: dict[str, list[str]]
    """client -> every message summary it receives, in order (the marker included where it is visible)"""
    setup: str = ""
    filters: dict[str, str] = attrs.field(factory=dict)
    """client -> the filter it subscribes with"""


SCENARIOS = {
    # An UPDATE is delivered when the new row is visible; its old_record only when the old row was visible too.
    "update moves a row from alice to bob and back": Scenario(
        steps=(Sql(row(1, "alice")), Sql(move(1, "bob")), Sql(move(1, "alice")), Sql("UPDATE items SET body = 'x'")),
        expected={
            "alice": ["INSERT 1", "UPDATE 1", "UPDATE 1 old", "INSERT 1000"],
            "bob": ["UPDATE 1", "INSERT 1000"],
            "service": ["INSERT 1", "UPDATE 1 old", "UPDATE 1 old", "UPDATE 1 old", "INSERT 1000"],
        },
    ),
    "delete reaches only the owner and the service role": Scenario(
        steps=(
            Sql(row(1, "alice")),
            Sql(row(2, "bob")),
            Sql("DELETE FROM items WHERE id = 1"),
            Sql("DELETE FROM items WHERE id = 2"),
        ),
        expected={
            "alice": ["INSERT 1", "DELETE 1 old", "INSERT 1000"],
            "bob": ["INSERT 2", "DELETE 2 old", "INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "DELETE 1 old", "DELETE 2 old", "INSERT 1000"],
        },
    ),
    "altered policy decides the next change": Scenario(
        steps=(
            Sql(row(1, "alice")),
            Await("alice", "INSERT 1"),
            Sql("ALTER POLICY mine ON items USING (user_id = (SELECT auth.uid()) OR body = 'shared')"),
            Sql(row(2, "bob", "shared")),
            Sql(row(3, "bob", "private")),
            Await("bob", "INSERT 3"),
            Sql("ALTER POLICY mine ON items USING (body = 'shared')"),
            Sql(row(4, "alice", "private")),
            Sql(row(5, None, "shared")),
        ),
        expected={
            "alice": ["INSERT 1", "INSERT 2", "INSERT 5", "INSERT 1000"],
            "bob": ["INSERT 2", "INSERT 3", "INSERT 5", "INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 4", "INSERT 5", "INSERT 1000"],
        },
    ),
    "dropped policy with RLS on hides every row but from the bypass role": Scenario(
        steps=(
            Sql(row(1, "alice")),
            Await("alice", "INSERT 1"),
            Sql("DROP POLICY mine ON items"),
            Sql(row(2, "alice")),
            Sql(row(3, "bob")),
        ),
        expected={
            "alice": ["INSERT 1", "INSERT 1000"],
            "bob": ["INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 1000"],
        },
    ),
    # Silent, today: the subscription stays, and gets nothing while the role may not read the table.
    "revoked SELECT stops every row": Scenario(
        steps=(
            Sql(row(1, "alice")),
            Await("alice", "INSERT 1"),
            Sql("REVOKE SELECT ON items FROM authenticated"),
            Sql(row(2, "alice")),
            Sql(row(3, "bob")),
        ),
        expected={
            "alice": ["INSERT 1"],
            "bob": [],
            "service": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 1000"],
        },
    ),
    "a new token with a role that may not read ends the subscription": Scenario(
        steps=(
            Sql(row(1, "alice")),
            Await("alice", "INSERT 1"),
            Auth("alice", "anon", ("ack", "error FORBIDDEN")),
            Sql(row(2, "alice")),
        ),
        expected={
            "alice": ["INSERT 1", "ack", "error FORBIDDEN"],
            "bob": ["INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 1000"],
        },
    ),
    # The oracle: a filter on a column no longer readable would go on choosing rows by its hidden values. The
    # subscription ends at the first change after the revoke, whether or not that change matches the filter or is
    # visible to its identity (4 is neither), so even when it ends says nothing about the hidden values.
    "a filter on a column whose SELECT was revoked ends the subscription": Scenario(
        steps=(
            Sql(row(1, "alice", secret=1)),
            Sql(row(2, "alice", secret=2)),
            Await("alice", "INSERT 1"),
            Sql(
                "REVOKE SELECT ON items FROM authenticated;"
                "GRANT SELECT (id, user_id, body, kind) ON items TO authenticated"
            ),
            Sql(row(4, None, secret=2)),
            Await("alice", "error SUBSCRIPTION_FAILED"),
            Sql(row(3, "alice", secret=1)),
            Sql(row(5, "bob", secret=1)),
        ),
        filters={"alice": "secret=eq.1"},
        expected={
            "alice": ["INSERT 1", "error SUBSCRIPTION_FAILED"],
            "bob": ["INSERT 5 -secret", "INSERT 1000 -secret"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 4", "INSERT 3", "INSERT 5", "INSERT 1000"],
        },
    ),
    "a policy calling a SQL function is decided per identity": Scenario(
        setup=(
            "CREATE FUNCTION public.owns(owner uuid) RETURNS boolean LANGUAGE sql STABLE"
            " AS $$ SELECT owner = (SELECT auth.uid()) $$;"
            "ALTER POLICY mine ON items USING (public.owns(user_id))"
        ),
        steps=(Sql(row(1, "alice")), Sql(row(2, "bob")), Sql(move(1, "bob"))),
        expected={
            "alice": ["INSERT 1", "INSERT 1000"],
            "bob": ["INSERT 2", "UPDATE 1", "INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "UPDATE 1 old", "INSERT 1000"],
        },
    ),
    # shares has row-level security of its own that reads the claims: each identity sees only its own shares.
    "a policy reading another table is decided per identity": Scenario(
        setup=(
            "CREATE TABLE shares (item_id int, user_id uuid); ALTER TABLE shares ENABLE ROW LEVEL SECURITY;"
            "CREATE POLICY own ON shares FOR SELECT USING (user_id = (SELECT auth.uid()));"
            "GRANT SELECT ON shares TO authenticated;"
            "ALTER POLICY mine ON items USING (user_id = (SELECT auth.uid())"
            " OR id IN (SELECT item_id FROM shares WHERE user_id = (SELECT auth.uid())));"
            f"INSERT INTO shares VALUES (2, '{ALICE}'), (3, '{BOB}')"
        ),
        steps=(Sql(row(1, "alice")), Sql(row(2, "bob")), Sql(row(3, "alice")), Sql(row(4, "bob"))),
        expected={
            "alice": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 1000"],
            "bob": ["INSERT 2", "INSERT 3", "INSERT 4", "INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 4", "INSERT 1000"],
        },
    ),
    # A view runs as its owner, yet auth.uid() inside it still reads the identity's claims.
    "a policy reading a view is decided per identity": Scenario(
        setup=(
            "CREATE TABLE shares (item_id int, user_id uuid);"
            "CREATE VIEW my_shares AS SELECT item_id FROM shares WHERE user_id = (SELECT auth.uid());"
            "GRANT SELECT ON my_shares TO authenticated;"
            "ALTER POLICY mine ON items USING (user_id = (SELECT auth.uid()) OR id IN (SELECT item_id FROM my_shares));"
            f"INSERT INTO shares VALUES (2, '{ALICE}')"
        ),
        steps=(Sql(row(1, "alice")), Sql(row(2, "bob")), Sql(row(3, "bob"))),
        expected={
            "alice": ["INSERT 1", "INSERT 2", "INSERT 1000"],
            "bob": ["INSERT 2", "INSERT 3", "INSERT 1000"],
            "service": ["INSERT 1", "INSERT 2", "INSERT 3", "INSERT 1000"],
        },
    ),
}


@attrs.define
class Client:
    ws: WebSocketConnection
    got: list[dict[str, Any]] = attrs.field(factory=list)

    async def read(self) -> None:
        while True:
            self.got.append(orjson.loads(await self.ws.get_message()))

    def summaries(self) -> list[str]:
        return [summary(m) for m in self.got]

    async def until_has(self, wanted: str) -> None:
        await wait_until(lambda: wanted in self.summaries(), timeout=10)

    async def until_answered(self, after: int, answers: tuple[str, ...]) -> None:
        """Until the messages after the first `after` are exactly `answers`."""
        await wait_until(lambda: tuple(self.summaries()[after:]) == answers, timeout=10)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_who_sees_what(name: str, start_server: Any, db: pg.ScratchDatabase, service_role: str) -> None:
    scenario = SCENARIOS[name]
    db.sql(TABLE.format(service=service_role))
    if scenario.setup:
        db.sql(scenario.setup)
    server = await start(start_server, db, auth={"roles": (service_role,)})
    tokens = {"alice": token(ALICE), "bob": token(BOB), "service": token(SERVICE, role=service_role)}
    async with (
        connect(server, tok=tokens["alice"]) as alice,
        connect(server, tok=tokens["bob"]) as bob,
        connect(server, tok=tokens["service"]) as service,
        trio.open_nursery() as nursery,
    ):
        clients = {"alice": Client(alice), "bob": Client(bob), "service": Client(service)}
        for who, client in clients.items():
            options = {"filter": scenario.filters[who]} if who in scenario.filters else {}
            await subscribe(client.ws, CHANNEL, **options)
            nursery.start_soon(client.read)
        for step in scenario.steps:
            if isinstance(step, Sql):
                await db.execute(step.text)
            elif isinstance(step, Auth):
                client = clients[step.who]
                before = len(client.got)
                await send(client.ws, type="auth", token=token(SUBS[step.who], role=step.role))
                await client.until_answered(before, step.answers)
            else:
                await clients[step.who].until_has(step.summary)
        await db.execute("INSERT INTO items (id, kind) VALUES (1000, 'marker')")
        # The service role sees the marker; by then the window holding it has been handed out to everyone, so a
        # ping on each connection is answered after whatever was queued for it.
        await clients["service"].until_has("INSERT 1000")
        for client in clients.values():
            await send(client.ws, type="ping", ref="barrier")
        for client in clients.values():
            await client.until_has("pong")
        nursery.cancel_scope.cancel()
    seen = {who: [s for s in client.summaries() if s != "pong"] for who, client in clients.items()}
    assert seen == scenario.expected
