"""Fuzz `Session`: a run of client frames, answers to its requests (allow, refuse, a new identity), server-ended
subscriptions, time passing and a close, refereed by tests/fuzz/referee.py after every step (subscriptions only
after their ack, never over the limit, presence only on subscribed presence channels, every Join left and every
Track untracked by the close)."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# The referee lives with the property tests; the harness runs from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["fluxrt_trio", "tests.fuzz"]):
    from fluxrt_trio.protocol.messages import Error, ErrorCode
    from fluxrt_trio.protocol.session import Authenticate
    from tests.fuzz.referee import CHANNELS, SUBS, Referee, frame, identity

KINDS = ["subscribe", "unsubscribe", "broadcast", "presence", "presence", "ping", "auth", "nope"]
PAYLOADS = [None, {}, {"a": 1}, {"big": "x" * 80}, [1], "text"]
REFS = [None, "r", "x" * 64]


def step(referee: Referee, fdp: atheris.FuzzedDataProvider) -> None:
    request = referee.waiting
    choice = fdp.ConsumeIntInRange(0, 9)
    if request is not None and choice < 6:
        if fdp.ConsumeBool():
            # An Authenticate is answered with the verified identity; every other request with None (allowed).
            allowed = identity(fdp.PickValueInList(list(SUBS))) if isinstance(request, Authenticate) else None
            referee.answer(allowed)
        else:
            referee.answer(Error(ErrorCode.FORBIDDEN, "refused", ref=request.ref))
    elif choice == 6:
        referee.drop(fdp.PickValueInList(list(CHANNELS)))
    elif choice == 7:
        referee.tick(fdp.ConsumeIntInRange(0, 120))
    elif choice == 8 and fdp.ConsumeIntInRange(0, 7) == 0:
        referee.close()
    elif request is None:
        if choice == 9 and fdp.ConsumeBool():
            text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
            referee.receive(text) if fdp.ConsumeBool() else referee.binary()
            return
        ref = fdp.PickValueInList(REFS)
        event = fdp.PickValueInList(["track", "track", "untrack", "leave"])
        message = frame(
            fdp.PickValueInList(KINDS),
            fdp.PickValueInList(list(CHANNELS)),
            ref,
            fdp.PickValueInList(PAYLOADS),
            event,
        )
        referee.receive(message, ref, ref_known=True)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    referee = Referee(sub=fdp.PickValueInList(list(SUBS)))
    while fdp.remaining_bytes() and not referee.closed:
        step(referee, fdp)
    if not referee.closed:
        referee.close()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
