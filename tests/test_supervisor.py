"""The supervisor's deadlines on a fake clock (`autojump_clock`): pings, idle timeouts and token expiry, with fake
connections and no sockets.

The timings asserted here exactly are asserted only loosely end to end, with real sleeps, in test_limits_live.py
(pings every heartbeat_interval, 4008 after connection_timeout, any frame keeping a connection alive) and
test_connection.py (4001 at the token's exp, a refreshed token replacing the expiry); those stay to prove the wiring.
"""

from __future__ import annotations

import gc
import weakref

import attrs
import pytest
import trio

from fluxrt_trio.supervisor import Supervisor

# UNIX time at trio.current_time() == 0; anything far from the real time.time() shows the wall clock is injected.
EPOCH = 2_000_000_000.0


def wall_clock() -> float:
    return EPOCH + trio.current_time()


@attrs.define(eq=False)
class Conn:
    """A supervised connection that records what the supervisor did to it, and when (on Trio's clock)."""

    last_seen: float = attrs.field(factory=trio.current_time)
    expires_at: float | None = None
    closed: bool = False
    pings: list[float] = attrs.field(factory=list)
    timeouts: list[tuple[float, float]] = attrs.field(factory=list)
    expired: list[float] = attrs.field(factory=list)

    def ping(self) -> None:
        self.pings.append(trio.current_time())

    def idle_timeout(self, idle: float) -> None:
        self.timeouts.append((trio.current_time(), idle))
        self.closed = True

    def token_expired(self) -> None:
        self.expired.append(trio.current_time())
        self.closed = True

    def speak(self) -> None:
        self.last_seen = trio.current_time()


@pytest.fixture
def supervise(nursery):
    """`supervise(heartbeat, timeout)` runs a Supervisor in the test's nursery and returns it.

    Each test asks for `autojump_clock` itself: pytest-trio looks for the clock among the test's own arguments.
    """

    def start(heartbeat_interval: float, connection_timeout: float) -> Supervisor:
        supervisor = Supervisor(heartbeat_interval, connection_timeout, wall_clock=wall_clock)
        nursery.start_soon(supervisor.run)
        return supervisor

    return start


async def test_pings_every_heartbeat_interval(autojump_clock, supervise):
    supervisor = supervise(10, 1000)
    conn = Conn()
    supervisor.watch(conn)
    await trio.sleep_until(35)
    assert conn.pings == [10, 20, 30]
    assert not conn.timeouts


async def test_silence_for_connection_timeout_times_out(autojump_clock, supervise):
    supervisor = supervise(1000, 30)
    conn = Conn()
    supervisor.watch(conn)
    await trio.sleep_until(29.9)
    assert not conn.timeouts
    await trio.sleep_until(31)
    assert conn.timeouts == [(30, 30)]


async def test_speaking_pushes_the_idle_timeout_back(autojump_clock, supervise):
    supervisor = supervise(1000, 30)
    conn = Conn()
    supervisor.watch(conn)
    await trio.sleep_until(20)
    conn.speak()
    await trio.sleep_until(49.9)
    assert not conn.timeouts
    await trio.sleep_until(51)
    assert conn.timeouts == [(50, 30)]


async def test_the_token_expires_at_its_exp_on_the_wall_clock(autojump_clock, supervise):
    supervisor = supervise(1000, 1000)
    conn = Conn(expires_at=EPOCH + 100)
    supervisor.watch(conn)
    await trio.sleep_until(99.9)
    assert not conn.expired
    await trio.sleep_until(101)
    assert conn.expired == [100]


async def test_a_new_token_replaces_the_watched_expiry(autojump_clock, supervise):
    supervisor = supervise(1000, 1000)
    later, sooner, never = Conn(expires_at=EPOCH + 100), Conn(expires_at=EPOCH + 100), Conn(expires_at=EPOCH + 100)
    for conn in (later, sooner, never):
        supervisor.watch(conn)
    await trio.sleep_until(50)
    later.expires_at = EPOCH + 200
    sooner.expires_at = EPOCH + 60
    never.expires_at = None
    for conn in (later, sooner, never):
        supervisor.identity_changed(conn)
    await trio.sleep_until(199)
    assert sooner.expired == [60]
    assert not later.expired, "the old token's deadline no longer counts"
    await trio.sleep_until(500)
    assert later.expired == [200]
    assert not never.expired


async def test_closed_connections_are_left_alone(autojump_clock, supervise):
    supervisor = supervise(10, 30)
    closed, open_ = Conn(expires_at=EPOCH + 20), Conn()
    supervisor.watch(closed)
    supervisor.watch(open_)
    await trio.sleep_until(5)
    closed.closed = True
    for _ in range(5):
        open_.speak()
        await trio.sleep(10)
    assert (closed.pings, closed.timeouts, closed.expired) == ([], [], [])
    assert open_.pings == [10, 20, 30, 40, 50]


async def test_a_new_heartbeat_interval_applies_after_the_ping_already_due(autojump_clock, supervise):
    supervisor = supervise(10, 1000)
    conn = Conn()
    supervisor.watch(conn)
    await trio.sleep_until(15)
    supervisor.heartbeat_interval = 3
    await trio.sleep_until(30)
    assert conn.pings == [10, 20, 23, 26, 29]


async def test_a_new_connection_timeout_applies_at_the_idle_deadline_already_set(autojump_clock, supervise):
    longer_supervisor = supervise(1000, 30)
    longer = Conn()
    longer_supervisor.watch(longer)
    shorter_supervisor = supervise(1000, 30)
    shorter = Conn()
    shorter_supervisor.watch(shorter)
    await trio.sleep_until(5)
    longer_supervisor.connection_timeout = 60
    shorter_supervisor.connection_timeout = 10
    await trio.sleep_until(25)
    shorter.speak()
    await trio.sleep_until(100)
    assert longer.timeouts == [(60, 60)]
    assert shorter.timeouts == [(35, 10)]


async def test_deadlines_beyond_the_next_ping_still_come_on_time(autojump_clock, supervise):
    supervisor = supervise(10, 25)
    silent, speaking, expiring = Conn(), Conn(), Conn(expires_at=EPOCH + 95)
    for conn in (silent, speaking, expiring):
        supervisor.watch(conn)
    await trio.sleep_until(22)
    speaking.speak()
    for t in (22, 40, 60, 80):
        await trio.sleep_until(t)
        expiring.speak()
    await trio.sleep_until(200)
    assert silent.timeouts == [(25, 25)]
    assert speaking.timeouts == [(47, 25)]
    assert expiring.expired == [95]


async def test_a_later_token_is_watched_from_the_next_pings(autojump_clock, supervise):
    supervisor = supervise(10, 1000)
    conn = Conn(expires_at=EPOCH + 15)
    supervisor.watch(conn)
    await trio.sleep_until(5)
    conn.expires_at = EPOCH + 333
    supervisor.identity_changed(conn)
    await trio.sleep_until(400)
    assert conn.expired == [333]


async def test_closed_connections_are_let_go_within_a_heartbeat_interval(autojump_clock, supervise):
    """A closed connection was held until its token's expiry (a day here): the soak's churn grew RSS by the
    connections it had closed."""
    supervisor = supervise(30, 120)
    conns = [Conn(expires_at=EPOCH + 86_400) for _ in range(100)]
    for conn in conns:
        supervisor.watch(conn)
    await trio.sleep_until(1)
    for conn in conns:
        conn.closed = True
    refs = [weakref.ref(conn) for conn in conns]
    del conns, conn
    await trio.sleep_until(31)
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
