"""`FrameGuard` on any byte stream cut into any reads: the same refusal as on the whole stream, at the same byte."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from .guard import check_cuts

# Frame headers with every length form and the FIN, opcode and mask bits, each followed by a little payload, so
# that streams hold real frame boundaries and not only noise.
lengths = st.integers(0, 125) | st.integers(126, 70_000) | st.integers(0, 2**64 - 1)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    first = draw(st.sampled_from([0x00, 0x01, 0x02, 0x08, 0x09, 0x0A, 0x03])) | (0x80 if draw(st.booleans()) else 0)
    length, masked = draw(lengths), draw(st.booleans())
    if length < 126:
        head = bytes([first, length | (0x80 if masked else 0)])
    elif length < 65536:
        head = bytes([first, 126 | (0x80 if masked else 0)]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, 127 | (0x80 if masked else 0)]) + length.to_bytes(8, "big")
    if masked:
        head += b"MASK"
    return head + bytes(min(length, draw(st.integers(0, 40))))


streams = st.lists(frames(), max_size=8).map(b"".join) | st.binary(max_size=120)


@given(streams, st.lists(st.integers(0, 400), max_size=12), st.sampled_from([0, 10, 125, 1000, 65536]))
def test_any_cut_of_any_stream_is_refused_where_the_whole_is(stream: bytes, cuts: list[int], max_size: int) -> None:
    check_cuts(stream, cuts, max_size)
