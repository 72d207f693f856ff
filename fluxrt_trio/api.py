"""The HTTP API for backends: `POST /api/broadcast` and `GET /api/presence` (docs/protocol.md, "Broadcast from the
database and from backends"), and `GET /api/stats` for the status page (status.py; docs/operations.md).

Pure, like `http.route`: requests, bodies and times in; decisions, messages and response bodies out. The connection
carries them out (reads the body, publishes through the hub, writes the response).
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterable
from typing import Any

import attrs
import orjson

from .protocol.channels import ChannelError, ChannelKind, ChannelName, parse_channel
from .protocol.limits import TokenBucket
from .protocol.messages import ErrorCode
from .protocol.presence import Meta

BROADCAST = "/api/broadcast"
PRESENCE = "/api/presence"
STATS = "/api/stats"
PATHS = {BROADCAST: ("broadcast", "POST"), PRESENCE: ("presence", "GET"), STATS: ("stats", "GET")}
"""path -> (endpoint name, the method it answers)"""
MAX_BATCH = 100
"""messages in one `POST /api/broadcast`"""
ENVELOPE = 1024
"""bytes a request body may hold beyond its messages' own (the `messages` key, brackets, whitespace)"""
MAX_TRACKED_TOKENS = 10_000
"""rate-limit buckets kept before the full ones (tokens idle for a whole refill) are forgotten"""
_MESSAGE_KEYS = ("channel", "payload")


@attrs.frozen(slots=True)
class ApiError:
    """A refusal: the HTTP status, the WebSocket protocol's error code, and a message naming the problem and the
    fix."""

    status: int
    code: ErrorCode
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        """`{"error":{"code":CODE,"message":TEXT}}`."""
        return orjson.dumps({"error": {"code": self.code.value, "message": self.message}})


@attrs.frozen(slots=True)
class ApiRequest:
    """A request for an API endpoint, routed: what the connection does next."""

    endpoint: str
    """`broadcast` or `presence`"""
    token: str
    query: str
    content_length: int | None
    """the body's declared size; None without one (chunked, or no body)"""


@attrs.frozen(slots=True)
class Message:
    """One message of a `POST /api/broadcast`, validated."""

    channel: ChannelName
    payload: Any


def is_api_path(path: str) -> bool:
    """Whether `path` is one of the API's endpoints."""
    return path in PATHS


def route(
    method: bytes, path: str, query: str, headers: Iterable[tuple[bytes, bytes]], *, draining: bool, enabled: bool
) -> ApiRequest | ApiError:
    """Route a request for an API path (`is_api_path`): the method, draining, then the bearer token's presence.
    The token itself is verified by the caller. Stats are answered while draining or disabled too: that is when
    someone looks."""
    endpoint, allowed = PATHS[path]
    if method.decode("latin-1") != allowed:
        return ApiError(405, ErrorCode.INVALID_MESSAGE, f"{path} answers {allowed} only", (("allow", allowed),))
    if endpoint != "stats" and not enabled:
        return ApiError(503, ErrorCode.UNAVAILABLE, "realtime is disabled on this server (realtime.enabled: false)")
    if endpoint != "stats" and draining:
        return ApiError(503, ErrorCode.UNAVAILABLE, "the server is shutting down; send to another node")
    headers = list(headers)
    token = bearer_token(headers)
    if isinstance(token, ApiError):
        return token
    # h11 has refused a malformed or repeated Content-Length already.
    lengths = [int(value) for name, value in headers if name == b"content-length"]
    return ApiRequest(endpoint, token, query, lengths[0] if lengths else None)


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | ApiError:
    """The token of the one `Authorization: Bearer` header (h11 lower-cases names)."""
    values = [value.decode("latin-1") for name, value in headers if name == b"authorization"]
    if len(values) > 1:
        # Which one a proxy in front checked is unknowable: refuse rather than pick.
        return unauthorized("more than one Authorization header; send exactly one")
    scheme, _, credentials = values[0].partition(" ") if values else ("", "", "")
    if scheme.lower() != "bearer" or not credentials.strip():
        return unauthorized("send the token of a service role as Authorization: Bearer <JWT>")
    return credentials.strip()


def unauthorized(message: str) -> ApiError:
    """401 `UNAUTHORIZED`: no token, or one that does not verify (`message` says which)."""
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, (("www-authenticate", "Bearer"),))


def check_role(role: str, service_roles: tuple[str, ...]) -> ApiError | None:
    """403 unless `role` (a verified token's) is one of `auth.service_roles`."""
    if role in service_roles:
        return None
    allowed = ", ".join(service_roles) if service_roles else "none configured"
    return ApiError(
        403,
        ErrorCode.FORBIDDEN,
        f"role {role[:64]!r} may not use the API; it takes tokens of auth.service_roles ({allowed})",
    )


def max_body_size(max_message_size: int) -> int:
    """The largest request body read: a full batch of messages of the largest size, and the envelope."""
    return MAX_BATCH * (max_message_size + ENVELOPE) + ENVELOPE


def body_too_large(size: int, max_message_size: int) -> ApiError:
    """413 for a body larger than `max_body_size`, refused before (or while) it is read."""
    return ApiError(
        413,
        ErrorCode.INVALID_MESSAGE,
        f"request body of {size} bytes or more exceeds {max_body_size(max_message_size)} bytes "
        f"(at most {MAX_BATCH} messages of realtime.max_message_size = {max_message_size} bytes)",
    )


