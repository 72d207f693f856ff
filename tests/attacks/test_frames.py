"""Frame and message attacks on one live fluxrt process: malformed frames and messages, frames over the size cap,
deep nesting, subscribe floods, hostile channel names and filters. docs/security.md ("Frames") lists each row.

The server runs in a child process for the whole module, on a database of its own, so that its memory (RSS) can be
read before and after an attack. Every attack comes with a healthy control client, connected before it, that must
still get a broadcast and a pong afterwards; attackers and controls each use their own `sub`, so no per-user limit
links one test to another.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import yaml
from wsproto.events import CloseConnection, Message

from fluxrt_trio.config import Config, ServerConfig
from fluxrt_trio.connection import CLOSE_TIMEOUT

from .. import pg
from ..process import Remote
from ..support.clients import RawClient, connect, raw_connect, recv, request, send, subscribe
from ..support.config import SECRET, token
from ..support.database import users_table

MAX_MESSAGE_SIZE = 256 * 1024
"""large enough for 100,000 levels of nested arrays (200 KB), so that the nesting itself is what is answered"""
MAX_SUBSCRIPTIONS = 100
RSS_GROWTH_LIMIT_KIB = 16 * 1024
"""what one streaming attack may leave in the server's resident memory. Measured in-process before the fix: 150-180
MiB per connection (wsproto kept every byte sent after its parse error, for the 2 s close timeout); after it, 0"""
STREAM_LIMIT = 512 * 1024 * 1024
"""the most an attacker sends in one streaming row, if the server has not dropped it before"""

TEXT, BINARY, CONTINUATION, PING = 0x1, 0x2, 0x0, 0x9
KEY = b"\x37\xfa\x21\x3d"
_subs = itertools.count()


# ---- the live server -------------------------------------------------------------------------------------------


class LiveServer(Remote):
    """fluxrt in a child process; `port`, `config` (for the client helpers), `rss_kib()`."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fluxrt_trio", "--config", str(config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        super().__init__(self._wait_listening(), Config(server=ServerConfig(path="/realtime")))
        deadline = time.monotonic() + 30
        while self._health().get("database") != "ok":
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"fluxrt's database never became ok:\n{log_path.read_text()}")
            time.sleep(0.05)

    def _wait_listening(self) -> int:
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"fluxrt did not start:\n{self.log_path.read_text()}")
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if record.get("msg") == "listening":
                        return int(record["port"])
            time.sleep(0.05)

    def _health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def database(pg_admin: str, pg_template: str) -> Iterator[pg.ScratchDatabase]:
    """public.users enabled for realtime, and public.x: the table the injections try to drop."""
    db = pg.ScratchDatabase(pg_admin, pg_template)
    try:
        users_table(db)
        db.sql("CREATE TABLE x (id int); INSERT INTO x VALUES (1)")
        yield db
    finally:
        db.drop()


@pytest.fixture(scope="module")
def live(database: pg.ScratchDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("attack-frames")
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"jwt_secret": SECRET},
        "database": {"dsn": database.dsn, "poll_interval": "10ms"},
        "realtime": {
            "max_message_size": MAX_MESSAGE_SIZE,
            "max_subscriptions_per_connection": MAX_SUBSCRIPTIONS,
            "max_connections_per_user": 10,
        },
        "log": {"format": "json", "level": "info"},
    }
    path = folder / "fluxrt.yaml"
    path.write_text(yaml.safe_dump(config))
    server = LiveServer(path, folder / "stderr.log")
    try:
        yield server
    finally:
        server.stop()


# ---- clients ---------------------------------------------------------------------------------------------------


def sub(role: str) -> str:
    return f"{role}-{next(_subs)}"


async def attacker(live: LiveServer) -> RawClient:
    return await raw_connect(live, query=f"token={token(sub('attacker'))}")


@contextlib.asynccontextmanager
async def healthy(live: LiveServer) -> AsyncIterator[None]:
    """A control client connected before the attack; after it, it must still get a broadcast from a new connection
    and a pong, and the server process must still run."""
    name = sub("control")
    channel = f"broadcast:{name}"
    async with connect(live, tok=token(name)) as control:
        await subscribe(control, channel)
        yield
        assert live.alive(), live.log_path.read_text()[-4000:]
        async with connect(live, tok=token(sub("sender"))) as sender:
            await send(sender, type="broadcast", channel=channel, payload={"still": "here"}, ref="sent")
            assert (await recv(sender))["status"] == "sent"
        message = await recv(control)
        assert (message["channel"], message["payload"]) == (channel, {"still": "here"})
        assert await request(control, type="ping", ref="after") == {"type": "pong", "ref": "after"}


