"""The session state machine under random runs of client frames, answers to its requests (allowed, refused, a new
identity), subscriptions the server ends, time passing and closes, refereed by tests/fuzz/referee.py after every
step: no subscription without its `subscribed` ack, never more than the limit, presence only on subscribed presence
channels and under the current key, every presence change handed off first (and a refused hand-off changing
nothing), and a close that gives back every Join and every Track."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fluxrt_trio.protocol.session import (
    Authenticate,
    CheckAction,
    Effect,
    HandOff,
    Outcome,
    Session,
    SessionLimits,
    Untrack,
)

from .referee import CHANNELS, SUBS, Referee, frame, identity

# presence:lobby the most, so that runs often reach presence tracked and a full session; every other name too.
channels = st.sampled_from(["presence:lobby"] * 2 + list(CHANNELS))
presence_channels = st.sampled_from(["presence:lobby"] * 4 + ["presence:room-2", "broadcast:news", "presence:"])
refs = st.sampled_from([None, "r1", "x" * 64])
states = st.sampled_from([{}, {"status": "online"}, {"status": "away"}, {"big": "x" * 80}, None, [1]])
idle = precondition(lambda self: self.referee.waiting is None)
"""The shell reads the next frame only once every request of the last one is answered."""


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.referee = Referee()
        self.gap = 10.0

    @initialize(sub=st.sampled_from(SUBS), start=st.sampled_from(["new", "subscribed", "tracking", "full"]))
    def connect(self, sub: str | None, start: str) -> None:
        """Runs start from a new connection or one that already holds presence (or its whole allowance of
        subscriptions), so that short runs reach the deep states as well."""
        self.referee = Referee(sub=sub)
        self.gap = 10.0
        names = {"new": [], "subscribed": ["presence:lobby"], "tracking": ["presence:lobby"]}.get(
            start, ["presence:lobby", "table:public.users"]
        )
        for name in names:
            self._send("subscribe", name, None)
            self.referee.answer(None)
        if start in ("tracking", "full"):
            self._send("presence", "presence:lobby", "t", {"status": "online"})
            self.referee.answer(None)

    def _send(self, kind: str, channel: str, ref: str | None, payload: Any = None, event: str = "track") -> None:
        self.referee.tick(self.gap)
        self.referee.receive(frame(kind, channel, ref, payload, event), ref, ref_known=True)
        self._reopen_if_closed()

    @idle
    @rule(channel=channels, ref=refs)
    def subscribe(self, channel: str, ref: str | None) -> None:
        self._send("subscribe", channel, ref)

    @idle
    @rule(channel=channels, ref=refs)
    def unsubscribe(self, channel: str, ref: str | None) -> None:
        self._send("unsubscribe", channel, ref)

    @idle
    @rule(channel=presence_channels, ref=refs, state=states)
    def track(self, channel: str, ref: str | None, state: Any) -> None:
        self._send("presence", channel, ref, state, "track")

    @idle
    @rule(channel=presence_channels, ref=refs, event=st.sampled_from(["untrack", "leave"]))
    def untrack(self, channel: str, ref: str | None, event: str) -> None:
        self._send("presence", channel, ref, None, event)

    @idle
    @rule(channel=channels, ref=refs)
    def broadcast(self, channel: str, ref: str | None) -> None:
        self._send("broadcast", channel, ref, {"n": 1})

    @idle
    @rule(ref=refs)
    def auth(self, ref: str | None) -> None:
        self._send("auth", "", ref)

    @idle
    @rule(ref=refs, kind=st.sampled_from(["ping", "nope"]))
    def ping(self, ref: str | None, kind: str) -> None:
        self._send(kind, "", ref)

    @idle
    @rule(text=st.text(max_size=30) | st.sampled_from(["[]", '{"type": 1}', '{"ref": 5}']))
    def client_sends_garbage(self, text: str) -> None:
        self.referee.receive(text)
        self._reopen_if_closed()

    @idle
    @rule()
    def client_sends_binary(self) -> None:
        self.referee.binary()
        self._reopen_if_closed()

    @precondition(lambda self: self.referee.waiting is not None)
    @rule(
        answer=st.sampled_from(["allow", "allow", "refuse", "drop", "close"]),
        sub=st.sampled_from(SUBS),
        channel=channels,
    )
    def shell_answers(self, answer: str, sub: str | None, channel: str) -> None:
        """One rule for everything that can happen while a check runs, so that checks mostly get answered. A
        hand-off is refused with UNAVAILABLE (the cluster engine is unreachable), a check with FORBIDDEN."""
        request = self.referee.waiting
        assert request is not None
        if answer == "close":
            self.connection_closes(sub)
        elif answer == "refuse":
            self.referee.answer(self.referee.refusal(request))
        else:
            if answer == "drop":
                # The server ends a subscription while the check runs (realtime turned off for its table).
                self.referee.drop(channel)
            self.referee.answer(identity(sub) if isinstance(request, Authenticate) else None)

    @idle
    @rule(channel=channels)
    def server_ends_subscription(self, channel: str) -> None:
        self.referee.drop(channel)

    @idle
    @rule(seconds=st.sampled_from([0.0, 0.5, 10.0, 120.0]))
    def pace(self, seconds: float) -> None:
        """Time between frames from now on: 10 s keeps within every allowance, 0 floods."""
        self.gap = seconds

    def connection_closes(self, sub: str | None) -> None:
        # Also at the end of every run (teardown): every run ends with its connection's release checked.
        self.referee.close()
        self.referee = Referee(sub=sub)

    def _reopen_if_closed(self) -> None:
        # A flood closes the connection (4029); the referee checked the release, a new connection comes.
        if self.referee.closed:
            self.referee = Referee()

    @invariant()
    def invariants_hold(self) -> None:
        self.referee.check()

    def teardown(self) -> None:
        if not self.referee.closed:
            self.referee.close()


TestSessionMachine = SessionMachine.TestCase
# Shorter runs than Hypothesis' 50 steps: the warm starts reach the deep states, and make test stays quick.
TestSessionMachine.settings = settings(settings(), stateful_step_count=25)


def _forgets_presence(close: Callable[[Session], list[Effect]]) -> Callable[[Session], list[Effect]]:
    return lambda session: [e for e in close(session) if not isinstance(e, Untrack)]


def _ignores_the_limit(checked: Callable[..., list[Effect]]) -> Callable[..., list[Effect]]:
    def subscribe_checked(session: Session, *args: Any) -> list[Effect]:
        limits, session.limits = session.limits, SessionLimits(max_subscriptions=1000)
        try:
            return checked(session, *args)
        finally:
            session.limits = limits

    return subscribe_checked


def _skips_the_hand_off(allowed: Callable[[Session, CheckAction], list[Effect]]) -> Callable[..., list[Effect]]:
    """Tracks as soon as the check allows it, as the session did before the cluster."""

    def allowed_at_once(session: Session, check: CheckAction) -> list[Effect]:
        effects = allowed(session, check)
        return [e for h in effects for e in (session.answered(h, None) if isinstance(h, HandOff) else [h])]

    return allowed_at_once


def _ignores_a_refused_hand_off(answered: Callable[..., list[Effect]]) -> Callable[..., list[Effect]]:
    def answered_regardless(session: Session, request: Any, outcome: Outcome) -> list[Effect]:
        return answered(session, request, None if isinstance(request, HandOff) else outcome)

    return answered_regardless


@pytest.mark.parametrize(
    ("name", "mutant"),
    [
        ("close", _forgets_presence),
        ("_subscribe_checked", _ignores_the_limit),
        ("_allowed", _skips_the_hand_off),
        ("answered", _ignores_a_refused_hand_off),
    ],
)
def test_the_machine_catches_a_broken_session(
    monkeypatch: pytest.MonkeyPatch, name: str, mutant: Callable[[Any], Any]
) -> None:
    """Not vacuous: the machine reaches tracked presence, a full session and refused hand-offs, and fails a session
    whose close() forgets presence, that subscribes past the limit, that tracks without a hand-off, or that makes
    a presence change its hand-off refused."""
    monkeypatch.setattr(Session, name, mutant(getattr(Session, name)))
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            SessionMachine, settings=settings(max_examples=500, phases=[Phase.generate], print_blob=False)
        )
