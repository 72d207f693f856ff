"""The HTTP API for backends over real sockets: POST /api/broadcast and GET /api/presence, every status of the
contract with its body, what subscribers receive (and do not), the rate limit, /metrics, and the Python client's
publish()."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from fluxrt_trio.auth import mint
from fluxrt_trio.client import PublishError, publish
from fluxrt_trio.hub import LocalHub
from fluxrt_trio.protocol.messages import Error, ErrorCode

from .support.clients import connect, http_get, recv, request, send, subscribe
from .support.config import token
from .support.waiting import nothing_before_pong

SERVICE = token("backend", role="service_role")


async def http(
    server: Any,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    tok: str | None = SERVICE,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request on a connection of its own: status, lower-cased headers, and the body as JSON."""
    head = {"host": "localhost", **({"authorization": f"Bearer {tok}"} if tok else {}), **(headers or {})}
    if body is not None and "transfer-encoding" not in head:
        head.setdefault("content-length", str(len(body)))
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, orjson.loads(body) if body else None


async def post(server: Any, message: Any, **options: Any) -> tuple[int, dict[str, str], Any]:
    return await http(server, "POST", "/api/broadcast", orjson.dumps(message), **options)


def error(code: str) -> Any:
    """Matches an API error body with `code` and any message (checked to be a non-empty string)."""

    class _Error:
        def __eq__(self, other: object) -> bool:
            return (
                isinstance(other, dict)
                and set(other) == {"error"}
                and set(other["error"]) == {"code", "message"}
                and other["error"]["code"] == code
                and isinstance(other["error"]["message"], str)
                and bool(other["error"]["message"])
            )

        def __repr__(self) -> str:
            return f"<API error {code}>"

    return _Error()


# ---- 202 -----------------------------------------------------------------------------------------------------


async def test_a_message_reaches_every_subscriber_as_a_client_broadcast_does(start_server):
    server = await start_server()
    async with connect(server) as a, connect(server) as b:
        for ws in (a, b):
            await subscribe(ws, "broadcast:orders")
        status, headers, body = await post(server, {"channel": "broadcast:orders", "payload": {"id": 7}})
        assert (status, body) == (202, {"published": 1})
        assert headers["content-type"] == "application/json"
        for ws in (a, b):
            message = await recv(ws)
            assert message.pop("id").startswith("b1~")  # resumable like any broadcast
            assert message == {"type": "broadcast", "channel": "broadcast:orders", "payload": {"id": 7}}


async def test_a_batch_is_delivered_in_order_across_channels(start_server):
    server = await start_server()
    async with connect(server) as a, connect(server) as b:
        await subscribe(a, "broadcast:one")
        await subscribe(b, "broadcast:two")
        batch = [{"channel": f"broadcast:{'one' if i % 2 else 'two'}", "payload": i} for i in range(10)]
        assert (await post(server, {"messages": batch}))[::2] == (202, {"published": 10})
        assert [(await recv(a))["payload"] for _ in range(5)] == [1, 3, 5, 7, 9]
        assert [(await recv(b))["payload"] for _ in range(5)] == [0, 2, 4, 6, 8]


async def test_with_no_subscribers_a_message_still_counts_as_published(start_server):
    server = await start_server()
    assert (await post(server, {"channel": "broadcast:nobody", "payload": None}))[::2] == (202, {"published": 1})


async def test_a_chunked_body_and_expect_100_continue_are_read(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:t")
        body = orjson.dumps({"channel": "broadcast:t", "payload": "chunked"})
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        status, _, answer = await http(
            server, "POST", "/api/broadcast", chunked, headers={"transfer-encoding": "chunked"}
        )
        assert (status, answer) == (202, {"published": 1})
        assert (await recv(ws))["payload"] == "chunked"
        # A client that waits for 100 Continue before sending its body (as curl does for large ones).
        body = orjson.dumps({"channel": "broadcast:t", "payload": "continued"})
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(
                b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                + f"Authorization: Bearer {SERVICE}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            with trio.fail_after(5):
                interim = await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            await stream.send_all(body)
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        assert parse_response(data)[::2] == (202, {"published": 1})
        assert (await recv(ws))["payload"] == "continued"


# ---- 400: nothing of the request is published ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "INVALID_MESSAGE"),
        (b'{"channel":"broadcast:t"}', "INVALID_MESSAGE"),
        (b'{"messages":[]}', "INVALID_MESSAGE"),
        (b'{"channel":"table:public.users","payload":1}', "INVALID_CHANNEL"),
        (b'{"channel":"broadcast:two words","payload":1}', "INVALID_CHANNEL"),
    ],
)
async def test_bad_bodies_are_400_with_the_code(start_server, body, code):
    server = await start_server()
    status, headers, answer = await http(server, "POST", "/api/broadcast", body)
    assert (status, answer) == (400, error(code))
    assert headers["content-type"] == "application/json"


