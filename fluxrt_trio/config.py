"""Settings: `fluxrt.yaml` and `FLUXRT_*` environment overrides, parsed into frozen attrs classes by cattrs.

Every problem is reported at once, one line each, naming the source, the key path and what was expected.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NewType, TypeGuard, get_args

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .admission import anonymous_places
from .cluster import address as redis_address

Seconds = NewType("Seconds", float)
Bytes = NewType("Bytes", int)
Count = NewType("Count", int)
CountOrZero = NewType("CountOrZero", int)
PerMinute = NewType("PerMinute", int)
Port = NewType("Port", int)
UrlPath = NewType("UrlPath", str)
Secret = NewType("Secret", str)
Fraction = NewType("Fraction", float)

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]

SECONDS = 1.0
KIB = 1024
MIB = 1024 * KIB


@attrs.frozen
class ServerConfig:
    host: str = "0.0.0.0"
    port: Port = Port(8080)
    path: UrlPath = UrlPath("/realtime")
    allowed_origins: tuple[str, ...] = ()
    handshake_timeout: Seconds = Seconds(10 * SECONDS)
    max_pending_handshakes_per_address: Count = Count(64)
    trusted_proxies: tuple[str, ...] = ()
    tls_cert_file: str | None = None
    """PEM certificate, its chain after it: set with tls_key_file, the port serves wss:// and https:// only"""
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    """PEM CA certificates: /metrics and /api then need a client certificate signed by one of them"""


@attrs.frozen
class AuthConfig:
    jwt_secret: Secret | None = None
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None
    algorithms: tuple[str, ...] = ()
    audience: str | None = None
    issuer: str | None = None
    leeway: Seconds = Seconds(10 * SECONDS)
    rotation_grace: Seconds = Seconds(24 * 3600 * SECONDS)
    allow_anonymous: bool = True
    anon_role: str = "anon"
    default_role: str = "authenticated"
    roles: tuple[str, ...] = ()
    service_roles: tuple[str, ...] = ("service_role",)
    """token roles that may use the HTTP API (publish broadcasts, read presence)"""


@attrs.frozen
class DatabaseConfig:
    dsn: Secret | None = None
    authorizer_dsn: Secret | None = None
    embedded: str | None = None
    migrate: bool = True
    poll_interval: Seconds = Seconds(0.01 * SECONDS)
    retention: Seconds = Seconds(600 * SECONDS)


@attrs.frozen
class RealtimeConfig:
    enabled: bool = True
    heartbeat_interval: Seconds = Seconds(30 * SECONDS)
    max_connections: Count = Count(1000)
    read_buffer_size: Bytes = Bytes(1024)
    write_buffer_size: Count = Count(1024)
    connection_timeout: Seconds = Seconds(120 * SECONDS)
    max_connections_per_user: Count = Count(10)
    max_anonymous_per_address: Count = Count(50)
    anonymous_share: Fraction = Fraction(0.5)
    max_subscriptions_per_connection: Count = Count(100)
    message_rate_limit: PerMinute = PerMinute(100)
    max_message_size: Bytes = Bytes(64 * KIB)
    max_presence_state_size: Bytes = Bytes(4 * KIB)
    shutdown_timeout: Seconds = Seconds(10 * SECONDS)
    history_size: CountOrZero = CountOrZero(100)
    """broadcasts kept per channel for clients that resume; 0 keeps none"""
    history_ttl: Seconds = Seconds(300 * SECONDS)


@attrs.frozen
class ClusterConfig:
    redis_url: Secret | None = None
    node_id: str | None = None
    node_timeout: Seconds = Seconds(15 * SECONDS)
    prefix: str = "fluxrt"
    max_backlog: Bytes = Bytes(8 * MIB)


@attrs.frozen
class ApiConfig:
    """The HTTP API for backends (`POST /api/broadcast`, `GET /api/presence`)."""

    rate_limit: PerMinute = PerMinute(6000)
    """requests per token, refilled continuously"""
    rate_burst: Count = Count(100)
    """requests a token may make at once before `rate_limit` paces it"""
    publish_timeout: Seconds = Seconds(10 * SECONDS)
    """longest wait for a request's broadcasts to be handed to every node; then 503"""


