"""A referee for `Session`, shared by the property tests and the coverage-guided harness (fuzz/fuzz_session.py).

It carries out effects the way the connection shell does (fluxrt_trio/connection.py `_apply`: in order, a request
answered before the effects after it, one client frame at a time) against a record of what the hub holds, and checks
the session's invariants after every step. A broken invariant raises AssertionError naming it.

A client's presence change (track, or untrack of what it tracks) must be handed off first (`HandOff`, which a cluster
refuses with UNAVAILABLE while its engine is unreachable): the Track or Untrack comes only from an allowed hand-off,
after its ack, and a refused one changes nothing. Giving presence back (unsubscribe, drop, close) and moving it to
a new key after a token refresh are never handed off.
"""

from __future__ import annotations

from typing import Any

import orjson

from fluxrt_trio.protocol.channels import ChannelKind
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.messages import Ack, Error, ErrorCode, Pong
from fluxrt_trio.protocol.session import (
    Authenticate,
    CheckAction,
    CheckSubscribe,
    Close,
    Effect,
    HandOff,
    Join,
    Leave,
    Outcome,
    Reply,
    Request,
    Session,
    SessionLimits,
    Track,
    Untrack,
)

CONN = "conn-fuzz"
LIMITS = SessionLimits(max_subscriptions=2, message_rate_limit=20, max_presence_state_size=64)
CHANNELS = (
    "table:public.users",
    "table:public.todos",
    "presence:lobby",
    "presence:room-2",
    "broadcast:news",
    "broadcast:chat",
    "table:bad",
    "presence:",
    "nonsense",
)
SUBS = (None, "alice", "bob")
REQUESTS = (CheckSubscribe, CheckAction, HandOff, Authenticate)


def identity(sub: str | None) -> Identity:
    return Identity(sub, "anon" if sub is None else "authenticated", {"sub": sub} if sub else {})


def frame(kind: str, channel: str, ref: str | None, payload: Any = None, event: str = "track") -> bytes:
    """A client frame of one of the protocol's types (or of an unknown one), on `channel`."""
    message: dict[str, Any] = {"type": kind, "channel": channel}
    if kind == "presence":
        message["event"] = event
        message["payload"] = payload
    elif kind == "broadcast":
        message["payload"] = payload
    elif kind == "auth":
        message = {"type": "auth", "token": "t"}
    elif kind == "ping":
        message = {"type": "ping"}
    if ref is not None:
        message["ref"] = ref
    return orjson.dumps(message)


