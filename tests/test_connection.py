"""Connecting: the HTTP side of the port, tokens, admission, origins, and the close codes of the handshake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed, ConnectionRejected

from .support.clients import connect, http_get, raw_connect, recv, request, send, subscribe
from .support.config import SECRET, token


async def test_health_reports_status_connections_uptime_and_database(start_server):
    server = await start_server()
    async with connect(server):
        status, headers, body = await http_get(server, "/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    health = orjson.loads(body)
    assert health["status"] == "ok"
    assert health["connections"] == 1
    assert health["uptime_s"] >= 0
    assert health["database"] == "not_configured"


async def test_metrics_are_prometheus_text_prefixed_fluxrt_or_process(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:a")
        await subscribe(ws, "presence:b")
        await send(ws, type="nonsense")
        await recv(ws)
        status, headers, body = await http_get(server, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    # fluxrt's own metrics, and the standard process metrics of Prometheus clients.
    assert samples and all(line.startswith(("fluxrt_", "process_")) for line in samples)
    assert "fluxrt_connections 1.0" in text
    assert 'fluxrt_subscriptions{kind="broadcast"} 1.0' in text
    assert 'fluxrt_subscriptions{kind="presence"} 1.0' in text
    assert 'fluxrt_errors_total{code="INVALID_MESSAGE"} 1.0' in text
    assert "fluxrt_messages_in_total 3.0" in text
    for name in ("fluxrt_messages_out_total", "fluxrt_closes_total", "fluxrt_slow_consumer_closes_total"):
        assert name in text


async def test_other_paths_are_404(start_server):
    server = await start_server()
    status, _, body = await http_get(server, "/nope")
    assert status == 404
    assert b"/realtime" in body
    with pytest.raises(ConnectionRejected) as info:
        async with connect(server, path="/elsewhere"):
            pass
    assert info.value.status_code == 404


async def test_configured_path_serves_websocket(start_server):
    server = await start_server(server={"path": "/rt"})
    async with connect(server) as ws:
        assert (await request(ws, type="ping")) == {"type": "pong"}
    assert (await http_get(server, "/realtime"))[0] == 404


async def test_plain_get_on_the_websocket_path_asks_for_an_upgrade(start_server):
    server = await start_server()
    status, headers, body = await http_get(server, "/realtime")
    assert status == 426
    assert headers["upgrade"] == "websocket"
    assert b"WebSocket" in body


async def test_anonymous_connection_gets_the_anon_identity(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await subscribe(ws, "presence:room")
        await recv(ws)  # sync
        await send(ws, type="presence", channel="presence:room", event="track", payload={"x": 1})
        diff = await recv(ws)
    (key,) = diff["payload"]["joins"]
    assert key.startswith("anon:")


async def test_anonymous_refused_when_disabled(start_server):
    server = await start_server(auth={"allow_anonymous": False})
    client = await raw_connect(server)
    assert await client.next_message() == {
        "type": "error",
        "code": "UNAUTHORIZED",
        "message": "Invalid or expired token",
    }
    assert await client.close_code() == 4001


@pytest.mark.parametrize("how", ["query", "bearer"])
async def test_token_from_query_or_bearer_header_sets_the_identity(start_server, how):
    server = await start_server()
    tok = token("alice")
    headers = [("Authorization", f"Bearer {tok}")] if how == "bearer" else None
    async with connect(server, tok=tok if how == "query" else None, headers=headers) as ws:
        await subscribe(ws, "presence:room")
        await recv(ws)
        await send(ws, type="presence", channel="presence:room", event="track", payload={})
        diff = await recv(ws)
    assert list(diff["payload"]["joins"]) == ["alice"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(claims: dict, key: str | bytes = SECRET, alg: str = "HS256", headers: dict | None = None) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _unsigned(claims: dict) -> str:
    return f"{_b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{_b64(orjson.dumps(claims))}."


NOW = int(time.time())
BAD_TOKENS = {
    "garbage": "not-a-jwt",
    "alg_none": _unsigned({"sub": "mallory", "exp": NOW + 3600}),
    "bad_signature": _forge({"sub": "mallory", "exp": NOW + 3600}, key="wrong-secret-" + "y" * 64),
    "expired": _forge({"sub": "alice", "exp": NOW - 3600}),
    "missing_exp": _forge({"sub": "alice"}),
    "future_nbf": _forge({"sub": "alice", "exp": NOW + 7200, "nbf": NOW + 3600}),
    "hs512_not_allowed": _forge({"sub": "alice", "exp": NOW + 3600}, alg="HS512"),
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_get_unauthorized_then_4001(start_server, name):
    server = await start_server()
    client = await raw_connect(server, query=f"token={BAD_TOKENS[name]}")
    assert client.rejected is None, "the upgrade completes so that browsers can read the reason"
    assert await client.next_message() == {
        "type": "error",
        "code": "UNAUTHORIZED",
        "message": "Invalid or expired token",
    }
    assert await client.close_code() == 4001


async def test_audience_and_issuer_are_checked_when_configured(start_server):
    server = await start_server(auth={"audience": "fluxrt", "issuer": "https://auth.example"})
    good = token("alice", aud="fluxrt", iss="https://auth.example")
    async with connect(server, tok=good) as ws:
        assert (await request(ws, type="ping")) == {"type": "pong"}
    for bad in (token("alice", aud="other", iss="https://auth.example"), token("alice", aud="fluxrt")):
        client = await raw_connect(server, query=f"token={bad}")
        assert (await client.next_message())["code"] == "UNAUTHORIZED"
        assert await client.close_code() == 4001


async def test_node_connection_limit_answers_rate_limited_4029(start_server):
    server = await start_server(realtime={"max_connections": 2, "max_connections_per_user": 2, "anonymous_share": 1.0})
    async with connect(server), connect(server):
        client = await raw_connect(server)
        message = await client.next_message()
        assert message["code"] == "RATE_LIMITED"
        assert "max_connections" in message["message"]
        assert await client.close_code() == 4029
    # Closed connections give their places back.
    async with connect(server) as ws:
        assert (await request(ws, type="ping"))["type"] == "pong"


async def test_per_user_limit_counts_users_not_anonymous(start_server):
    server = await start_server(realtime={"max_connections_per_user": 2})
    tok = token("bob")
    async with connect(server, tok=tok), connect(server, tok=tok):
        client = await raw_connect(server, query=f"token={tok}")
        assert (await client.next_message())["code"] == "RATE_LIMITED"
        assert await client.close_code() == 4029
        # Another user, and anonymous connections, are not affected.
        async with connect(server, tok=token("carol")), connect(server), connect(server), connect(server) as ws:
            assert (await request(ws, type="ping"))["type"] == "pong"


async def test_refused_origin_gets_403_before_upgrade(start_server):
    server = await start_server(server={"allowed_origins": ("https://app.example",)})
    with pytest.raises(ConnectionRejected) as info:
        async with connect(server, headers=[("Origin", "https://evil.example")]):
            pass
    assert info.value.status_code == 403
    async with connect(server, headers=[("Origin", "https://app.example")]) as ws:
        assert (await request(ws, type="ping"))["type"] == "pong"


async def test_realtime_disabled_answers_503_json_and_admin_endpoints_still_work(start_server):
    server = await start_server(realtime={"enabled": False})
    with pytest.raises(ConnectionRejected) as info:
        async with connect(server):
            pass
    assert info.value.status_code == 503
    assert b"realtime is disabled" in info.value.body
    assert orjson.loads(info.value.body)["error"] == "realtime_disabled"
    assert (await http_get(server, "/health"))[0] == 200
    assert (await http_get(server, "/metrics"))[0] == 200


async def test_token_expiring_mid_connection_closes_4001_on_time(start_server):
    server = await start_server(auth={"leeway": 0.001})
    lifetime = 1.5
    started = time.time()
    client = await raw_connect(server, query=f"token={token('alice', ttl=lifetime)}")
    # exp has one-second resolution: the deadline is the claim's second.
    exp = jwt.decode(token("alice", ttl=lifetime), options={"verify_signature": False})["exp"]
    message = await client.next_message(timeout=5)
    assert message == {"type": "error", "code": "UNAUTHORIZED", "message": "token expired"}
    closed_at = time.time()
    assert await client.close_code() == 4001
    assert exp - 0.2 <= closed_at <= exp + 0.5, (started, exp, closed_at)


async def test_auth_message_refreshes_the_token_before_expiry(start_server):
    server = await start_server(auth={"leeway": 0.001})
    client = await raw_connect(server, query=f"token={token('alice', ttl=1)}")
    client.send(type="auth", token=token("alice", ttl=3600), ref="r1")
    assert await client.next_message() == {"type": "ack", "status": "authorized", "ref": "r1"}
    with pytest.raises(trio.TooSlowError):
        await client.next_event(timeout=2.5)


async def test_auth_with_a_bad_token_keeps_the_old_identity(start_server):
    server = await start_server()
    async with connect(server, tok=token("alice")) as ws:
        reply = await request(ws, type="auth", token="garbage", ref="x")
        assert reply == {"type": "error", "code": "UNAUTHORIZED", "message": "Invalid or expired token", "ref": "x"}
        await subscribe(ws, "presence:room")
        await recv(ws)
        await send(ws, type="presence", channel="presence:room", event="track", payload={})
        assert list((await recv(ws))["payload"]["joins"]) == ["alice"]


async def test_auth_changing_user_moves_presence_and_the_per_user_count(start_server):
    server = await start_server(realtime={"max_connections_per_user": 1})
    async with connect(server) as ws:
        await subscribe(ws, "presence:room")
        await recv(ws)
        await send(ws, type="presence", channel="presence:room", event="track", payload={"s": 1})
        (anon,) = (await recv(ws))["payload"]["joins"]
        reply = await request(ws, type="auth", token=token("dave"))
        assert reply == {"type": "ack", "status": "authorized"}
        diffs = [await recv(ws), await recv(ws)]
        assert diffs[0]["payload"]["leaves"] == {anon: [{"ref": anon.removeprefix("anon:"), "state": {"s": 1}}]}
        assert list(diffs[1]["payload"]["joins"]) == ["dave"]
        assert server.admission.per_user["dave"] == 1
        # dave is now at his limit of one connection.
        client = await raw_connect(server, query=f"token={token('dave')}")
        assert (await client.next_message())["code"] == "RATE_LIMITED"
        # A second connection cannot become dave either, and keeps its identity.
        async with connect(server, tok=token("erin")) as other:
            reply = await request(other, type="auth", token=token("dave"), ref="2")
            assert reply["code"] == "RATE_LIMITED" and reply["ref"] == "2"
            assert server.admission.per_user["erin"] == 1


async def test_client_close_is_answered_with_1000(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await ws.aclose(code=1000, reason="bye")
        assert ws.closed.code == 1000
    with trio.fail_after(5):
        while server.connections:
            await trio.sleep(0.01)


async def test_dropped_socket_releases_the_connection(start_server):
    server = await start_server()
    client = await raw_connect(server)
    client.send(type="subscribe", channel="broadcast:x")
    assert (await client.next_message())["status"] == "subscribed"
    client.close()
    with trio.fail_after(5):
        while server.connections or server.hub.statistics().subscriptions["broadcast"]:
            await trio.sleep(0.01)


async def test_closed_connection_raises_for_the_client(start_server):
    server = await start_server(auth={"allow_anonymous": False})
    with pytest.raises(ConnectionClosed) as info:
        async with connect(server) as ws:
            assert (await recv(ws))["code"] == "UNAUTHORIZED"
            await ws.get_message()
    assert info.value.reason.code == 4001


async def test_algorithm_confusion_over_the_wire_is_refused(start_server, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    server = await start_server(auth={"jwt_secret": None, "jwt_public_key_file": str(key_file)})
    claims = {"sub": "mallory", "exp": int(time.time()) + 3600}
    # HMAC "signed" with the public key, which the attacker knows: must never verify.
    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(orjson.dumps(claims))
    signature = _b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    client = await raw_connect(server, query=f"token={header}.{body}.{signature}")
    assert (await client.next_message())["code"] == "UNAUTHORIZED"
    assert await client.close_code() == 4001
    # The real key pair works.
    good = jwt.encode({**claims, "sub": "alice"}, private, algorithm="RS256")
    async with connect(server, tok=good) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}
