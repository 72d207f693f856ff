"""FrameGuard (protocol/inbound.py): declared sizes of client frames, from byte values, however reads cut them."""

from __future__ import annotations

import struct

import pytest

from fluxrt_trio.protocol.inbound import FrameGuard

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
KEY = b"\x01\x02\x03\x04"


def header(opcode: int, length: int, *, fin: bool = True, masked: bool = True) -> bytes:
    """A frame header as a client sends it: the 7-bit, 16-bit or 64-bit length form, whichever fits."""
    first = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    if length < 126:
        head = bytes((first, mask | length))
    elif length < 65536:
        head = struct.pack("!BBH", first, mask | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask | 127, length)
    return head + (KEY if masked else b"")


def frame(opcode: int, payload: bytes, **kwargs: bool) -> bytes:
    # The guard never unmasks, so the payload's bytes need not be masked to test it.
    return header(opcode, len(payload), **kwargs) + payload


def feed(chunks: list[bytes], max_size: int) -> int | None:
    """The absolute offset at which the guard refused, or None; what the guard returns is relative to its read."""
    guard = FrameGuard()
    at = 0
    for chunk in chunks:
        refused = guard.feed(chunk, max_size)
        if refused is not None:
            return at + refused
        at += len(chunk)
    return None


@pytest.mark.parametrize(
    ("length", "header_size"), [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14), (2**62, 14), (2**64 - 1, 14)]
)
def test_each_length_form_is_read_from_the_header_alone(length, header_size):
    head = header(TEXT, length)
    assert len(head) == header_size
    assert feed([head], max_size=length) is None
    if length:
        assert feed([head], max_size=length - 1) == 0


def test_unmasked_headers_are_read_too():
    assert feed([header(BINARY, 70000, masked=False)], max_size=65536) == 0
    assert feed([frame(TEXT, b"x" * 10, masked=False) * 3], max_size=10) is None


def test_a_message_exactly_at_the_limit_passes_and_one_byte_more_is_refused():
    assert feed([frame(TEXT, b"a" * 64)], max_size=64) is None
    assert feed([frame(TEXT, b"a" * 65)], max_size=64) == 0


def test_the_offset_is_where_the_refused_frame_begins_so_earlier_frames_can_still_be_served():
    first = frame(TEXT, b'{"type":"ping"}')
    second = frame(PING, b"hi")
    assert feed([first + second + header(TEXT, 1000)], max_size=100) == len(first) + len(second)


def test_continuation_frames_add_to_the_message_and_final_frames_end_it():
    part = b"x" * 40
    over = frame(TEXT, part, fin=False) + frame(CONTINUATION, part, fin=False)
    assert feed([over + frame(CONTINUATION, part)], max_size=100) == len(over)
    # Two whole messages of 60 each: each is measured alone.
    assert feed([frame(TEXT, b"y" * 60) * 2], max_size=100) is None
    # A message of two 50-byte fragments fits exactly; the next message starts again from nothing.
    fits = frame(BINARY, b"z" * 50, fin=False) + frame(CONTINUATION, b"z" * 50)
    assert feed([fits + fits], max_size=100) is None


def test_control_frames_between_fragments_neither_count_nor_end_the_message():
    part = b"x" * 40
    stream = (
        frame(TEXT, part, fin=False)
        + frame(PING, b"p" * 125)
        + frame(PONG, b"")
        + frame(CONTINUATION, part, fin=False)
        + frame(PING, b"q")
    )
    assert feed([stream + frame(CONTINUATION, part[:20])], max_size=100) is None
    assert feed([stream + frame(CONTINUATION, part[:21])], max_size=100) == len(stream)
    assert feed([frame(CLOSE, b"\x03\xe8" + b"r" * 100)], max_size=10) is None


def test_payload_bytes_that_look_like_headers_are_skipped():
    # 0x81 0xff would be a text header declaring 2^63 bytes, if the guard looked inside payloads.
    payload = (b"\x81\xff" + b"\xff" * 8) * 6
    assert feed([frame(TEXT, payload) + frame(TEXT, payload)], max_size=len(payload)) is None


STREAM = (
    frame(TEXT, b"a" * 130)
    + frame(PING, b"ping")
    + frame(TEXT, b"b" * 100, fin=False)
    + frame(CONTINUATION, b"c" * 300, fin=False)
    + frame(CONTINUATION, b"d" * 70000)
)
REFUSED_AT = len(frame(TEXT, b"a" * 130) + frame(PING, b"ping") + frame(TEXT, b"b" * 100, fin=False)) + len(
    frame(CONTINUATION, b"c" * 300, fin=False)
)


@pytest.mark.parametrize("max_size", [70400, 70399, 1000, 129])
def test_every_way_of_cutting_the_stream_into_two_or_three_reads_gives_the_same_answer(max_size):
    whole = feed([STREAM], max_size)
    if max_size == 70400:
        assert whole is None
    elif max_size == 129:
        assert whole == 0
    else:
        assert whole == REFUSED_AT
    for cut in [*range(1, REFUSED_AT + 40), *range(REFUSED_AT + 40, len(STREAM), 997)]:
        chunks = [STREAM[:cut], STREAM[cut:]]
        expected = None if whole is None else _chunk_start(chunks, whole)
        assert feed(chunks, max_size) == expected, cut
    for first in range(1, 40):
        for second in range(first + 1, first + 16):
            chunks = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            expected = None if whole is None else _chunk_start(chunks, whole)
            assert feed(chunks, max_size) == expected, (first, second)


def _chunk_start(chunks: list[bytes], frame_start: int) -> int:
    """Where the guard reports the refused frame: its start if its header is whole within one read, else the start
    of the read that completes the header."""
    second = STREAM[frame_start + 1] & 0x7F
    last = frame_start + {126: 4, 127: 10}.get(second, 2) + 4 - 1
    at = 0
    for chunk in chunks:
        if at <= last < at + len(chunk):
            return frame_start if at <= frame_start else at
        at += len(chunk)
    raise AssertionError("the header is beyond the stream")


def test_one_byte_at_a_time_refuses_at_the_byte_that_completes_the_header():
    guard = FrameGuard()
    head = header(TEXT, 2**62)
    answers = [guard.feed(bytes((byte,)), 64 * 1024) for byte in head]
    assert answers == [None] * (len(head) - 1) + [0]
