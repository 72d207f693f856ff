"""Token attacks over the wire, one row each: the attack, and fluxrt's documented answer (docs/security.md, "Tokens").

The table runs against a server configured as a production deployment with an identity provider would be: RS256
only (a public key file, no HS secret), `aud` and `iss` required. Every attack comes with a control that the same
server accepts the honest token. Verifier-level cases live in tests/test_auth.py and the handshake's own cases
(garbage, missing `exp`, HS512 not allowed) in tests/test_connection.py; they are not repeated here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from wsproto.events import CloseConnection, Message

from ..support.clients import connect as ws_connect
from ..support.clients import raw_connect, request, subscribe
from ..support.config import token
from ..support.database import users_table
from ..support.servers import start

AUDIENCE = "fluxrt"
ISSUER = "https://auth.example"
BIG = 100 * 1024


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@attrs.frozen
class Keys:
    issuer: rsa.RSAPrivateKey
    attacker: rsa.RSAPrivateKey
    public_file: Path
    attacker_public_file: Path
    """the attacker's public key, in a file the server could open if it followed a `kid`"""
    jwks_url: str
    """a URL the attacker serves; the test fails if the server ever connects to it"""

    def claims(self, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 3600, **extra}

    def honest(self, headers: dict[str, Any] | None = None, **extra: Any) -> str:
        return jwt.encode(self.claims(**extra), self.issuer, algorithm="RS256", headers=headers)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    return tuple(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))


@pytest.fixture
async def attacker_url(nursery: trio.Nursery) -> tuple[str, list[str]]:
    """A listener serving nothing but counting connections: where `kid`, `jku` and `x5u` point."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    contacted: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        contacted.append("connection")
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, handler, listeners)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/.well-known/jwks.json", contacted


@pytest.fixture
async def rs256(start_server, tmp_path, rsa_keys, attacker_url):
    issuer, attacker = rsa_keys
    public_file = tmp_path / "issuer.pem"
    public_file.write_bytes(_pem_public(issuer))
    attacker_file = tmp_path / "attacker.pem"
    attacker_file.write_bytes(_pem_public(attacker))
    server = await start_server(
        auth={
            "jwt_secret": None,
            "jwt_public_key_file": str(public_file),
            "algorithms": ("RS256",),
            "audience": AUDIENCE,
            "issuer": ISSUER,
        }
    )
    return server, Keys(issuer, attacker, public_file, attacker_file, attacker_url[0])


def _alg_none(k: Keys) -> str:
    return f"{_b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{_b64(orjson.dumps(k.claims()))}."


def _hs256_with_public_key(k: Keys) -> str:
    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(orjson.dumps(k.claims()))
    signature = hmac.new(k.public_file.read_bytes(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


def _attacker(k: Keys, headers: dict[str, Any] | None = None, **extra: Any) -> str:
    return jwt.encode(k.claims(**extra), k.attacker, algorithm="RS256", headers=headers)


REFUSED: dict[str, Callable[[Keys], str]] = {
    "alg_none": _alg_none,
    "wrong_key": lambda k: _attacker(k),
    "hs256_signed_with_the_rsa_public_key": _hs256_with_public_key,
    "expired": lambda k: k.honest(exp=int(time.time()) - 3600),
    "nbf_ahead": lambda k: k.honest(nbf=int(time.time()) + 3600),
    "wrong_aud": lambda k: k.honest(aud="another-service"),
    "no_aud": lambda k: jwt.encode({**k.claims(), "aud": None}, k.issuer, algorithm="RS256"),
    "wrong_iss": lambda k: k.honest(iss="https://evil.example"),
    # The header names the attacker's key; following it would make the attacker's signature valid.
    "kid_naming_a_file": lambda k: _attacker(k, {"kid": str(k.attacker_public_file)}),
    "kid_naming_a_relative_path": lambda k: _attacker(k, {"kid": "../../../../../../dev/null"}),
    "kid_naming_a_url": lambda k: _attacker(k, {"kid": k.jwks_url}),
    "jku_and_x5u_naming_a_url": lambda k: _attacker(k, {"jku": k.jwks_url, "x5u": k.jwks_url}),
}


@pytest.mark.parametrize("attack", sorted(REFUSED))
async def test_forged_tokens_are_unauthorized_4001_and_the_honest_one_is_not(rs256, attacker_url, attack):
    server, keys = rs256
    client = await raw_connect(server, query=f"token={REFUSED[attack](keys)}")
    assert client.rejected is None, "the upgrade completes so that browsers can read the reason"
    assert await client.next_message() == {
        "type": "error",
        "code": "UNAUTHORIZED",
        "message": "Invalid or expired token",
    }
    assert await client.close_code() == 4001
    # Control: the same server takes an honest token, with the same header when the attack had one.
    headers = jwt.get_unverified_header(REFUSED[attack](keys))
    honest_headers = {k: v for k, v in headers.items() if k in ("kid", "jku", "x5u")}
    async with ws_connect(server, tok=keys.honest(honest_headers or None)) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}
    # Nothing was fetched from where the token pointed.
    assert attacker_url[1] == []


# ---- a token too large for the request head ------------------------------------------------------------------


def _padded(keys: Keys, size: int) -> str:
    return keys.honest(pad="x" * size)


async def _raw_http(port: int, request_head: bytes) -> bytes:
    """Send a request head and read the answer until the server closes; a reset after the answer is fine."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        # The server may answer and close before reading it all; what it answered is still read.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(request_head)
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


