"""The properties both fuzzers check on `FrameGuard`: on a whole stream it refuses where RFC 6455's message sizes
say (`reference`, written frame by frame from the RFC rather than as a stream); however the stream is cut into
reads, it refuses the same frame, in the read that completes that frame's header."""

from __future__ import annotations

from fluxrt_trio.protocol.inbound import FrameGuard, _header


def reference(stream: bytes, max_size: int) -> int | None:
    """Where the first frame that takes its data message past `max_size` starts, or None."""
    pos, message = 0, 0
    while (header := _header(stream, pos)) is not None:
        size, opcode, fin, length = header
        if opcode < 8:
            # A continuation (0) adds to the message; a text, binary or reserved data opcode starts one.
            message = message + length if opcode == 0 else length
            if message > max_size:
                return pos
            if fin:
                message = 0
        pos += size + length
    return None


def check_cuts(stream: bytes, cuts: list[int], max_size: int) -> None:
    whole = FrameGuard().feed(stream, max_size)
    assert whole == reference(stream, max_size), f"refused at {whole}, RFC 6455 says {reference(stream, max_size)}"
    guard = FrameGuard()
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    start = 0
    for end in [*points, len(stream)]:
        offset = guard.feed(stream[start:end], max_size)
        if offset is not None:
            assert whole is not None, f"refused at read {start}:{end} offset {offset}, not when whole"
            header = _header(stream, whole)
            assert header is not None
            assert start < whole + header[0] <= end, f"refused in read {start}:{end}, header {whole}+{header[0]}"
            expected = whole - start if whole >= start else 0
            assert offset == expected, f"offset {offset} in read {start}:{end}; whole stream: {whole}"
            return
        start = end
    assert whole is None, f"whole stream refused at {whole}, in reads never"
