"""Fuzz `parse_channel`: any value is a ChannelName or a ChannelError; what parses is the name it was given, and
parsing it again gives the same channel."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["fluxrt_trio"]):
    from fluxrt_trio.protocol.channels import ChannelError, ChannelKind, parse_channel


def check(name: object) -> None:
    try:
        channel = parse_channel(name)
    except ChannelError as exc:
        assert ":{" in str(exc), "a ChannelError shows the expected format"
        return
    assert channel.name == name
    assert parse_channel(channel.name) == channel
    if channel.kind is ChannelKind.TABLE:
        assert f"table:{channel.schema}.{channel.table}" == name
    else:
        assert channel.topic and f"{channel.kind.value}:{channel.topic}" == name


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    # The kinds are given most of the time, so that the fuzzer spends its effort on what follows the colon.
    prefix = fdp.PickValueInList(["table:", "presence:", "broadcast:", ""])
    check(prefix + fdp.ConsumeUnicode(fdp.remaining_bytes()))
    check(data)
    check(None)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
