"""The garbage-collector policy (fluxrt_trio/collector.py): survivors of a full collection are frozen, and the life of
a connection leaves no garbage in reference cycles, the only kind frozen objects could keep."""

from __future__ import annotations

import collections
import gc
import subprocess
import sys
import textwrap

import trio

from fluxrt_trio.postgres.bridge import asyncio_loop, close_connection, on_connection
from fluxrt_trio.postgres.bridge import connect as open_connection

from .support.clients import connect, recv, send, subscribe
from .support.config import token
from .support.servers import start

POLICY = """
import gc
from fluxrt_trio import collector

collector.install()
collector.install()
assert gc.callbacks.count(collector._freeze_survivors) == 1
frozen = gc.get_freeze_count()
young = [[n] for n in range(5000)]  # tracked containers that outlive the collection
gc.collect(1)
assert gc.get_freeze_count() == frozen, "only a full collection freezes"
gc.collect()
assert gc.get_freeze_count() >= frozen + 5000, (frozen, gc.get_freeze_count())
# A frozen object is still freed by its reference count.
import weakref
class Box:
    pass
box = Box()
gc.collect()
ref = weakref.ref(box)
del box
assert ref() is None
print("ok")
"""


def test_survivors_of_a_full_collection_are_frozen():
    # In a process of its own: freezing in the test process would keep other tests' cyclic garbage.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(POLICY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


async def test_a_connection_s_life_leaves_no_garbage_in_cycles(start_server, db):
    db.sql(
        "CREATE TABLE items (id int PRIMARY KEY); GRANT SELECT ON items TO authenticated;"
        "SELECT enable_realtime('items');"
    )
    server = await start(start_server, db)
    async with asyncio_loop():
        writer = await open_connection(db.dsn)
        try:
            await _lives(server, writer)
        finally:
            await close_connection(writer)


async def _lives(server, writer) -> None:
    """A connection's whole life, 20 at once, with the collector saving whatever it finds in cycles: none."""
    one_at_a_time = trio.Lock()

    async def life(n: int) -> None:
        async with connect(server, tok=token(f"user-{n}")) as ws:
            await subscribe(ws, "table:public.items")
            await subscribe(ws, "presence:room")
            await send(ws, type="presence", channel="presence:room", event="track", payload={"n": n}, ref="t")
            await send(ws, type="subscribe", channel="table:public.missing", ref="m")
            async with one_at_a_time:
                await on_connection(writer, lambda c: c.execute("INSERT INTO items VALUES ($1)", n))
            seen: set[object] = set()
            while not {"t", "m", n} <= seen:
                message = await recv(ws)
                seen.add(message.get("ref"))
                if message["channel"] == "table:public.items":
                    seen.add(message["payload"]["record"]["id"])

    await life(0)  # what the first connection makes once (caches, prepared statements) is not of interest
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with trio.open_nursery() as nursery:
            for n in range(1, 21):
                nursery.start_soon(life, n)
        await trio.sleep(0)
        gc.collect()
        kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not kinds, kinds.most_common(20)
