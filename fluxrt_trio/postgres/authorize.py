"""The optional channel authorization hook: `realtime.authorize(channel text, action text) RETURNS boolean`.

When the database defines it, fluxrt asks it before a connection subscribes to a `presence:` or `broadcast:`
channel (action `subscribe`), broadcasts (`broadcast`) or tracks presence (`track`), running it as the connection's
role with its claims in `request.jwt.claims`. When it is absent, those channels are open to every connection; its
presence is looked up again every few seconds, so creating or dropping it needs no restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg
import orjson
import trio

from ..protocol.identity import Identity
from .bridge import AuthorizerPool, DatabaseUnavailable, describe
from .shared import SharedQueries

log = logging.getLogger("fluxrt.authorize")

HOOK_RECHECK = 5.0
"""seconds between looks for the hook's existence"""


class Refused(Exception):
    """The hook said no, or failed; the message is for the client."""


class ChannelAuthorizer:
    def __init__(self, pool: AuthorizerPool) -> None:
        self._pool = pool
        self._hook: bool | None = None
        self._checked_at = -HOOK_RECHECK
        # Checks that find the answer missing or old while a look is waiting for a connection share that look.
        self.looks: SharedQueries[None, bool] = SharedQueries()

    async def hook_exists(self) -> bool:
        """Whether realtime.authorize exists, as looked up at most HOOK_RECHECK seconds ago.

        Raises DatabaseUnavailable when the database cannot be asked and has never answered.
        """
        if self._hook is None or trio.current_time() - self._checked_at >= HOOK_RECHECK:
            return await self.looks.run(None, self._look)
        return self._hook

    async def _look(self, sent: Callable[[], None]) -> bool:
        async def ask(conn: asyncpg.Connection) -> bool:
            sent()
            found = await conn.fetchval("SELECT to_regprocedure('realtime.authorize(text,text)') IS NOT NULL")
            return bool(found)

        now = trio.current_time()
        try:
            self._hook = await self._pool.run(ask)
        except DatabaseUnavailable:
            # Unknown: keep the last answer (closed if never known) rather than opening channels by accident.
            if self._hook is None:
                raise
        self._checked_at = now
        return self._hook

    async def check(self, identity: Identity, channel: str, action: str) -> None:
        """Return when the hook allows `action` on `channel` (or there is no hook); raise Refused otherwise.

        Raises DatabaseUnavailable when the database cannot be asked.
        """
        if not await self.hook_exists():
            return
        claims = orjson.dumps(identity.claims).decode()

        async def ask(conn: asyncpg.Connection) -> bool | None:
            async with conn.transaction(readonly=True):
                await conn.execute(
                    "SELECT pg_catalog.set_config('role', $1, true), "
                    "pg_catalog.set_config('request.jwt.claims', $2, true)",
                    identity.role,
                    claims,
                )
                allowed: bool | None = await conn.fetchval("SELECT realtime.authorize($1, $2)", channel, action)
                return allowed

        try:
            allowed = await self._pool.run(ask)
        except asyncpg.PostgresError as exc:
            log.warning("realtime.authorize failed", extra={"ctx_channel": channel, "ctx_error": describe(exc)})
            raise Refused(f"realtime.authorize failed for {channel} ({describe(exc)})") from None
        if not allowed:
            raise Refused(f"realtime.authorize does not allow {action} on {channel} for role {identity.role}")
