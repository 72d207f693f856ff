"""The sizes that client WebSocket frame headers declare, read before wsproto parses the frames.

wsproto reports a data frame only as its payload arrives, so a header declaring 2^62 bytes would be answered only
once the client had sent more than the limit. `FrameGuard` reads just the headers (it skips payloads without looking
at them) and says, at the header, that a message will be too big. Its cost is a few steps per frame, not per byte.
"""

from __future__ import annotations

_CONTINUATION = 0x0
_CONTROL = 0x8
"""opcodes from 8 up are control frames (close, ping, pong, and reserved ones), which belong to no message"""
_MAX_HEADER = 14
"""2 bytes, a 64-bit extended length, a 4-byte masking key"""


class FrameGuard:
    """Follows the frame boundaries of one client's byte stream and sums the declared payload of each data message
    (a text or binary frame and its continuation frames)."""

    __slots__ = ("_head", "_message", "_skip")

    def __init__(self) -> None:
        self._skip = 0
        """payload bytes of the current frame still to come"""
        self._head = b""
        """the start of a header that the last read cut short"""
        self._message = 0
        """payload bytes the current data message has declared so far"""

    def feed(self, data: bytes, max_size: int) -> int | None:
        """Follow `data`, the next bytes from the client.

        Returns None while every data message declared so far fits in `max_size` bytes; otherwise the offset in
        `data` where the first frame that takes its message past `max_size` begins (0 when its header began in an
        earlier read). The bytes before that offset hold whole frames or frames already under way, and may be
        parsed; the guard must not be fed again after a refusal.
        """
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            start = pos
            held = len(self._head)
            if held:
                # Enough of this read to complete any header; a header never needs more than _MAX_HEADER bytes.
                joined = self._head + data[pos : pos + _MAX_HEADER - held]
                header = _header(joined, 0)
            else:
                joined = b""
                header = _header(data, pos)
            if header is None:
                self._head = joined if held else bytes(data[pos:])
                return None
            size, opcode, fin, length = header
            pos += size - held
            self._head = b""
            self._skip = length
            if opcode >= _CONTROL:
                continue
            self._message = self._message + length if opcode == _CONTINUATION else length
            if self._message > max_size:
                return 0 if held else start
            if fin:
                self._message = 0
        return None


def _header(buf: bytes, at: int) -> tuple[int, int, bool, int] | None:
    """The header at `buf[at:]`: its size, opcode, FIN bit and declared payload length; None if it is cut short."""
    have = len(buf) - at
    if have < 2:
        return None
    first, second = buf[at], buf[at + 1]
    length = second & 0x7F
    size = 2
    if length == 126:
        size = 4
        if have < size:
            return None
        length = int.from_bytes(buf[at + 2 : at + 4], "big")
    elif length == 127:
        size = 10
        if have < size:
            return None
        length = int.from_bytes(buf[at + 2 : at + 10], "big")
    if second & 0x80:
        size += 4
    if have < size:
        return None
    return size, first & 0x0F, bool(first & 0x80), length
