"""Fixtures of the cluster tests: a private Redis per test (never the machine's shared one: these tests stop,
restart and pause it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..support.redis import RedisServer, redis_server


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server
