"""load_config, masked() and the `check-config` / `token` subcommands."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fluxrt_trio.auth import Verifier
from fluxrt_trio.config import AuthConfig, Config, ConfigError, load_config, masked

REPO = Path(__file__).resolve().parent.parent

REFERENCE_BLOCK = """\
realtime:
  enabled: true
  heartbeat_interval: 30s
  max_connections: 1000
  read_buffer_size: 1024
  write_buffer_size: 1024
"""


def write(tmp_path: Path, text: str, name: str = "fluxrt.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def realtime(tmp_path: Path, key: str, value: str) -> Config:
    return load_config(write(tmp_path, f"realtime:\n  {key}: {value}\n"), {})


# ---- the reference's block and the defaults ------------------------------------------------------------------


def test_reference_block_is_accepted_exactly(tmp_path):
    config = load_config(write(tmp_path, REFERENCE_BLOCK), {})
    rt = config.realtime
    assert rt.enabled is True
    assert rt.heartbeat_interval == 30.0
    assert rt.max_connections == 1000
    assert rt.read_buffer_size == 1024
    assert rt.write_buffer_size == 1024


def test_defaults():
    config = load_config(None, {})
    assert config == Config()
    assert config.server.port == 8080
    assert config.server.path == "/realtime"
    assert config.server.allowed_origins == ()
    assert config.auth.allow_anonymous is True
    assert config.auth.anon_role == "anon"
    assert config.auth.default_role == "authenticated"
    assert config.auth.jwt_secret is None
    assert config.realtime.enabled is True
    assert config.realtime.heartbeat_interval == 30.0
    assert config.realtime.connection_timeout == 120.0
    assert config.realtime.max_connections == 1000
    assert config.realtime.max_connections_per_user == 10
    assert config.realtime.max_subscriptions_per_connection == 100
    assert config.realtime.message_rate_limit == 100
    assert config.realtime.max_message_size == 64 * 1024
    assert config.realtime.max_presence_state_size == 4 * 1024


def test_empty_file_and_empty_sections_are_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), {}) == Config()
    assert load_config(write(tmp_path, "realtime:\nauth:\n", "sections.yaml"), {}) == Config()


def test_a_full_file(tmp_path):
    path = write(
        tmp_path,
        """\
        server:
          host: 127.0.0.1
          port: 9000
          path: /ws
          allowed_origins: [https://app.example.com, https://admin.example.com]
        auth:
          jwt_secret: a-secret-that-is-long-enough-for-hs256
          audience: fluxbase
          issuer: https://auth.example.com
          leeway: 5s
          allow_anonymous: false
          anon_role: visitor
          default_role: member
        database:
          dsn: postgresql://fluxrt:pw@db:5432/app
        realtime:
          connection_timeout: 2m
          max_connections_per_user: 3
          max_subscriptions_per_connection: 20
          message_rate_limit: 10/s
          max_message_size: 1MiB
          max_presence_state_size: 2KiB
        log:
          level: debug
          format: text
        """,
    )
    config = load_config(path, {})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 9000
    assert config.server.path == "/ws"
    assert config.server.allowed_origins == ("https://app.example.com", "https://admin.example.com")
    assert config.auth.jwt_secret == "a-secret-that-is-long-enough-for-hs256"
    assert config.auth.audience == "fluxbase"
    assert config.auth.issuer == "https://auth.example.com"
    assert config.auth.leeway == 5.0
    assert config.auth.allow_anonymous is False
    assert (config.auth.anon_role, config.auth.default_role) == ("visitor", "member")
    assert config.database.dsn == "postgresql://fluxrt:pw@db:5432/app"
    assert config.realtime.connection_timeout == 120.0
    assert config.realtime.max_connections_per_user == 3
    assert config.realtime.max_subscriptions_per_connection == 20
    assert config.realtime.message_rate_limit == 600
    assert config.realtime.max_message_size == 1024 * 1024
    assert config.realtime.max_presence_state_size == 2048
    assert (config.log.level, config.log.format) == ("debug", "text")


# ---- units ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("45", 45.0), ("500ms", 0.5), ("1.5s", 1.5)]
)
def test_durations(tmp_path, text, seconds):
    assert realtime(tmp_path, "heartbeat_interval", text).realtime.heartbeat_interval == seconds
    assert realtime(tmp_path, "connection_timeout", text).realtime.connection_timeout == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("1024", 1024), ("64KiB", 65536), ("1MiB", 1048576), ("512B", 512), ("1KB", 1000)]
)
def test_sizes(tmp_path, text, size):
    assert realtime(tmp_path, "max_message_size", text).realtime.max_message_size == size
    assert realtime(tmp_path, "read_buffer_size", text).realtime.read_buffer_size == size


@pytest.mark.parametrize(
    ("text", "per_minute"), [("100", 100), ("10/s", 600), ("100/min", 100), ("120/m", 120), ("6000/h", 100)]
)
def test_rates(tmp_path, text, per_minute):
    assert realtime(tmp_path, "message_rate_limit", text).realtime.message_rate_limit == per_minute


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("heartbeat_interval", "-5s", "duration"),
        ("heartbeat_interval", "-5", "greater than zero"),
        ("heartbeat_interval", "0", "greater than zero"),
        ("connection_timeout", "2 weeks", "duration like 30s, 2m or 1h"),
        ("connection_timeout", "true", "duration"),
        ("max_message_size", "0", "greater than zero"),
        ("max_message_size", "-1", "greater than zero"),
        ("max_message_size", "1.5KiB", "size like 1024, 64KiB or 1MiB"),
        ("max_message_size", "lots", "size like"),
        ("message_rate_limit", "0", "at least one"),
        ("message_rate_limit", "fast", "per minute"),
        ("message_rate_limit", "1.5", "per minute"),
        ("max_connections", "0", "whole number greater than zero"),
        ("max_connections", "-3", "whole number greater than zero"),
        ("max_connections", "1.5", "whole number"),
        ("max_connections", "'1000'", "whole number"),
        ("max_connections", "true", "whole number"),
        ("enabled", "'yes'", "true or false"),
        ("enabled", "1", "true or false"),
    ],
)
def test_impossible_realtime_values(tmp_path, key, value, says):
    path = write(tmp_path, f"realtime:\n  {key}: {value}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: realtime.{key}: ")
    assert says in problem


@pytest.mark.parametrize("port", [70000, 65536, -1, "'8080'", "http", "true"])
def test_impossible_ports(tmp_path, port):
    path = write(tmp_path, f"server:\n  port: {port}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: server.port: expected a TCP port from 0 to 65535")


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_possible_ports(tmp_path, port):
    assert load_config(write(tmp_path, f"server:\n  port: {port}\n"), {}).server.port == port


@pytest.mark.parametrize("path_value", ["realtime", "/health", "/metrics", "/ws?x=1", "'/a b'"])
def test_bad_ws_paths(tmp_path, path_value):
    path = write(tmp_path, f"server:\n  path: {path_value}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: server.path: ")


def test_wrong_types(tmp_path):
    path = write(
        tmp_path,
        """\
        auth:
          jwt_secret: 12345
          allow_anonymous: "no"
        server:
          allowed_origins: 5
        log:
          level: loud
        """,
    )
    found = problems(path)
    assert f"{path}: auth.jwt_secret: expected a string, got 12345" in found
    assert f"{path}: auth.allow_anonymous: expected true or false, got 'no'" in found
    assert f"{path}: server.allowed_origins: expected a list of strings, got 5" in found
    assert f"{path}: log.level: expected one of debug, info, warning, error, got 'loud'" in found
    assert len(found) == 4


def test_unknown_keys(tmp_path):
    path = write(
        tmp_path,
        """\
        realtime:
          max_conections: 10
        sever:
          port: 1
        """,
    )
    found = problems(path)
    assert len(found) == 2
    [realtime_problem] = [p for p in found if "realtime.max_conections" in p]
    assert realtime_problem.startswith(f"{path}: realtime.max_conections: unknown key; expected one of ")
    assert "max_connections" in realtime_problem
    [top] = [p for p in found if "sever" in p]
    assert top == f"{path}: sever: unknown key; expected one of server, auth, database, realtime, cluster, api, log"


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """\
        server:
          port: 70000
          bogus: 1
        realtime:
          enabled: "yes"
          heartbeat_interval: -5s
          connection_timeout: -5
          max_connections: abc
          nonsense: 2
        unknown_section: {}
        """,
    )
    found = problems(path)
    expected_paths = [
        "server.port",
        "server.bogus",
        "realtime.enabled",
        "realtime.heartbeat_interval",
        "realtime.connection_timeout",
        "realtime.max_connections",
        "realtime.nonsense",
        "unknown_section",
    ]
    assert len(found) == len(expected_paths)
    for key_path in expected_paths:
        assert sum(p.startswith(f"{path}: {key_path}: ") for p in found) == 1, (key_path, found)
    assert all("\n" not in p for p in found)


def test_cross_checks(tmp_path):
    path = write(
        tmp_path,
        """\
        auth:
          allow_anonymous: false
          algorithms: [none, HS256, RS256]
        realtime:
          max_connections: 5
          max_connections_per_user: 10
        """,
    )
    found = problems(path)
    assert any(p.startswith(f"{path}: auth.algorithms: 'none' is not supported") for p in found)
    assert f"{path}: auth.algorithms: HS256 needs auth.jwt_secret or auth.jwt_secret_file" in found
    assert f"{path}: auth.algorithms: RS256 needs auth.jwt_public_key_file" in found
    assert any(p.startswith(f"{path}: auth.allow_anonymous: false needs auth.jwt_secret") for p in found)
    assert f"{path}: realtime.max_connections_per_user: 10 exceeds realtime.max_connections (5)" in found
    assert len(found) == 5


def test_missing_public_key_file(tmp_path):
    path = write(tmp_path, f"auth:\n  jwt_public_key_file: {tmp_path / 'nope.pem'}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: auth.jwt_public_key_file: cannot read")
    assert "No such file" in problem


def test_secret_file_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    path = write(tmp_path, f"auth:\n  jwt_secret: abc\n  jwt_secret_file: {empty}\n")
    assert problems(path) == [
        f"{path}: auth.jwt_secret_file: set either auth.jwt_secret or auth.jwt_secret_file, not both",
        f"{path}: auth.jwt_secret_file: {str(empty)!r} is empty",
    ]
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe random bytes")
    path = write(tmp_path, f"auth:\n  jwt_secret_file: {binary}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: auth.jwt_secret_file: {str(binary)!r} is not UTF-8 text")
    secret = tmp_path / "secret"
    secret.write_text("s3cret-from-a-file\n")
    path = write(tmp_path, f"auth:\n  jwt_secret_file: {secret}\n  allow_anonymous: false\n")
    assert load_config(path, {}).auth.jwt_secret_file == str(secret)


def test_unreadable_and_invalid_files(tmp_path):
    [problem] = problems(tmp_path / "missing.yaml")
    assert problem.startswith(f"{tmp_path / 'missing.yaml'}: cannot read the configuration file")
    [problem] = problems(write(tmp_path, "realtime: [unclosed\n", "broken.yaml"))
    assert problem.startswith(f"{tmp_path / 'broken.yaml'}: not valid YAML")
    assert "\n" not in problem
    [problem] = problems(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert problem.startswith(f"{tmp_path / 'list.yaml'}: expected a mapping of sections")


# ---- environment overrides -----------------------------------------------------------------------------------


def test_environment_overrides(tmp_path):
    path = write(tmp_path, "server:\n  port: 9000\nrealtime:\n  max_connections: 500\n")
    config = load_config(
        path,
        {
            "FLUXRT_AUTH_JWT_SECRET": "from-the-environment-0123456789abcdef",
            "FLUXRT_SERVER_PORT": "9100",
            "FLUXRT_REALTIME_MAX_CONNECTIONS": "50",
            "FLUXRT_REALTIME_HEARTBEAT_INTERVAL": "2m",
            "FLUXRT_REALTIME_ENABLED": "false",
            "FLUXRT_SERVER_ALLOWED_ORIGINS": "https://a.example, https://b.example",
            "FLUXRT_DATABASE_DSN": "postgresql://u:pw@h/db",
            "FLUXRT_CONFIG": str(path),  # names the file, not a setting
            "PATH": "/usr/bin",  # not ours
        },
    )
    assert config.auth.jwt_secret == "from-the-environment-0123456789abcdef"
    assert config.server.port == 9100  # the environment wins over the file
    assert config.realtime.max_connections == 50
    assert config.realtime.heartbeat_interval == 120.0
    assert config.realtime.enabled is False
    assert config.server.allowed_origins == ("https://a.example", "https://b.example")
    assert config.database.dsn == "postgresql://u:pw@h/db"


@pytest.mark.parametrize("secret", ["12345", "0x1f", "1e3", "true", "null", "~", "[1, 2]", "007"])
def test_a_numeric_looking_secret_stays_a_string(secret):
    config = load_config(None, {"FLUXRT_AUTH_JWT_SECRET": secret})
    assert config.auth.jwt_secret == secret
    assert isinstance(config.auth.jwt_secret, str)


def test_text_settings_from_the_environment_stay_text():
    config = load_config(None, {"FLUXRT_AUTH_ANON_ROLE": "123", "FLUXRT_AUTH_AUDIENCE": "yes"})
    assert config.auth.anon_role == "123"
    assert config.auth.audience == "yes"


def test_an_empty_variable_turns_a_database_setting_off_and_is_an_error_elsewhere():
    environ = {"FLUXRT_DATABASE_EMBEDDED": "", "FLUXRT_DATABASE_DSN": ""}
    config = load_config(None, environ)
    assert (config.database.embedded, config.database.dsn) == (None, None)
    # An empty audience would quietly turn the audience check off: it is refused, naming the variable.
    for name in ("FLUXRT_AUTH_AUDIENCE", "FLUXRT_AUTH_ISSUER", "FLUXRT_AUTH_JWT_SECRET", "FLUXRT_AUTH_ANON_ROLE"):
        with pytest.raises(ConfigError) as info:
            load_config(None, {name: ""})
        assert info.value.problems == [
            f"environment {name}: empty; unset the variable to keep the configuration file's value"
        ]


def test_environment_problems_name_the_variable():
    found = problems(
        None,
        {
            "FLUXRT_BOGUS": "1",
            "FLUXRT_REALTIME_PORT": "1",
            "FLUXRT_SERVER_PORT": "x",
            "FLUXRT_REALTIME_MAX_MESSAGE_SIZE": "0",
        },
    )
    # FLUXRT_BOGUS names no section: not configuration (tooling may use FLUXRT_* names), so it is left alone.
    assert len(found) == 3
    assert not any("FLUXRT_BOGUS" in p for p in found)
    assert any(p.startswith("environment FLUXRT_REALTIME_PORT: unknown setting") for p in found)
    assert any(p.startswith("environment FLUXRT_SERVER_PORT: server.port: expected a TCP port") for p in found)
    assert any(
        p.startswith("environment FLUXRT_REALTIME_MAX_MESSAGE_SIZE: realtime.max_message_size: expected a size")
        for p in found
    )


def test_load_config_uses_only_the_mapping_it_is_given(monkeypatch):
    monkeypatch.setenv("FLUXRT_SERVER_PORT", "not-a-port")
    assert load_config(None, {}).server.port == 8080


# ---- masked --------------------------------------------------------------------------------------------------


def test_masked_hides_the_secret_and_the_dsn_password():
    config = load_config(
        None,
        {
            "FLUXRT_AUTH_JWT_SECRET": "super-secret-value-0123456789abcdef",
            "FLUXRT_DATABASE_DSN": "postgresql://fluxrt:hunter2@db.internal:5432/app?sslmode=require",
        },
    )
    data = masked(config)
    assert data["auth"]["jwt_secret"] == "********"
    assert data["database"]["dsn"] == "postgresql://fluxrt:********@db.internal:5432/app?sslmode=require"
    text = repr(data)
    assert "super-secret-value" not in text
    assert "hunter2" not in text
    # Everything else is plain data.
    assert data["server"] == {
        "host": "0.0.0.0",
        "port": 8080,
        "path": "/realtime",
        "allowed_origins": [],
        "handshake_timeout": 10.0,
        "max_pending_handshakes_per_address": 64,
        "trusted_proxies": [],
        "tls_cert_file": None,
        "tls_key_file": None,
        "tls_client_ca_file": None,
    }
    assert data["realtime"]["max_message_size"] == 65536
    assert data["realtime"]["heartbeat_interval"] == 30.0
    assert data["log"] == {"level": "info", "format": "json"}


def test_masked_key_value_dsn():
    config = load_config(None, {"FLUXRT_DATABASE_DSN": "host=db user=fluxrt password=hunter2 dbname=app"})
    assert masked(config)["database"]["dsn"] == "host=db user=fluxrt password=******** dbname=app"


def test_masked_leaves_unset_secrets_and_passwordless_dsns_alone():
    config = load_config(None, {"FLUXRT_DATABASE_DSN": "postgresql://fluxrt@db/app"})
    data = masked(config)
    assert data["auth"]["jwt_secret"] is None
    assert data["database"]["dsn"] == "postgresql://fluxrt@db/app"


def test_masked_hides_a_quoted_key_value_password():
    config = load_config(None, {"FLUXRT_DATABASE_DSN": "host=db password='correct horse' dbname=app"})
    dsn = masked(config)["database"]["dsn"]
    assert "horse" not in dsn
    assert "correct" not in dsn
    assert dsn.startswith("host=db password=")
    assert dsn.endswith(" dbname=app")


# ---- the command line ----------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fluxrt_trio", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_reports_every_problem_and_exits_2(tmp_path):
    bad = write(
        tmp_path,
        """\
        server:
          port: 70000
        realtime:
          heartbeat_interval: -5s
          bogus: 1
        """,
        "BAD.yaml",
    )
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert sum(f"{bad}: server.port: " in line for line in lines) == 1
    assert sum(f"{bad}: realtime.heartbeat_interval: " in line for line in lines) == 1
    assert sum(f"{bad}: realtime.bogus: unknown key" in line for line in lines) == 1
    assert result.stdout == ""


def test_check_config_prints_the_masked_config(tmp_path):
    good = write(
        tmp_path,
        REFERENCE_BLOCK
        + "auth:\n  jwt_secret: do-not-print-me-0123456789abcdef\ndatabase:\n  dsn: postgresql://u:hunter2@db/app\n",
        "good.yaml",
    )
    result = run_cli("check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"# {good}: valid"
    assert "do-not-print-me" not in result.stdout
    assert "hunter2" not in result.stdout
    assert "jwt_secret: '********'" in result.stdout
    assert "dsn: postgresql://u:********@db/app" in result.stdout
    assert "heartbeat_interval: 30.0" in result.stdout
    assert "max_connections: 1000" in result.stdout


def test_token_command_mints_a_token_the_verifier_accepts():
    secret = "cli-test-secret-0123456789abcdef0123"
    result = run_cli("token", "--sub", "alice", "--ttl", "1h", env={"FLUXRT_AUTH_JWT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2
    identity = Verifier(AuthConfig(jwt_secret=secret)).verify(token)
    assert identity.sub == "alice"
    assert identity.role == "authenticated"  # default_role: the token carries no role
    assert 3500 <= identity.claims["exp"] - identity.claims["iat"] <= 3600
