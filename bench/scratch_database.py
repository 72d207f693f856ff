"""The scratch PostgreSQL database a benchmark run creates for itself and drops at the end."""

from __future__ import annotations

import secrets
import urllib.parse

import asyncpg


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database replaced by `database` (host, user and options kept)."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def create(
    admin_dsn: str, settings: tuple[str, ...] = (), prefix: str = "fluxrt_bench"
) -> tuple[str, str, dict[str, str]]:
    """Create an empty database `prefix`_<8 hex digits> for one run, connecting with `admin_dsn`; returns its name,
    the server's version and the values of the named pg_settings. asyncpg's errors propagate."""
    database = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        version = await admin.fetchval("SHOW server_version")
        values: dict[str, str] = {}
        if settings:
            rows = await admin.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])", settings)
            values = {row["name"]: row["setting"] for row in rows}
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    return database, version, values


async def drop(admin_dsn: str, database: str) -> None:
    """Drop a run's scratch database, closing whatever is still connected to it (WITH (FORCE))."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
