"""What the fault tests share: a private PostgreSQL, a writer that retries through outages and knows what committed,
and subscribers that count what they receive by id."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shutil
import threading
import uuid
from typing import Any

import asyncpg
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from fluxrt_trio.postgres.embedded import EmbeddedPostgres
from fluxrt_trio.postgres.migrate import migrate

from .. import pg
from ..support.database import in_asyncio

WRITER_APP = "fluxrt-fault-writer"
"""the writer's application_name, so that killing "every fluxrt backend" spares it"""

_tables = itertools.count(1)


class PrivatePostgres:
    """The embedded binaries on a data directory of this test module's own, under .fluxrt/."""

    def __init__(self, name: str) -> None:
        self.data_dir = pg.ROOT / ".fluxrt" / f"faults-{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.embedded = EmbeddedPostgres(self.data_dir)
        self.dsn = ""

    def start(self) -> str:
        """Start the server (the first time: initdb and migrate). Later starts keep the port and the data."""
        first = not self.dsn
        self.dsn = self.embedded.start()
        if first:

            async def prepare() -> None:
                conn = await asyncpg.connect(self.dsn)
                try:
                    await migrate(conn, pg.ROLES)
                finally:
                    await conn.close()

            _thread(prepare)
        return self.dsn

    def stop(self) -> None:
        """A fast shutdown: open sessions are ended, as an operator's restart does."""
        self.embedded.stop()

    def remove(self) -> None:
        self.embedded.stop(quiet=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def sql(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return pg.run_sql(self.dsn, sql, *args)

    async def execute(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await trio.to_thread.run_sync(lambda: pg.run_sql(self.dsn, sql, *args))

    def table(self, *, grant: str = "anon") -> str:
        """A fresh realtime table `(id int PRIMARY KEY, note text)` readable by `grant`; its name."""
        name = f"items_{next(_tables)}"
        self.sql(
            f"CREATE TABLE {name} (id int PRIMARY KEY, note text); GRANT SELECT ON {name} TO {grant};"
            f"SELECT enable_realtime('{name}')"
        )
        return name


def _thread(make: Any) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


class Writer:
    """Inserts 1, 2, 3... into a table, one row per transaction at about `rate` rows/s, from asyncio in a worker
    thread. An insert whose outcome is unknown (the connection broke) is retried with the same id until it is
    answered; ON CONFLICT DO NOTHING makes a retry of a commit that did happen a no-op that fires no trigger. So
    once stopped, exactly the ids 1..committed are in the table."""

    def __init__(self, dsn: str, table: str, *, rate: float = 200, deadline: float = 40) -> None:
        self.dsn, self.table, self.pause, self.deadline = dsn, table, 1 / rate, deadline
        self.stop = threading.Event()
        self.committed = 0
        self.errors = 0
        self.done = trio.Event()

    async def _write(self) -> None:
        conn = None
        next_id = 1
        async with asyncio.timeout(self.deadline):
            while not self.stop.is_set():
                try:
                    if conn is None:
                        conn = await asyncpg.connect(
                            self.dsn, timeout=2, server_settings={"application_name": WRITER_APP}
                        )
                    await conn.execute(f"INSERT INTO {self.table} VALUES ($1) ON CONFLICT DO NOTHING", next_id)
                    self.committed = next_id
                    next_id += 1
                    await asyncio.sleep(self.pause)
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                ):
                    self.errors += 1
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(0.05)
        if conn is not None:
            await conn.close()

    async def run(self) -> None:
        try:
            await in_asyncio(self._write)
        finally:
            self.done.set()

    async def finish(self, timeout: float = 10) -> list[int]:
        """Stop writing; the ids committed, read back from the table (which must be 1..committed)."""
        self.stop.set()
        with trio.fail_after(timeout):
            await self.done.wait()
        rows = await trio.to_thread.run_sync(lambda: pg.run_sql(self.dsn, f"SELECT id FROM {self.table} ORDER BY id"))
        ids = [r["id"] for r in rows]
        assert ids == list(range(1, self.committed + 1)), "the writer lost track of what it committed"
        return ids

    async def wait_committed(self, n: int, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while self.committed < n:
                if self.done.is_set():
                    raise AssertionError(f"the writer stopped at {self.committed} ({self.errors} errors)")
                await trio.sleep(0.01)


class Subscriber:
    """One table subscriber's view: how often each INSERT id arrived, and every other message."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.counts: collections.Counter[int] = collections.Counter()
        self.other: list[dict[str, Any]] = []
        self.closed: str | None = None
        self._changed = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                message = orjson.loads(await self.ws.get_message())
                payload = message.get("payload") or {}
                if message.get("type") == "broadcast" and payload.get("type") == "INSERT":
                    self.counts[payload["record"]["id"]] += 1
                else:
                    self.other.append(message)
                self._changed.set()
                self._changed = trio.Event()
        except ConnectionClosed as exc:
            self.closed = repr(exc.reason)
            self._changed.set()

    async def ping(self, ref: str, timeout: float = 5) -> None:
        """A ping answered while the reader runs: the connection is open and served. The pong is not kept."""
        await self.ws.send_message(orjson.dumps({"type": "ping", "ref": ref}).decode())
        pong = {"type": "pong", "ref": ref}
        with trio.fail_after(timeout):
            while pong not in self.other:
                if self.closed is not None:
                    raise AssertionError(f"the connection closed: {self.closed}")
                await self._changed.wait()
        self.other.remove(pong)

    async def wait_for(self, ids: Any, timeout: float) -> None:
        """Until every id in `ids` arrived."""
        want = set(ids)
        with trio.fail_after(timeout):
            while not want <= self.counts.keys():
                if self.closed is not None:
                    raise AssertionError(f"the connection closed: {self.closed}")
                await self._changed.wait()


def exactly_once(subscriber: Subscriber, expected: list[int]) -> str | None:
    """None when every expected id arrived once and nothing else did; else what went wrong."""
    missing = sorted(set(expected) - subscriber.counts.keys())
    repeated = sorted(i for i, n in subscriber.counts.items() if n > 1)
    unexpected = sorted(subscriber.counts.keys() - set(expected))
    if missing or repeated or unexpected:
        return (
            f"{len(missing)} missing (first {missing[:5]}), {len(repeated)} repeated (first {repeated[:5]}), "
            f"{len(unexpected)} never committed (first {unexpected[:5]})"
        )
    return None
