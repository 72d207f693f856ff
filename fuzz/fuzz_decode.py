"""Fuzz `decode`: any client frame, as bytes or as text, is a message or a DecodeError; a message survives a round
trip through JSON unchanged."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["fluxrt_trio"]):
    import attrs
    import orjson

    from fluxrt_trio.protocol.messages import CLIENT_TYPES, MAX_REF_LENGTH, DecodeError, decode


def check(frame: str | bytes) -> None:
    try:
        message = decode(frame)
    except DecodeError as exc:
        assert str(exc), "a DecodeError names the problem"
        assert exc.ref is None or (isinstance(exc.ref, str) and len(exc.ref) <= MAX_REF_LENGTH), exc.ref
        return
    assert CLIENT_TYPES[message.TYPE] is type(message)
    assert message.ref is None or len(message.ref) <= MAX_REF_LENGTH
    wire = {"type": message.TYPE, **attrs.asdict(message)}
    assert decode(orjson.dumps(wire)) == message, f"{message!r} does not round-trip"


def test_one_input(data: bytes) -> None:
    check(data)
    text = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    check(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
