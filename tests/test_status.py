"""The status page's pure parts (status.py: samples, rates, top channels, the page's security policy), its routing,
and `GET /api/stats` against a live server, its numbers checked against `/metrics`. The page in a browser:
test_status_page.py."""

from __future__ import annotations

import base64
import hashlib
import re

import h11
import orjson
import pytest

from fluxrt_trio import status
from fluxrt_trio.http import StatusPage, Upgrade, route
from fluxrt_trio.hub import LocalHub

from .support.clients import connect, http_get, recv, send, subscribe
from .support.config import token
from .support.metrics import samples

SERVICE = token("backend", role="service_role")


def snap(at: float, *, connections: int = 0, messages_in: int = 0, errors: int = 0, lag: float | None = None):
    return status.Snapshot(
        at=at,
        connections=connections,
        subscriptions={"table": 1, "presence": 0, "broadcast": 2},
        messages_in_total=messages_in,
        messages_out_total=2 * messages_in,
        errors_total=errors,
        slow_consumer_closes_total=0,
        changefeed_lag=lag,
    )


# ---- samples and rates ---------------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_samples_in_order_and_refuses_one_from_the_past():
    ring = status.Samples(size=3)
    for at in range(5):
        ring.add(snap(float(at)))
    assert [s.at for s in ring] == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="older than the newest"):
        ring.add(snap(3.5))
    assert len(ring) == 3


def test_rates_are_per_second_over_each_interval_and_start_at_the_second_sample():
    ring = status.Samples()
    ring.add(snap(10.0, connections=1, messages_in=100, lag=None))
    ring.add(snap(12.0, connections=3, messages_in=140, errors=1, lag=0.5))
    ring.add(snap(16.0, connections=2, messages_in=140, errors=5, lag=0.25))
    columns = status.series(ring, now=17.0)
    assert columns["t"] == [-7.0, -5.0, -1.0]
    assert columns["connections"] == [1, 3, 2]
    assert columns["subscriptions"] == [3, 3, 3]
    assert columns["changefeed_lag_s"] == [None, 0.5, 0.25]
    assert columns["messages_in_per_s"] == [20.0, 0.0]
    assert columns["messages_out_per_s"] == [40.0, 0.0]
    assert columns["errors_per_s"] == [0.5, 1.0]
    assert columns["slow_consumer_closes_per_s"] == [0.0, 0.0]


def test_the_body_shows_the_latest_rates_and_zero_before_there_are_two_samples():
    def body(ring):
        return orjson.loads(
            status.stats_body(
                snap(20.0, connections=4, messages_in=150, errors=2, lag=0.01),
                ring,
                node={"version": "x"},
                max_connections=10,
                errors_by_code={"INVALID_CHANNEL": 2},
                top=[],
                database="ok",
                cluster=None,
            )
        )

    ring = status.Samples()
    ring.add(snap(10.0, messages_in=100))
    first = body(ring)
    assert first["messages"] == {"in_total": 150, "out_total": 300, "in_per_s": 0.0, "out_per_s": 0.0}
    ring.add(snap(12.0, messages_in=110))
    second = body(ring)
    assert (second["messages"]["in_per_s"], second["messages"]["out_per_s"]) == (5.0, 10.0)
    assert second["errors"] == {"total": 2, "per_s": 0.0, "by_code": {"INVALID_CHANNEL": 2}}
    assert (second["connections"], second["max_connections"], second["changefeed_lag_s"]) == (4, 10, 0.01)
    assert (second["samples"]["interval_s"], second["samples"]["window_s"]) == (status.SAMPLE_INTERVAL, 600.0)
    assert len(second["samples"]["t"]) == 2


def test_top_channels_are_the_largest_first_ties_by_name():
    sizes = [("broadcast:b", 3), ("presence:a", 7), ("broadcast:a", 3), ("table:public.t", 1)]
    assert status.top_channels(iter(sizes), 3) == [
        {"channel": "presence:a", "subscribers": 7},
        {"channel": "broadcast:a", "subscribers": 3},
        {"channel": "broadcast:b", "subscribers": 3},
    ]


def test_a_hubs_traffic_is_what_its_statistics_say():
    class Subscriber:
        def deliver_nowait(self, frame: bytes) -> None:
            pass

    hub = LocalHub()
    a, b = Subscriber(), Subscriber()
    hub.join("broadcast:x", a)
    hub.join("broadcast:x", b)
    hub.join("presence:r", a)
    hub.broadcast("broadcast:x", 1, sender=a)
    stats = hub.statistics()
    assert hub.traffic() == (stats.subscriptions, stats.delivered) == ({"table": 0, "presence": 1, "broadcast": 2}, 1)
    assert sorted(hub.channel_sizes()) == [("broadcast:x", 2), ("presence:r", 1)]


# ---- the page ------------------------------------------------------------------------------------------------


