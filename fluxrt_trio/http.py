"""The HTTP side of the port: routing a request to the WebSocket upgrade, `/health`, `/metrics`, the status page
(status.py), the API for backends (api.py), or a refusal.

`route` is pure: it takes the parsed request and returns what to do; the connection carries it out with h11.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import urllib.parse
from collections.abc import Iterable
from http import HTTPStatus

import attrs
import h11
import orjson

from . import api, status
from .protocol.messages import ErrorCode

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@attrs.frozen(slots=True)
class Refuse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    endpoint: str | None = None
    """the API endpoint refused (counted in fluxrt_api_requests_total), None for other paths"""


@attrs.frozen(slots=True)
class Admin:
    endpoint: str
    """`health` or `metrics`"""


@attrs.frozen(slots=True)
class StatusPage:
    """Serve the status page: whole (`not_modified` False) or as 304 to a browser that holds this version."""

    page: status.Page
    not_modified: bool


@attrs.frozen(slots=True)
class Upgrade:
    accept: str
    """the Sec-WebSocket-Accept value"""
    token: str | None
    """from `?token=` or `Authorization: Bearer`"""


def api_refusal(error: api.ApiError, endpoint: str) -> Refuse:
    """An API error as the response that carries it."""
    return Refuse(error.status, error.body(), headers=error.headers, endpoint=endpoint)


def _json_error(status: int, error: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Refuse:
    return Refuse(status, orjson.dumps({"error": error, "message": message}), headers=headers)


_CERTIFICATE_REQUIRED = (
    "%s needs a client certificate signed by the CA in server.tls_client_ca_file: connect with one "
    "(curl --cert client.pem --key client-key.pem)"
)


def _certificate_required(path: str) -> Refuse:
    return _json_error(403, "client_certificate_required", _CERTIFICATE_REQUIRED % path)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    """`server.trusted_proxies` as networks (the configuration has validated them)."""
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def is_trusted(host: str, trusted: tuple[Network, ...]) -> bool:
    """Whether `host` (the socket's peer address) is one of the trusted proxies."""
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def client_address(headers: Iterable[tuple[bytes, bytes]], peer: str, trusted: tuple[Network, ...]) -> str:
    """The address a request comes from: `peer` (the socket's), unless it is a trusted proxy; then the rightmost
    X-Forwarded-For entry that is not itself a trusted proxy (entries to its left are the client's own word), or
    `peer` when there is none or it is not an IP address."""
    if not is_trusted(peer, trusted):
        return peer
    hops = [
        hop.strip() for key, value in headers if key == b"x-forwarded-for" for hop in value.decode("latin-1").split(",")
    ]
    for hop in reversed(hops):
        if is_trusted(hop, trusted):
            continue
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:
            return peer
    return peer


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode("ascii")


def route(
    request: h11.Request,
    *,
    ws_path: str,
    realtime_enabled: bool,
    draining: bool,
    allowed_origins: tuple[str, ...],
    admin_allowed: bool = True,
) -> Refuse | Admin | StatusPage | Upgrade | api.ApiRequest:
    """Decide what to do with one HTTP request. `request.headers` are lower-cased by h11.

    `admin_allowed` False (server.tls_client_ca_file is set and the client showed no certificate) refuses /metrics
    and /api with 403; /health, the status page and the WebSocket endpoint need no certificate.
    """
    split = urllib.parse.urlsplit(request.target.decode("latin-1"))
    path = split.path
    method = request.method
    if path in ("/health", "/metrics"):
        if method not in (b"GET", b"HEAD"):
            return _json_error(405, "method_not_allowed", f"{path} answers GET", (("allow", "GET, HEAD"),))
        if path == "/metrics" and not admin_allowed:
            return _certificate_required(path)
        return Admin(path[1:])
    if path in status.PAGE_PATHS and path != ws_path:
        if method not in (b"GET", b"HEAD"):
            return _json_error(405, "method_not_allowed", f"{path} answers GET", (("allow", "GET, HEAD"),))
        page = status.page()
        return StatusPage(page, status.not_modified(_header(list(request.headers), b"if-none-match"), page.etag))
    if api.is_api_path(path):
        if not admin_allowed:
            return api_refusal(api.ApiError(403, ErrorCode.FORBIDDEN, _CERTIFICATE_REQUIRED % path), api.PATHS[path][0])
        decision = api.route(method, path, split.query, request.headers, draining=draining, enabled=realtime_enabled)
        return api_refusal(decision, api.PATHS[path][0]) if isinstance(decision, api.ApiError) else decision
    if path != ws_path:
        return _json_error(404, "not_found", f"no such path; the WebSocket endpoint is {ws_path}")
    if not realtime_enabled:
        return _json_error(503, "realtime_disabled", "realtime is disabled on this server (realtime.enabled: false)")
    if draining:
        return _json_error(503, "shutting_down", "the server is shutting down; reconnect to another node")
    headers = list(request.headers)
    upgrade = (_header(headers, b"upgrade") or "").lower()
    connection = {t.strip() for t in (_header(headers, b"connection") or "").lower().split(",")}
    if method != b"GET" or upgrade != "websocket" or "upgrade" not in connection:
        return _json_error(
            426,
            "upgrade_required",
            f"{ws_path} speaks WebSocket: connect with ws:// or wss:// (GET with Upgrade: websocket)",
            (("upgrade", "websocket"), ("sec-websocket-version", "13")),
        )
    if _header(headers, b"sec-websocket-version") != "13":
        return _json_error(
            426, "unsupported_version", "only WebSocket version 13 is supported", (("sec-websocket-version", "13"),)
        )
    key = _header(headers, b"sec-websocket-key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except ValueError:
        return _json_error(400, "bad_request", "Sec-WebSocket-Key must be 16 random bytes in base64")
    origin = _header(headers, b"origin")
    if allowed_origins and origin not in allowed_origins:
        return _json_error(403, "origin_not_allowed", f"origin {origin!r} is not in server.allowed_origins")
    tokens = set(urllib.parse.parse_qs(split.query).get("token", ()))
    for name, value in headers:
        scheme, _, credentials = value.decode("latin-1").partition(" ")
        if name == b"authorization" and scheme.lower() == "bearer" and credentials.strip():
            tokens.add(credentials.strip())
    if len(tokens) > 1:
        # Which one a proxy in front checked is unknowable: refuse rather than pick.
        return _json_error(
            400, "ambiguous_token", "more than one token given (?token= and Authorization: Bearer); send exactly one"
        )
    return Upgrade(accept_key(key), tokens.pop() if tokens else None)


def response_bytes(
    exchange: h11.Connection,
    status: int,
    body: bytes,
    content_type: str,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    head: bool = False,
    cache_control: str = "no-store",
) -> bytes:
    """A complete response that closes the connection afterwards; a 304 carries no body (RFC 9110 15.4.5)."""
    all_headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
        ("cache-control", cache_control),
        *headers,
    ]
    if status == 304:
        all_headers = all_headers[2:]
        head = True
    data = exchange.send(h11.Response(status_code=status, headers=all_headers, reason=HTTPStatus(status).phrase)) or b""
    if not head:
        data += exchange.send(h11.Data(data=body)) or b""
    data += exchange.send(h11.EndOfMessage()) or b""
    return data


def switching_protocols(accept: str) -> bytes:
    """The 101 response completing a WebSocket upgrade (no extensions, no subprotocol).

    Written out rather than through h11 (which took ~19 µs a handshake validating three constant headers): nothing
    of the HTTP exchange is used after it, and `accept` is base64 (`accept_key`), so it needs no checking.
    """
    return _SWITCHING_PROTOCOLS % accept.encode("ascii")


_SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: %s\r\n\r\n"
)
