"""api.py without sockets: routing API paths, bearer tokens, roles, bodies of POST /api/broadcast, the presence
query, and the per-token rate limit (times passed in)."""

from __future__ import annotations

import h11
import orjson
import pytest

from fluxrt_trio import api
from fluxrt_trio.config import ConfigError, load_config
from fluxrt_trio.http import Refuse, route
from fluxrt_trio.protocol.channels import ChannelKind
from fluxrt_trio.protocol.messages import ErrorCode

BEARER = [(b"authorization", b"Bearer abc.def.ghi")]


def api_route(method: bytes = b"POST", path: str = api.BROADCAST, headers=BEARER, **flags: bool):
    options = {"draining": False, "enabled": True, **flags}
    return api.route(method, path, "", headers, **options)


def refused(result: object, status: int, code: ErrorCode) -> str:
    assert isinstance(result, api.ApiError), result
    assert (result.status, result.code) == (status, code), result
    body = orjson.loads(result.body())
    assert body == {"error": {"code": code.value, "message": result.message}}
    return result.message


# ---- routing -------------------------------------------------------------------------------------------------


def test_api_paths_route_to_their_endpoint_with_the_token():
    assert api_route() == api.ApiRequest("broadcast", "abc.def.ghi", "", None)
    got = api.route(b"GET", api.PRESENCE, "channel=presence:r", BEARER, draining=False, enabled=True)
    assert got == api.ApiRequest("presence", "abc.def.ghi", "channel=presence:r", None)


def test_the_declared_body_size_is_kept():
    got = api_route(headers=[*BEARER, (b"content-length", b"42")])
    assert isinstance(got, api.ApiRequest) and got.content_length == 42


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [(b"GET", api.BROADCAST, "POST"), (b"PUT", api.BROADCAST, "POST"), (b"POST", api.PRESENCE, "GET")],
)
def test_other_methods_are_405_with_allow(method, path, allow):
    result = api_route(method, path)
    refused(result, 405, ErrorCode.INVALID_MESSAGE)
    assert ("allow", allow) in result.headers


def test_draining_or_disabled_is_503_unavailable():
    assert "shutting down" in refused(api_route(draining=True), 503, ErrorCode.UNAVAILABLE)
    assert "realtime.enabled" in refused(api_route(enabled=False), 503, ErrorCode.UNAVAILABLE)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"Basic dXNlcjpwdw==")],
        [(b"authorization", b"Bearer ")],
        [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
    ],
)
def test_without_exactly_one_bearer_token_is_401(headers):
    result = api_route(headers=headers)
    refused(result, 401, ErrorCode.UNAUTHORIZED)
    assert ("www-authenticate", "Bearer") in result.headers


def test_the_scheme_is_case_insensitive():
    assert isinstance(api_route(headers=[(b"authorization", b"bearer tok")]), api.ApiRequest)


def test_http_route_hands_api_paths_to_the_api_and_its_refusals_in_its_shape():
    def request(method: str, target: str, headers: list[tuple[str, str]]) -> h11.Request:
        return h11.Request(method=method, target=target, headers=[("host", "x"), *headers])

    options = {"ws_path": "/realtime", "realtime_enabled": True, "draining": False, "allowed_origins": ()}
    auth = [("authorization", "Bearer t")]
    got = route(request("POST", "/api/broadcast", [*auth, ("content-length", "2")]), **options)
    assert got == api.ApiRequest("broadcast", "t", "", 2)
    got = route(request("GET", "/api/presence?channel=presence:x", auth), **options)
    assert got == api.ApiRequest("presence", "t", "channel=presence:x", None)
    refusal = route(request("DELETE", "/api/presence", auth), **options)
    assert isinstance(refusal, Refuse) and refusal.status == 405 and refusal.endpoint == "presence"
    assert orjson.loads(refusal.body)["error"]["code"] == "INVALID_MESSAGE"
    # Origins do not apply: backends are not browsers.
    got = route(request("GET", "/api/presence", auth), **{**options, "allowed_origins": ("https://a.example",)})
    assert isinstance(got, api.ApiRequest)
    assert isinstance(route(request("GET", "/api/other", auth), **options), Refuse)


# ---- roles ---------------------------------------------------------------------------------------------------


def test_only_service_roles_pass():
    assert api.check_role("service_role", ("service_role",)) is None
    assert api.check_role("backend", ("service_role", "backend")) is None
    message = refused(api.check_role("authenticated", ("service_role",)), 403, ErrorCode.FORBIDDEN)
    assert "'authenticated'" in message and "auth.service_roles" in message and "service_role" in message
    assert "none configured" in refused(api.check_role("service_role", ()), 403, ErrorCode.FORBIDDEN)


