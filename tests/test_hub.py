"""LocalHub, the hub of one node, as values: a broadcast reaches every other subscriber, and the hub, not the
session, answers its sender."""

from __future__ import annotations

import attrs
import orjson

from fluxrt_trio.hub import LocalHub
from fluxrt_trio.protocol.messages import ServerMessage, encode


@attrs.define(eq=False)
class Recorder:
    """A subscriber that writes what it is handed, in order, to a log shared with the others."""

    name: str
    log: list[tuple[str, str, dict]]

    def deliver_nowait(self, frame: bytes) -> None:
        # A server text frame: FIN + opcode, a length (7, 16 or 64 bits, unmasked), then the JSON.
        length = frame[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(length, 0)
        self.log.append((self.name, "delivered", orjson.loads(frame[start:])))

    def reply_nowait(self, message: ServerMessage) -> None:
        self.log.append((self.name, "replied", orjson.loads(encode(message))))


def room(*names: str, channel: str = "broadcast:chat") -> tuple[LocalHub[Recorder], dict[str, Recorder], list]:
    """A hub with one subscriber of `channel` per name, and their shared log."""
    log: list[tuple[str, str, dict]] = []
    hub: LocalHub[Recorder] = LocalHub()
    subscribers = {name: Recorder(name, log) for name in names}
    for subscriber in subscribers.values():
        hub.join(channel, subscriber)
    return hub, subscribers, log


def test_a_broadcast_with_ref_is_acked_to_its_sender_after_the_others_have_it():
    hub, subscribers, log = room("sender", "b", "c")
    hub.broadcast("broadcast:chat", {"m": 1}, sender=subscribers["sender"], ref="r1")
    event = {"type": "broadcast", "channel": "broadcast:chat", "payload": {"m": 1}}
    ack = {"type": "ack", "channel": "broadcast:chat", "status": "sent", "ref": "r1"}
    assert log == [("b", "delivered", event), ("c", "delivered", event), ("sender", "replied", ack)]


def test_a_broadcast_without_ref_sends_its_sender_nothing():
    hub, subscribers, log = room("sender", "b")
    hub.broadcast("broadcast:chat", 1, sender=subscribers["sender"])
    assert log == [("b", "delivered", {"type": "broadcast", "channel": "broadcast:chat", "payload": 1})]


def test_a_sender_that_is_not_subscribed_or_alone_is_acked_too():
    hub, _, log = room("b")
    outsider = Recorder("outsider", log)
    hub.broadcast("broadcast:chat", 1, sender=outsider, ref="x")
    hub.broadcast("broadcast:empty", 2, sender=outsider, ref="y")
    assert log == [
        ("b", "delivered", {"type": "broadcast", "channel": "broadcast:chat", "payload": 1}),
        ("outsider", "replied", {"type": "ack", "channel": "broadcast:chat", "status": "sent", "ref": "x"}),
        ("outsider", "replied", {"type": "ack", "channel": "broadcast:empty", "status": "sent", "ref": "y"}),
    ]


def test_a_broadcast_without_a_sender_is_delivered_to_everyone_and_answered_to_no_one():
    hub, _, log = room("a", "b")
    hub.broadcast("broadcast:chat", 1, ref="ignored")
    assert [(who, what) for who, what, _ in log] == [("a", "delivered"), ("b", "delivered")]


def test_each_broadcast_takes_the_next_position():
    hub, subscribers, _ = room("sender", "b")
    first = hub.broadcast("broadcast:chat", 1, sender=subscribers["sender"], ref="1")
    assert hub.broadcast("broadcast:chat", 2, sender=subscribers["sender"]) == first + 1
    assert hub.statistics().delivered == 2


def test_one_node_is_always_available_to_itself():
    assert LocalHub().unavailable() is None
