"""http.route on h11.Request objects: admin endpoints, refusals before the upgrade, and the upgrade itself."""

from __future__ import annotations

import base64
import hashlib

import h11
import orjson
import pytest

from fluxrt_trio.http import Admin, Refuse, Upgrade, accept_key, route

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

WS_HEADERS = [
    ("host", "localhost:8080"),
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", RFC_KEY),
]


def request(
    target: str = "/realtime", headers: list[tuple[str, str]] | None = None, method: str = "GET"
) -> h11.Request:
    return h11.Request(method=method, target=target, headers=WS_HEADERS if headers is None else headers)


def go(
    req: h11.Request,
    *,
    ws_path: str = "/realtime",
    realtime_enabled: bool = True,
    draining: bool = False,
    allowed_origins: tuple[str, ...] = (),
) -> Refuse | Admin | Upgrade:
    return route(
        req,
        ws_path=ws_path,
        realtime_enabled=realtime_enabled,
        draining=draining,
        allowed_origins=allowed_origins,
    )


def refused(result: Refuse | Admin | Upgrade, status: int) -> dict[str, str]:
    assert isinstance(result, Refuse), result
    assert result.status == status
    assert result.content_type == "application/json"
    body = orjson.loads(result.body)
    assert set(body) == {"error", "message"}
    return body


PLAIN = [("host", "localhost:8080")]


# ---- accept key ----------------------------------------------------------------------------------------------


def test_accept_key_matches_rfc_6455():
    assert accept_key(RFC_KEY) == RFC_ACCEPT


def test_accept_key_for_another_key():
    key = base64.b64encode(bytes(range(16))).decode()
    expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert accept_key(key) == expected.decode()


# ---- admin endpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "endpoint"), [("/health", "health"), ("/metrics", "metrics")])
def test_admin_endpoints(target, endpoint):
    assert go(request(target, PLAIN)) == Admin(endpoint)
    assert go(request(target + "?verbose=1", PLAIN)) == Admin(endpoint)
    assert go(request(target, PLAIN, method="HEAD")) == Admin(endpoint)


@pytest.mark.parametrize("target", ["/health", "/metrics"])
def test_admin_endpoints_answer_even_when_realtime_is_disabled_or_draining(target):
    endpoint = target[1:]
    assert go(request(target, PLAIN), realtime_enabled=False) == Admin(endpoint)
    assert go(request(target, PLAIN), draining=True) == Admin(endpoint)
    assert go(request(target, PLAIN), allowed_origins=("https://app.example.com",)) == Admin(endpoint)


def test_admin_endpoints_answer_only_get():
    result = go(request("/health", [*PLAIN, ("content-length", "0")], method="POST"))
    refused(result, 405)
    assert isinstance(result, Refuse)
    assert ("allow", "GET, HEAD") in result.headers


# ---- paths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["/status/", "/index.html", "/realtime/", "/Realtime", "/realtime/x", "/healthz", "/favicon.ico", "/ws"]
)
def test_other_paths_are_404(target):
    body = refused(go(request(target)), 404)
    assert body["error"] == "not_found"
    assert "/realtime" in body["message"]


def test_configured_ws_path():
    assert isinstance(go(request("/socket"), ws_path="/socket"), Upgrade)
    refused(go(request("/realtime"), ws_path="/socket"), 404)


# ---- refusals on the WebSocket path --------------------------------------------------------------------------


def test_plain_get_without_upgrade_is_426():
    result = go(request("/realtime", PLAIN))
    body = refused(result, 426)
    assert body["error"] == "upgrade_required"
    assert isinstance(result, Refuse)
    assert ("upgrade", "websocket") in result.headers


@pytest.mark.parametrize(
    "headers",
    [
        [h for h in WS_HEADERS if h[0] != "upgrade"],
        [h for h in WS_HEADERS if h[0] != "connection"],
        [("upgrade", "h2c") if h[0] == "upgrade" else h for h in WS_HEADERS],
        [("connection", "keep-alive") if h[0] == "connection" else h for h in WS_HEADERS],
    ],
)
def test_incomplete_upgrade_is_426(headers):
    refused(go(request("/realtime", headers)), 426)


def test_post_to_the_ws_path_is_426():
    refused(go(request("/realtime", [*WS_HEADERS, ("content-length", "0")], method="POST")), 426)


def test_unsupported_websocket_version_is_426():
    headers = [("sec-websocket-version", "8") if h[0] == "sec-websocket-version" else h for h in WS_HEADERS]
    result = go(request("/realtime", headers))
    refused(result, 426)
    assert isinstance(result, Refuse)
    assert ("sec-websocket-version", "13") in result.headers


