"""The database unreachable for a while: what does not need it keeps working, what does is answered at once with
the documented error, a token refresh keeps the connection's table subscriptions (they are checked again once the
database is back), /health says degraded, and nothing spins while it waits."""

from __future__ import annotations

import time

import orjson
import pytest
import trio

from fluxrt_trio.protocol.channels import parse_channel
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.messages import Ack, Error, ErrorCode, Subscribe
from fluxrt_trio.protocol.session import (
    Authenticate,
    CheckSubscribe,
    IdentityChanged,
    Leave,
    RecheckLater,
    Reply,
    Session,
    SessionLimits,
    Unavailable,
)

from ..support.clients import connect, http_get, recv, request, send, subscribe
from ..support.config import token
from ..support.servers import serving, wait_ok
from ..support.waiting import nothing_before_pong

OUTAGE = 10.0
"""seconds the database stays away, at least"""
CPU_SHARE = 0.05
"""of one core, at most, while the node waits for the database"""

# ---- the session's part, as values ---------------------------------------------------------------------------


def renewed(session: Session, identity: Identity) -> list[CheckSubscribe]:
    effects = session.answered(Authenticate("t", "r"), identity)
    assert effects[0] == Reply(Ack("authorized", None, "r"))
    assert isinstance(effects[1], IdentityChanged)
    checks = effects[2:]
    assert all(isinstance(c, CheckSubscribe) and c.renewal for c in checks)
    return checks  # type: ignore[return-value]


def test_a_renewal_check_without_a_database_keeps_the_subscription_and_is_asked_again():
    session = Session("c", Identity("alice", "anon"), SessionLimits())
    for name in ("table:public.a", "table:public.b"):
        [check] = session.receive(orjson.dumps({"type": "subscribe", "channel": name}), 0.0)
        session.answered(check, None)
    a, b = renewed(session, Identity("alice", "authenticated"))
    away = Unavailable("DatabaseUnavailable: connection refused")
    assert session.answered(a, away) == [RecheckLater()]
    assert session.answered(b, away) == [RecheckLater()]
    assert set(session.subscriptions) == {"table:public.a", "table:public.b"}
    assert session.rechecks_pending
    # The database is back: both asked again, once; one refused now ends, the other stays.
    again = session.rechecks()
    assert again == [a, b]
    assert not session.rechecks_pending
    assert session.rechecks() == []
    refusal = Error(ErrorCode.FORBIDDEN, "role authenticated may not read public.b", channel=b.channel.name)
    assert session.answered(again[0], None) == []
    assert session.answered(again[1], refusal) == [
        Reply(
            Error(
                ErrorCode.FORBIDDEN,
                "no longer allowed under the new token: role authenticated may not read public.b",
                channel="table:public.b",
            )
        ),
        Leave(parse_channel("table:public.b")),
    ]
    assert set(session.subscriptions) == {"table:public.a"}


def test_pending_rechecks_end_with_the_subscription_or_a_newer_token():
    session = Session("c", Identity("alice", "anon"), SessionLimits())
    for name in ("table:public.a", "table:public.b"):
        [check] = session.receive(orjson.dumps({"type": "subscribe", "channel": name}), 0.0)
        session.answered(check, None)
    a, b = renewed(session, Identity("alice", "authenticated"))
    session.answered(a, Unavailable("away"))
    session.answered(b, Unavailable("away"))
    session.receive(orjson.dumps({"type": "unsubscribe", "channel": "table:public.a"}), 0.0)
    assert session.rechecks() == [b]
    session.answered(b, Unavailable("away"))
    # A newer token checks every table afresh: nothing of the older one is left to ask.
    renewed(session, Identity("alice", "anon"))
    assert not session.rechecks_pending
    # A client's own subscribe is never taken as allowed for want of an answer.
    check = CheckSubscribe(Subscribe("table:public.c"), parse_channel("table:public.c"))
    with pytest.raises(AssertionError):
        session.answered(check, Unavailable("away"))


