"""The filter index finds exactly the subscribers a scan of every subscriber would, for every filter operator and
JSON value type, so indexing changes the cost of a change, never who receives it."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import orjson

from fluxrt_trio.protocol.channels import parse_channel
from fluxrt_trio.protocol.delivery import FilterIndex, wants
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.rows import decode_image
from fluxrt_trio.protocol.session import Subscription

CHANNEL = "table:public.tasks"


@attrs.define(eq=False)
class Subscriber:
    conn_id: str
    sub: Subscription | None
    identity: Identity | None = attrs.field(factory=lambda: Identity("u", "authenticated"))

    def subscription(self, channel: str) -> Subscription | None:
        return self.sub if channel == CHANNEL else None


FILTERS = [
    None,
    "n=eq.1",
    "n=eq.1.0",
    "n=eq.01",
    "n=eq.x",
    "n=in.(1,2)",
    "n=in.(1,1.0,3)",
    "n=neq.1",
    "n=gt.1",
    "n=eq.NaN",
    "s=eq.open",
    "s=eq.1",
    "s=in.(open,late)",
    "s=eq.true",
    "b=eq.true",
    "b=eq.false",
    "b=in.(true,1)",
    "b=is.null",
    "missing=eq.1",
    "big=eq.9007199254740993",
    "big=eq.9007199254740992",
]
VALUES = [
    "1",
    "1.0",
    "2",
    "3",
    "-0",
    '"1"',
    '"open"',
    '"true"',
    "true",
    "false",
    "null",
    "{}",
    "[1]",
    "9007199254740993",
]


def unfiltered(index: FilterIndex) -> list[tuple[Any, Subscription, str]]:
    """The subscriptions without a filter: delivery reaches them through their identity's group."""
    return [(x, sub, key) for key, group in index.groups.items() for x, sub in group if sub.filter is None]


def test_the_index_finds_what_a_scan_finds():
    subscribers = [Subscriber(str(i), Subscription(parse_channel(CHANNEL), "*", f)) for i, f in enumerate(FILTERS)]
    subscribers.append(Subscriber("gone", None))
    subscribers.append(Subscriber("anonymous-less", Subscription(parse_channel(CHANNEL)), None))
    index = FilterIndex(CHANNEL, subscribers)
    checked = 0
    for n, s, b in itertools.product(VALUES, repeat=3):
        image: dict[str, Any] = decode_image(f'{{"n": {n}, "s": {s}, "b": {b}, "big": {n}}}')
        scanned = {
            x.conn_id
            for x in subscribers
            if x.sub is not None and x.identity is not None and wants(x.sub, "INSERT", image)
        }
        found = [x.conn_id for x, sub, _ in [*unfiltered(index), *index.filtered(image)] if wants(sub, "INSERT", image)]
        assert len(found) == len(set(found)), (image, found)
        assert set(found) == scanned, orjson.dumps(image)
        checked += len(scanned)
    assert checked > 1000  # the comparison saw matches, not only empty sets
    assert {x.conn_id for x, _, _ in [*unfiltered(index), *index.filtered(None)]} == {"0", "7", "8", "17"}