@attrs.frozen
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "json"


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    database: DatabaseConfig = DatabaseConfig()
    realtime: RealtimeConfig = RealtimeConfig()
    cluster: ClusterConfig = ClusterConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()


for _cls in (ServerConfig, AuthConfig, DatabaseConfig, RealtimeConfig, ClusterConfig, ApiConfig, LogConfig, Config):
    attrs.resolve_types(_cls)

_TEXT_TYPES = (str, Secret, str | None, Secret | None, UrlPath)
_EMPTY_UNSETS = frozenset(
    {"database.dsn", "database.authorizer_dsn", "database.embedded", "cluster.redis_url", "cluster.node_id"}
)


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d{1,30})\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*\Z")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": KIB, "MiB": MIB, "GiB": 1024 * MIB, "KB": 1000, "MB": 10**6, "GB": 10**9}
_RATE = re.compile(r"\s*(\d{1,30})\s*(?:/|per)\s*(s|sec|second|m|min|minute|h|hour)\s*\Z")
_RATE_UNITS = {"s": 60, "sec": 60, "second": 60, "m": 1, "min": 1, "minute": 1, "h": 1 / 60, "hour": 1 / 60}


class _Invalid(ValueError):
    pass


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: object, _: Any) -> float:
    if _number(value):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    else:
        raise _Invalid(f"expected a duration like 30s, 2m or 1h, got {value!r}")
    # NaN would pass `<= 0`, and an endless timeout or interval is never what a typo meant.
    if not (seconds > 0 and math.isfinite(seconds)):
        raise _Invalid(f"expected a finite duration greater than zero, got {value!r}")
    return seconds


def _bytes(value: object, _: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m[1]) * _SIZE_UNITS[m[2]]
    else:
        raise _Invalid(f"expected a size like 1024, 64KiB or 1MiB, got {value!r}")
    if size <= 0:
        raise _Invalid(f"expected a size greater than zero, got {value!r}")
    return size


