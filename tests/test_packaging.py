"""What ops teams install: the systemd unit passes systemd-analyze, and fluxrt.pyz runs air-gapped from an empty
folder with nothing but Python: migrate, serve, deliver a change and a broadcast."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio
import yaml

from fluxrt_trio import __version__
from fluxrt_trio.config import RealtimeConfig

from . import pg
from .process import FluxrtProcess, Remote
from .support.clients import connect, http_get, recv, send, subscribe
from .support.config import SECRET, token
from .support.redis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "fluxrt.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this host")
def test_the_unit_file_passes_systemd_analyze_verify():
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys: any output at all is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_is_hardened_and_reloads_with_sighup():
    service = _unit()["Service"]
    assert service["User"] == "fluxrt"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert "-HUP" in service["ExecReload"]
    assert service["StateDirectory"] == "fluxrt"
    assert "SHIV_ROOT=%S/fluxrt" in service["Environment"] or "SHIV_ROOT=%S/fluxrt" in UNIT.read_text()
    assert service["EnvironmentFile"] == "/etc/fluxrt/fluxrt.env"
    assert int(service["LimitNOFILE"]) > RealtimeConfig().max_connections + 100


def _load_build_pyz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_pyz", ROOT / "packaging" / "build_pyz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_pyz = _load_build_pyz()
NEXT_MINOR = build_pyz.next_minor(sys.executable)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pyz as `make pyz` builds it: for this Python, and the next minor version's where one is installed."""
    out = tmp_path_factory.mktemp("build") / "fluxrt.pyz"
    build = [sys.executable, str(ROOT / "packaging" / "build_pyz.py"), "--also-next", "--output", str(out)]
    subprocess.run(build, check=True, timeout=600)
    return out


def _host_python() -> str:
    """A system Python of the minor version the pyz was built for, outside any virtual environment."""
    for candidate in ("/usr/bin/python3", getattr(sys, "_base_executable", sys.executable)):
        if Path(candidate).exists() and build_pyz._version(candidate) == sys.version_info[:2]:
            return candidate
    raise AssertionError(f"no Python {sys.version_info[:2]} outside the virtual environment to run the pyz with")


INTERPRETERS = [
    pytest.param(_host_python, id="this-minor"),
    pytest.param(
        lambda: NEXT_MINOR,
        id="next-minor",
        marks=pytest.mark.skipif(NEXT_MINOR is None, reason="no interpreter of the next minor version installed"),
    ),
]


@pytest.mark.parametrize("python", INTERPRETERS)
async def test_the_pyz_migrates_serves_and_delivers_from_an_empty_folder_air_gapped(
    python, pyz, pg_admin, tmp_path, nursery
):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(pyz, folder / "fluxrt.pyz")
    temp = tmp_path / "tmp"
    temp.mkdir()
    name = f"fluxrt_pyz_{os.getpid()}_{tmp_path.name[-12:].lower()}"
    pg.run_sql(pg_admin, f"CREATE DATABASE {name}")
    dsn = pg.with_database(pg_admin, name)
    # The broadcast below goes through the cluster engine: the Redis client and its parser are in the pyz too.
    redis = RedisServer()
    redis.start()
    (folder / "fluxrt.yaml").write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "database": {"dsn": dsn, "poll_interval": "10ms", "migrate": False},
                "cluster": {"redis_url": redis.url, "node_id": "pyz", "prefix": f"pyz-{os.getpid()}"},
                "log": {"format": "json"},
            }
        )
    )
    # Nothing but Python: no venv, no PYTHONPATH, no index to install from, and a home directory that cannot be
    # written to even by root (/proc), so shiv must unpack elsewhere.
    env = [
        "env",
        "-i",
        "HOME=/proc/fluxrt-no-home",
        "PIP_NO_INDEX=1",
        f"TMPDIR={temp}",
        f"FLUXRT_AUTH_JWT_SECRET={SECRET}",
    ]
    fluxrt = [*env, python(), "fluxrt.pyz", "--config", "fluxrt.yaml"]

    async def run(*args: str, expect: int = 0) -> str:
        result = await trio.run_process(
            [*fluxrt, *args], cwd=folder, capture_stdout=True, capture_stderr=True, check=False
        )
        output = (result.stdout + result.stderr).decode()
        assert result.returncode == expect, output
        return output

    try:
        assert (await run("--version")).strip() == f"fluxrt {__version__}"
        assert "valid" in await run("check-config")
        assert (await run("token", "--sub", "alice")).startswith("eyJ")
        assert "applied: 0001_changefeed" in await run("migrate")
        assert "already up to date" in await run("migrate")
        assert list(temp.glob("fluxrt-shiv-*/fluxrt.pyz_*/site-packages/fluxrt_trio"))

        pg.run_sql(
            dsn,
            "CREATE TABLE public.users (id serial PRIMARY KEY, name text);"
            " GRANT SELECT ON public.users TO anon, authenticated;"
            " SELECT enable_realtime('public.users');",
        )
        proc = FluxrtProcess(fluxrt, {}, cwd=folder)
        try:
            await proc.start(nursery)
            await proc.wait_for("changefeed connected")
            await proc.wait_for("cluster engine connected")
            server = Remote(proc.port)
            # The status page is package data: shipped in the pyz, not only in the source tree.
            code, headers, page = await http_get(server, "/status")
            assert (code, headers["content-type"]) == (200, "text/html; charset=utf-8")
            assert b"<title>fluxrt status</title>" in page
            async with connect(server, tok=token("alice")) as alice, connect(server, tok=token("bob")) as bob:
                await subscribe(alice, "table:public.users")
                await subscribe(alice, "broadcast:room")
                await subscribe(bob, "broadcast:room")
                await send(bob, type="broadcast", channel="broadcast:room", payload={"text": "hi"})
                assert (await recv(alice))["payload"] == {"text": "hi"}
                await trio.to_thread.run_sync(lambda: pg.run_sql(dsn, "INSERT INTO public.users (name) VALUES ('Ada')"))
                change = await recv(alice)
                assert (change["payload"]["type"], change["payload"]["record"]) == ("INSERT", {"id": 1, "name": "Ada"})
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            proc.kill()
        broken = folder / "broken.yaml"
        broken.write_text("realtime: {heartbeat_interval: soon}\n")
        assert "heartbeat_interval" in await run("--config", str(broken), "check-config", expect=2)
    finally:
        redis.close()
        pg.run_sql(pg_admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_pyz_names_the_pythons_it_runs_on_when_started_by_another(pyz, tmp_path):
    built_for = {sys.version_info[:2]} | ({build_pyz._version(NEXT_MINOR)} if NEXT_MINOR else set())
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    others = [
        str(p)
        for p in [Path("/usr/bin/python3"), *pyenv.glob("3.*/bin/python3")]
        if p.exists() and build_pyz._version(str(p)) not in built_for and build_pyz._version(str(p)) >= (3, 6)
    ]
    if not others:
        pytest.skip("no Python of another version installed to try")
    result = subprocess.run(
        ["env", "-i", f"SHIV_ROOT={tmp_path}", others[0], str(pyz), "--version"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("fluxrt: this fluxrt.pyz runs on Python 3.")
    assert "build one for this Python" in result.stderr
