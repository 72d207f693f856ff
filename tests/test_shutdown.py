"""Graceful shutdown, in process and as a real process receiving SIGTERM; and logs that never hold a token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from .process import Remote
from .support.clients import connect, http_get, random_key, raw_connect, subscribe
from .support.config import SECRET, token


async def test_shutdown_closes_every_connection_with_1001_and_refuses_handshakes_503(start_server):
    server = await start_server(realtime={"shutdown_timeout": 5})
    clients = [await raw_connect(server) for _ in range(3)]
    # A client that connected but has not sent its request yet: its handshake is in progress.
    pending = await trio.open_tcp_stream("127.0.0.1", server.port)
    await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.shutdown)
        for client in clients:
            assert await client.close_code() == 1001
        await pending.send_all(
            b"GET /realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Key: {random_key()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            response = await pending.receive_some(65536)
        assert response.startswith(b"HTTP/1.1 503"), response
        assert b"shutting down" in response
    await pending.aclose()
    assert not server.connections
    # Nothing listens any more.
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        raise AssertionError("still accepting after shutdown")
    except ConnectionRefusedError:
        pass


async def test_shutdown_does_not_wait_longer_than_shutdown_timeout(start_server):
    server = await start_server(realtime={"shutdown_timeout": 0.5})
    # This client never reads nor answers the close: the server gives up on it after the timeout.
    stuck = await raw_connect(server, rcvbuf=4096)
    stuck.send(type="subscribe", channel="broadcast:x")
    started = time.monotonic()
    await server.shutdown()
    assert time.monotonic() - started < 3.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigterm_drains_and_exits_0_and_logs_hold_no_token(tmp_path):
    port = _free_port()
    config = tmp_path / "fluxrt.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        "realtime: {shutdown_timeout: 5s}\n"
        "log: {level: debug, format: json}\n"
    )
    env = {**os.environ, "FLUXRT_AUTH_JWT_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxrt_trio", "--config", str(config)],
        stderr=subprocess.PIPE,
        env=env,
    )
    server_like = Remote(port)
    try:
        with trio.fail_after(15):
            while True:
                try:
                    if (await http_get(server_like, "/health"))[0] == 200:
                        break
                except OSError:
                    await trio.sleep(0.05)
        good, bad = token("alice"), token("alice")[:-4] + "AAAA"
        async with connect(server_like, tok=good) as ws:
            await subscribe(ws, "broadcast:x")
            bad_client = await raw_connect(server_like, query=f"token={bad}")
            assert (await bad_client.next_message())["code"] == "UNAUTHORIZED"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 1001
        with trio.fail_after(10):
            while proc.poll() is None:
                await trio.sleep(0.05)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode()
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.strip()]
    assert any(line["msg"] == "shutting down" for line in lines)
    assert any(line["msg"] == "refused token" for line in lines)
    for secret in (good, bad, good.split(".")[2], bad.split(".")[2]):
        assert secret not in stderr
