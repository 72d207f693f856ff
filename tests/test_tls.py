"""Native TLS (server.tls_*): wss:// and https:// with a CA made at test time, client certificates for /metrics and
/api, certificate rotation on SIGHUP without dropping a connection, and the TLS socket under a full send buffer."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import yaml
from cryptography import x509
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request

from fluxrt_trio import tls
from fluxrt_trio.client import ConnectionState, PublishError, open_client, publish
from fluxrt_trio.config import Config, ConfigError, ServerConfig, load_config, plan_reload
from fluxrt_trio.outbox import Flusher, Outbox

from .process import FluxrtProcess, Remote
from .support.clients import http_get
from .support.config import SECRET, token
from .support.tls import ThrowawayCA, make_ca

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def authority(tmp_path: Path) -> ThrowawayCA:
    ca = make_ca(tmp_path / "ca")
    # The chain may follow the certificate in the same file.
    ca.server_cert.write_bytes(ca.server_cert.read_bytes() + ca.ca_cert.read_bytes())
    return ca


def _wss(server: Any) -> str:
    return f"wss://127.0.0.1:{server.port}/realtime"


async def _https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    status, _, body = await http_get(Remote(port), path, ssl_context=context)
    return status, body


async def _peer_certificate(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        certificate = stream.getpeercert()
        assert certificate is not None
        return certificate


# ---- serving wss:// ---------------------------------------------------------------------------------------------


async def test_the_python_client_subscribes_and_receives_over_wss(start_server, authority):
    server = await start_server(server=authority.server_settings())
    received: list[Any] = []
    context = authority.client_context()
    async with (
        open_client(_wss(server), token=token("alice"), ssl_context=context) as receiver,
        open_client(_wss(server), token=token("bob"), ssl_context=context) as sender,
    ):
        await receiver.channel("broadcast:room").on("broadcast", received.append).subscribe()
        channel = await sender.channel("broadcast:room").subscribe()
        # Larger than one TLS record (16 KiB) and than the read buffer: records are split and joined correctly.
        payloads = [{"n": i, "pad": "x" * (40_000 * (i % 2))} for i in range(20)]
        for payload in payloads:
            await channel.send(payload)
        with trio.fail_after(10):
            while len(received) < len(payloads):
                await trio.sleep(0.01)
    assert [event.payload for event in received] == payloads
    assert server.counters.tls_handshake_failures == 0


async def test_a_client_that_does_not_trust_the_certificate_is_refused_and_counted(start_server, authority, tmp_path):
    server = await start_server(server=authority.server_settings())
    context = make_ca(tmp_path / "stranger").client_context()
    with pytest.raises(trio.BrokenResourceError) as refused:
        await _https_get(server.port, "/health", context)
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    with trio.fail_after(5):
        while server.counters.tls_handshake_failures < 1:
            await trio.sleep(0.01)


async def test_plain_http_to_the_tls_port_is_told_to_use_tls(start_server, authority):
    server = await start_server(server=authority.server_settings())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"this port serves TLS: connect with wss:// or https://" in data


async def test_metrics_and_the_status_page_name_the_certificate_expiry(start_server, authority):
    server = await start_server(server=authority.server_settings())
    status, body = await _https_get(server.port, "/metrics", authority.client_context())
    assert status == 200
    expiry = [line for line in body.decode().splitlines() if line.startswith("fluxrt_tls_certificate_expiry")]
    not_after = x509.load_pem_x509_certificate(authority.server_cert.read_bytes()).not_valid_after_utc
    assert len(expiry) == 1 and float(expiry[0].split()[1]) == not_after.timestamp()
    status, _, stats = await http_get(
        server,
        "/api/stats",
        {"authorization": f"Bearer {token('ops', role='service_role')}"},
        ssl_context=authority.client_context(),
    )
    assert status == 200 and orjson.loads(stats)["node"]["tls_certificate_expires"] == not_after.isoformat()
    assert "fluxrt_tls_handshake_failures_total 0.0" in body.decode()


# ---- client certificates for /metrics and /api ------------------------------------------------------------------


async def test_metrics_and_api_need_a_client_certificate_when_a_client_ca_is_set(start_server, authority, tmp_path):
    clients_ca = make_ca(tmp_path / "clients")
    server = await start_server(
        server={**authority.server_settings(), "tls_client_ca_file": str(clients_ca.ca_cert)},
        auth={"jwt_secret": SECRET},
    )
    anonymous = authority.client_context()
    certified = authority.client_context()
    certified.load_cert_chain(*clients_ca.issue_client(tmp_path, "ops"))
    foreign = authority.client_context()
    foreign.load_cert_chain(*make_ca(tmp_path / "mallory").issue_client(tmp_path, "mallory"))

    status, body = await _https_get(server.port, "/metrics", anonymous)
    assert status == 403 and b"client_certificate_required" in body and b"server.tls_client_ca_file" in body
    assert (await _https_get(server.port, "/metrics", certified))[0] == 200
    # /health stays open for load balancers, and the WebSocket endpoint for clients.
    assert (await _https_get(server.port, "/health", anonymous))[0] == 200
    async with open_client(_wss(server), token=token("alice"), ssl_context=anonymous) as client:
        await client.channel("broadcast:any").subscribe()

    service = token("backend", role="service_role")
    with pytest.raises(PublishError) as refused:
        await publish(f"https://127.0.0.1:{server.port}", service, "broadcast:any", {}, ssl_context=anonymous)
    assert refused.value.status == 403 and refused.value.code == "FORBIDDEN"
    assert "server.tls_client_ca_file" in str(refused.value)
    assert await publish(f"https://127.0.0.1:{server.port}", service, "broadcast:any", {}, ssl_context=certified) == 1
    # A certificate from another CA fails the handshake itself.
    with pytest.raises(trio.BrokenResourceError):
        await _https_get(server.port, "/metrics", foreign)


# ---- configuration ----------------------------------------------------------------------------------------------


def _problems(tmp_path: Path, server: dict[str, Any]) -> list[str]:
    path = tmp_path / "fluxrt.yaml"
    path.write_text(yaml.safe_dump({"server": server, "auth": {"jwt_secret": SECRET}}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    return error.value.problems


def test_configuration_errors_name_the_file_and_the_fix(tmp_path, authority):
    cert, key = str(authority.server_cert), str(authority.server_key)
    (problem,) = _problems(tmp_path, {"tls_cert_file": cert})
    assert "server.tls_cert_file is set without server.tls_key_file" in problem
    (problem,) = _problems(tmp_path, {"tls_client_ca_file": str(authority.ca_cert)})
    assert "set server.tls_cert_file and server.tls_key_file too" in problem
    (problem,) = _problems(tmp_path, {"tls_cert_file": cert, "tls_key_file": str(tmp_path / "nowhere.pem")})
    assert "server.tls_key_file: cannot read" in problem and "nowhere.pem" in problem
    _, other_key = authority.issue_client(tmp_path, "other")
    (problem,) = _problems(tmp_path, {"tls_cert_file": cert, "tls_key_file": str(other_key)})
    assert "the PEM private key that matches it" in problem
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    (problem,) = _problems(tmp_path, {"tls_cert_file": cert, "tls_key_file": str(encrypted)})
    assert "encrypted with a password" in problem and "openssl pkey" in problem
    (problem,) = _problems(tmp_path, {**authority.server_settings(), "tls_client_ca_file": key})
    assert "server.tls_client_ca_file: cannot use" in problem


def test_certificates_reload_live_but_turning_tls_on_or_off_needs_a_restart(authority):
    plain = Config(server=ServerConfig())
    secure = Config(server=ServerConfig(**authority.server_settings()))
    plan = plan_reload(plain, plain, secure)
    assert set(plan.needs_restart) == {"server.tls_cert_file", "server.tls_key_file"} and plan.changed == ()
    assert plan.config.server.tls_cert_file is None
    plan = plan_reload(secure, secure, plain)
    assert set(plan.needs_restart) == {"server.tls_cert_file", "server.tls_key_file"}
    assert plan.config.server.tls_cert_file == str(authority.server_cert)
    moved = Config(server=ServerConfig(tls_cert_file="/elsewhere/cert.pem", tls_key_file=str(authority.server_key)))
    plan = plan_reload(secure, secure, moved)
    assert plan.changed == ("server.tls_cert_file",) and plan.needs_restart == ()


# ---- rotation on SIGHUP, on a real process ------------------------------------------------------------------------


async def test_sighup_serves_a_new_certificate_without_dropping_a_connection(authority, tmp_path, nursery):
    authority.reissue_server("first certificate")
    first = authority.server_cert.read_bytes()
    path = tmp_path / "fluxrt.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0, **authority.server_settings()},
                "auth": {"jwt_secret": SECRET},
                "log": {"format": "json", "level": "info"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
    proc = await FluxrtProcess([sys.executable, "-m", "fluxrt_trio", "--config", str(path)], env).start(nursery)
    try:
        assert proc.port is not None
        loaded = await proc.wait_for("TLS certificate loaded")
        assert "first certificate" in loaded["subject"]
        context = authority.client_context()
        url = f"wss://127.0.0.1:{proc.port}/realtime"
        async with (
            open_client(url, token=token("alice"), ssl_context=context) as before,
            open_client(url, token=token("bob"), ssl_context=context) as sender,
        ):
            received: list[Any] = []
            await before.channel("broadcast:room").on("broadcast", received.append).subscribe()
            room = await sender.channel("broadcast:room").subscribe()

            authority.reissue_server("second certificate")
            assert authority.server_cert.read_bytes() != first
            seen = len(proc.lines)
            proc.signal(signal.SIGHUP)
            await proc.wait_for("configuration reloaded", after=seen)
            reloaded = await proc.wait_for("TLS certificate loaded", after=seen)
            assert "second certificate" in reloaded["subject"]

            subject = dict(item[0] for item in (await _peer_certificate(proc.port, context))["subject"])
            assert subject["commonName"] == "second certificate"
            # Both connections opened with the first certificate are still there, and still carry messages.
            await room.send({"after": "rotation"})
            with trio.fail_after(10):
                while not received:
                    await trio.sleep(0.01)
            assert received[0].payload == {"after": "rotation"}
            assert before.state is ConnectionState.OPEN and sender.state is ConnectionState.OPEN
            assert before.last_close is None and sender.last_close is None

            # A broken replacement is refused whole: the running certificate stays.
            authority.server_key.write_text("not a key")
            seen = len(proc.lines)
            proc.signal(signal.SIGHUP)
            rejected = await proc.wait_for("reload rejected; the running configuration stays", after=seen)
            assert any("server.tls_key_file" in problem for problem in rejected["problems"])
            subject = dict(item[0] for item in (await _peer_certificate(proc.port, context))["subject"])
            assert subject["commonName"] == "second certificate"
            # Only the probes' connections ended: no client connection was dropped by either reload.
            assert not proc.logged("connection closed")
    finally:
        proc.kill()


# ---- the TLS socket under a full send buffer ---------------------------------------------------------------------


@asynccontextmanager
async def _handshaken(authority: ThrowawayCA) -> AsyncIterator[tuple[tls.TlsSocket, trio.SSLStream, trio.Nursery]]:
    """A TlsSocket over a socketpair whose server end sends through a 4 KiB buffer, its handshake with a Trio
    client done; the nursery is cancelled when the block ends."""
    server_end, client_end = socket.socketpair()
    server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server_end.setblocking(False)
    tls_socket = tls.TlsSocket(server_end, tls.load(str(authority.server_cert), str(authority.server_key)).context)
    client = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(client_end)),
        authority.client_context(),
        server_hostname="localhost",
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            with trio.fail_after(10):
                await tls_socket.handshake()
            yield tls_socket, client, nursery
            nursery.cancel_scope.cancel()
    finally:
        server_end.close()


async def test_the_outbox_over_tls_delivers_every_byte_in_order_when_the_kernel_takes_little_at_a_time(authority):
    """The encrypted bytes the kernel refuses are owed to the outbox as one unsent byte (tls.py): a reader that
    lags far behind must still get every frame whole and in order, with the backlog and the writer doing the
    waiting as for a plain socket."""
    frames = [bytes([i % 251]) * (1 + (i * 7919) % 30_000) for i in range(300)]
    expected = b"".join(frames)
    got = bytearray()
    flusher = Flusher()
    async with _handshaken(authority) as (tls_socket, client, nursery):
        outbox = Outbox(tls_socket, limit=10_000, nursery=nursery, flusher=flusher)
        for i, frame in enumerate(frames):
            assert outbox.send_nowait(frame)
            if i % 7 == 0:
                flusher.flush()
        flusher.flush()
        assert outbox.backlog > 0, "the kernel took everything: this test would not test the owed byte"
        with trio.fail_after(30):
            while len(got) < len(expected):
                got += await client.receive_some(65536)
                await trio.sleep(0)
            await outbox.wait_drained()
    assert bytes(got) == expected


async def test_a_slow_consumer_over_tls_is_closed_without_the_frames_it_did_not_read(authority):
    """The frames the kernel refuses wait in the outbox, where closing a slow consumer drops them, as on a plain
    socket: only a bounded piece is encrypted ahead of the kernel, not the whole batch handed to sendmsg."""
    flusher = Flusher()
    async with _handshaken(authority) as (tls_socket, client, nursery):
        outbox = Outbox(tls_socket, limit=100, nursery=nursery, flusher=flusher)
        assert outbox.send_nowait(b"first")
        for i in range(1000):
            assert outbox.send_nowait(bytes([65 + i % 26]) * 10_000)
        flusher.flush()
        assert outbox.backlog > 900
        outbox.close(b"CLOSE", discard_backlog=True)
        got = bytearray()
        with trio.fail_after(10):
            while not got.endswith(b"CLOSE"):
                got += await client.receive_some(1 << 20)
        # The 10 MB the consumer did not read are not sent before the close frame.
        assert len(got) < 200_000


async def test_a_client_gone_before_the_server_hello_fails_the_handshake_as_refused(authority):
    """The server's first flight finds the socket broken: the handshake is refused (counted and logged as such),
    not an error escaping into the connection."""
    server_end, client_end = socket.socketpair()
    server_end.setblocking(False)
    tls_socket = tls.TlsSocket(server_end, tls.load(str(authority.server_cert), str(authority.server_key)).context)
    hello = ssl.MemoryBIO()
    client = authority.client_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    client_end.sendall(hello.read())
    client_end.close()
    with pytest.raises(tls.TlsRefused, match="the connection failed during the TLS handshake"), trio.fail_after(5):
        await tls_socket.handshake()
    server_end.close()


async def test_a_client_closed_for_an_oversized_message_over_wss_completes_the_close_handshake(start_server, authority):
    """After the server's close frame and close_notify, what the client sent is still read, as after a plain
    half-close: the rest of the oversized message is discarded, the client's close frame is read and the connection
    ends cleanly, not by a broken pipe or a reset."""
    server = await start_server(server=authority.server_settings(), realtime={"max_message_size": 1024})
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=authority.client_context())
    ws = WSConnection(ConnectionType.CLIENT)

    async def until(kind: type) -> Any:
        while True:
            for event in ws.events():
                if isinstance(event, kind):
                    return event
            ws.receive_data(await stream.receive_some(65536) or None)

    async with stream:
        with trio.fail_after(10):
            await stream.send_all(ws.send(Request(host="localhost", target="/realtime")))
            await until(AcceptConnection)
            oversized = {"type": "broadcast", "channel": "broadcast:x", "payload": "a" * 2000}
            more = b"".join(ws.send(Message(data="x" * 500)) for _ in range(200))
            await stream.send_all(ws.send(Message(data=orjson.dumps(oversized).decode())) + more)
            close = await until(CloseConnection)
            assert close.code == 1009
            await stream.send_all(ws.send(close.response()))
            while await stream.receive_some(65536):
                pass


async def test_an_https_answer_ends_with_close_notify(start_server, authority):
    """A client that reads to the end of the stream (not trusting Content-Length) sees TLS's close_notify, not an
    EOF that could be a truncation attack."""
    server = await start_server(server=authority.server_settings())
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=authority.client_context())
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_a_tls_handshake_that_does_not_complete_in_time_is_counted_and_logged(start_server, authority, caplog):
    caplog.set_level("INFO", logger="fluxrt.connection")
    server = await start_server(server={**authority.server_settings(), "handshake_timeout": 0.2})
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        with trio.fail_after(5):
            # Nothing sent: the server gives up after server.handshake_timeout and closes.
            assert await stream.receive_some() == b""
    assert server.counters.tls_handshake_failures == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "TLS handshake failed"]
    assert "server.handshake_timeout" in record.__dict__["ctx_reason"]


def test_a_certificate_clients_would_refuse_is_named_with_the_fix():
    day = datetime.timedelta(days=1)
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    certificate = tls.Certificate("CN=x", not_before=start, not_after=start + 90 * day)
    assert certificate.problem(start + day) is None
    assert "expired at 2026-04-01T00:00:00+00:00: renew it and reload" in str(certificate.problem(start + 90 * day))
    assert "check this host's clock" in str(certificate.problem(start - day))
