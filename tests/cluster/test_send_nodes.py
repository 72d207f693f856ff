"""`realtime.send` with two nodes over one database and one Redis (docs/protocol.md, "Broadcast from the database and
from backends"): a committed send reaches the channel's subscribers on both nodes once each, in commit order; a
rolled-back one reaches nobody."""

from __future__ import annotations

from ..support.clients import connect, recv, subscribe
from ..support.nodes import running_nodes
from ..support.waiting import nothing_arrives
from .test_cluster_resume import up

NEWS = "broadcast:news"


async def test_a_committed_send_reaches_both_nodes_once_and_a_rolled_back_one_neither(db, redis, tmp_path):
    async with running_nodes(2, tmp_path, db.dsn, redis_url=redis.url) as nodes:
        for node in nodes:
            await up(node)
        async with connect(nodes[0].remote) as first, connect(nodes[1].remote) as second:
            await subscribe(first, NEWS)
            await subscribe(second, NEWS)
            await db.execute("BEGIN; SELECT realtime.send('broadcast:news', '\"rolled back\"'); ROLLBACK")
            await db.execute("SELECT realtime.send('broadcast:news', to_jsonb(n)) FROM generate_series(1, 20) n")
            for ws in (first, second):
                assert [(await recv(ws, timeout=10))["payload"] for _ in range(20)] == list(range(1, 21))
                await nothing_arrives(ws, 0.3)
