"""Several batches in flight on one node's link to Redis (docs/protocol.md "Several nodes"): an in-process hub on a
private Redis that the tests stall (SIGSTOP), kill and run late. Whatever happens to Redis, every broadcast gets
exactly one answer (`ack` `sent` or `UNAVAILABLE`), in the order it was sent, and none is delivered twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio

from fluxrt_trio.cluster.hub import MAX_IN_FLIGHT, ClusterHub

from ..support.redis import RedisServer
from .test_cluster_resume import Recorder

CHAT = "broadcast:chat"
SENT = 12
"""broadcasts sent while Redis is stalled: MAX_IN_FLIGHT batches in flight, the rest queued behind them"""


class LargeRecorder(Recorder):
    """A Recorder that also reads frames with a 64-bit length."""

    def deliver_nowait(self, frame: bytes) -> None:
        start = {126: 4, 127: 10}.get(frame[1] & 0x7F, 2)
        self.got.append(orjson.loads(frame[start:]))


@pytest.fixture
async def hub(redis: RedisServer, nursery: trio.Nursery, request: pytest.FixtureRequest) -> AsyncIterator[ClusterHub]:
    node_timeout = getattr(request, "param", 60.0)
    cluster: ClusterHub[Recorder] = ClusterHub(redis.url, node_id="solo", node_timeout=node_timeout, history_size=50)
    await nursery.start(cluster.run)
    await up(cluster)
    yield cluster
    nursery.cancel_scope.cancel()


async def up(hub: ClusterHub) -> None:
    with trio.fail_after(15):
        while hub.cluster_statistics().state != "up":
            await trio.sleep(0.01)


async def answers(sender: Recorder, n: int) -> list[dict[str, Any]]:
    """The first `n` replies the sender got (acks and errors), once it has them."""
    with trio.fail_after(15):
        while len(sender.got) < n:
            await trio.sleep(0.01)
    return sender.got[:n]


def stall_and_send(redis: RedisServer, hub: ClusterHub, sender: Recorder) -> None:
    """Stall Redis, then broadcast SENT messages (payload n, ref str(n)) one by one, as separate callers would."""
    assert MAX_IN_FLIGHT < SENT
    redis.pause()
    for n in range(SENT):
        hub.broadcast(CHAT, n, sender=sender, ref=str(n))
    # Each went out at once as a batch of its own until MAX_IN_FLIGHT waited for Redis; the rest wait behind them
    # (the answers when Redis fails tell them apart). All of them count in the backlog until Redis answers.
    assert hub.cluster_statistics().backlog_bytes > 0


async def test_batches_in_flight_are_answered_in_order_and_each_broadcast_delivered_once(redis, hub):
    live, sender = Recorder(), Recorder()
    hub.join(CHAT, live)
    stall_and_send(redis, hub, sender)
    redis.resume()

    acks = await answers(sender, SENT)
    assert [(a["type"], a["status"], a["ref"]) for a in acks] == [("ack", "sent", str(n)) for n in range(SENT)]
    with trio.fail_after(15):
        while len(live.got) < SENT:
            await trio.sleep(0.01)
    assert [m["payload"] for m in live.got] == list(range(SENT))
    # Each has its own position, in the order Redis took them.
    ids = [tuple(map(int, m["id"].removeprefix("b2~").split("-"))) for m in live.got]
    assert ids == sorted(set(ids))
    statistics = hub.cluster_statistics()
    assert (statistics.backlog_bytes, statistics.refused) == (0, 0)


async def test_batches_larger_than_the_socket_takes_at_once_keep_their_order(redis, nursery):
    # 12 batches of 600 kB while Redis reads nothing: the kernel's buffers fill, and what the socket does not take
    # waits in the transport and then in the engine's queue for the writer.
    hub: ClusterHub[Recorder] = ClusterHub(redis.url, node_id="solo", node_timeout=60, max_backlog=16 * 1024 * 1024)
    await nursery.start(hub.run)
    await up(hub)
    live, sender = LargeRecorder(), Recorder()
    hub.join(CHAT, live)
    redis.pause()
    for n in range(SENT):
        hub.broadcast(CHAT, [n, "x" * 600_000], sender=sender, ref=str(n))
    redis.resume()

    acks = await answers(sender, SENT)
    assert [(a["status"], a["ref"]) for a in acks] == [("sent", str(n)) for n in range(SENT)]
    with trio.fail_after(15):
        while len(live.got) < SENT:
            await trio.sleep(0.01)
    assert [m["payload"][0] for m in live.got] == list(range(SENT))
    assert hub.cluster_statistics().backlog_bytes == 0


async def test_redis_killed_with_batches_in_flight_answers_each_broadcast_once_and_delivers_none(redis, hub):
    live, sender = Recorder(), Recorder()
    hub.join(CHAT, live)
    stall_and_send(redis, hub, sender)
    redis.kill()

    refused = await answers(sender, SENT)
    assert [(r["code"], r["ref"]) for r in refused] == [("UNAVAILABLE", str(n)) for n in range(SENT)]
    # Those in flight may have been run by Redis; those queued behind them never left the node.
    assert all("may have reached other nodes" in r["message"] for r in refused[:MAX_IN_FLIGHT])
    assert all("nothing was delivered to any node" in r["message"] for r in refused[MAX_IN_FLIGHT:])
    assert live.got == []

    redis.start()
    await up(hub)
    hub.broadcast(CHAT, "after", sender=sender, ref="after")
    assert (await answers(sender, SENT + 1))[-1] == {"type": "ack", "channel": CHAT, "status": "sent", "ref": "after"}
    with trio.fail_after(15):
        while not live.got:
            await trio.sleep(0.01)
    assert [m["payload"] for m in live.got] == ["after"]
    assert len(sender.got) == SENT + 1


@pytest.mark.parametrize("hub", [3.0], indirect=True)
async def test_batches_redis_runs_after_the_node_gave_up_on_them_are_not_delivered_here(redis, hub):
    # node_timeout 3 s: a call to Redis times out after 1 s.
    live, sender = Recorder(), Recorder()
    hub.join(CHAT, live)
    stall_and_send(redis, hub, sender)
    try:
        refused = await answers(sender, SENT)
    finally:
        # Redis runs what it had read of the old link, perhaps after the node connected again.
        redis.resume()
    assert [(r["code"], r["ref"]) for r in refused] == [("UNAVAILABLE", str(n)) for n in range(SENT)]
    assert all("may have reached other nodes but not this one" in r["message"] for r in refused[:MAX_IN_FLIGHT])

    await up(hub)
    hub.broadcast(CHAT, "after", sender=sender, ref="after")
    assert (await answers(sender, SENT + 1))[-1]["status"] == "sent"
    with trio.fail_after(15):
        while "after" not in [m["payload"] for m in live.got]:
            await trio.sleep(0.01)
    assert [m["payload"] for m in live.got] == ["after"]
    assert len(sender.got) == SENT + 1