# ---- live ----------------------------------------------------------------------------------------------------


async def test_an_unreachable_database_leaves_the_rest_working_and_token_refreshes_keep_subscriptions(private_pg):
    shared = private_pg.table(grant="anon, authenticated")
    anon_only = private_pg.table(grant="anon")
    anon_token = token("alice", role="anon")
    async with (
        serving(database={"dsn": private_pg.dsn, "poll_interval": 0.01}) as server,
        connect(server, tok=anon_token) as alice,
        connect(server) as sender,
        connect(server) as listener,
        connect(server) as newcomer,
    ):
        await wait_ok(server)
        await subscribe(alice, f"table:public.{shared}")
        await subscribe(alice, f"table:public.{anon_only}")
        await subscribe(sender, "presence:room")
        assert (await recv(sender))["event"] == "sync"
        await subscribe(listener, "broadcast:chat")
        await subscribe(listener, "presence:room")
        assert (await recv(listener))["event"] == "sync"
        private_pg.sql(f"INSERT INTO {shared} VALUES (1)")
        assert (await recv(alice))["payload"]["record"]["id"] == 1

        stopped_at = trio.current_time()
        await trio.to_thread.run_sync(private_pg.stop)
        try:
            with trio.fail_after(5):
                while server.database_state() != "degraded":
                    await trio.sleep(0.01)
            status, _, body = await http_get(server, "/health")
            assert (status, orjson.loads(body)["status"]) == (503, "degraded")

            # Broadcast, presence and pings need no database.
            assert (await request(sender, type="ping", ref="p"))["type"] == "pong"
            await send(sender, type="broadcast", channel="broadcast:chat", payload={"n": 1}, ref="b")
            assert (await recv(sender))["type"] == "ack"
            assert (await recv(listener))["payload"] == {"n": 1}
            await send(sender, type="presence", channel="presence:room", event="track", payload={"at": 1}, ref="t")
            assert (await recv(sender))["type"] == "ack"
            assert (await recv(listener))["event"] == "diff"

            # A table subscribe is refused at once, saying why.
            with trio.fail_after(3):
                reply = await request(newcomer, type="subscribe", channel=f"table:public.{shared}", ref="s")
            assert reply["code"] == "SUBSCRIPTION_FAILED", reply
            assert reply["message"].startswith("database unavailable"), reply

            # A new token whose role may read only one of the two tables: acknowledged, and neither subscription
            # ends while nothing can say whether it is still allowed.
            reply = await request(alice, type="auth", token=token("alice", role="authenticated"), ref="a")
            assert reply == {"type": "ack", "status": "authorized", "ref": "a"}, reply
            await nothing_before_pong(alice)

            # Waiting for the database costs (next to) nothing.
            cpu = time.process_time()
            await trio.sleep(5)
            share = (time.process_time() - cpu) / 5
            print(f"\nCPU while the database is away: {share:.1%} of one core")
            assert share < CPU_SHARE
            await trio.sleep(max(0.0, OUTAGE - (trio.current_time() - stopped_at)))
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(private_pg.start)
        back_at = trio.current_time()

        # Back: the re-checks run, and the one the new role fails ends that subscription only.
        ended = await recv(alice, timeout=15)
        assert ended["code"] == "FORBIDDEN", ended
        assert ended["channel"] == f"table:public.{anon_only}", ended
        assert "no longer allowed under the new token" in ended["message"], ended
        print(f"re-checked {trio.current_time() - back_at:.2f} s after the database came back")
        await wait_ok(server)
        private_pg.sql(f"INSERT INTO {anon_only} VALUES (2)")
        private_pg.sql(f"INSERT INTO {shared} VALUES (3)")
        assert (await recv(alice, timeout=10))["payload"]["record"]["id"] == 3
        assert (await request(newcomer, type="subscribe", channel=f"table:public.{shared}", ref="s"))["type"] == "ack"
