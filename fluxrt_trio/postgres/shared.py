"""Identical database checks that wait at the same time share one query, without ever answering from the past.

A connect storm asks the catalog the same question thousands of times at once (may role `authenticated` read
`public.items`?), each ask queued behind the pool's few connections. `SharedQueries` lets checks with the same key
ride on one query, but only on a query that has not been sent yet: a flight stops taking riders at the moment its
SQL goes out (`sent`, called by the query on the database connection just before it). So every answer comes from a
statement that the database began after the check arrived, exactly as fresh as a query of its own: a REVOKE
committed before a check arrived is always seen by it. Nothing is kept once a flight lands.

The key must hold everything the answer depends on (for a privilege check: schema, table and role), so that two
checks that could get different answers never share a flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Query = Callable[[Callable[[], None]], Awaitable[V]]
"""A query given `sent`: it calls `sent()` on the database connection right before its statement goes out."""


class _Flight(Generic[V]):
    __slots__ = ("answered", "error", "landed", "value")

    def __init__(self) -> None:
        self.landed = trio.Event()
        self.answered = False
        """False once landed: its leader was cancelled before an answer, so its riders ask again"""
        self.value: V | None = None
        self.error: Exception | None = None


class SharedQueries(Generic[K, V]):
    """Runs at most one waiting query per key; checks with that key arriving before it is sent share its result."""

    def __init__(self) -> None:
        self._boarding: dict[K, _Flight[V]] = {}
        self.queries = 0
        """queries run (for tests and statistics): checks answered minus riders"""

    async def run(self, key: K, query: Query[V]) -> V:
        """The result of `query` for `key`, run now or shared with a check of the same key whose query has not
        been sent yet; its exceptions propagate to every check that shared it."""
        while True:
            flight = self._boarding.get(key)
            if flight is None:
                return await self._lead(key, query)
            await flight.landed.wait()
            if flight.error is not None:
                raise flight.error
            if flight.answered:
                return cast(V, flight.value)

    async def _lead(self, key: K, query: Query[V]) -> V:
        flight: _Flight[V] = _Flight()
        self._boarding[key] = flight

        def sent() -> None:
            if self._boarding.get(key) is flight:
                del self._boarding[key]

        self.queries += 1
        try:
            value = await query(sent)
        except Exception as exc:
            flight.error = exc
            raise
        else:
            flight.value, flight.answered = value, True
            return value
        finally:
            # Failed or cancelled before sending: riders must not board a flight that is over.
            sent()
            flight.landed.set()