def _sha(text: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'"


def test_the_policy_allows_the_pages_own_script_and_style_and_nothing_else():
    html = status.page().body
    script = re.search(rb"<script>(.*?)</script>", html, re.S)
    style = re.search(rb"<style>(.*?)</style>", html, re.S)
    assert script is not None and style is not None
    policy = dict(part.strip().split(" ", 1) for part in status.content_security_policy(html).split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == _sha(script.group(1))
    assert policy["style-src"] == _sha(style.group(1))
    assert policy["connect-src"] == "'self'"
    # Self-contained (air-gapped): nothing else is loaded, no attribute styles or handlers the policy would block.
    assert not re.search(rb"""(src|href)=["'](?!data:)|@import|url\(|\sstyle=|\son[a-z]+=""", html)


def test_a_page_with_a_second_script_has_no_policy():
    with pytest.raises(ValueError, match="exactly one <script>"):
        status.content_security_policy(b"<style>a</style><script>1</script><script>2</script>")


def test_if_none_match_names_the_page_or_any():
    etag = status.page().etag
    assert status.not_modified(etag, etag)
    assert status.not_modified(f'"other", W/{etag}', etag)
    assert status.not_modified("*", etag)
    assert not status.not_modified('"other"', etag)
    assert not status.not_modified(None, etag)


def _route(target: str, method: str = "GET", headers=(), ws_path: str = "/realtime"):
    request = h11.Request(method=method, target=target, headers=[("host", "x"), *headers])
    return route(request, ws_path=ws_path, realtime_enabled=True, draining=False, allowed_origins=())


def test_the_page_is_at_the_root_and_at_status_unless_the_websocket_is_there():
    for target in ("/", "/status", "/status?x=1"):
        assert _route(target) == StatusPage(status.page(), False)
    assert _route("/status", "HEAD") == StatusPage(status.page(), False)
    assert _route("/", headers=[("if-none-match", status.page().etag)]) == StatusPage(status.page(), True)
    assert _route("/status", "POST").status == 405
    upgrade = [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13")]
    key = [("sec-websocket-key", base64.b64encode(b"k" * 16).decode())]
    assert isinstance(_route("/", headers=[*upgrade, *key], ws_path="/"), Upgrade)


async def test_the_page_is_served_with_its_policy_and_revalidated_by_etag(start_server):
    server = await start_server()
    code, headers, body = await http_get(server, "/status")
    assert (code, headers["content-type"], body) == (200, "text/html; charset=utf-8", status.page().body)
    assert headers["cache-control"] == "no-cache"
    assert headers["content-security-policy"] == status.content_security_policy(body)
    assert (headers["x-content-type-options"], headers["x-frame-options"]) == ("nosniff", "DENY")
    code, again, body = await http_get(server, "/", {"If-None-Match": headers["etag"]})
    assert (code, body, again["etag"]) == (304, b"", headers["etag"])


# ---- GET /api/stats ------------------------------------------------------------------------------------------


async def test_stats_need_a_service_roles_token(start_server):
    server = await start_server()
    code, headers, body = await http_get(server, "/api/stats")
    assert (code, headers["www-authenticate"], orjson.loads(body)["error"]["code"]) == (401, "Bearer", "UNAUTHORIZED")
    code, _, body = await http_get(server, "/api/stats", {"Authorization": f"Bearer {token('alice')}"})
    assert (code, orjson.loads(body)["error"]["code"]) == (403, "FORBIDDEN")
    assert "auth.service_roles" in orjson.loads(body)["error"]["message"]
    code, headers, body = await http_get(server, "/api/stats", {"Authorization": f"Bearer {SERVICE}"})
    assert (code, headers["content-type"], headers["cache-control"]) == (200, "application/json", "no-store")
    counted = samples((await http_get(server, "/metrics"))[2])
    assert counted['fluxrt_api_requests_total{endpoint="stats",status="401"}'] == 1
    assert counted['fluxrt_api_requests_total{endpoint="stats",status="200"}'] == 1


async def test_stats_are_what_metrics_shows_and_are_answered_while_draining(start_server):
    server = await start_server()
    async with connect(server, tok=token("alice")) as alice, connect(server, tok=token("bob")) as bob:
        for ws in (alice, bob):
            await subscribe(ws, "broadcast:lobby")
        await subscribe(alice, "presence:room")
        assert (await recv(alice))["event"] == "sync"
        await send(bob, type="broadcast", channel="broadcast:lobby", payload={"n": 1})
        assert (await recv(alice))["payload"] == {"n": 1}
        await send(bob, type="subscribe", channel="nope:x")
        assert (await recv(bob))["code"] == "INVALID_CHANNEL"

        code, _, body = await http_get(server, "/api/stats", {"Authorization": f"Bearer {SERVICE}"})
        metrics = samples((await http_get(server, "/metrics"))[2])
        stats = orjson.loads(body)
        assert code == 200
        assert stats["connections"] == metrics["fluxrt_connections"] == 2
        assert stats["max_connections"] == metrics["fluxrt_connections_limit"]
        assert stats["subscriptions"] == {
            kind: metrics[f'fluxrt_subscriptions{{kind="{kind}"}}'] for kind in ("table", "presence", "broadcast")
        }
        assert stats["subscriptions"] == {"table": 0, "presence": 1, "broadcast": 2}
        assert stats["messages"]["in_total"] == metrics["fluxrt_messages_in_total"] > 0
        assert stats["messages"]["out_total"] == metrics["fluxrt_messages_out_total"] > 0
        assert stats["errors"]["total"] == metrics['fluxrt_errors_total{code="INVALID_CHANNEL"}'] == 1
        assert stats["errors"]["by_code"] == {"INVALID_CHANNEL": 1}
        assert stats["slow_consumer_closes"]["total"] == metrics["fluxrt_slow_consumer_closes_total"] == 0
        assert stats["top_channels"] == [
            {"channel": "broadcast:lobby", "subscribers": 2},
            {"channel": "presence:room", "subscribers": 1},
        ]
        assert (stats["database"], stats["cluster"], stats["changefeed_lag_s"]) == ("not_configured", None, None)
        assert stats["node"]["status"] == "ok"
        # The sampler took its first sample when the server started.
        assert len(stats["samples"]["t"]) >= 1

        server.draining = True
        code, _, body = await http_get(server, "/api/stats", {"Authorization": f"Bearer {SERVICE}"})
        assert (code, orjson.loads(body)["node"]["status"]) == (200, "draining")
        assert (await http_get(server, "/api/presence?channel=presence:room", {"Authorization": f"Bearer {SERVICE}"}))[
            0
        ] == 503
        server.draining = False