async def test_a_batch_with_one_bad_message_publishes_nothing(start_server):
    server = await start_server()
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:t")
        good = {"channel": "broadcast:t", "payload": "must not arrive"}
        status, _, answer = await post(server, {"messages": [good, good, {"channel": "presence:x", "payload": 1}]})
        assert (status, answer) == (400, error("INVALID_CHANNEL"))
        assert answer["error"]["message"].startswith("messages[2]: ")
        oversized = {"channel": "broadcast:t", "payload": "x" * 70_000}
        assert (await post(server, {"messages": [good, oversized]}))[::2] == (413, error("INVALID_MESSAGE"))
        # A barrier: the next request's message is the first the subscriber gets.
        assert (await post(server, {"channel": "broadcast:t", "payload": "first"}))[0] == 202
        assert (await recv(ws))["payload"] == "first"
        await nothing_before_pong(ws)


# ---- 401, 403 ------------------------------------------------------------------------------------------------


async def test_no_token_a_forged_one_or_an_expired_one_is_401(start_server):
    server = await start_server()
    forged = mint("not-the-server-secret-" + "y" * 40, "backend", role="service_role")
    expired = token("backend", role="service_role", ttl=-60)
    for tok in (None, forged, expired, "not.a.jwt"):
        status, headers, answer = await post(server, {"channel": "broadcast:t", "payload": 1}, tok=tok)
        assert (status, answer) == (401, error("UNAUTHORIZED")), tok
        assert headers["www-authenticate"] == "Bearer"
    status, _, answer = await http(server, "GET", "/api/presence?channel=presence:r", tok=forged)
    assert (status, answer) == (401, error("UNAUTHORIZED"))


async def test_a_token_whose_role_is_not_a_service_role_is_403(start_server):
    server = await start_server(auth={"service_roles": ["publisher"]})
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:t")
        for tok in (token("alice"), token("alice", role="service_role")):
            status, _, answer = await post(server, {"channel": "broadcast:t", "payload": "no"}, tok=tok)
            assert (status, answer) == (403, error("FORBIDDEN"))
            assert "auth.service_roles" in answer["error"]["message"]
        status, _, answer = await http(server, "GET", "/api/presence?channel=presence:r", tok=token("alice"))
        assert (status, answer) == (403, error("FORBIDDEN"))
        ok = token("backend", role="publisher")
        assert (await post(server, {"channel": "broadcast:t", "payload": "yes"}, tok=ok))[0] == 202
        assert (await recv(ws))["payload"] == "yes"


# ---- 405, 413, 408 -------------------------------------------------------------------------------------------


async def test_other_methods_are_405_with_allow(start_server):
    server = await start_server()
    status, headers, answer = await http(server, "GET", "/api/broadcast")
    assert (status, headers["allow"], answer) == (405, "POST", error("INVALID_MESSAGE"))
    status, headers, answer = await http(server, "POST", "/api/presence", b"{}")
    assert (status, headers["allow"], answer) == (405, "GET", error("INVALID_MESSAGE"))


async def test_a_message_over_max_message_size_is_413(start_server):
    server = await start_server(realtime={"max_message_size": 1024})
    message = {"channel": "broadcast:t", "payload": "x" * 1024}
    status, _, answer = await post(server, message)
    assert (status, answer) == (413, error("INVALID_MESSAGE"))
    assert "realtime.max_message_size (1024 bytes)" in answer["error"]["message"]


async def test_a_body_declared_larger_than_the_cap_is_413_before_it_is_sent(start_server):
    server = await start_server(realtime={"max_message_size": 1024})
    # The head alone: the server answers without waiting for a body that never comes.
    status, _, answer = await http(server, "POST", "/api/broadcast", headers={"content-length": str(10**9)})
    assert (status, answer) == (413, error("INVALID_MESSAGE"))
    assert "1000000000 bytes" in answer["error"]["message"]


async def test_a_chunked_body_over_the_cap_is_413_once_it_passes_it(start_server):
    server = await start_server(realtime={"max_message_size": 1024})
    piece = b"x" * 60_000
    chunked = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * 5 + b"0\r\n\r\n"
    status, _, answer = await http(server, "POST", "/api/broadcast", chunked, headers={"transfer-encoding": "chunked"})
    assert (status, answer) == (413, error("INVALID_MESSAGE"))


