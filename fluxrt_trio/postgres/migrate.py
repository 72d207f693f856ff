"""Numbered SQL migrations (sql/NNNN_name.sql), each applied once and recorded in realtime.schema_migrations.

Safe to run twice and from several nodes at once: a session advisory lock serializes runners, and each migration
commits together with its record. Migrations never drop an enabled table's capture.
"""

from __future__ import annotations

import importlib.resources
import logging
import re

import asyncpg

from .bridge import AUTHORIZER_ROLE

log = logging.getLogger("fluxrt.migrate")

# Any fixed number: the key of the advisory lock that serializes migration runners across nodes.
_LOCK_KEY = 0x666C7578  # "flux"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with fluxrt, in order."""
    found = []
    for entry in importlib.resources.files("fluxrt_trio.postgres").joinpath("sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, roles: tuple[str, ...] = ()) -> list[str]:
    """Apply the migrations this database lacks; return the names applied.

    Then let the authorizer role assume each of `roles` (creating a missing one as NOLOGIN).
    """
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE SCHEMA IF NOT EXISTS realtime;"
            "CREATE TABLE IF NOT EXISTS realtime.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM realtime.schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO realtime.schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("migration applied", extra={"ctx_version": version, "ctx_name": name})
            applied_now.append(f"{version:04d}_{name}")
        for role in roles:
            await _grant_role(conn, role)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


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