# ---- bodies --------------------------------------------------------------------------------------------------

SIZE = 1024


def parse(body: object) -> list[api.Message] | api.ApiError:
    return api.parse_broadcast(body if isinstance(body, bytes) else orjson.dumps(body), SIZE)


def test_one_message():
    [message] = parse({"channel": "broadcast:orders", "payload": {"id": 7}})
    assert message.channel.name == "broadcast:orders" and message.channel.kind is ChannelKind.BROADCAST
    assert message.payload == {"id": 7}


@pytest.mark.parametrize("payload", [None, 0, 1.5, "text", [1, "two", None], {"nested": {"deep": [True]}}])
def test_a_payload_is_any_json_value_as_in_a_client_broadcast(payload):
    [message] = parse({"channel": "broadcast:t", "payload": payload})
    assert message.payload == payload


def test_a_batch_keeps_its_order():
    messages = parse({"messages": [{"channel": f"broadcast:t{i}", "payload": i} for i in range(api.MAX_BATCH)]})
    assert isinstance(messages, list)
    assert [(m.channel.name, m.payload) for m in messages] == [(f"broadcast:t{i}", i) for i in range(100)]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"channel": "broadcast:t"}, "missing 'payload'"),
        ({"payload": 1}, "missing 'channel'"),
        ({"channel": "broadcast:t", "payload": 1, "type": "broadcast"}, "unknown key 'type'"),
        ({"messages": []}, "1 to 100 messages"),
        ({"messages": {"channel": "broadcast:t"}}, "1 to 100 messages"),
        ({"messages": [{"channel": "broadcast:t", "payload": 1}] * 101}, "1 to 100 messages"),
        ({"messages": [], "channel": "broadcast:t"}, "not both"),
        ({"messages": [{"channel": "broadcast:t", "payload": 1}, "x"]}, "messages[1]: a message must be"),
        ({"messages": [{"channel": "broadcast:t", "payload": 1}, {"channel": "broadcast:t"}]}, "messages[1]: missing"),
    ],
)
def test_malformed_bodies_are_invalid_message(body, says):
    assert says in refused(parse(body), 400, ErrorCode.INVALID_MESSAGE)


@pytest.mark.parametrize(
    ("channel", "says"),
    [
        ("table:public.users", "broadcast messages go to broadcast:{topic}"),
        ("presence:room", "broadcast messages go to broadcast:{topic}"),
        ("broadcast:has space", "invalid channel"),
        ("nokind", "invalid channel"),
        (7, "must be a string"),
    ],
)
def test_channels_other_than_broadcast_are_invalid_channel(channel, says):
    assert says in refused(parse({"channel": channel, "payload": 1}), 400, ErrorCode.INVALID_CHANNEL)


def test_one_bad_message_refuses_the_whole_batch_naming_it():
    good = {"channel": "broadcast:t", "payload": 1}
    message = refused(
        parse({"messages": [good, good, {"channel": "broadcast:", "payload": 1}]}), 400, ErrorCode.INVALID_CHANNEL
    )
    assert message.startswith("messages[2]: ")


def test_a_message_over_max_message_size_is_413():
    fits = {"channel": "broadcast:t", "payload": "x" * (SIZE - 40)}
    assert len(orjson.dumps(fits)) <= SIZE
    assert isinstance(parse(fits), list)
    big = {"channel": "broadcast:t", "payload": "x" * SIZE}
    message = refused(parse({"messages": [fits, big]}), 413, ErrorCode.INVALID_MESSAGE)
    assert message.startswith("messages[1]: ") and "realtime.max_message_size (1024 bytes)" in message


def test_the_body_cap_holds_a_full_batch_of_the_largest_messages_with_whitespace():
    biggest = {"channel": "broadcast:t", "payload": "x" * (SIZE - 40)}
    body = orjson.dumps({"messages": [biggest] * api.MAX_BATCH}, option=orjson.OPT_INDENT_2)
    assert len(body) <= api.max_body_size(SIZE)
    message = refused(api.body_too_large(10**9, SIZE), 413, ErrorCode.INVALID_MESSAGE)
    assert "1000000000 bytes" in message and "realtime.max_message_size" in message


# ---- presence query ------------------------------------------------------------------------------------------