def header(opcode: int, length: int, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A frame header as a client writes it, in the 7-, 16- or 64-bit length form, whichever fits."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask = 0x80 if masked else 0
    if length < 126:
        head = bytes((first, mask | length))
    elif length < 65536:
        head = struct.pack("!BBH", first, mask | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask | 127, length)
    return head + (KEY if masked else b"")


def masked(payload: bytes, skip: int = 0) -> bytes:
    """`payload` masked with KEY, as if `skip` bytes of the same frame's payload came before it."""
    key = (KEY * (len(payload) // 4 + 2))[skip % 4 :][: len(payload)]
    return bytes(a ^ b for a, b in zip(payload, key, strict=True))


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    body = masked(payload) if mask else payload
    return header(opcode, len(payload), fin=fin, masked=mask, rsv=rsv) + body


async def dropped_within(client: RawClient, seconds: float) -> None:
    """Wait until the server has closed the socket. Its end of stream comes first, right after the close frame (a
    half-close), so keep writing: once the socket is gone, a write is refused."""
    with trio.fail_after(seconds):
        while True:
            try:
                client.sock.send(b"\x00" * 1024)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return
            await trio.sleep(0.05)


# ---- malformed messages ----------------------------------------------------------------------------------------

NESTED_ARRAYS = '{"type":"broadcast","channel":"broadcast:n","payload":' + "[" * 100_000 + "]" * 100_000 + "}"
NESTED_OBJECTS = '{"type":"broadcast","channel":"broadcast:n","payload":' + '{"a":' * 40_000 + "1" + "}" * 40_000 + "}"

MALFORMED = [
    pytest.param('{"type":"subscribe",', "message is not valid JSON", id="not-json"),
    pytest.param('[{"type":"ping"}]', "message must be a JSON object, got an array", id="json-array"),
    pytest.param("42", "message must be a JSON object, got a number", id="json-number"),
    pytest.param('"ping"', "message must be a JSON object, got a string", id="json-string"),
    pytest.param("null", "message must be a JSON object, got null", id="json-null"),
    pytest.param('{"type":"drop_table"}', "unknown message type 'drop_table'", id="unknown-type"),
    pytest.param('{"type":5}', "unknown message type '5'", id="mistyped-type"),
    pytest.param('{"channel":"broadcast:x"}', "message has no type", id="no-type"),
    pytest.param('{"type":"broadcast","channel":"broadcast:x"}', "missing field 'payload'", id="missing-field"),
    pytest.param('{"type":"subscribe","channel":5}', "field 'channel': expected a string", id="mistyped-field"),
    pytest.param('{"type":"subscribe","channel":["broadcast:x"]}', "field 'channel'", id="array-field"),
    pytest.param('{"type":"ping","ref":"' + "r" * 65 + '"}', "ref must be a string of at most 64", id="long-ref"),
    pytest.param('{"type":"ping","ref":{"$ne":1}}', "ref must be a string", id="object-ref"),
    pytest.param('{"type":"ping","ref":"\\ud800"}', "message is not valid JSON", id="lone-surrogate"),
    pytest.param(NESTED_ARRAYS, "message is not valid JSON", id="100000-nested-arrays"),
    pytest.param(NESTED_OBJECTS, "message is not valid JSON", id="40000-nested-objects"),
    pytest.param(b'{"type":"ping"}', "binary frames are not supported", id="binary-frame"),
]


@pytest.mark.parametrize(("sent", "message"), MALFORMED)
async def test_malformed_message_gets_invalid_message_and_the_connection_stays_open(live, sent, message):
    async with healthy(live):
        client = await attacker(live)
        started = time.monotonic()
        client.send_bytes(client.ws.send(Message(data=sent)))
        reply = await client.next_message()
        # Deep nesting is refused by the parser's depth limit: no recursion, no CPU burn.
        assert time.monotonic() - started < 2.0
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", reply
        assert message in reply["message"], reply
        client.send(type="ping", ref="still-open")
        assert await client.next_message() == {"type": "pong", "ref": "still-open"}
        client.close()


async def test_extra_fields_are_ignored_and_the_message_is_served(live):
    async with healthy(live):
        client = await attacker(live)
        client.send(type="ping", ref="x", extra={"__proto__": {"admin": True}}, role="service_role")
        assert await client.next_message() == {"type": "pong", "ref": "x"}
        client.close()


# ---- frames ----------------------------------------------------------------------------------------------------

PART = b"x" * (MAX_MESSAGE_SIZE // 2)

BAD_FRAMES = [
    # Only headers: the close must come before any payload does.
    pytest.param(header(TEXT, MAX_MESSAGE_SIZE + 1), 1009, id="text-header-over-cap"),
    pytest.param(header(BINARY, 2**62), 1009, id="binary-header-2^62"),
    pytest.param(header(TEXT, 2**64 - 1), 1009, id="text-header-2^64-1"),
    pytest.param(
        frame(TEXT, PART, fin=False)
        + frame(PING, b"p")
        + frame(CONTINUATION, PART, fin=False)
        + header(CONTINUATION, 1),
        1009,
        id="fragments-adding-up-past-cap",
    ),
    pytest.param(frame(TEXT, b'{"type":"ping"}', mask=False), 1002, id="unmasked-frame"),
    pytest.param(frame(TEXT, b'{"type":"ping"}', rsv=0x40), 1002, id="rsv1-without-extension"),
    pytest.param(frame(0x3, b"x"), 1002, id="reserved-opcode"),
    pytest.param(frame(PING, b"p" * 126), 1002, id="control-frame-over-125"),
    pytest.param(frame(PING, b"p", fin=False), 1002, id="fragmented-control-frame"),
    pytest.param(frame(CONTINUATION, b"x"), 1002, id="continuation-without-start"),
    pytest.param(frame(TEXT, b"x", fin=False) + frame(TEXT, b"y"), 1002, id="new-message-inside-fragments"),
    pytest.param(frame(TEXT, b'{"type":"ping","ref":"\xff"}'), 1007, id="invalid-utf8"),
    pytest.param(frame(TEXT, b'{"type":"ping","ref":"\xed\xa0\x80"}'), 1007, id="utf8-encoded-surrogate"),
]


@pytest.mark.parametrize(("sent", "code"), BAD_FRAMES)
async def test_bad_frame_closes_at_once_with_its_code(live, sent, code):
    async with healthy(live):
        client = await attacker(live)
        started = time.monotonic()
        client.send_bytes(sent)
        assert await client.close_code(timeout=2.0) == code
        assert time.monotonic() - started < 2.0
        client.close()


async def test_after_a_violation_a_client_that_never_answers_the_close_is_dropped(live):
    async with healthy(live):
        client = await attacker(live)
        client.send_bytes(header(TEXT, 2**62))
        assert await client.close_code(timeout=2.0) == 1009
        await dropped_within(client, CLOSE_TIMEOUT + 3)
        client.close()


async def test_frames_before_an_oversized_one_in_the_same_read_are_still_served(live):
    async with healthy(live):
        client = await attacker(live)
        ping = client.ws.send(Message(data='{"type":"ping","ref":"first"}'))
        client.send_bytes(ping + header(TEXT, 2**62))
        assert await client.next_message() == {"type": "pong", "ref": "first"}
        assert await client.close_code() == 1009
        client.close()


STREAMS = [
    # One text frame declaring 2^62 bytes, then 100 KB chunks each ending in a byte that is never valid UTF-8.
    pytest.param(header(TEXT, 2**62), masked(b"a" * (100_000 - 1) + b"\xff"), 1009, id="2^62-header-invalid-utf8"),
    # Frames within the cap whose payload is invalid UTF-8: wsproto stops parsing at the first one.
    pytest.param(b"", frame(TEXT, b"a" * (100_000 - 1) + b"\xff"), 1007, id="frames-of-invalid-utf8"),
]


@pytest.mark.parametrize(("start", "chunk", "code"), STREAMS)
async def test_streaming_after_a_violation_is_neither_parsed_nor_kept(live, start, chunk, code):
    """Before the fix the server fed wsproto every byte that followed its close, and wsproto, stopped by the parse
    error, kept them all: RSS grew by what was sent until the close timeout (150-180 MiB per connection)."""
    async with healthy(live):
        before = live.rss_kib()
        client = await attacker(live)
        sock = client.sock
        sent = 0
        started = time.monotonic()
        closed_at: list[float] = []

        async def read_close() -> None:
            assert await client.close_code(timeout=2.0) == code
            closed_at.append(time.monotonic() - started)

        with trio.fail_after(CLOSE_TIMEOUT + 5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_close)
                data = memoryview(start + chunk)
                while sent < STREAM_LIMIT:
                    try:
                        n = sock.send(data)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += n
                    data = data[n:] or memoryview(chunk)
                    await trio.lowlevel.checkpoint()
        dropped_after = time.monotonic() - started
        client.close()
        grown = live.rss_kib() - before
    assert closed_at and closed_at[0] < 1.5, closed_at
    assert sent < STREAM_LIMIT, "the server never dropped the connection"
    assert dropped_after < CLOSE_TIMEOUT + 3, dropped_after
    assert grown < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {grown} KiB after {sent} bytes"


# ---- floods ----------------------------------------------------------------------------------------------------


async def test_ten_thousand_subscribes_on_one_connection_hit_the_limits_and_harm_nothing(live):
    async with healthy(live):
        before = live.rss_kib()
        client = await attacker(live)
        burst = b"".join(
            client.ws.send(Message(data=f'{{"type":"subscribe","channel":"broadcast:s{i}","ref":"{i}"}}'))
            for i in range(10_000)
        )
        replies: list[dict[str, Any]] = []
        code = None

        async def read() -> None:
            nonlocal code
            while True:
                event = await client.next_event(timeout=10)
                if isinstance(event, CloseConnection):
                    code = event.code
                    return
                if isinstance(event, Message):
                    replies.append(orjson.loads(event.data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await trio.to_thread.run_sync(_send_all, client.sock, burst)
        client.close()
        grown = live.rss_kib() - before
    acks = [r for r in replies if r["type"] == "ack"]
    errors = {r.get("code") for r in replies if r["type"] == "error"}
    assert len(acks) == MAX_SUBSCRIPTIONS
    assert errors == {"SUBSCRIPTION_FAILED", "RATE_LIMITED"}, errors
    assert "closing" in replies[-1]["message"]
    assert code == 4029
    # Once closed, the rest of the burst is not handled.
    assert len(replies) < 1000
    assert grown < RSS_GROWTH_LIMIT_KIB


def _send_all(sock: socket.socket, data: bytes) -> None:
    """Blocking send from a worker thread; the socket is non-blocking for the reader, so wait for room by hand."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            time.sleep(0.001)


# ---- channel names ---------------------------------------------------------------------------------------------

CHANNELS = [
    pytest.param("broadcast:" + "a" * 200_000, "INVALID_CHANNEL", id="huge-topic"),
    pytest.param("table:public." + "u" * 100_000, "INVALID_CHANNEL", id="huge-table"),
    pytest.param("x" * 200_000, "INVALID_CHANNEL", id="huge-no-kind"),
    pytest.param("presence:room\x00admin", "INVALID_CHANNEL", id="nul-in-room"),
    pytest.param("broadcast:a\x1b[31mred", "INVALID_CHANNEL", id="escape-in-topic"),
    pytest.param("broadcast:a\nb", "INVALID_CHANNEL", id="newline-in-topic"),
    pytest.param("broadcast:a\u2028b", "INVALID_CHANNEL", id="line-separator-in-topic"),
    pytest.param("broadcast:a\x85b", "INVALID_CHANNEL", id="c1-control-in-topic"),
    pytest.param("table:public.us\x00ers", "INVALID_CHANNEL", id="nul-in-table"),
    pytest.param("table:public.users;drop table x", "INVALID_CHANNEL", id="sql-after-table"),
    pytest.param("table:public.users where 1=1", "INVALID_CHANNEL", id="sql-where"),
    pytest.param('table:public."users"', "INVALID_CHANNEL", id="quoted-identifier"),
    pytest.param("table:public.x--", "INVALID_CHANNEL", id="comment"),
    pytest.param("table:public.users.x", "INVALID_CHANNEL", id="two-dots"),
    pytest.param("table:users", "INVALID_CHANNEL", id="no-schema"),
    pytest.param("table:pg_catalog.pg_authid", "SUBSCRIPTION_FAILED", id="pg_authid"),
    pytest.param("table:pg_catalog.pg_class", "SUBSCRIPTION_FAILED", id="pg_class"),
    pytest.param("table:information_schema.sql_features", "SUBSCRIPTION_FAILED", id="information_schema"),
    pytest.param("table:realtime.changes", "SUBSCRIPTION_FAILED", id="realtime-changes"),
    pytest.param("table:realtime.tables", "SUBSCRIPTION_FAILED", id="realtime-tables"),
    pytest.param("table:pg_toast.pg_toast_1262", "SUBSCRIPTION_FAILED", id="pg_toast"),
]


@pytest.mark.parametrize(("channel", "code"), CHANNELS)
async def test_hostile_channel_name_is_refused(live, database, channel, code):
    async with healthy(live):
        client = await attacker(live)
        client.send(type="subscribe", channel=channel, ref="c")
        reply = await client.next_message()
        assert reply["type"] == "error" and reply["code"] == code, reply
        assert reply["ref"] == "c"
        # The error quotes at most a bounded part of what was sent.
        assert len(reply["message"]) < 1000
        if channel.startswith(("table:pg_", "table:information_schema", "table:realtime")):
            assert "system schema" in reply["message"], reply
        client.close()
    assert [row["n"] for row in await database.execute("SELECT count(*) AS n FROM x")] == [1]


# ---- filters ---------------------------------------------------------------------------------------------------

FILTERS = [
    # (filter, the answer, a `name` that the filter must match as a plain value, or None)
    pytest.param("id=eq.1;drop table x", "ack", None, id="statement-after-value"),
    pytest.param("id=eq.1) or (1=1", "ack", None, id="parentheses"),
    pytest.param("name=eq.x' or '1'='1", "ack", "x' or '1'='1", id="quote-or-true"),
    pytest.param('name=eq.a"; drop table x; --', "ack", 'a"; drop table x; --', id="double-quote-comment"),
    pytest.param("name=eq.(select string_agg(rolname, ',') from pg_authid)", "ack", None, id="subquery"),
    pytest.param("name=in.(a,b');drop table x;--)", "ack", "b');drop table x;--", id="in-list-injection"),
    pytest.param("name=eq.ünï\u202ecödé ☃ \U0001f600", "ack", "ünï\u202ecödé ☃ \U0001f600", id="unicode"),
    pytest.param("name=eq.a\x00b", "ack", None, id="nul-in-value"),
    pytest.param("name;drop table x=eq.1", "SUBSCRIPTION_FAILED", None, id="sql-in-column"),
    pytest.param('id" or 1=1 --=eq.1', "SUBSCRIPTION_FAILED", None, id="quoted-column"),
    pytest.param("id=like.%", "SUBSCRIPTION_FAILED", None, id="unknown-operator"),
    pytest.param("id=is.null;drop table x", "SUBSCRIPTION_FAILED", None, id="is-with-sql"),
    pytest.param("id=in.()", "SUBSCRIPTION_FAILED", None, id="empty-in"),
]


@pytest.mark.parametrize(("condition", "answer", "matches"), FILTERS)
async def test_hostile_filter_is_refused_or_taken_as_a_plain_value(live, database, condition, answer, matches):
    channel = "table:public.users"
    async with healthy(live), connect(live, tok=token(sub("filter"))) as ws:
        reply = await request(ws, type="subscribe", channel=channel, filter=condition)
        if answer != "ack":
            assert reply["type"] == "error" and reply["code"] == answer, reply
        else:
            assert reply == {"type": "ack", "channel": channel, "status": "subscribed"}
            if matches is not None:
                # Rows that only SQL would match come first; the one whose name is the value itself comes last.
                base = next(_subs) * 10
                await database.execute(
                    "INSERT INTO users VALUES ($1, 'p', null), ($2, 'q', null), ($3, $4, null)",
                    base,
                    base + 1,
                    base + 2,
                    matches,
                )
                change = await recv(ws)
                assert change["payload"]["record"]["id"] == base + 2, change
    assert [row["n"] for row in await database.execute("SELECT count(*) AS n FROM x")] == [1]
