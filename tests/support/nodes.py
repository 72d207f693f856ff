"""Several fluxrt nodes as real processes (`python -m fluxrt_trio --config node-N.yaml`), as operators run a cluster:
each on its own free port, all on one database and, when given a Redis URL, one cluster engine."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import yaml

from ..pg import ROOT
from ..process import FluxrtProcess, Remote
from .config import SECRET


class Node(FluxrtProcess):
    """One fluxrt process of a cluster; `port` and `url` once started."""

    def __init__(self, index: int, config_path: Path, config: Mapping[str, Any]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
        super().__init__([sys.executable, "-m", "fluxrt_trio", "--config", str(config_path)], env, cwd=ROOT)
        self.index = index
        self.config_path = config_path
        self.config = dict(config)
        self._nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery) -> Node:
        """Start the process, its log read in `nursery`, and wait until it listens."""
        self._nursery = nursery
        await super().start(nursery)
        return self

    @property
    def node_id(self) -> str | None:
        cluster = self.config.get("cluster")
        return None if cluster is None else str(cluster["node_id"])

    @property
    def url(self) -> str:
        """The WebSocket URL of the realtime endpoint, `ws://127.0.0.1:PORT/realtime`."""
        assert self.port is not None, "not started"
        return f"ws://127.0.0.1:{self.port}{self.config['server'].get('path', '/realtime')}"

    @property
    def remote(self) -> Remote:
        """For the helpers in support/clients.py (`connect(node.remote, tok=...)`)."""
        assert self.port is not None, "not started"
        return Remote(self.port)

    def terminate(self) -> None:
        """SIGTERM: a graceful shutdown (connections closed with 1001, presence left)."""
        if self._process is not None and self._process.poll() is None:
            self.signal(signal.SIGTERM)

    async def respawn(self) -> Node:
        """After this node exited: the same node (id, configuration) started again on the same port, its log read
        in the same nursery. In `running_nodes`, put it in the node's place (`nodes[i] = await nodes[i].respawn()`)
        so that the block's end kills it too."""
        assert self._process is not None and self._process.poll() is not None, "still running"
        assert self._nursery is not None
        config = {**self.config, "server": {**self.config["server"], "port": self.port}}
        self.config_path.write_text(yaml.safe_dump(config))
        return await Node(self.index, self.config_path, config).start(self._nursery)


def node_config(
    dsn: str,
    *,
    node_id: str,
    redis_url: str | None = None,
    node_timeout: float = 2.0,
    prefix: str = "fluxrt",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A node's configuration: 127.0.0.1 port 0, the test secret, `dsn` polled every 10 ms, JSON logs and, with
    `redis_url`, a `cluster:` section. `sections` are merged into these, key by key within a section."""
    config: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"jwt_secret": SECRET},
        "database": {"dsn": dsn, "poll_interval": "10ms"},
        "log": {"format": "json", "level": "info"},
    }
    if redis_url is not None:
        config["cluster"] = {
            "redis_url": redis_url,
            "node_id": node_id,
            "node_timeout": node_timeout,
            "prefix": prefix,
        }
    for name, values in (sections or {}).items():
        config[name] = {**config.get(name, {}), **values}
    return config


async def start_nodes(
    nursery: trio.Nursery,
    n: int,
    directory: Path,
    dsn: str,
    *,
    redis_url: str | None = None,
    node_timeout: float = 2.0,
    prefix: str | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Node]:
    """Start `n` nodes (`node-0`...) at once, their configurations written to `directory`, their logs read in
    `nursery`; return them once every one listens. They share `dsn`, and with `redis_url` one cluster engine under
    one key `prefix` (default: a fresh one). The caller kills them (or uses `running_nodes`)."""
    prefix = prefix if prefix is not None else f"fluxrt-test-{uuid.uuid4().hex[:8]}"
    nodes = []
    for i in range(n):
        config = node_config(
            dsn, node_id=f"node-{i}", redis_url=redis_url, node_timeout=node_timeout, prefix=prefix, sections=sections
        )
        path = directory / f"node-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        nodes.append(Node(i, path, config))
    try:
        async with trio.open_nursery() as starting:
            for node in nodes:
                starting.start_soon(node.start, nursery)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


@asynccontextmanager
async def running_nodes(n: int, directory: Path, dsn: str, **options: Any) -> AsyncIterator[list[Node]]:
    """`start_nodes` for one block: every node in the yielded list at its end is killed (SIGKILL) and reaped."""
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, n, directory, dsn, **options)
        try:
            yield nodes
        finally:
            for node in nodes:
                node.kill()
            with trio.CancelScope(shield=True):
                for node in nodes:
                    await node.wait()