def test_presence_query():
    channel = api.presence_channel("channel=presence%3Alobby")
    assert not isinstance(channel, api.ApiError) and channel.name == "presence:lobby"
    assert "exactly one channel" in refused(api.presence_channel(""), 400, ErrorCode.INVALID_MESSAGE)
    assert "exactly one" in refused(
        api.presence_channel("channel=presence:a&channel=presence:b"), 400, ErrorCode.INVALID_MESSAGE
    )
    assert "has no presence" in refused(api.presence_channel("channel=broadcast:a"), 400, ErrorCode.INVALID_CHANNEL)
    refused(api.presence_channel("channel=presence:"), 400, ErrorCode.INVALID_CHANNEL)


def test_response_bodies():
    assert orjson.loads(api.published_body(3)) == {"published": 3}
    state = {"alice": [{"ref": "c1", "state": {"s": 1}}]}
    assert orjson.loads(api.presence_body("presence:r", state)) == {"channel": "presence:r", "state": state}


# ---- rate limit ----------------------------------------------------------------------------------------------


def test_a_token_gets_its_burst_then_the_rate():
    limiter = api.RateLimiter(per_minute=60, burst=3)  # one a second
    assert [limiter.take("a", 100.0) for _ in range(3)] == [None, None, None]
    refusal = limiter.take("a", 100.0)
    refused(refusal, 429, ErrorCode.RATE_LIMITED)
    assert ("retry-after", "1") in refusal.headers
    assert "api.rate_limit" in refusal.message
    # Another token has its own bucket.
    assert limiter.take("b", 100.0) is None
    assert limiter.take("a", 101.0) is None
    assert limiter.take("a", 101.0) is not None


def test_retry_after_says_when_one_request_is_earned():
    limiter = api.RateLimiter(per_minute=6, burst=1)  # one every 10 s
    assert limiter.take("a", 0.0) is None
    refusal = limiter.take("a", 1.0)
    assert refusal is not None and ("retry-after", "9") in refusal.headers


def test_resize_applies_to_buckets_in_use():
    limiter = api.RateLimiter(per_minute=60, burst=10)
    assert limiter.take("a", 0.0) is None
    limiter.resize(per_minute=60, burst=1)
    assert limiter.take("a", 0.0) is None
    assert limiter.take("a", 0.0) is not None


def test_idle_tokens_are_forgotten_past_the_bound(monkeypatch):
    monkeypatch.setattr(api, "MAX_TRACKED_TOKENS", 3)
    limiter = api.RateLimiter(per_minute=60, burst=2)
    for name in "abc":
        limiter.take(name, 0.0)
    assert len(limiter) == 3
    # At t=5 the three buckets have refilled (2 s): they go, and the new one is counted.
    assert limiter.take("d", 5.0) is None
    assert len(limiter) == 1


# ---- settings ------------------------------------------------------------------------------------------------


def test_settings_defaults_the_file_and_the_environment(tmp_path):
    config = load_config(None, {})
    assert config.auth.service_roles == ("service_role",)
    assert (config.api.rate_limit, config.api.rate_burst, config.api.publish_timeout) == (6000, 100, 10.0)
    path = tmp_path / "fluxrt.yaml"
    path.write_text("auth:\n  service_roles: [backend, jobs]\napi:\n  rate_limit: 10/s\n  publish_timeout: 2s\n")
    config = load_config(path, {"FLUXRT_API_RATE_BURST": "5", "FLUXRT_AUTH_SERVICE_ROLES": "ops"})
    assert config.auth.service_roles == ("ops",)
    assert (config.api.rate_limit, config.api.rate_burst, config.api.publish_timeout) == (600, 5, 2.0)
    assert load_config(None, {"FLUXRT_AUTH_SERVICE_ROLES": "[]"}).auth.service_roles == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("auth:\n  service_roles: [authenticated]\n", "auth.service_roles: 'authenticated' is the role of every token"),
        ("auth:\n  service_roles: [anon]\n", "auth.service_roles: 'anon' is the role of anonymous clients"),
        ("auth:\n  service_roles: ['']\n", "auth.service_roles: a role name is empty"),
        ("api:\n  rate_limit: 0\n", "api.rate_limit: expected at least one message per minute"),
        ("api:\n  rate_burst: 0\n", "api.rate_burst: expected a whole number greater than zero"),
        ("api:\n  publish_timeout: never\n", "api.publish_timeout: expected a duration"),
        ("api:\n  rate_limits: 5\n", "api.rate_limits: unknown key"),
        ("server:\n  path: /api/broadcast\n", "server.path: /api/broadcast is taken by an HTTP endpoint"),
    ],
)
def test_check_config_refuses_bad_api_settings(tmp_path, text, says):
    path = tmp_path / "fluxrt.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path, {})
    assert any(says in problem for problem in refused.value.problems), refused.value.problems
