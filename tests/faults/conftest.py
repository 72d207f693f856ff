"""Fault tests run against a PostgreSQL of their own, one per test module, that they may stop, restart and starve:
never the machine's shared server on 5432, which other tests and engineers use at the same time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import PrivatePostgres


@pytest.fixture(scope="module")
def private_pg(request: pytest.FixtureRequest) -> Iterator[PrivatePostgres]:
    """A migrated PostgreSQL for this module alone; stopped and deleted after its last test."""
    server = PrivatePostgres(request.module.__name__.rpartition(".")[2])
    try:
        server.start()
        yield server
    finally:
        server.remove()
