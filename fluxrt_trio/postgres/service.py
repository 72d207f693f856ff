"""The database side of a node, started and owned by the server: migrations, the pool, the changefeed, pruning.

Start-up never waits for the database: if it is away, the node serves broadcast and presence, reports the database
as degraded, and keeps trying; table subscribes are refused with a message saying the database is unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import trio
import trio_asyncio

from ..protocol.changes import Window
from .bridge import AuthorizerPool, DatabaseUnavailable, close_connection, connect, describe, on_connection
from .bridge import authorizer_dsn as default_authorizer_dsn
from .changefeed import Changefeed
from .migrate import lifecycle_missing, migrate, record_settings

log = logging.getLogger("fluxrt.postgres")

WINDOW_QUEUE = 16
"""windows read ahead of delivery; a full queue makes the changefeed wait, and the changes wait in the database"""


class DatabaseService:
    def __init__(
        self,
        dsn: str,
        *,
        authorizer_dsn: str | None = None,
        migrate: bool,
        roles: tuple[str, ...],
        poll_interval: float,
        retention: float,
        max_message_size: int | None = None,
    ) -> None:
        self.dsn = dsn
        self._max_message_size = max_message_size
        self._wanted_size = max_message_size
        self._settings_changed = trio.Event()
        self._migrate = migrate
        self._roles = roles
        self.authorizer_pool = AuthorizerPool(authorizer_dsn or default_authorizer_dsn(dsn))
        # Replays read the change log, which only fluxrt's own login may read; no policy code runs there.
        self.log_pool = AuthorizerPool(dsn, max_size=2, refuse_superuser=False)
        self._send, self.windows = trio.open_memory_channel[Window](WINDOW_QUEUE)
        self.changefeed = Changefeed(dsn, self._send, poll_interval=poll_interval, retention=retention)
        self.ready = trio.Event()

    @property
    def state(self) -> str:
        """`connecting`, `ok` or `degraded`, for /health."""
        if not self.ready.is_set():
            return "connecting" if self.changefeed.last_error is None else "degraded"
        return self.changefeed.state

    async def wait_ok(self) -> None:
        """Return once the database is prepared and the changefeed reads from it (at once if it does now)."""
        await self.ready.wait()
        await self.changefeed.wait_ok()

    def record_settings(self, max_message_size: int) -> None:
        """Have a reloaded realtime.max_message_size written for realtime.send, soon (only where this node
        migrates the database: elsewhere its owner does). A failure is logged: the old limit stays."""
        self._wanted_size = max_message_size
        self._settings_changed.set()

    async def _record_settings_forever(self) -> None:
        while True:
            await self._settings_changed.wait()
            self._settings_changed = trio.Event()
            size = self._wanted_size
            if not self._migrate or size is None or size == self._max_message_size:
                continue
            try:
                conn = await connect(self.dsn)
                try:
                    await on_connection(conn, functools.partial(record_settings, max_message_size=size))
                finally:
                    with trio.CancelScope(shield=True):
                        await close_connection(conn)
            except Exception as exc:
                log.warning(
                    "could not record realtime.max_message_size for realtime.send; it checks the previous value",
                    extra={"ctx_error": describe(exc)},
                )
                continue
            self._max_message_size = size
            log.info("recorded realtime.max_message_size for realtime.send", extra={"ctx_bytes": size})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run inside `opened()`. Reports started as soon as the first attempt finished."""
        await self._prepare(task_status)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.changefeed.run)
            nursery.start_soon(self.changefeed.prune_forever)
            nursery.start_soon(self._record_settings_forever)
            self.ready.set()

    async def _prepare(self, task_status: trio.TaskStatus[None]) -> None:
        backoff = 0.1
        reported = False
        while True:
            try:
                if self._migrate:
                    conn = await connect(self.dsn)
                    try:
                        applied = await on_connection(
                            conn, lambda c: migrate(c, self._roles, max_message_size=self._max_message_size)
                        )
                        missing = await on_connection(conn, lifecycle_missing)
                    finally:
                        with trio.CancelScope(shield=True):
                            await close_connection(conn)
                    if applied:
                        log.info("database migrated", extra={"ctx_applied": ",".join(applied)})
                    if missing:
                        log.warning(missing)
                await self.authorizer_pool.open()
                await self.log_pool.open()
                break
            except DatabaseUnavailable as exc:
                self.changefeed.last_error = str(exc)
                log.warning("database unavailable at start-up; retrying", extra={"ctx_error": str(exc)})
            except Exception as exc:
                # A migration that fails for a reason other than reachability needs a person; keep the node up.
                self.changefeed.last_error = describe(exc)
                log.error("database preparation failed; retrying", extra={"ctx_error": describe(exc)})
            if not reported:
                reported = True
                task_status.started()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
        if not reported:
            task_status.started()

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The asyncio loop asyncpg lives on, for as long as the node runs; the pool is closed on the way out."""
        async with trio_asyncio.open_loop():
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await self.authorizer_pool.close()
                    await self.log_pool.close()