async def test_a_body_that_does_not_arrive_in_time_is_408(start_server):
    server = await start_server(server={"handshake_timeout": 0.3})
    status, _, answer = await http(server, "POST", "/api/broadcast", headers={"content-length": "100"})
    assert (status, answer) == (408, error("INVALID_MESSAGE"))
    assert "server.handshake_timeout" in answer["error"]["message"]


# ---- 429 -----------------------------------------------------------------------------------------------------


async def test_over_the_rate_limit_is_429_with_retry_after_and_counts_per_token(start_server):
    server = await start_server(api={"rate_limit": 1, "rate_burst": 2})
    message = {"channel": "broadcast:t", "payload": 1}
    assert [(await post(server, message))[0] for _ in range(2)] == [202, 202]
    status, headers, answer = await post(server, message)
    assert (status, answer) == (429, error("RATE_LIMITED"))
    assert int(headers["retry-after"]) >= 1
    # Presence reads count in the same allowance; another token has its own.
    assert (await http(server, "GET", "/api/presence?channel=presence:r"))[0] == 429
    assert (await post(server, message, tok=token("other", role="service_role")))[0] == 202


# ---- 503 -----------------------------------------------------------------------------------------------------


class RefusingHub(LocalHub):
    """A hub whose cluster engine is unreachable (`cut_off`), or that refuses broadcasts on `refused` channels as a
    cluster does when Redis fails under them, or never answers (`silent`)."""

    def __init__(self) -> None:
        super().__init__()
        self.cut_off = False
        self.refused: set[str] = set()
        self.silent = False

    def unavailable(self) -> str | None:
        return "the cluster engine (Redis) is unreachable" if self.cut_off else None

    def broadcast(self, channel: str, payload: Any, *, sender: Any = None, ref: str | None = None) -> int:
        if self.silent:
            return 0
        if channel in self.refused:
            sender.reply_nowait(Error(ErrorCode.UNAVAILABLE, "Redis went away", channel=channel, ref=ref))
            return 0
        return super().broadcast(channel, payload, sender=sender, ref=ref)


async def test_unavailable_hubs_and_a_publish_that_takes_too_long_are_503(start_server):
    hub = RefusingHub()
    server = await start_server(hub=hub, api={"publish_timeout": 0.2})
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:t")
        hub.cut_off = True
        status, _, answer = await post(server, {"channel": "broadcast:t", "payload": "nowhere"})
        assert (status, answer) == (503, error("UNAVAILABLE"))
        assert "nothing of the request was published" in answer["error"]["message"]
        hub.cut_off = False
        hub.refused = {"broadcast:gone"}
        batch = {"messages": [{"channel": "broadcast:t", "payload": "ok"}, {"channel": "broadcast:gone", "payload": 1}]}
        status, _, answer = await post(server, batch)
        assert (status, answer) == (503, error("UNAVAILABLE"))
        assert answer["error"]["message"].startswith("broadcast:gone: Redis went away")
        assert (await recv(ws))["payload"] == "ok"
        hub.refused, hub.silent = set(), True
        status, _, answer = await post(server, {"channel": "broadcast:t", "payload": 1})
        assert (status, answer) == (503, error("UNAVAILABLE"))
        assert "api.publish_timeout" in answer["error"]["message"]


