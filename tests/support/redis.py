"""Private Redis servers for tests: `redis-server` processes of the test's own on free loopback ports, which a test
may stop, restart, stall and kill. Never the machine's shared Redis on 6379, which other tests and engineers use.

Every server keeps nothing on disk (`save ""`, `appendonly no`): a restarted one comes back empty, as a Redis without
persistence does. The calls here block (a start or a stop takes a few milliseconds); the waits that can last seconds
(a sentinel failover) are async, so that the nodes and clients of a Trio test keep running meanwhile.

Given `tls=` (a throwaway CA of tests/support/tls.py), a server or sentinel listens with TLS only (`--port 0
--tls-port PORT`), its replicas and sentinels reach it over TLS, and its `url` is a `rediss://` one that names the CA
(`?ssl_ca_certs=`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import redis
import trio

from .tls import ThrowawayCA

HOST = "127.0.0.1"
_SEARCHED = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")
_live: set[_Process] = set()


class RedisMissing(RuntimeError):
    """No redis-server binary on this machine."""


def redis_binary() -> str:
    """The path of `redis-server`; RedisMissing, naming the fix, when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    for path in _SEARCHED:
        if os.access(path, os.X_OK):
            return path
    raise RedisMissing(
        "redis-server not found (the tests start private ones): run `make services` as root, "
        "or `apt-get install redis-server`"
    )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _send(port: int, command: bytes, timeout: float, tls: ThrowawayCA | None, answer: bool) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        if tls is None:
            raw.sendall(command)
            return raw.recv(64) if answer else b""
        with tls.client_context().wrap_socket(raw, server_hostname=HOST) as s:
            s.sendall(command)
            return s.recv(64) if answer else b""


def ping(port: int, timeout: float = 0.2, *, tls: ThrowawayCA | None = None) -> bool:
    """Whether a Redis (or sentinel) on `port` answers PING now; over TLS, verified with `tls`'s CA, when given."""
    try:
        return _send(port, b"PING\r\n", timeout, tls, answer=True).startswith(b"+PONG")
    except (OSError, ssl.SSLError):
        return False


def _tls_argv(tls: ThrowawayCA, port: int) -> list[str]:
    # Clients need no certificate of their own (fluxrt presents none); replicas and sentinels present the server's.
    return [
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(tls.server_cert),
        "--tls-key-file", str(tls.server_key),
        "--tls-ca-cert-file", str(tls.ca_cert),
        "--tls-auth-clients", "no",
        "--tls-replication", "yes",
    ]  # fmt: skip


def _ca_query(tls: ThrowawayCA | None) -> str:
    return "" if tls is None else "?ssl_ca_certs=" + urllib.parse.quote(str(tls.ca_cert), safe="/")


