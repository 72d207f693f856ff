"""fluxrt in a child process, as operators run it, with its JSON log lines collected as they are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import trio

from fluxrt_trio.config import Config

from .pg import ROOT


class FluxrtProcess:
    """Run `argv` (a fluxrt command logging JSON to stderr) in the caller's nursery; look at its log as it grows."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self.port: int | None = None
        self._grew = trio.Event()
        self._process: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> FluxrtProcess:
        """Start the process and wait until it listens; `port` is then the port it listens on."""
        self._process = await trio.lowlevel.open_process(
            self.argv, env=self.env, cwd=self.cwd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        nursery.start_soon(self._read)
        self.port = (await self.wait_for("listening", timeout=30))["port"]
        return self

    async def _read(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        pending = b""
        async for chunk in self._process.stderr:
            self.stderr += chunk
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if line.strip():
                    try:
                        self.lines.append(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        self.lines.append({"msg": None, "raw": line.decode(errors="replace")})
            self._grew.set()
            self._grew = trio.Event()
        self._grew.set()

    def logged(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line for line in self.lines if line.get("msg") == msg and all(line.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(self, msg: str, *, timeout: float = 10, after: int = 0, **fields: Any) -> dict[str, Any]:
        """The first log line from index `after` on with this message and these fields, waiting for it to come."""
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[after:]:
                    if line.get("msg") == msg and all(line.get(k) == v for k, v in fields.items()):
                        return line
                if self._process is not None and self._process.poll() is not None:
                    raise AssertionError(f"fluxrt exited {self._process.returncode}:\n{self.stderr.decode()}")
                await self._grew.wait()

    def signal(self, signum: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    async def wait(self, timeout: float = 15) -> int:
        """Wait for the process to exit and return its exit status."""
        assert self._process is not None
        with trio.fail_after(timeout):
            return await self._process.wait()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()


class Remote:
    """Enough of a Server for the client helpers in support/clients.py, for a server running in another process."""

    def __init__(self, port: int, config: Config | None = None) -> None:
        self.port = port
        self.config = config if config is not None else Config()


async def run_cli(dsn: str, *args: str) -> tuple[int, str, str]:
    """Run `fluxrt *args` (as `python -m fluxrt_trio`) on database `dsn`; its exit status, stdout and stderr."""
    env = {**os.environ, "FLUXRT_DATABASE_DSN": dsn}
    env.pop("FLUXRT_CONFIG", None)
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "fluxrt_trio", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(ROOT),
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()