@pytest.mark.parametrize("key", [None, "short", "not base64!!", base64.b64encode(b"x" * 15).decode()])
def test_bad_websocket_key_is_400(key):
    headers = [h for h in WS_HEADERS if h[0] != "sec-websocket-key"]
    if key is not None:
        headers.append(("sec-websocket-key", key))
    refused(go(request("/realtime", headers)), 400)


def test_realtime_disabled_is_503_saying_so():
    body = refused(go(request(), realtime_enabled=False), 503)
    assert body["error"] == "realtime_disabled"
    assert "disabled" in body["message"]
    # Also without any upgrade headers.
    refused(go(request("/realtime", PLAIN), realtime_enabled=False), 503)


def test_draining_is_503():
    body = refused(go(request(), draining=True), 503)
    assert body["error"] == "shutting_down"
    refused(go(request("/realtime", PLAIN), draining=True), 503)


def test_origin_refused_with_403_when_a_list_is_configured():
    allowed = ("https://app.example.com", "https://admin.example.com")
    body = refused(
        go(request("/realtime", [*WS_HEADERS, ("origin", "https://evil.example.com")]), allowed_origins=allowed), 403
    )
    assert body["error"] == "origin_not_allowed"
    assert "https://evil.example.com" in body["message"]
    # No Origin header at all is refused too when a list is configured.
    refused(go(request(), allowed_origins=allowed), 403)
    # An origin differing only in scheme or port is another origin.
    refused(go(request("/realtime", [*WS_HEADERS, ("origin", "http://app.example.com")]), allowed_origins=allowed), 403)
    refused(
        go(request("/realtime", [*WS_HEADERS, ("origin", "https://app.example.com:8443")]), allowed_origins=allowed),
        403,
    )


def test_allowed_origin_is_upgraded():
    allowed = ("https://app.example.com", "https://admin.example.com")
    for origin in allowed:
        result = go(request("/realtime", [*WS_HEADERS, ("origin", origin)]), allowed_origins=allowed)
        assert result == Upgrade(RFC_ACCEPT, None)


def test_any_origin_when_no_list_is_configured():
    assert go(request("/realtime", [*WS_HEADERS, ("origin", "https://anywhere.example")])) == Upgrade(RFC_ACCEPT, None)


# ---- the upgrade ---------------------------------------------------------------------------------------------


def test_upgrade_without_token():
    assert go(request()) == Upgrade(RFC_ACCEPT, None)


def test_header_values_are_case_insensitive():
    headers = [
        ("host", "localhost"),
        ("upgrade", "WebSocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", RFC_KEY),
    ]
    assert go(request("/realtime", headers)) == Upgrade(RFC_ACCEPT, None)


def test_token_from_the_query_string():
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl_-"
    assert go(request(f"/realtime?token={token}")) == Upgrade(RFC_ACCEPT, token)
    assert go(request(f"/realtime?vsn=2&token={token}&x=1")) == Upgrade(RFC_ACCEPT, token)


def test_token_from_the_authorization_header():
    assert go(request("/realtime", [*WS_HEADERS, ("authorization", "Bearer abc.def.ghi")])) == Upgrade(
        RFC_ACCEPT, "abc.def.ghi"
    )
    assert go(request("/realtime", [*WS_HEADERS, ("authorization", "bearer abc.def.ghi")])).token == "abc.def.ghi"


@pytest.mark.parametrize("authorization", ["Basic YWxpY2U6cHc=", "Bearer", "Token abc.def.ghi", "abc.def.ghi", ""])
def test_other_authorization_headers_give_no_token(authorization):
    assert go(request("/realtime", [*WS_HEADERS, ("authorization", authorization)])) == Upgrade(RFC_ACCEPT, None)


@pytest.mark.parametrize(
    ("target", "authorizations"),
    [
        ("/realtime?token=from-query", ["Bearer from-header"]),
        ("/realtime?token=one&token=two", []),
        ("/realtime", ["Bearer one", "Bearer two"]),
    ],
)
def test_two_different_tokens_are_refused_400_not_picked_from(target, authorizations):
    result = go(request(target, [*WS_HEADERS, *(("authorization", a) for a in authorizations)]))
    assert isinstance(result, Refuse) and result.status == 400
    assert orjson.loads(result.body)["error"] == "ambiguous_token"


def test_the_same_token_in_the_query_and_the_header_is_one_token():
    result = go(request("/realtime?token=same", [*WS_HEADERS, ("authorization", "Bearer same")]))
    assert result == Upgrade(RFC_ACCEPT, "same")