def parse_broadcast(body: bytes, max_message_size: int) -> list[Message] | ApiError:
    """The messages of a `POST /api/broadcast` body, every one valid, or the first problem found (then nothing of
    the request may be published).

    A body is `{"channel":C,"payload":P}` or `{"messages":[{"channel":C,"payload":P},...]}` with 1 to MAX_BATCH
    messages. `C` is a `broadcast:{topic}` channel; `P` any JSON value, as in a client broadcast. A message larger
    than `max_message_size` as compact JSON is 413; every other problem 400 `INVALID_MESSAGE` or `INVALID_CHANNEL`.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _invalid(f"body is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        return _invalid('body must be a JSON object: {"channel":C,"payload":P} or {"messages":[...]}')
    if "messages" in raw:
        if set(raw) != {"messages"}:
            return _invalid('give either "messages" or one message\'s "channel" and "payload", not both')
        items = raw["messages"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            return _invalid(f'"messages" must be an array of 1 to {MAX_BATCH} messages')
        where = [f"messages[{i}]: " for i in range(len(items))]
    else:
        items, where = [raw], [""]
    messages = []
    for item, prefix in zip(items, where, strict=True):
        message = _message(item, prefix, max_message_size)
        if isinstance(message, ApiError):
            return message
        messages.append(message)
    return messages


def _message(item: Any, prefix: str, max_message_size: int) -> Message | ApiError:
    if not isinstance(item, dict):
        return _invalid(f'{prefix}a message must be a JSON object {{"channel":C,"payload":P}}')
    unknown = sorted(set(item) - set(_MESSAGE_KEYS))
    if unknown:
        return _invalid(f"{prefix}unknown key {unknown[0][:64]!r}; a message has channel and payload")
    for key in _MESSAGE_KEYS:
        if key not in item:
            return _invalid(f"{prefix}missing {key!r}")
    try:
        channel = parse_channel(item["channel"])
    except ChannelError as exc:
        return ApiError(400, ErrorCode.INVALID_CHANNEL, f"{prefix}{exc}")
    if channel.kind is not ChannelKind.BROADCAST:
        return ApiError(
            400,
            ErrorCode.INVALID_CHANNEL,
            f"{prefix}cannot broadcast on {channel.name}: broadcast messages go to broadcast:{{topic}} channels",
        )
    size = len(orjson.dumps(item))
    if size > max_message_size:
        return ApiError(
            413,
            ErrorCode.INVALID_MESSAGE,
            f"{prefix}message of {size} bytes exceeds realtime.max_message_size ({max_message_size} bytes)",
        )
    return Message(channel, item["payload"])


def _invalid(message: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID_MESSAGE, message)


def presence_channel(query: str) -> ChannelName | ApiError:
    """The channel of `GET /api/presence?channel=presence:R`."""
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("channel", [])
    if len(values) != 1:
        return _invalid("give exactly one channel: /api/presence?channel=presence:{room}")
    try:
        channel = parse_channel(values[0])
    except ChannelError as exc:
        return ApiError(400, ErrorCode.INVALID_CHANNEL, str(exc))
    if channel.kind is not ChannelKind.PRESENCE:
        return ApiError(
            400, ErrorCode.INVALID_CHANNEL, f"{channel.name} has no presence; ask for a presence:{{room}} channel"
        )
    return channel


def published_body(count: int) -> bytes:
    """202's body."""
    return orjson.dumps({"published": count})


def presence_body(channel: str, state: dict[str, list[Meta]]) -> bytes:
    """200's body for `GET /api/presence`: the state a `sync` would show."""
    return orjson.dumps({"channel": channel, "state": state})


def unavailable(reason: str) -> ApiError:
    """503 `UNAVAILABLE`: not handed to every node (`reason` says why)."""
    return ApiError(503, ErrorCode.UNAVAILABLE, reason)


class RateLimiter:
    """Requests per token: a bucket of `burst` requests per token, refilled at `per_minute` / 60 a second.

    Only tokens that verified with a service role are counted, so the keys are tokens the operator issued; still,
    past MAX_TRACKED_TOKENS the buckets that have refilled (their token idle) are forgotten: a full bucket is the
    same as none.
    """

    __slots__ = ("_buckets", "burst", "per_minute")

    def __init__(self, per_minute: int, burst: int) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def _period(self) -> float:
        """seconds in which an empty bucket fills"""
        return self.burst * 60.0 / self.per_minute

    def resize(self, per_minute: int, burst: int) -> None:
        """New limits from now on (a reload); tokens already earned are kept, up to the new burst."""
        self.per_minute, self.burst = per_minute, burst
        for bucket in self._buckets.values():
            bucket.capacity, bucket.period = float(burst), self._period
            bucket.tokens = min(bucket.tokens, float(burst))

    def take(self, token: str, now: float) -> ApiError | None:
        """Count one request of `token` at `now` (seconds, monotonic); 429 with Retry-After when over the limit."""
        bucket = self._buckets.get(token)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_TOKENS:
                self._forget_full(now)
            bucket = self._buckets[token] = TokenBucket(float(self.burst), self._period)
        if bucket.take(now):
            return None
        wait = math.ceil((1.0 - bucket.tokens) * 60.0 / self.per_minute)
        return ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"more than {self.burst} requests at once or {self.per_minute} a minute with this token "
            f"(api.rate_burst, api.rate_limit); retry in {wait}s",
            (("retry-after", str(max(1, wait))),),
        )

    def _forget_full(self, now: float) -> None:
        period = self._period
        for token, bucket in list(self._buckets.items()):
            if bucket.updated is None or now - bucket.updated >= period:
                del self._buckets[token]

    def __len__(self) -> int:
        return len(self._buckets)
