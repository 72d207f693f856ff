"""The `fluxrt` command: serve (the default), check-config, token."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio
import yaml

from . import __version__, collector, logs
from .auth import mint, read_secret
from .config import Config, ConfigError, Secret, load_config, masked, plan_reload
from .postgres.bridge import DatabaseUnavailable, asyncio_loop, close_connection, connect, on_connection
from .postgres.embedded import EmbeddedError, EmbeddedPostgres
from .postgres.migrate import MigrationError, lifecycle_missing, migrate

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("fluxrt.cli")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxrt", description="Realtime server for PostgreSQL over WebSocket.")
    parser.add_argument("--version", action="version", version=f"fluxrt {__version__}")
    parser.add_argument(
        "--config",
        default=os.environ.get("FLUXRT_CONFIG"),
        help="YAML configuration file (default: $FLUXRT_CONFIG; without one, built-in defaults)",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the server (the default)")
    sub.add_parser("check-config", help="validate the configuration and print it with secrets masked")
    sub.add_parser("migrate", help="install or upgrade fluxrt's objects in the database (safe to repeat)")
    token = sub.add_parser("token", help="mint an HS256 token with the configured secret (development, tests)")
    token.add_argument("--sub", required=True, help="the token's subject (user id)")
    token.add_argument("--role", help="the role claim (default: none, so auth.default_role applies)")
    token.add_argument("--ttl", default="1h", help="lifetime such as 30s, 15m, 1h (default 1h)")
    for p in sub.choices.values():
        p.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
    return parser


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _ttl(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m|h|d)?", text.strip())
    if not m:
        raise SystemExit(f"fluxrt token: --ttl must look like 30s, 15m, 1h or 7d, got {text!r}")
    return int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m[2]]


def main(argv: list[str] | None = None) -> int:
    # Until serving installs its handler, a reload request must not kill the process (SIGHUP's default action):
    # start-up may take seconds (the embedded database, migrations), and systemd allows `reload` meanwhile.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    config = _load(args.config)
    if args.command == "check-config":
        print(f"# {args.config or 'built-in defaults'}: valid")
        print(yaml.safe_dump(masked(config), sort_keys=False), end="")
        return 0
    if args.command == "token":
        secret = read_secret(config.auth)
        if not secret:
            print(
                "fluxrt token: no secret to sign with: set auth.jwt_secret or auth.jwt_secret_file in the config, "
                "or FLUXRT_AUTH_JWT_SECRET",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        print(mint(secret, args.sub, role=args.role, ttl=_ttl(args.ttl)))
        return 0
    logs.configure(config.log.level, config.log.format)
    started = config
    embedded = None
    # A DSN (from the file or FLUXRT_DATABASE_DSN) wins over the embedded development database.
    if config.database.embedded is not None and config.database.dsn is None:
        embedded, config = _start_embedded(config, args.config)
    try:
        if args.command == "migrate":
            return _migrate(config)
        log.info("starting", extra=logs.ctx(version=__version__, config=args.config or "built-in defaults"))
        trio.run(_serve, config, started, args.config)
    finally:
        if embedded is not None:
            embedded.stop(quiet=True)
    return 0


def _start_embedded(config: Config, config_path: str | None) -> tuple[EmbeddedPostgres, Config]:
    folder = Path(config.database.embedded or "")
    if not folder.is_absolute() and config_path:
        folder = Path(config_path).resolve().parent / folder
    try:
        embedded = EmbeddedPostgres(folder)
        dsn = embedded.start()
    except EmbeddedError as exc:
        print(f"fluxrt: database.embedded: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    log.info(f"embedded PostgreSQL ready; connect with: {embedded.psql_command()}")
    return embedded, attrs.evolve(config, database=attrs.evolve(config.database, dsn=Secret(dsn), embedded=None))


def _migrate(config: Config) -> int:
    dsn = config.database.dsn
    if dsn is None:
        print("fluxrt migrate: no database configured (database.dsn or database.embedded)", file=sys.stderr)
        return EXIT_CONFIG
    roles = tuple(dict.fromkeys((config.auth.anon_role, config.auth.default_role, *config.auth.roles)))

    missing: list[str] = []

    async def run() -> list[str] | str:
        """The migrations applied, or why none could be."""
        # Caught inside the loop's context: leaving it wraps whatever escapes in an exception group.
        async with asyncio_loop():
            try:
                conn = await connect(dsn)
                try:
                    applied = await on_connection(conn, lambda c: migrate(c, roles))
                    if warning := await on_connection(conn, lifecycle_missing):
                        missing.append(warning)
                    return applied
                finally:
                    await close_connection(conn)
            except DatabaseUnavailable as exc:
                return f"database unavailable: {exc}"
            except MigrationError as exc:
                return str(exc)

    applied = trio.run(run)
    if isinstance(applied, str):
        print(f"fluxrt migrate: {applied}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "already up to date")
    for warning in missing:
        print(f"fluxrt migrate: warning: {warning}", file=sys.stderr)
    return 0


async def _serve(config: Config, started: Config, path: str | None) -> None:
    from .server import Server

    server = Server(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            collector.install()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reload(server, started, path)
                    continue
                log.info("signal received", extra=logs.ctx(signal=signal.Signals(signum).name))
                await server.shutdown()
                break


def reload(server: Server, started: Config, path: str | None) -> None:
    """Re-read the configuration (file and environment) and apply what can change live.

    A configuration with any error is rejected in full and the running one stays. Restart-only settings that
    differ from the ones the server started with are named in one log line and left as they were.
    """
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload rejected; the running configuration stays", extra=logs.ctx(problems=exc.problems))
        return
    plan = plan_reload(started, server.config, new)
    try:
        server.reload(plan.config)
    except (OSError, ValueError) as exc:
        # The files changed since they were checked (or cannot be used as keys): nothing was applied.
        log.error(
            "reload rejected; the running configuration stays",
            extra=logs.ctx(problems=[f"cannot use a file named by the configuration: {exc}"]),
        )
        return
    logs.configure(plan.config.log.level, plan.config.log.format)
    log.info("configuration reloaded", extra=logs.ctx(changed=list(plan.changed)))
    if plan.needs_restart:
        log.warning(
            "these settings need a restart and were left as they were",
            extra=logs.ctx(settings=list(plan.needs_restart)),
        )
