"""Migration checksums against a real PostgreSQL: recorded when applied, checked on every run, backfilled for
databases migrated before checksums existed. (Applying, repeating and concurrent runs: test_changefeed.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import trio

from fluxrt_trio.postgres import migrate as migrate_module
from fluxrt_trio.postgres.migrate import MigrationError, checksum, migrate, migrations

from . import pg
from .process import run_cli
from .support.database import fresh_database, in_asyncio
from .support.servers import start

SHIPPED = {version: checksum(sql) for version, _, sql in migrations()}
THIRD = "{:04d}_{}.sql".format(*migrations()[2][:2])


async def on(dsn: str, work: Callable[[asyncpg.Connection], Any]) -> Any:
    """`await work(conn)` on a fresh asyncpg connection to `dsn`, on asyncio."""

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return await in_asyncio(run)


def recorded(db: pg.ScratchDatabase) -> dict[int, str | None]:
    return {r["version"]: r["checksum"] for r in db.sql("SELECT version, checksum FROM realtime.schema_migrations")}


async def test_each_migration_records_its_file_checksum_and_a_second_run_is_fine(db):
    # The scratch database is a clone of a template migrated at the start of the session.
    assert recorded(db) == SHIPPED
    assert await on(db.dsn, lambda conn: migrate(conn, pg.ROLES)) == []
    assert recorded(db) == SHIPPED


async def test_a_migration_changed_since_it_was_applied_is_refused_by_name(db, monkeypatch):
    shipped = migrations()
    version, name, sql = shipped[2]
    edited = [*shipped[:2], (version, name, sql + "\n-- edited after release\n"), *shipped[3:]]
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*edited, (9999, "later", "CREATE TABLE later ()")])
    with pytest.raises(MigrationError) as refused:
        await on(db.dsn, lambda conn: migrate(conn, pg.ROLES))
    message = str(refused.value)
    assert THIRD in message
    assert "never be edited" in message and "new migration" in message
    assert 9999 not in recorded(db), "nothing is applied after a refusal"
    assert not db.sql("SELECT to_regclass('public.later') IS NOT NULL AS present")[0]["present"]


async def test_fluxrt_migrate_fails_naming_the_changed_file(db):
    db.sql("UPDATE realtime.schema_migrations SET checksum = repeat('0', 64) WHERE version = $1", migrations()[2][0])
    code, _, err = await run_cli(db.dsn, "migrate")
    assert code == 1
    # One line that says what to do, not a traceback.
    [line] = err.strip().splitlines()
    assert line.startswith("fluxrt migrate: migration ") and THIRD in line and "never be edited" in line, err


async def test_fluxrt_migrate_without_a_database_says_so_in_one_line():
    code, _, err = await run_cli("postgresql://postgres@127.0.0.1:1/postgres", "migrate")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("fluxrt migrate: database unavailable:"), err


async def test_server_start_up_reports_the_changed_file_and_stays_degraded(start_server, db):
    db.sql("UPDATE realtime.schema_migrations SET checksum = repeat('0', 64) WHERE version = $1", migrations()[2][0])
    server = await start_server(database={"dsn": db.dsn, "poll_interval": 0.01})
    assert server.db is not None
    with trio.fail_after(10):
        while server.db.changefeed.last_error is None:
            await trio.sleep(0.01)
    assert THIRD in server.db.changefeed.last_error
    assert server.database_state() == "degraded"


@pytest.mark.parametrize("how", ["column missing", "checksum null"])
async def test_rows_without_a_checksum_get_the_current_files_on_the_first_run(db, how):
    # As left by a fluxrt from before checksums: the table without the column, or rows whose checksum is NULL.
    if how == "column missing":
        db.sql("ALTER TABLE realtime.schema_migrations DROP COLUMN checksum")
    else:
        db.sql("UPDATE realtime.schema_migrations SET checksum = NULL")
    assert await on(db.dsn, lambda conn: migrate(conn, pg.ROLES)) == []
    assert recorded(db) == SHIPPED


async def test_a_backfilled_checksum_is_held_to_afterwards(start_server, db, monkeypatch):
    db.sql("UPDATE realtime.schema_migrations SET checksum = NULL")
    await on(db.dsn, lambda conn: migrate(conn, pg.ROLES))
    shipped = migrations()
    version, name, sql = shipped[2]
    monkeypatch.setattr(migrate_module, "migrations", lambda: [*shipped[:2], (version, name, sql + " "), *shipped[3:]])
    with pytest.raises(MigrationError, match=THIRD):
        await on(db.dsn, lambda conn: migrate(conn, pg.ROLES))
    # And the server, migrating at start, still starts on the unchanged files.
    monkeypatch.undo()
    server = await start(start_server, db)
    assert server.database_state() == "ok"


async def test_upgrading_to_0007_keeps_enabled_tables_and_covers_their_partitions(pg_admin, monkeypatch):
    # A database migrated to 0006 (before the table lifecycle) with an enabled partitioned table, an enabled plain
    # table and the registry entry of an enabled table dropped back then, which 0006 kept.
    shipped = migrations()
    assert [version for version, _, _ in shipped][6] == 7
    async with fresh_database(pg_admin) as dsn:
        monkeypatch.setattr(migrate_module, "migrations", lambda: shipped[:6])
        # As fluxrt before 0007 migrated: it had no event triggers to install afterwards.
        monkeypatch.setattr(migrate_module, "_IS_SUPERUSER", "SELECT false")
        await on(dsn, lambda conn: migrate(conn, pg.ROLES))
        await trio.to_thread.run_sync(
            pg.run_sql,
            dsn,
            "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
            "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
            # PostgreSQL allows foreign tables no TRUNCATE trigger: 0007 must leave this one out, not fail.
            "CREATE FOREIGN DATA WRAPPER up_fdw; CREATE SERVER up_server FOREIGN DATA WRAPPER up_fdw;"
            "CREATE FOREIGN TABLE events_f PARTITION OF events FOR VALUES IN ('f') SERVER up_server;"
            "CREATE TABLE notes (id int); CREATE TABLE gone (id int);"
            "SELECT enable_realtime('events', true); SELECT enable_realtime('notes'); SELECT enable_realtime('gone');"
            "DROP TABLE gone",
        )
        monkeypatch.undo()
        assert await on(dsn, lambda conn: migrate(conn, pg.ROLES)) == ["0007_lifecycle", "0008_partitions"]

        def sql(query: str) -> list[tuple]:
            return [tuple(r) for r in pg.run_sql(dsn, query)]

        assert sorted(sql("SELECT schema_name, table_name, notify FROM realtime.tables")) == [
            ("public", "events", True),
            ("public", "notes", False),
        ]
        assert sorted(sql("SELECT schema_name, table_name FROM realtime_enabled_tables")) == [
            ("public", "events"),
            ("public", "notes"),
        ]
        # The partition that existed before 0007 gets its TRUNCATE trigger, with the root's notify flag.
        assert sql(
            "SELECT tgargs FROM pg_trigger WHERE tgrelid = 'events_a'::regclass AND tgname = 'fluxrt_capture_truncate'"
        ) == [(b"notify\x00",)]
        assert sorted(sql("SELECT evtname FROM pg_event_trigger")) == [
            ("fluxrt_lifecycle_ddl",),
            ("fluxrt_lifecycle_drop",),
        ]
        pg.run_sql(dsn, "TRUNCATE events_a; ALTER TABLE notes RENAME TO memos; DROP TABLE events")
        assert sql("SELECT op, table_name, new_record FROM realtime.changes ORDER BY id") == [
            ("TRUNCATE", "events", '{"partition": "public.events_a"}'),
            ("RENAME", "notes", '{"table": "memos", "schema": "public"}'),
            ("DROP", "events", None),
        ]


async def test_upgrading_to_0008_ends_a_partition_enabled_on_its_own(pg_admin, monkeypatch):
    # Before 0008 enable_realtime accepted a partition whose root was not enabled: its rows were reported as the
    # root's, so its subscribers were sent nothing. 0008 takes it out of the registry and tells them where to go.
    shipped = migrations()
    assert [version for version, _, _ in shipped][7] == 8
    async with fresh_database(pg_admin) as dsn:
        monkeypatch.setattr(migrate_module, "migrations", lambda: shipped[:7])
        await on(dsn, lambda conn: migrate(conn, pg.ROLES))
        await trio.to_thread.run_sync(
            pg.run_sql,
            dsn,
            "CREATE TABLE events (id int, kind text) PARTITION BY LIST (kind);"
            "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');"
            "CREATE TABLE notes (id int); SELECT enable_realtime('events_a'); SELECT enable_realtime('notes')",
        )
        monkeypatch.undo()
        assert await on(dsn, lambda conn: migrate(conn, pg.ROLES)) == ["0008_partitions"]

        def sql(query: str) -> list[tuple]:
            return [tuple(r) for r in pg.run_sql(dsn, query)]

        assert sql("SELECT table_name FROM realtime.tables") == [("notes",)]
        assert sql("SELECT op, table_name, new_record FROM realtime.changes") == [
            ("DISABLE", "events_a", '{"partition_of": "public.events"}')
        ]
        # Its own trigger stays (the migration may not own the table) and reports nothing; enabling the root
        # replaces it.
        pg.run_sql(
            dsn,
            "INSERT INTO events VALUES (1, 'a'); SELECT enable_realtime('events'); INSERT INTO events VALUES (2, 'a')",
        )
        assert sql("SELECT op, table_name, new_record FROM realtime.changes WHERE op = 'INSERT'") == [
            ("INSERT", "events", '{"id": 2, "kind": "a"}')
        ]
