"""The door between Trio and asyncpg: one crossing per unit of work, never one per row or per subscriber.

`AuthorizerPool` owns the asyncpg pool and hands out nothing asyncio-shaped: its methods are Trio coroutines taking and
returning plain values. Each crossing costs about 0.1 ms, so callers batch (one window, one batch of checks).
"""

from __future__ import annotations

import collections
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import trio_asyncio

log = logging.getLogger("fluxrt.postgres")

T = TypeVar("T")

errors: collections.Counter[str] = collections.Counter()
"""Database errors seen by this process, by SQLSTATE class (the code's first two characters; "08", connection
exception, for a connection that failed without one), for `fluxrt_database_errors_total`."""

RESOURCE_LOG_INTERVAL = 10.0
"""seconds between log lines about the same resource error (SQLSTATE class 53) while it lasts"""
_resource_logged: dict[str, float] = {}

AUTHORIZER_ROLE = "fluxrt_authorizer"
"""The role that subscribe checks and row-level security log in as by default (see sql/0004_authorizer.sql)."""


def authorizer_dsn(dsn: str) -> str:
    """The main DSN with the user replaced by AUTHORIZER_ROLE and any password removed."""
    split = urllib.parse.urlsplit(dsn)
    if split.scheme in ("postgres", "postgresql"):
        host = split.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(split._replace(netloc=f"{AUTHORIZER_ROLE}@{host}"))
    without = re.sub(r"\b(user|password)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "", dsn).strip()
    return f"{without} user={AUTHORIZER_ROLE}".strip()


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """The asyncio event loop that asyncpg runs on, for a Trio program: every crossing happens inside it."""
    async with trio_asyncio.open_loop():
        yield


class DatabaseUnavailable(Exception):
    """The database cannot be reached right now; the message says why."""


Work = Callable[[asyncpg.Connection], Awaitable[T]]


AUTHORIZER_SESSION = {"default_transaction_read_only": "on", "default_transaction_isolation": "repeatable read"}
"""Session defaults of the authorizer's connections: a statement on its own is then a read-only transaction with one
snapshot, as every use wants (row-level security decides a window in one statement). Given at connection start, they
survive the pool's RESET ALL."""


class AuthorizerPool:
    """A small asyncpg pool for checks and authorization, usable only inside `trio_asyncio.open_loop()`.

    Its login role must not be a superuser (connections are refused otherwise): policy code runs in these sessions
    and can always get back to the session user. `refuse_superuser=False` is for a pool where no policy code runs
    (reading the change log for replays).
    """

    def __init__(self, dsn: str, *, max_size: int = 4, refuse_superuser: bool = True) -> None:
        self.dsn = dsn
        self._max_size = max_size
        self._refuse_superuser = refuse_superuser
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Open the pool. Raises DatabaseUnavailable when the server cannot be reached."""
        try:
            # min_size=0: connections are made when needed, so a database that is away now costs nothing yet.
            self._pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
                self.dsn,
                min_size=0,
                max_size=self._max_size,
                init=_refuse_superuser if self._refuse_superuser else None,
                server_settings=AUTHORIZER_SESSION,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(describe(exc)) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio_asyncio.aio_as_trio(pool.close)()

    async def run(self, work: Work[T]) -> T:
        """Run `work(connection)` on asyncio with a pooled connection, in one crossing.

        Raises DatabaseUnavailable when no connection can be had or it breaks; errors raised by the SQL itself
        (asyncpg.PostgresError other than connection failures) propagate.
        """
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("the database connection is not open")

        async def unit() -> T:
            async with pool.acquire() as conn:
                # A pooled connection is a proxy that hands every attribute to its asyncpg.Connection; the stubs
                # keep the two classes apart.
                return await work(conn)  # type: ignore[arg-type]

        return await _cross(unit)


async def _refuse_superuser(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user"):
        raise DatabaseUnavailable(
            "database.authorizer_dsn logs in as a superuser; policy code would run with its powers: use the "
            f"{AUTHORIZER_ROLE} role (created by fluxrt migrate) or another role that is not a superuser"
        )


def is_connection_error(exc: asyncpg.PostgresError) -> bool:
    """Whether the error means "the database cannot serve us now" rather than "this SQL is wrong": every caller
    then retries with backoff (or refuses with "database unavailable"), never at once."""
    code = getattr(exc, "sqlstate", "") or ""
    # 08: connection exception; 57P: operator intervention (shutdown, terminated backend); 53: insufficient
    # resources (too many connections, out of memory, disk full), which pass with time or an operator.
    return code.startswith(("08", "57P", "53"))


def count_error(exc: BaseException) -> None:
    """Count a database error by SQLSTATE class; log a resource error (class 53) at most every
    RESOURCE_LOG_INTERVAL seconds per SQLSTATE, since every retry meets it again."""
    code = getattr(exc, "sqlstate", None) or "08000"
    errors[code[:2]] += 1
    if code.startswith("53"):
        now = time.monotonic()
        if now - _resource_logged.get(code, -RESOURCE_LOG_INTERVAL) >= RESOURCE_LOG_INTERVAL:
            _resource_logged[code] = now
            log.warning(
                "the database is out of a resource; retrying with backoff",
                extra={"ctx_sqlstate": code, "ctx_error": describe(exc)},
            )


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and client messages, without credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


async def connect(dsn: str) -> Any:
    """One dedicated connection (for the changefeed), opened on asyncio. Raises DatabaseUnavailable."""
    try:
        return await trio_asyncio.aio_as_trio(asyncpg.connect)(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        count_error(exc)
        raise DatabaseUnavailable(describe(exc)) from None


async def on_connection(conn: Any, work: Work[T]) -> T:
    """Run `work(conn)` on asyncio in one crossing. Raises DatabaseUnavailable when the connection fails."""
    return await _cross(lambda: work(conn))


async def _cross(unit: Callable[[], Awaitable[T]]) -> T:
    """Run `unit()` on asyncio; a lost or unreachable server becomes DatabaseUnavailable, SQL errors propagate."""
    try:
        result: T = await trio_asyncio.aio_as_trio(unit)()  # trio_asyncio has no types: Any
        return result
    except DatabaseUnavailable:
        raise
    except (
        OSError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.ConnectionDoesNotExistError,
    ) as exc:
        # InternalClientError: asyncpg's state machine after the backend vanished mid-statement.
        count_error(exc)
        raise DatabaseUnavailable(describe(exc)) from None
    except asyncpg.PostgresError as exc:
        count_error(exc)
        if is_connection_error(exc):
            raise DatabaseUnavailable(describe(exc)) from None
        raise


async def close_connection(conn: Any) -> None:
    try:
        await trio_asyncio.aio_as_trio(conn.close)(timeout=2)
    except Exception:  # a connection that is already gone is closed enough
        conn.terminate()