class Referee:
    """One session and the hub-side record of what its effects did."""

    def __init__(self, limits: SessionLimits = LIMITS, sub: str | None = None) -> None:
        self.limits = limits
        self.session = Session(CONN, identity(sub), limits)
        self.joined: set[str] = set()
        self.present: set[tuple[str, str, str]] = set()
        """(channel, key, ref) of every Track not yet undone by its Untrack"""
        self.acked: set[str] = set()
        """channels with a `subscribed` ack produced since their last Leave"""
        self.pending: list[Effect] = []
        """effects still to carry out, the next one last; a request on top waits for its answer"""
        self.now = 0.0
        self.closed = False

    @property
    def waiting(self) -> Request | None:
        """The request the shell is waiting on, if any."""
        top = self.pending[-1] if self.pending else None
        return top if isinstance(top, REQUESTS) else None

    def receive(self, text: str | bytes, ref: str | None = None, *, ref_known: bool = False) -> None:
        """One client frame. With `ref_known`, every ack, error or pong it produces must echo `ref`."""
        assert self.waiting is None, "the shell reads no frame while a request waits"
        effects = self.session.receive(text, self.now)
        if ref_known:
            self._check_refs(effects, ref)
        self._check_not_handed_off(effects)
        self._run(effects)

    def binary(self) -> None:
        assert self.waiting is None
        self._run(self.session.binary_frame(self.now))

    def answer(self, outcome: Outcome) -> None:
        request = self.waiting
        assert request is not None
        self.pending.pop()
        effects = self.session.answered(request, outcome)
        renewal = isinstance(request, CheckSubscribe) and request.renewal
        if not renewal:
            self._check_refs(effects, request.ref)
        if isinstance(request, HandOff):
            self._check_handed_off(request, outcome, effects)
        elif not isinstance(request, Authenticate):
            self._check_not_handed_off(effects)
        self._run(effects, more=True)

    def refusal(self, request: Request) -> Error:
        """The refusal the shell sends for `request`: UNAVAILABLE for a hand-off (the cluster engine is
        unreachable), FORBIDDEN for a check."""
        if isinstance(request, HandOff):
            return Error(
                ErrorCode.UNAVAILABLE, "cluster engine unreachable", channel=request.channel.name, ref=request.ref
            )
        return Error(ErrorCode.FORBIDDEN, "refused by the referee", ref=request.ref)

    def drop(self, name: str) -> None:
        """The server ends a subscription (end_subscription), possibly while a check runs."""
        self._apply_all(self.session.drop(name))
        self.check()

    def tick(self, seconds: float) -> None:
        self.now += seconds

    def close(self) -> None:
        """The connection ends (possibly while a check runs, whose answer is then thrown away): everything held
        must be given back."""
        self.pending.clear()
        self._apply_all(self.session.close())
        self.closed = True
        self.check()
        assert not self.joined, f"Join without Leave after close: {sorted(self.joined)}"
        assert not self.present, f"Track without Untrack after close: {sorted(self.present)}"
        assert not self.session.subscriptions and not self.session.tracked, "close() left state behind"

    # ---- carrying out effects --------------------------------------------------------------------------------

    def _run(self, effects: list[Effect], *, more: bool = False) -> None:
        if more:
            self.pending.extend(reversed(effects))
        else:
            self.pending = effects[::-1]
        while self.pending and self.waiting is None:
            effect = self.pending.pop()
            self._apply(effect)
            if self.closed:
                return
        self.check()

    def _apply_all(self, effects: list[Effect]) -> None:
        for effect in effects:
            assert not isinstance(effect, REQUESTS), f"unexpected {effect!r}"
            self._apply(effect)

    def _apply(self, effect: Effect) -> None:
        match effect:
            case Join(subscription=sub):
                self.joined.add(sub.channel.name)
            case Reply(message=Ack(status="subscribed", channel=str(name))):
                self.acked.add(name)
            case Leave(channel=channel):
                assert channel.name in self.joined, f"Leave of {channel.name} that was never joined"
                self.joined.discard(channel.name)
                self.acked.discard(channel.name)
            case Track(channel=channel, key=key, ref=ref):
                assert channel.kind is ChannelKind.PRESENCE, f"Track on {channel.name}"
                assert channel.name in self.joined, f"Track on {channel.name} without a subscription"
                # A re-track under the same key replaces the meta; under another key the old one must be undone.
                stale = {p for p in self.present if p[0] == channel.name and p[2] == ref and p[1] != key}
                assert not stale, f"Track under {key} while still tracked as {stale}"
                self.present.add((channel.name, key, ref))
            case Untrack(channel=channel, key=key, ref=ref):
                assert (channel.name, key, ref) in self.present, f"Untrack of {channel.name} {key} never tracked"
                self.present.discard((channel.name, key, ref))
            case Close():
                self.close()

    def _check_refs(self, effects: list[Effect], ref: str | None) -> None:
        for effect in effects:
            if isinstance(effect, Reply) and isinstance(effect.message, Ack | Error | Pong):
                assert effect.message.ref == ref, f"{effect.message!r} does not echo ref {ref!r}"
            renewal = isinstance(effect, CheckSubscribe) and effect.renewal
            if isinstance(effect, REQUESTS) and not renewal:
                assert effect.ref == ref, f"{effect!r} does not carry ref {ref!r}"

    def _check_not_handed_off(self, effects: list[Effect]) -> None:
        """Effects that answer no hand-off: no Track, and an Untrack only right after the Leave that gives the
        presence back; a hand-off only for a presence change the session can make."""
        for i, effect in enumerate(effects):
            assert not isinstance(effect, Track), f"{effect!r} without a hand-off"
            if isinstance(effect, Untrack):
                assert i > 0 and effects[i - 1] == Leave(effect.channel), f"{effect!r} without a hand-off"
            if isinstance(effect, HandOff):
                assert effect.channel.kind is ChannelKind.PRESENCE, f"{effect!r} off a presence channel"
                assert effect.action in ("track", "untrack"), f"{effect!r}"
                if effect.action == "untrack":
                    assert effect.channel.name in self.session.tracked, f"{effect!r} of nothing tracked"
                else:
                    assert isinstance(effect.payload, dict), f"{effect!r} without a state"

    def _check_handed_off(self, request: HandOff, outcome: Outcome, effects: list[Effect]) -> None:
        """A refused hand-off sends its refusal and changes nothing; an allowed one acks before the change."""
        if isinstance(outcome, Error):
            assert effects == [Reply(outcome)], f"{request!r} refused, yet {effects!r}"
            return
        assert not any(isinstance(e, REQUESTS) for e in effects), f"{request!r} answered with {effects!r}"
        changes = [i for i, e in enumerate(effects) if isinstance(e, Track | Untrack)]
        assert len(changes) <= 1, f"{request!r} answered with {effects!r}"
        assert all(i == len(effects) - 1 for i in changes), f"the change of {request!r} before its ack: {effects!r}"
        for i in changes:
            expected = Track if request.action == "track" else Untrack
            assert isinstance(effects[i], expected), f"{request!r} answered with {effects[i]!r}"
            assert effects[i].channel == request.channel, f"{request!r} answered with {effects[i]!r}"
            if request.ref is not None:
                status = "tracked" if request.action == "track" else "untracked"
                assert effects[0] == Reply(Ack(status, request.channel.name, request.ref)), f"unacked {request!r}"

    # ---- invariants ------------------------------------------------------------------------------------------

    def check(self) -> None:
        session = self.session
        names = set(session.subscriptions)
        # Requests come last in every effect list, so whenever the shell waits, what came before is carried out.
        assert names == self.joined, f"subscriptions {sorted(names)} but joined {sorted(self.joined)}"
        unacked = names - self.acked
        assert not unacked, f"subscribed to {sorted(unacked)} without a subscribed ack"
        assert len(names) <= self.limits.max_subscriptions, f"{len(names)} subscriptions over the limit"
        for name in session.tracked:
            assert name in names, f"tracked {name} without a subscription"
            assert session.subscriptions[name].channel.kind is ChannelKind.PRESENCE, f"tracked {name}"
        held = {(name, session.presence_key, CONN) for name in session.tracked}
        assert held == self.present, f"session tracks {sorted(held)}, hub holds {sorted(self.present)}"
