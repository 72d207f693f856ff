"""What RowSecurity keeps of the identities it decides, against a real PostgreSQL: a small part per identity, and
nothing once an identity is no longer asked about. Before, it kept every identity's claims (and orjson's 4 KiB
buffer for each) until 100,000 had piled up: under the soak's churn, most of them of connections long closed."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import asyncpg
import orjson
import pytest

from fluxrt_trio.postgres import rls
from fluxrt_trio.postgres.bridge import AUTHORIZER_ROLE, AUTHORIZER_SESSION
from fluxrt_trio.postgres.rls import RowSecurity

from .support.database import in_asyncio

IMAGES = orjson.dumps([{"id": 1, "owner": "user-1"}, {"id": 2, "owner": "alice"}]).decode()


class Claims(dict):
    """Claims that a test can watch being freed (a plain dict takes no weak reference)."""

    __slots__ = ("__weakref__",)


def token_claims(sub: str) -> Claims:
    return Claims(sub=sub, role="authenticated", iat=1_800_000_000, exp=1_800_086_400)


@pytest.fixture
def notes(db) -> tuple[str, int]:
    """The authorizer's DSN and the relid of a table whose policy is decided per role (one query for all)."""
    db.sql(
        "CREATE TABLE notes (id int PRIMARY KEY, owner text); ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY mine ON notes FOR SELECT USING (owner = (SELECT auth.jwt() ->> 'sub'));"
        "GRANT SELECT ON notes TO authenticated;"
    )
    return db.dsn.replace("postgres@", f"{AUTHORIZER_ROLE}@", 1), db.sql("SELECT 'notes'::regclass::oid")[0][0]


async def test_claims_of_identities_no_longer_asked_about_are_let_go(notes, monkeypatch):
    monkeypatch.setattr(rls, "CLAIMS_TURN", 3)
    authorizer, relid = notes

    async def decide() -> int:
        conn = await asyncpg.connect(authorizer, server_settings=AUTHORIZER_SESSION)
        try:
            security = RowSecurity()
            closed = [("authenticated", token_claims(f"user-{n}")) for n in range(100)]
            for _ in range(2):
                await security.decide(conn, relid, closed, IMAGES, 2)
            refs = [weakref.ref(claims) for _, claims in closed]
            del closed
            staying = [("authenticated", token_claims("alice"))]
            for _ in range(10):
                await security.decide(conn, relid, staying, IMAGES, 2)
            assert security.statistics().one_statement >= 10, "the windows took the path that sends claims"
            gc.collect()
            return sum(ref() is not None for ref in refs)
        finally:
            await conn.close()

    assert await in_asyncio(decide) == 0


async def test_an_identity_decided_costs_a_small_part_of_its_claims(notes):
    authorizer, relid = notes
    count = 2000

    async def decide() -> float:
        conn = await asyncpg.connect(authorizer, server_settings=AUTHORIZER_SESSION)
        try:
            security = RowSecurity()
            # Plans and prepared statements are made once, before measuring.
            await security.decide(conn, relid, [("authenticated", token_claims("alice"))], IMAGES, 2)
            identities = [("authenticated", token_claims(f"user-{n}")) for n in range(count)]
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                await security.decide(conn, relid, identities, IMAGES, 2)
                gc.collect()
                return (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
        finally:
            await conn.close()

    # What stays is the identity's JSON part (about 40 bytes here) and the cache's entry for it; orjson's own
    # result would keep 4 KiB.
    assert await in_asyncio(decide) < 1024
