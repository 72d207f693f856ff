"""Numbered SQL migrations (sql/NNNN_name.sql), each applied once and recorded in realtime.schema_migrations.

Safe to run twice and from several nodes at once: a session advisory lock serializes runners, and each migration
commits together with its record. Migrations never drop an enabled table's capture.

Each record holds the SHA-256 of the file applied. A shipped migration whose file no longer matches its record is
refused (MigrationError) before anything is applied: a database migrated with the old text would silently differ
from one migrated with the new, so a change always goes in a new migration.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re

import asyncpg

from .bridge import AUTHORIZER_ROLE

log = logging.getLogger("fluxrt.migrate")

# Any fixed number: the key of the advisory lock that serializes migration runners across nodes.
_LOCK_KEY = 0x666C7578  # "flux"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")


class MigrationError(Exception):
    """A migration shipped with fluxrt differs from the one this database recorded; the message names the file."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with fluxrt, in order."""
    found = []
    for entry in importlib.resources.files("fluxrt_trio.postgres").joinpath("sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


def checksum(sql: str) -> str:
    """The SHA-256 (hex) recorded for a migration's text.

    Taken over the text as read, newlines normalized, so a checkout's line endings are not a change.
    """
    return hashlib.sha256(sql.encode("utf-8")).hexdigest()


async def migrate(
    conn: asyncpg.Connection, roles: tuple[str, ...] = (), *, max_message_size: int | None = None
) -> list[str]:
    """Apply the migrations this database lacks; return the names applied.

    Then let the authorizer role assume each of `roles` (creating a missing one as NOLOGIN), and record
    `max_message_size` (realtime.max_message_size) for realtime.send, when given.
    Raises MigrationError, applying no migration, when an applied migration's file has changed since.
    """
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS realtime;"
            "CREATE TABLE IF NOT EXISTS realtime.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),"
            " checksum text);"
            # Databases migrated by a fluxrt from before checksums have the table without the column.
            "ALTER TABLE realtime.schema_migrations ADD COLUMN IF NOT EXISTS checksum text"
        )
        recorded = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM realtime.schema_migrations")
        }
        shipped = migrations()
        for version, name, sql in shipped:
            if version in recorded:
                await _verify(conn, version, name, checksum(sql), recorded[version])
        for version, name, sql in shipped:
            if version in recorded:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO realtime.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version,
                    name,
                    checksum(sql),
                )
            log.info("migration applied", extra={"ctx_version": version, "ctx_name": name})
            applied_now.append(f"{version:04d}_{name}")
        for role in roles:
            await _grant_role(conn, role)
        if await conn.fetchval(_IS_SUPERUSER):
            # Installs the event triggers a migration run by a lesser role had to leave out.
            await conn.execute("SELECT realtime.install_lifecycle()")
        if max_message_size is not None:
            await record_settings(conn, max_message_size)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


_IS_SUPERUSER = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"

LIFECYCLE_MISSING = (
    "the table lifecycle event triggers are not installed (creating them needs a superuser): a dropped or renamed "
    "enabled table is reported to its subscribers only at the next pruning pass, and a partition created later is "
    "not captured on TRUNCATE until enable_realtime runs again; as a superuser run SELECT realtime.install_lifecycle()"
)


async def lifecycle_missing(conn: asyncpg.Connection) -> str | None:
    """LIFECYCLE_MISSING when the event triggers of migration 0007 are not both installed, else None."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_catalog.pg_event_trigger"
        " WHERE evtname IN ('fluxrt_lifecycle_drop', 'fluxrt_lifecycle_ddl') AND evtenabled <> 'D'"
    )
    return None if found == 2 else LIFECYCLE_MISSING


async def record_settings(conn: asyncpg.Connection, max_message_size: int) -> None:
    """Write the configuration realtime.send checks against (realtime.settings)."""
    await conn.execute("UPDATE realtime.settings SET max_message_size = $1", max_message_size)


async def _verify(conn: asyncpg.Connection, version: int, name: str, current: str, stored: str | None) -> None:
    if stored is None:
        # Applied by a fluxrt from before checksums: nothing tells which text ran, so the file shipped now is taken
        # as the one applied and recorded, and is held to it from here on.
        await conn.execute("UPDATE realtime.schema_migrations SET checksum = $2 WHERE version = $1", version, current)
        log.info("migration checksum recorded", extra={"ctx_version": version, "ctx_name": name})
    elif stored != current:
        file = f"{version:04d}_{name}.sql"
        raise MigrationError(
            f"migration {file} has changed since it was applied to this database; a shipped migration must never be"
            f" edited: restore {file} as released and put the change in a new migration"
        )


async def _grant_role(conn: asyncpg.Connection, role: str) -> None:
    row = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = $1", role)
    if row is not None and row["rolsuper"]:
        # Becoming it would make policy code a superuser.
        log.error(
            "not letting the authorizer assume a superuser role; tokens naming it get nothing",
            extra={"ctx_role": role},
        )
        return
    if row is None:
        await conn.execute(f"CREATE ROLE {_ident(role)} NOLOGIN")
        log.info("created role", extra={"ctx_role": role})
    member = await conn.fetchval("SELECT pg_catalog.pg_has_role($1, $2, 'MEMBER')", AUTHORIZER_ROLE, role)
    if not member:
        await conn.execute(f"GRANT {_ident(role)} TO {AUTHORIZER_ROLE}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