class _Process:
    """One redis-server process on a fixed port, in a directory that outlives its restarts."""

    _kind = "redis"

    def __init__(self, port: int | None = None, tls: ThrowawayCA | None = None) -> None:
        self.tls = tls
        self.port = port if port is not None else free_port()
        self._fixed_port = port is not None
        self.dir = Path(tempfile.mkdtemp(prefix=f"fluxrt-{self._kind}-"))
        self.log = self.dir / f"{self._kind}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.paused = False
        _live.add(self)

    def _argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self, timeout: float = 10) -> None:
        """Start the process and wait until it answers PING. A first start that finds its port taken (another
        process bound it since it was picked) picks another; a restart keeps the port and fails instead.
        RuntimeError, with the server's log, when it does not come up."""
        assert not self.running, f"{self._kind} on {self.port} already running"
        for _ in range(5):
            try:
                self._spawn(timeout)
                return
            except _PortTaken:
                if self._fixed_port:
                    raise RuntimeError(f"{self._kind} cannot listen on {self.port}: the port was taken") from None
                self.port = free_port()
        raise RuntimeError(f"{self._kind}: no free port after 5 tries")

    def _spawn(self, timeout: float) -> None:
        self.log.write_bytes(b"")
        self._process = subprocess.Popen(
            self._argv(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self.paused = False
        deadline = time.monotonic() + timeout
        while not ping(self.port, tls=self.tls):
            if self._process.poll() is not None:
                text = self.log.read_text(errors="replace")
                if "Address already in use" in text:
                    raise _PortTaken
                raise RuntimeError(f"{self._kind} on {self.port} exited {self._process.returncode}:\n{text}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self._kind} on {self.port} did not answer PING in {timeout} s:\n{self.log_text}")
            time.sleep(0.005)
        # Whoever answered might be another process that bound the port first (ours then fails to bind and exits).
        if int(self.execute("INFO", "server")["process_id"]) != self._process.pid:
            self.kill()
            raise _PortTaken
        self._fixed_port = True

    @property
    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 5) -> None:
        """A clean shutdown (resumed first if paused), waited for, with SIGKILL after `timeout` seconds."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self.resume()
            # SHUTDOWN acts at once; SIGTERM waits for the next server tick (up to 100 ms), so it is the fallback.
            try:
                _send(self.port, b"SHUTDOWN NOSAVE\r\n", 1, self.tls, answer=False)
            except (OSError, ssl.SSLError):
                self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would, and reap the process."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.paused = False

    def restart(self, timeout: float = 10) -> None:
        """stop(), then start() on the same port. The data is gone: nothing was persisted."""
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process holds its connections and answers nothing, a stalled Redis."""
        assert self.running, f"{self._kind} on {self.port} is not running"
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause(); nothing otherwise."""
        if self.paused and self.running:
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        """Kill the process (resumed first if paused) and delete its directory. Safe to call more than once."""
        self.resume()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> Self:
        """Start (unless running); on the way out, close() whatever happened."""
        try:
            if not self.running:
                self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new synchronous redis-py client of this process (answers decoded as str); close it after use."""
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2, "decode_responses": True}
        if self.tls is not None:
            options |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert)}
        return redis.Redis(host=HOST, port=self.port, **{**options, **kwargs})

    def execute(self, *args: Any) -> Any:
        """Run one command on a fresh connection and return its decoded answer."""
        with self.client() as c:
            return c.execute_command(*args)


class _PortTaken(Exception):
    pass


