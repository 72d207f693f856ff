"""fluxrt's status page in a real browser: headless Chromium (Debian's `chromium`, installed when missing) driven by
playwright-core from sdk/typescript/test/browser/pages.ts (its `status` scenario), against a node with a database
and the cluster engine, and clients holding subscriptions of every kind. What the page shows is checked against
`/metrics`, scraped after the browser has closed (nothing changes the node's counts in between)."""

from __future__ import annotations

import pytest
import trio

from fluxrt_trio import status

from .support.browser import ensure_chromium, see
from .support.clients import connect, http_get, recv, send, subscribe
from .support.config import token
from .support.metrics import samples
from .support.redis import redis_server
from .support.sdk import USERS, prepare_sdk
from .support.servers import start


@pytest.mark.timeout(600)  # the first run may install Chromium; the page itself is bounded by see()
async def test_the_status_page_shows_what_metrics_shows(start_server, db, tmp_path):
    tools = prepare_sdk(), ensure_chromium()
    db.sql(USERS)
    with redis_server() as redis:
        server = await start(start_server, db, cluster={"redis_url": redis.url, "node_id": "web-1", "prefix": "st"})
        # Up before anyone subscribes: the engine's arrival would send presence subscribers a sync of its own.
        with trio.fail_after(10):
            while server.cluster.cluster_statistics().state != "up":
                await trio.sleep(0.01)
        async with (
            connect(server, tok=token("alice")) as alice,
            connect(server, tok=token("bob")) as bob,
            connect(server, tok=token("carol")) as carol,
        ):
            for ws in (alice, bob, carol):
                await subscribe(ws, "broadcast:lobby")
            for ws in (alice, bob):
                await subscribe(ws, "presence:room")
                assert (await recv(ws))["event"] == "sync"
            await subscribe(alice, "table:public.users")
            await send(bob, type="broadcast", channel="broadcast:lobby", payload={"hello": 1})
            for ws in (alice, carol):
                assert (await recv(ws))["payload"] == {"hello": 1}
            await send(carol, type="subscribe", channel="nope:x")
            assert (await recv(carol))["code"] == "INVALID_CHANNEL"

            screenshot = tmp_path / "status.png"
            env = {
                "FLUXRT_URL": f"http://127.0.0.1:{server.port}",
                "TOKEN_ALICE": token("alice"),
                "TOKEN_SERVICE": token("ops", role="service_role"),
                "SCREENSHOT": str(screenshot),
            }
            seen = await see("status", tools, env)
            metrics = samples((await http_get(server, "/metrics"))[2])
        await server.shutdown()

    shown = seen["values"]
    assert shown["connections"] == str(int(metrics["fluxrt_connections"])) == "3"
    assert shown["max_connections"] == str(int(metrics["fluxrt_connections_limit"]))
    for kind, n in (("table", 1), ("presence", 2), ("broadcast", 3)):
        assert shown[f"subscriptions.{kind}"] == str(int(metrics[f'fluxrt_subscriptions{{kind="{kind}"}}'])) == str(n)
    assert shown["subscriptions"] == "6"
    assert shown["messages.in_total"] == str(int(metrics["fluxrt_messages_in_total"]))
    assert shown["messages.out_total"] == str(int(metrics["fluxrt_messages_out_total"]))
    assert int(shown["messages.out_total"]) > 0
    assert shown["errors.total"] == shown["errors.by_code.INVALID_CHANNEL"] == "1"
    assert metrics['fluxrt_errors_total{code="INVALID_CHANNEL"}'] == 1
    assert shown["slow_consumer_closes.total"] == str(int(metrics["fluxrt_slow_consumer_closes_total"])) == "0"
    assert (shown["database"], shown["node.status"]) == ("ok", "ok")
    assert (shown["cluster.state"], metrics["fluxrt_cluster_engine_up"]) == ("up", 1)
    assert shown["cluster.nodes"] == str(int(metrics["fluxrt_cluster_nodes"])) == "1"
    assert "fluxrt_changefeed_lag_seconds" in metrics
    assert float(shown["changefeed_lag_s"]) >= 0
    # What a person reads is the value, formatted.
    assert seen["texts"]["connections"] == "3"
    assert seen["texts"]["cluster.last_error"] == "\u2013"  # none

    assert seen["channels"] == [["broadcast:lobby", 3], ["presence:room", 2], ["table:public.users", 1]]
    assert set(seen["points"]) == {
        "connections",
        "subscriptions",
        "messages_in_per_s",
        "messages_out_per_s",
        "changefeed_lag_s",
        "slow_consumer_closes_per_s",
        "errors_per_s",
    }
    assert all(2 <= n <= status.SAMPLES for n in seen["points"].values()), seen["points"]
    assert seen["problem"] is None
    # Asked for a token, refused alice's (not a service role), kept the service role's across a reload.
    assert len(seen["prompts"]) == 2
    assert "auth.service_roles" in seen["prompts"][0]
    assert seen["prompts"][1].startswith("That token was refused") and "auth.service_roles" in seen["prompts"][1]
    assert seen["loginAfterReload"] is False
    # Air-gapped: the page asked nothing of anyone but the node.
    assert seen["origins"] == [f"http://127.0.0.1:{server.port}"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