def _upgrade_head(target: str, headers: list[tuple[str, str]] = ()) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("where", ["query", "authorization"])
async def test_a_100_kb_token_is_refused_431_before_the_upgrade(rs256, where):
    server, keys = rs256
    big = _padded(keys, BIG)
    assert len(big) > BIG
    if where == "query":
        head = _upgrade_head(f"/realtime?token={big}")
    else:
        head = _upgrade_head("/realtime", [("Authorization", f"Bearer {big}")])
    answer = await _raw_http(server.port, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "bad_request"
    # Control: a large but fitting token (claims of 8 KiB) is verified as usual.
    async with ws_connect(server, tok=_padded(keys, 8 * 1024)) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}


# ---- two tokens in one request -------------------------------------------------------------------------------


async def test_different_tokens_in_the_query_and_the_header_are_refused_400(rs256):
    server, keys = rs256
    honest, other = keys.honest(), keys.honest(sub="bob")
    answer = await _raw_http(
        server.port, _upgrade_head(f"/realtime?token={honest}", [("Authorization", f"Bearer {other}")])
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "ambiguous_token"
    # Even when one of them is a forgery that would fail: fluxrt does not try them in turn.
    answer = await _raw_http(server.port, _upgrade_head(f"/realtime?token={honest}&token={_alg_none(keys)}"))
    assert answer.startswith(b"HTTP/1.1 400 ")
    # Control: the same token in both places is one token.
    async with ws_connect(server, tok=honest, headers=[("Authorization", f"Bearer {honest}")]) as ws:
        assert await request(ws, type="ping") == {"type": "pong"}


# ---- roles fluxrt may not assume -----------------------------------------------------------------------------

HOOK = """
CREATE FUNCTION realtime.authorize(channel text, action text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT current_user = '{privileged}' OR channel NOT LIKE '%:staff-%'
$$;
"""


@pytest.mark.parametrize("role", ["postgres", "service_role"])
async def test_a_role_not_in_auth_roles_opens_but_is_forbidden_tables_and_never_runs_a_check(start_server, db, role):
    # The authorizer login may become `privileged` (an operator's grant): if fluxrt ever ran a check as the
    # token's role, the hook below would say yes to the staff channel.
    privileged = f"fluxrt_privileged_{db.name}"[:63]
    db.sql(f"CREATE ROLE {privileged} NOLOGIN; GRANT {privileged} TO fluxrt_authorizer")
    try:
        db.sql(HOOK.format(privileged=privileged))
        users_table(db)
        server = await start(start_server, db)
        attacked = privileged if role == "service_role" else role
        async with ws_connect(server, tok=token("mallory", role=attacked)) as ws:
            assert await request(ws, type="ping") == {"type": "pong"}
            reply = await request(ws, type="subscribe", channel="table:public.users", ref="t")
            assert reply["code"] == "FORBIDDEN" and reply["ref"] == "t"
            assert f"role {attacked!r} may not be assumed by fluxrt" in reply["message"]
            assert "auth.roles" in reply["message"]
            reply = await request(ws, type="subscribe", channel="broadcast:staff-room", ref="b")
            assert reply["code"] == "FORBIDDEN" and "may not be assumed" in reply["message"], reply
            assert "realtime.authorize" not in reply["message"]
        # Control: an allowed role is checked by the hook, and the hook is what refuses it.
        async with ws_connect(server, tok=token("alice")) as ws:
            await subscribe(ws, "table:public.users")
            reply = await request(ws, type="subscribe", channel="broadcast:staff-room")
            assert reply["code"] == "FORBIDDEN" and "realtime.authorize does not allow" in reply["message"]
            await subscribe(ws, "broadcast:lobby")
    finally:
        db.sql(f"DROP FUNCTION IF EXISTS realtime.authorize(text, text); DROP OWNED BY {privileged}")
        db.sql(f"DROP ROLE IF EXISTS {privileged}")


# ---- a token that expires while it is being used -------------------------------------------------------------


async def test_a_token_expiring_during_subscribes_closes_4001_and_no_data_follows(start_server, db, nursery):
    users_table(db)
    server = await start(start_server, db, auth={"leeway": 0.001})
    exp = int(time.time()) + 2
    client = await raw_connect(server, query=f"token={token('alice', exp=exp)}")
    client.send(type="subscribe", channel="table:public.users", ref="first")
    assert (await client.next_message())["status"] == "subscribed"

    async def write() -> None:
        n = 0
        while time.time() < exp + 1:
            n += 1
            await db.execute("INSERT INTO users (id, name) VALUES ($1, $2)", n, repr(time.time()))
            await trio.sleep(0.02)

    nursery.start_soon(write)
    # Subscribe again and again across the expiry, so that a check is under way when the token runs out.
    received: list[Any] = []
    closed_at = None
    n = 0
    with trio.fail_after(exp - time.time() + 5):
        while closed_at is None:
            n += 1
            with contextlib.suppress(OSError):
                client.send(type="subscribe", channel=f"broadcast:b{n}", ref=str(n))
            with trio.move_on_after(0.02):
                while True:
                    event = await client.next_event(timeout=10)
                    if isinstance(event, CloseConnection):
                        closed_at = time.time()
                        code = event.code
                        break
                    assert isinstance(event, Message)
                    received.append((time.time(), orjson.loads(event.data)))
    assert code == 4001
    assert exp - 0.2 <= closed_at <= exp + 1.0
    errors = [m for _, m in received if m["type"] == "error"]
    assert errors and errors[-1] == {"type": "error", "code": "UNAUTHORIZED", "message": "token expired"}
    changes = [(at, m) for at, m in received if m.get("channel") == "table:public.users" and m["type"] == "broadcast"]
    assert changes, "rows written before the expiry were delivered"
    # Every row delivered was written before the token ran out (and its leeway, 1 ms).
    for _, m in changes:
        assert float(m["payload"]["record"]["name"]) <= exp + 0.01, m
    # After the close frame nothing else arrives: the socket only ends.
    with trio.fail_after(5):
        while True:
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(client.sock)
                continue
            except OSError:
                break
            if not data:
                break
            client.ws.receive_data(data)
            assert not [e for e in client.ws.events() if isinstance(e, Message)]
    client.close()
