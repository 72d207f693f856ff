"""The operations surface, on a real process: SIGHUP reload, the log lines operators rely on, /metrics."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from trio_websocket import ConnectionClosed

from fluxrt_trio.auth import mint

from .process import FluxrtProcess, Remote
from .support.clients import connect, http_get, recv, request, send, subscribe

SECRET_A = "secret-a-" + "a" * 40
SECRET_B = "secret-b-" + "b" * 40


def _write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


def _config(dsn: str, **realtime: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"jwt_secret": SECRET_A},
        "database": {"dsn": dsn, "poll_interval": "10ms"},
        "realtime": {"max_subscriptions_per_connection": 5, **realtime},
        "log": {"format": "json", "level": "info"},
    }


async def test_sighup_reload_keeps_connections_and_rotates_keys_and_logs_what_it_did(db, tmp_path, nursery):
    path = tmp_path / "fluxrt.yaml"
    config = _config(db.dsn)
    _write(path, config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
    proc = FluxrtProcess([sys.executable, "-m", "fluxrt_trio", "--config", str(path)], env)
    try:
        await proc.start(nursery)
        await proc.wait_for("changefeed connected")
        # Losing the changefeed's connection is one line, and so is getting it back.
        seen = len(proc.lines)
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await proc.wait_for("database unreachable; changes will be read when it is back", after=seen)
        await proc.wait_for("changefeed connected", after=seen)
        server = Remote(proc.port)
        before = mint(SECRET_A, "alice")
        async with connect(server, tok=before) as ws:
            await subscribe(ws, "broadcast:one")
            await subscribe(ws, "broadcast:two")

            config["auth"]["jwt_secret"] = SECRET_B
            config["realtime"]["max_subscriptions_per_connection"] = 2
            config["server"]["port"] = 1
            config["log"]["level"] = "debug"
            _write(path, config)
            seen = len(proc.lines)
            proc.signal(signal.SIGHUP)
            reloaded = await proc.wait_for("configuration reloaded", after=seen)
            assert set(reloaded["changed"]) == {
                "auth.jwt_secret",
                "realtime.max_subscriptions_per_connection",
                "log.level",
            }
            restart = await proc.wait_for("these settings need a restart and were left as they were", after=seen)
            assert restart["settings"] == ["server.port"]

            # The open connection stays, and the lowered limit already applies to it.
            refused = await request(ws, type="subscribe", channel="broadcast:three")
            assert refused["type"] == "error" and "at most 2" in refused["message"]
            # Tokens signed with the replaced secret before the reload stay valid; new ones come from the new secret.
            async with connect(server, tok=before) as again:
                await subscribe(again, "broadcast:one")
            async with connect(server, tok=mint(SECRET_B, "bob")) as new:
                await subscribe(new, "broadcast:one")
                await send(new, type="broadcast", channel="broadcast:one", payload={"n": 1})
                assert (await recv(ws))["payload"] == {"n": 1}
            time.sleep(1.1)  # iat has one-second resolution: this token is issued after the reload
            async with connect(server, tok=mint(SECRET_A, "mallory")) as late:
                assert (await recv(late))["code"] == "UNAUTHORIZED"

            # A configuration with an error is rejected whole: the running one stays.
            config["realtime"]["max_subscriptions_per_connection"] = 50
            config["realtime"]["no_such_setting"] = 1
            _write(path, config)
            seen = len(proc.lines)
            proc.signal(signal.SIGHUP)
            rejected = await proc.wait_for("reload rejected; the running configuration stays", after=seen)
            assert any("realtime.no_such_setting" in p for p in rejected["problems"])
            refused = await request(ws, type="subscribe", channel="broadcast:three")
            assert refused["type"] == "error" and "at most 2" in refused["message"]
            assert (await http_get(server, "/health"))[0] == 200
            await ws.aclose(1000, "bye")
        closed_by_client = await proc.wait_for("connection closed", by="client", reason="bye")
        assert closed_by_client["code"] == 1000 and closed_by_client["duration_s"] > 0

        async with connect(server, tok=mint(SECRET_B, "carol")) as ws:
            await subscribe(ws, "broadcast:one")
            proc.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        assert await proc.wait() == 0
    finally:
        proc.kill()
    for msg in ("starting", "listening", "changefeed connected", "signal received", "shutting down", "stopped"):
        assert proc.logged(msg), f"no {msg!r} line"
    # The node asks for the largest backlog and says what the kernel grants (net.core.somaxconn caps it).
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert proc.logged("listening")[0]["backlog"] == min(65535, somaxconn)
    opened = proc.logged("connection opened")
    assert {line["sub"] for line in opened} >= {"alice", "bob", "carol"}
    assert all(line["peer"].startswith("127.0.0.1:") for line in opened)
    assert proc.logged("connection closed", code=1001, reason="server shutting down", by="server")
    assert proc.logged("refused token")
    # Every line is one JSON object; no token or secret in any of them.
    assert all(line["msg"] is not None for line in proc.lines), proc.stderr.decode()
    for secret in (SECRET_A, SECRET_B, before.split(".")[2]):
        assert secret not in proc.stderr.decode()


async def test_sigterm_while_the_database_is_away_still_stops(pg_admin, tmp_path, nursery):
    path = tmp_path / "fluxrt.yaml"
    # Nothing listens on port 1: the changefeed keeps trying, and says so once.
    _write(path, _config("postgresql://postgres@127.0.0.1:1/none"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
    proc = FluxrtProcess([sys.executable, "-m", "fluxrt_trio", "--config", str(path)], env)
    try:
        await proc.start(nursery)
        await proc.wait_for("database unavailable at start-up; retrying")
        assert (await http_get(Remote(proc.port), "/health"))[0] == 503
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        proc.kill()
    assert proc.logged("stopped")


def _metrics(body: bytes) -> dict[str, float]:
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_metrics_show_the_process_and_the_changefeed_lag(start_server, db):
    server = await start_server(database={"dsn": db.dsn, "poll_interval": 0.01})
    with trio.fail_after(5):
        while server.db.changefeed.lag() is None:
            await trio.sleep(0.01)
    values = _metrics((await http_get(server, "/metrics"))[2])
    assert values["process_resident_memory_bytes"] > 10_000_000
    assert values["process_open_fds"] >= 3
    assert values["process_max_fds"] >= values["process_open_fds"]
    assert "process_cpu_seconds_total" in values
    assert 0 <= values["fluxrt_changefeed_lag_seconds"] < 2


async def test_changefeed_lag_grows_while_changes_cannot_be_read(start_server, db):
    server = await start_server(database={"dsn": db.dsn, "poll_interval": 0.01})
    with trio.fail_after(5):
        while server.db.changefeed.lag() is None:
            await trio.sleep(0.01)
    # Revoking the changefeed's read of the change log stalls it without closing anything.
    await db.execute("ALTER TABLE realtime.changes RENAME TO changes_away")
    await trio.sleep(0.5)
    stalled = _metrics((await http_get(server, "/metrics"))[2])["fluxrt_changefeed_lag_seconds"]
    await db.execute("ALTER TABLE realtime.changes_away RENAME TO changes")
    with trio.fail_after(5):
        while server.db.changefeed.lag() > 0.2:
            await trio.sleep(0.01)
    assert stalled >= 0.4


async def test_metrics_without_a_database_have_no_changefeed_lag(start_server):
    server = await start_server()
    values = _metrics((await http_get(server, "/metrics"))[2])
    assert "fluxrt_changefeed_lag_seconds" not in values
    assert values["process_resident_memory_bytes"] > 0
