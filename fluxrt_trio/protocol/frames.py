"""Server-side WebSocket frames built once and shared.

Server frames are unmasked and fluxrt negotiates no extensions, so the same bytes are a valid frame on every
connection: a message bound for many connections is framed once.
"""

from __future__ import annotations

import struct

_TEXT = 0x81  # FIN + text
_PING = 0x89  # FIN + ping

PING = bytes((_PING, 0))


def text_frame(payload: bytes) -> bytes:
    """One final text frame holding `payload` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return bytes((_TEXT, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _TEXT, 126, n) + payload
    return struct.pack("!BBQ", _TEXT, 127, n) + payload