def _count(value: object, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _Invalid(f"expected a whole number greater than zero, got {value!r}")
    return value


def _count_or_zero(value: object, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Invalid(f"expected a whole number, 0 or more, got {value!r}")
    return value


def _per_minute(value: object, _: Any) -> int:
    rate: float
    if isinstance(value, int) and not isinstance(value, bool):
        rate = value
    elif isinstance(value, str) and (m := _RATE.match(value)):
        rate = int(m[1]) * _RATE_UNITS[m[2]]
    else:
        raise _Invalid(f"expected messages per minute like 100, or a rate like 100/min, 10/s, 1000/h, got {value!r}")
    if rate < 1:
        raise _Invalid(f"expected at least one message per minute, got {value!r}")
    return round(rate)


def _fraction(value: object, _: Any) -> float:
    if not _number(value) or not 0 < value <= 1:
        raise _Invalid(
            f"expected a fraction greater than 0 and at most 1, such as 0.5, got {value!r} "
            "(to refuse anonymous connections altogether, set auth.allow_anonymous: false)"
        )
    return float(value)


def _port(value: object, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise _Invalid(f"expected a TCP port from 0 to 65535 (0 picks a free one), got {value!r}")
    return value


def _url_path(value: object, _: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in "?# "):
        raise _Invalid(f"expected a URL path starting with /, without query or spaces, got {value!r}")
    if value in ("/health", "/metrics", "/api/broadcast", "/api/presence"):
        raise _Invalid(f"{value} is taken by an HTTP endpoint; pick another path such as /realtime")
    return value


def _strict(kind: type, label: str) -> Any:
    def structure(value: object, _: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _Invalid(f"expected {label}, got {value!r}")
        return value

    return structure


def _strings(value: object, _: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _literal(options: tuple[str, ...]) -> Any:
    def structure(value: object, _: Any) -> str:
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return structure


def _is(kind: object) -> Callable[[Any], bool]:
    return lambda t: bool(t == kind)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind, hook in (
        (Seconds, _seconds),
        (Bytes, _bytes),
        (Count, _count),
        (CountOrZero, _count_or_zero),
        (PerMinute, _per_minute),
        (Fraction, _fraction),
        (Port, _port),
        (UrlPath, _url_path),
        (Secret, _strict(str, "a string")),
        (str, _strict(str, "a string")),
        (bool, _strict(bool, "true or false")),
    ):
        conv.register_structure_hook(kind, hook)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _strings)
    for literal in (LogLevel, LogFormat):
        conv.register_structure_hook_func(_is(literal), _literal(get_args(literal)))
    return conv


_converter = _make_converter()


def _problems(exc: BaseException, path: str, source: Mapping[str, str], out: list[str]) -> None:
    if isinstance(exc, ClassValidationError):
        with_notes, without_notes = exc.group_exceptions()
        for inner, note in with_notes:
            _problems(inner, f"{path}.{note.name}" if path else note.name, source, out)
        for inner in without_notes:
            _problems(inner, path, source, out)
    elif isinstance(exc, IterableValidationError):
        for inner in exc.exceptions:
            _problems(inner, path, source, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = ", ".join(a.name for a in attrs.fields(exc.cl))
        for key in sorted(exc.extra_fields):
            key_path = f"{path}.{key}" if path else key
            out.append(f"{source.get(key_path, source[''])}: {key_path}: unknown key; expected one of {known}")
    else:
        where = source.get(path, source[""])
        if isinstance(exc, _Invalid):
            out.append(f"{where}: {path}: {exc}")
        elif isinstance(exc, KeyError | TypeError | AttributeError):
            out.append(f"{where}: {path}: expected a mapping of keys, got something else")
        else:
            out.append(f"{where}: {path}: {exc}")


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str], source: dict[str, str]) -> list[str]:
    problems = []
    sections = {a.name: a.type for a in attrs.fields(Config)}
    for name, text in sorted(environ.items()):
        if not name.startswith("FLUXRT_"):
            continue
        rest = name[len("FLUXRT_") :].lower()
        section, _, key = rest.partition("_")
        cls = sections.get(section)
        if cls is None:
            # Not one of ours (FLUXRT_CONFIG, tooling around fluxrt): only FLUXRT_<SECTION>_* is configuration.
            continue
        if key not in attrs.fields_dict(cls):
            problems.append(
                f"environment {name}: unknown setting; expected FLUXRT_<SECTION>_<KEY>, e.g. FLUXRT_AUTH_JWT_SECRET"
            )
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, ValueError):
            # ValueError: text YAML takes for a number or a date it cannot build (`2024-13-01`, 5000 digits).
            value = text
        # A secret, a DSN or a name is a string even when it looks like a number or a boolean. Empty turns off the
        # database settings that may be off (FLUXRT_DATABASE_EMBEDDED= stops the embedded database) and is an error
        # for the other texts.
        kind = attrs.fields_dict(cls)[key].type
        if kind in _TEXT_TYPES:
            value = text
        if not text and f"{section}.{key}" in _EMPTY_UNSETS:
            value = None
        elif not text and kind in _TEXT_TYPES:
            # An empty audience or issuer must not quietly turn a check off (a compose file's `${UNSET}`).
            problems.append(f"environment {name}: empty; unset the variable to keep the configuration file's value")
            continue
        section_raw = raw.setdefault(section, {})
        if isinstance(section_raw, dict):
            section_raw[key] = value
            source[f"{section}.{key}"] = f"environment {name}"
    return problems


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file at `path` (None: defaults only), apply `FLUXRT_<SECTION>_<KEY>` overrides, validate.

    Raises ConfigError with one line per problem.
    """
    environ = os.environ if environ is None else environ
    label = str(path) if path is not None else "defaults"
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{label}: cannot read the configuration file: {exc.strerror}"]) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{label}: not valid YAML: {exc}".replace("\n", " ")]) from None
        except ValueError as exc:
            # A plain value YAML reads as a number or a date it cannot build (`2024-13-01`, 5000 digits).
            raise ConfigError([f"{label}: a value cannot be read ({exc}); quote it to keep it as text"]) from None
        if raw is None:
            raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{label}: expected a mapping of sections (server, auth, database, realtime, cluster, api, log)"]
        )
    source = {"": label}
    problems = _env_overrides(raw, environ, source)
    for section, value in raw.items():
        if value is None:
            raw[section] = {}
    try:
        config = _converter.structure(raw, Config)
    except Exception as exc:
        _problems(exc, "", source, problems)
        raise ConfigError(problems) from None
    problems.extend(_cross_checks(config, label))
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config, label: str) -> list[str]:
    problems = []
    auth = config.auth
    for alg in auth.algorithms:
        if alg.lower() == "none" or not re.fullmatch(r"(HS|RS|PS|ES)(256|384|512)|ES256K|EdDSA", alg):
            problems.append(
                f"{label}: auth.algorithms: {alg!r} is not supported; expected HS256/384/512, RS*, PS*, ES* or EdDSA"
            )
        elif alg.startswith("HS") and not (auth.jwt_secret or auth.jwt_secret_file):
            problems.append(f"{label}: auth.algorithms: {alg} needs auth.jwt_secret or auth.jwt_secret_file")
        elif not alg.startswith("HS") and not auth.jwt_public_key_file:
            problems.append(f"{label}: auth.algorithms: {alg} needs auth.jwt_public_key_file")
    if auth.jwt_secret and auth.jwt_secret_file:
        problems.append(f"{label}: auth.jwt_secret_file: set either auth.jwt_secret or auth.jwt_secret_file, not both")
    for key in ("jwt_secret_file", "jwt_public_key_file"):
        path = getattr(auth, key)
        if path:
            try:
                content = Path(path).read_bytes()
            except OSError as exc:
                problems.append(f"{label}: auth.{key}: cannot read {path!r}: {exc.strerror}")
            else:
                if not content.strip():
                    problems.append(f"{label}: auth.{key}: {path!r} is empty")
                elif key == "jwt_secret_file" and not _is_utf8(content):
                    problems.append(
                        f"{label}: auth.{key}: {path!r} is not UTF-8 text; write the secret as text (for random bytes, "
                        "their base64 or hex form, as your token issuer uses it)"
                    )
    if not auth.allow_anonymous and not (auth.jwt_secret or auth.jwt_secret_file or auth.jwt_public_key_file):
        problems.append(
            f"{label}: auth.allow_anonymous: false needs auth.jwt_secret, auth.jwt_secret_file or "
            "auth.jwt_public_key_file to verify tokens"
        )
    for role in auth.service_roles:
        if not role:
            problems.append(f"{label}: auth.service_roles: a role name is empty")
        elif role in (auth.anon_role, auth.default_role):
            who = "anonymous clients" if role == auth.anon_role else "every token without a role claim"
            problems.append(
                f"{label}: auth.service_roles: {role!r} is the role of {who}, who would then publish to every "
                "channel; name a role that only your backends' tokens carry, such as service_role"
            )
    problems.extend(_tls_problems(config.server, label))
    for proxy in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            problems.append(
                f"{label}: server.trusted_proxies: {proxy!r} is not an IP address or network; expected e.g. "
                "127.0.0.1, 10.0.0.0/8 or ::1"
            )
    rt = config.realtime
    if rt.max_connections_per_user > rt.max_connections:
        problems.append(
            f"{label}: realtime.max_connections_per_user: {rt.max_connections_per_user} exceeds "
            f"realtime.max_connections ({rt.max_connections})"
        )
    if auth.allow_anonymous and anonymous_places(rt.anonymous_share, rt.max_connections) < 1:
        problems.append(
            f"{label}: realtime.anonymous_share: {rt.anonymous_share} of realtime.max_connections "
            f"({rt.max_connections}) leaves no place for anonymous connections; raise it, or set "
            "auth.allow_anonymous: false"
        )
    problems.extend(_cluster_checks(config.cluster, label))
    return problems


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def _cluster_checks(cluster: ClusterConfig, label: str) -> list[str]:
    problems = []
    if cluster.redis_url is not None:
        try:
            redis_address.parse(cluster.redis_url)
        except ValueError as exc:
            problems.append(f"{label}: cluster.redis_url: {exc}")
    for key in ("node_id", "prefix"):
        value = getattr(cluster, key)
        if value is not None and not _NAME.match(value):
            problems.append(
                f"{label}: cluster.{key}: {value[:80]!r} is not a name: 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or a digit"
            )
    if cluster.node_timeout < 1:
        problems.append(
            f"{label}: cluster.node_timeout: {cluster.node_timeout}s is too short: a node must be able to miss a "
            "heartbeat or two; use 1s or more (default 15s)"
        )
    return problems


def _is_utf8(content: bytes) -> bool:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_MASK = "********"


def _mask_dsn(dsn: str) -> str:
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", rf"\1{_MASK}@", dsn)
    # libpq key=value form: the value is a single word or a quoted string with backslash escapes.
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\1{_MASK}", dsn)


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets and DSN passwords masked."""
    data: dict[str, Any] = _converter.unstructure(config)
    if data["auth"]["jwt_secret"]:
        data["auth"]["jwt_secret"] = _MASK
    for key in ("dsn", "authorizer_dsn"):
        if data["database"][key]:
            data["database"][key] = _mask_dsn(data["database"][key])
    if data["cluster"]["redis_url"]:
        data["cluster"]["redis_url"] = _mask_dsn(data["cluster"]["redis_url"])
    for section in data.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return data


RESTART_REQUIRED = (
    "server.host",
    "server.port",
    "server.path",
    "database",
    "cluster",
    "auth.anon_role",
    "auth.default_role",
    "auth.roles",
    "realtime.history_size",
    "realtime.history_ttl",
)
"""Settings a running server cannot change: the listening socket, the database and the roles it was prepared for
(a whole section where the name has no dot)."""


@attrs.frozen
class Reload:
    """What a re-read configuration does to a running one."""

    config: Config
    """the configuration to run with: the new one, except that restart-only settings keep their running values"""
    changed: tuple[str, ...]
    """dotted names of the settings that change now"""
    needs_restart: tuple[str, ...]
    """dotted names of restart-only settings that differ from what the server started with; left as they were"""


def _settings(config: Config) -> dict[str, Any]:
    sections = {section.name: getattr(config, section.name) for section in attrs.fields(Config)}
    return {
        f"{name}.{field.name}": getattr(values, field.name)
        for name, values in sections.items()
        for field in attrs.fields(type(values))
    }


def _tls_problems(server: ServerConfig, label: str) -> list[str]:
    """The TLS files are loaded here, as the server will load them, so that check-config finds what it would."""
    cert, key, client_ca = server.tls_cert_file, server.tls_key_file, server.tls_client_ca_file
    if cert is None and key is None:
        if client_ca is not None:
            return [
                f"{label}: server.tls_client_ca_file: client certificates are checked over TLS only; set "
                "server.tls_cert_file and server.tls_key_file too"
            ]
        return []
    if cert is None or key is None:
        given, missing = ("tls_cert_file", "tls_key_file") if cert is not None else ("tls_key_file", "tls_cert_file")
        return [f"{label}: server.{given} is set without server.{missing}: set both to serve TLS, or neither"]
    from . import tls

    try:
        tls.load(cert, key, client_ca)
    except ValueError as exc:
        return [f"{label}: {exc}"]
    return []


def tls_enabled(config: Config) -> bool:
    return config.server.tls_cert_file is not None


def _restart_only(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in RESTART_REQUIRED)


def plan_reload(started: Config, running: Config, new: Config) -> Reload:
    """Split `new` (just read) into what applies to the `running` server and what needs a restart.

    `started` is the configuration as read at start, before start-up filled anything in (the embedded database's
    DSN), so that only settings the operator changed are reported as needing a restart.
    """
    before, now, after = _settings(started), _settings(running), _settings(new)
    sections: dict[str, dict[str, Any]] = {}
    changed, needs_restart = [], []
    for name, value in after.items():
        section, key = name.split(".", 1)
        if _restart_only(name):
            if value != before[name]:
                needs_restart.append(name)
            value = now[name]
        elif value != now[name]:
            changed.append(name)
        sections.setdefault(section, {})[key] = value
    if tls_enabled(new) != tls_enabled(running):
        # Certificates can be replaced live, but a port cannot switch between plain and TLS under its clients.
        for key in _TLS_FILES:
            name = f"server.{key}"
            if name in changed:
                changed.remove(name)
            if after[name] != before[name]:
                needs_restart.append(name)
            sections["server"][key] = now[name]
    config = Config(**{s: type(getattr(new, s))(**fields) for s, fields in sections.items()})
    return Reload(config, tuple(changed), tuple(needs_restart))


_TLS_FILES = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