async def test_a_draining_server_answers_503(start_server):
    server = await start_server(realtime={"shutdown_timeout": 5})
    # Connected before the shutdown, its request sent after.
    pending = await trio.open_tcp_stream("127.0.0.1", server.port)
    await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.shutdown)
        body = orjson.dumps({"channel": "broadcast:t", "payload": 1})
        await pending.send_all(
            f"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SERVICE}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        with trio.fail_after(5):
            while chunk := await pending.receive_some(65536):
                data += chunk
    status, _, answer = parse_response(data)
    assert (status, answer) == (503, error("UNAVAILABLE"))
    assert "shutting down" in answer["error"]["message"]


# ---- GET /api/presence ---------------------------------------------------------------------------------------


async def test_presence_shows_the_members_tracked_over_websocket(start_server):
    server = await start_server()
    status, _, answer = await http(server, "GET", "/api/presence?channel=presence:lobby")
    assert (status, answer) == (200, {"channel": "presence:lobby", "state": {}})
    async with connect(server, tok=token("alice")) as a, connect(server, tok=token("bob")) as b:
        for ws, state in ((a, {"status": "online"}), (b, {"status": "away"})):
            await subscribe(ws, "presence:lobby")
            await recv(ws)  # the sync
            reply = await request(ws, type="presence", channel="presence:lobby", event="track", payload=state, ref="t")
            assert reply["status"] == "tracked"
        status, _, answer = await http(server, "GET", "/api/presence?channel=presence%3Alobby")
        assert status == 200 and answer["channel"] == "presence:lobby"
        assert {key: [meta["state"] for meta in metas] for key, metas in answer["state"].items()} == {
            "alice": [{"status": "online"}],
            "bob": [{"status": "away"}],
        }
        await send(b, type="unsubscribe", channel="presence:lobby")
        await recv(b)
        answer = (await http(server, "GET", "/api/presence?channel=presence:lobby"))[2]
        assert set(answer["state"]) == {"alice"}


async def test_presence_needs_one_presence_channel(start_server):
    server = await start_server()
    assert (await http(server, "GET", "/api/presence"))[::2] == (400, error("INVALID_MESSAGE"))
    assert (await http(server, "GET", "/api/presence?channel=broadcast:x"))[::2] == (400, error("INVALID_CHANNEL"))


# ---- /metrics ------------------------------------------------------------------------------------------------


async def test_requests_and_published_messages_are_counted_in_metrics(start_server):
    server = await start_server()
    batch = {"messages": [{"channel": "broadcast:t", "payload": i} for i in range(3)]}
    assert (await post(server, batch))[0] == 202
    assert (await post(server, {"channel": "nope", "payload": 1}))[0] == 400
    assert (await post(server, {"channel": "broadcast:t", "payload": 1}, tok=None))[0] == 401
    assert (await http(server, "GET", "/api/presence?channel=presence:r"))[0] == 200
    _, _, text = await http_get(server, "/metrics")
    lines = set(text.decode().splitlines())
    for line in (
        'fluxrt_api_requests_total{endpoint="broadcast",status="202"} 1.0',
        'fluxrt_api_requests_total{endpoint="broadcast",status="400"} 1.0',
        'fluxrt_api_requests_total{endpoint="broadcast",status="401"} 1.0',
        'fluxrt_api_requests_total{endpoint="presence",status="200"} 1.0',
        "fluxrt_api_messages_published_total 3.0",
    ):
        assert line in lines, line


# ---- the Python client's publish() ---------------------------------------------------------------------------


async def test_publish_helper_sends_one_message_or_a_batch_and_raises_the_servers_error(start_server):
    server = await start_server()
    base = f"http://127.0.0.1:{server.port}"
    async with connect(server) as ws:
        await subscribe(ws, "broadcast:jobs")
        assert await publish(base, SERVICE, "broadcast:jobs", {"progress": 50}) == 1
        assert (await recv(ws))["payload"] == {"progress": 50}
        # The WebSocket URL works as well, as open_client takes it.
        ws_url = f"ws://127.0.0.1:{server.port}/realtime"
        assert await publish(ws_url, SERVICE, messages=[("broadcast:jobs", 1), ("broadcast:jobs", 2)]) == 2
        assert [(await recv(ws))["payload"] for _ in range(2)] == [1, 2]
    with pytest.raises(PublishError) as refused:
        await publish(base, token("alice"), "broadcast:jobs", 1)
    assert (refused.value.status, refused.value.code) == (403, "FORBIDDEN")
    assert "auth.service_roles" in str(refused.value)
    with pytest.raises(PublishError) as refused:
        await publish(base, SERVICE, messages=[("broadcast:jobs", 1), ("table:public.x", 2)])
    assert (refused.value.status, refused.value.code) == (400, "INVALID_CHANNEL")
    with pytest.raises(ValueError, match="either channel"):
        await publish(base, SERVICE)


async def test_publish_helper_reports_the_wait_of_a_429(start_server):
    server = await start_server(api={"rate_limit": 1, "rate_burst": 1})
    base = f"http://127.0.0.1:{server.port}"
    assert await publish(base, SERVICE, "broadcast:t", 1) == 1
    with pytest.raises(PublishError) as refused:
        await publish(base, SERVICE, "broadcast:t", 2)
    assert refused.value.code == "RATE_LIMITED" and refused.value.retry_after is not None
    assert refused.value.retry_after >= 1


class BrokenHub(LocalHub):
    """A hub with a fault of ours in it."""

    def presence_state(self, channel: str) -> dict[str, list[dict[str, Any]]]:
        raise RuntimeError("injected fault")


async def test_a_fault_of_ours_is_500_internal_error_and_the_server_goes_on(start_server):
    server = await start_server(hub=BrokenHub())
    status, _, answer = await http(server, "GET", "/api/presence?channel=presence:r")
    assert (status, answer) == (500, error("INTERNAL_ERROR"))
    assert (await post(server, {"channel": "broadcast:t", "payload": 1}))[0] == 202
