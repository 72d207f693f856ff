"""What a call to Redis costs through the trio-asyncio bridge, and what a broadcast costs an in-process cluster hub:
the measurements behind the cluster engine's design (docs/architecture.md, "The trio-asyncio bridge").

1. a crossing: `trio_asyncio.aio_as_trio` of a coroutine that does nothing;
2. one batch's transaction (MULTI, SET, PUBLISH, EXEC) with redis-py's `Pipeline`, through a crossing each, and the
   same in plain asyncio (no Trio) for comparison;
3. the same commands packed and written on a connection of their own and the answers read back, through a crossing;
4. the CPU (process time) per broadcast of an in-process `ClusterHub` with 10 subscribers that do nothing, one
   broadcast every millisecond, against a `LocalHub` in the same loop: what the bus costs a node per message.

Keys and the channel are under a run-unique prefix on `--redis-url` (the machine's shared Redis by default: nothing
is flushed; what the run wrote is deleted at the end). Latencies are p50/p99 over `--calls` calls; run it on a quiet
box and pin it (`taskset -c 0`) to compare trees (`PYTHONPATH=<tree>`).

    .venv/bin/python bench/cluster_bridge.py
    taskset -c 0 .venv/bin/python bench/cluster_bridge.py --hub-messages 3000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
import trio
import trio_asyncio


def summary(name: str, seconds: list[float]) -> None:
    us = sorted(s * 1e6 for s in seconds)
    p99 = us[min(len(us) - 1, math.ceil(len(us) * 0.99) - 1)]
    print(f"  {name:<58} p50 {statistics.median(us):7.0f} us   p99 {p99:7.0f} us", flush=True)


def batch(prefix: str) -> list[tuple[Any, ...]]:
    return [
        ("MULTI",),
        ("SET", f"{prefix}:node", "incarnation 1", "PX", 15000),
        ("PUBLISH", f"{prefix}:bus", b"x" * 200),
        ("EXEC",),
    ]


async def timed(calls: int, once: Callable[[], Awaitable[Any]]) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await once()
        out.append(time.perf_counter() - started)
    return out


async def bridge(args: argparse.Namespace, prefix: str) -> None:
    async with trio_asyncio.open_loop() as loop:

        def cross(work: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            return lambda: trio_asyncio.aio_as_trio(work, loop=loop)()

        client = aioredis.Redis.from_url(args.redis_url, health_check_interval=0, socket_timeout=None)

        async def nothing() -> None:
            return None

        async def pipeline() -> Any:
            pipe = client.pipeline(transaction=True)
            for command in batch(prefix)[1:-1]:
                pipe.execute_command(*command)
            return await pipe.execute()

        link = await cross(client.connection_pool.get_connection)()  # type: ignore[no-untyped-call]
        packed = link.pack_commands(batch(prefix))

        async def written() -> Any:
            await link.send_packed_command(packed, check_health=False)
            for _ in range(len(batch(prefix))):
                answer = await link.read_response(timeout=math.inf)
            return answer

        summary("a crossing of a coroutine that does nothing", await timed(args.calls, cross(nothing)))
        summary("redis-py Pipeline MULTI/SET/PUBLISH/EXEC, a crossing each", await timed(args.calls, cross(pipeline)))
        summary("the same packed, written and read on a connection, crossing", await timed(args.calls, cross(written)))
        await cross(client.aclose)()


async def plain_asyncio(args: argparse.Namespace, prefix: str) -> None:
    client = aioredis.Redis.from_url(args.redis_url, health_check_interval=0, socket_timeout=None)

    async def pipeline() -> Any:
        pipe = client.pipeline(transaction=True)
        for command in batch(prefix)[1:-1]:
            pipe.execute_command(*command)
        return await pipe.execute()

    summary("redis-py Pipeline MULTI/SET/PUBLISH/EXEC in plain asyncio", await timed(args.calls, pipeline))
    await client.aclose()


class Subscriber:
    conn_id = "bench"

    def deliver_nowait(self, frame: bytes) -> None:
        pass

    def reply_nowait(self, message: Any) -> None:
        pass


async def hub_cpu(args: argparse.Namespace, prefix: str, cluster: bool) -> None:
    from fluxrt_trio.cluster.hub import ClusterHub
    from fluxrt_trio.hub import LocalHub

    heard = 0

    class Counting(Subscriber):
        def deliver_nowait(self, frame: bytes) -> None:
            nonlocal heard
            heard += 1

    async with trio.open_nursery() as nursery:
        hub: Any
        if cluster:
            hub = ClusterHub(args.redis_url, node_id="bench", node_timeout=15, prefix=f"{prefix}-hub")
            await nursery.start(hub.run)
            while hub.cluster_statistics().state != "up":
                await trio.sleep(0.01)
        else:
            hub = LocalHub()
        hub.join("broadcast:bench", Counting())
        for _ in range(9):
            hub.join("broadcast:bench", Subscriber())
        await trio.sleep(0.2)
        cpu, wall = time.process_time(), time.perf_counter()
        for n in range(args.hub_messages):
            hub.broadcast("broadcast:bench", {"n": n, "pad": "x" * 80})
            await trio.sleep(0.001)
        while heard < args.hub_messages:
            await trio.sleep(0.001)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        name = "ClusterHub (through Redis)" if cluster else "LocalHub"
        print(f"  {name:<27} {cpu / args.hub_messages * 1e6:6.0f} us of CPU per broadcast ({wall:.1f} s)", flush=True)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--hub-messages", type=int, default=3000, help="broadcasts per hub (0: skip the hubs)")
    args = parser.parse_args()
    prefix = f"bench-bridge-{secrets.token_hex(4)}"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cluster_bridge: Redis {args.redis_url}, prefix {prefix}, load average {load}", flush=True)
    try:
        trio.run(bridge, args, prefix)
        asyncio.run(plain_asyncio(args, prefix))
        if args.hub_messages:
            trio.run(hub_cpu, args, prefix, False)
            trio.run(hub_cpu, args, prefix, True)
    finally:
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