class RedisServer(_Process):
    """A private redis-server on 127.0.0.1, without persistence. Not started until start() or `with`.

    `with RedisServer() as server:` starts it and, whatever happens, kills it and deletes its directory on exit.
    With `tls`, it listens with TLS only, on `port`; a replica of a TLS primary uses the primary's CA by default.
    """

    def __init__(
        self, port: int | None = None, *, replica_of: RedisServer | None = None, tls: ThrowawayCA | None = None
    ) -> None:
        super().__init__(port, tls if tls is not None or replica_of is None else replica_of.tls)
        self.primary = replica_of

    def _argv(self) -> list[str]:
        argv = [
            redis_binary(),
            *(["--port", str(self.port)] if self.tls is None else _tls_argv(self.tls, self.port)),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--daemonize", "no",
            # A replica's first sync starts at once, without the default 5 s wait for other replicas to join.
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.primary is not None:
            argv += ["--replicaof", HOST, str(self.primary.port)]
        return argv

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:PORT/0`; with TLS, `rediss://127.0.0.1:PORT/0?ssl_ca_certs=/path/ca.pem`."""
        if self.tls is None:
            return f"redis://{HOST}:{self.port}/0"
        return f"rediss://{HOST}:{self.port}/0{_ca_query(self.tls)}"

    def role(self) -> str:
        """'master' or 'slave', as INFO replication says."""
        return str(self.execute("INFO", "replication")["role"])

    def wait_synced(self, timeout: float = 10) -> None:
        """For a replica: until its link to the primary is up (the first full sync done). TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.execute("INFO", "replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica on {self.port} not synced in {timeout} s:\n{self.log_text}")
            time.sleep(0.01)


def replica_of(primary: RedisServer, timeout: float = 10) -> RedisServer:
    """A started replica of `primary`, its first sync done; close() it (or use it in `with`, which is a no-op start)."""
    replica = RedisServer(replica_of=primary)
    try:
        replica.start(timeout)
        replica.wait_synced(timeout)
    except BaseException:
        replica.close()
        raise
    return replica


class RedisSentinel(_Process):
    """A Redis Sentinel (`redis-server <conf> --sentinel`) on a free loopback port, monitoring `primary` under
    `master_name` with a quorum of 1 and short timeouts: a primary that stops answering is down after
    `down_after_ms`, and a replica is promoted a few seconds later.

    Start the primary's replicas (and wait_synced()) before the sentinel, and call wait_ready() before causing a
    failover: a sentinel learns of replicas from the primary's INFO, which it reads at once, then every 10 s.

    A sentinel of a TLS primary listens with TLS only and reaches the primary and its replicas over TLS, with the
    primary's CA.
    """

    _kind = "sentinel"

    def __init__(
        self,
        primary: RedisServer,
        master_name: str = "fluxrt",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        port: int | None = None,
    ) -> None:
        super().__init__(port, primary.tls)
        self.primary = primary
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def _argv(self) -> list[str]:
        # The sentinel rewrites its configuration file (what it learnt, its id), so it is written once, before the
        # first start: a restarted sentinel resumes from what it knew.
        conf = self.dir / "sentinel.conf"
        if not conf.exists():
            name = self.master_name
            if self.tls is None:
                listen = f"port {self.port}\n"
            else:
                flags = _tls_argv(self.tls, self.port)
                listen = "".join(f"{flag[2:]} {value}\n" for flag, value in zip(flags[::2], flags[1::2], strict=True))
            conf.write_text(
                listen + f"bind {HOST}\n"
                f"dir {self.dir}\n"
                f"logfile {self.log}\n"
                f"sentinel monitor {name} {HOST} {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        return [redis_binary(), str(conf), "--sentinel"]

    @property
    def url(self) -> str:
        """`redis+sentinel://127.0.0.1:PORT/MASTER_NAME/0`: the sentinel, the monitored name and the database; with
        TLS, `rediss+sentinel://...?ssl_ca_certs=/path/ca.pem`."""
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        return f"{scheme}://{HOST}:{self.port}/{self.master_name}/0{_ca_query(self.tls)}"

    def primary_addr(self) -> tuple[str, int]:
        """The primary's address as this sentinel reports it now (`SENTINEL get-master-addr-by-name`)."""
        with self.client() as c:
            host, port = c.sentinel_get_master_addr_by_name(self.master_name)
        return str(host), int(port)

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas this sentinel knows of (`SENTINEL replicas`), as redis-py parses them (`is_sdown`...)."""
        with self.client() as c:
            return list(c.sentinel_slaves(self.master_name))

    def wait_ready(self, replicas: int = 1, timeout: float = 10) -> None:
        """Until the sentinel knows `replicas` replicas of the primary, each connected and up (well under a second
        after a start); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while sum(not (r["is_sdown"] or r["is_disconnected"]) for r in self.replicas()) < replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinel on {self.port} knows {self.replicas()} in {timeout} s:\n{self.log_text}")
            time.sleep(0.02)

    async def wait_failover(self, timeout: float = 10) -> tuple[str, int]:
        """Until the sentinel names a primary other than `primary` (a replica it promoted); that address."""
        old = (HOST, self.primary.port)
        with trio.fail_after(timeout):
            while (addr := self.primary_addr()) == old:
                await trio.sleep(0.05)
        return addr


@contextmanager
def redis_server(*, tls: ThrowawayCA | None = None) -> Iterator[RedisServer]:
    """A started private RedisServer (TLS only, with `tls`), killed and deleted when the block ends (a
    function-scoped fixture's body)."""
    with RedisServer(tls=tls) as server:
        yield server


@contextmanager
def sentinel_setup(
    master_name: str = "fluxrt", *, tls: ThrowawayCA | None = None
) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    """A primary, one synced replica and a sentinel that knows both, ready for a failover; all closed at the end.
    With `tls`, all three speak TLS only, to clients and to each other."""
    with (
        RedisServer(tls=tls) as primary,
        replica_of(primary) as replica,
        RedisSentinel(primary, master_name) as sentinel,
    ):
        sentinel.wait_ready()
        yield primary, replica, sentinel


def _close_all() -> None:
    # A test run that ends without reaching close() (an interrupted session) leaves no Redis and no directory.
    for process in list(_live):
        process.close()


atexit.register(_close_all)
