"""Channel names: `table:{schema}.{table}`, `presence:{room}`, `broadcast:{topic}`."""

from __future__ import annotations

import enum
import functools
import re

import attrs


class ChannelKind(enum.Enum):
    TABLE = "table"
    PRESENCE = "presence"
    BROADCAST = "broadcast"


class ChannelError(ValueError):
    """A channel name that does not match any format; the message shows the expected one."""


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")
# Rooms and topics: no whitespace and no control characters (C0, DEL, C1).
_ROOM = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,255}\Z")

EXPECTED_FORMATS = "table:{schema}.{table}, presence:{room} or broadcast:{topic}"
PARSED_CHANNELS = 1024
"""channel names whose ChannelName is kept to be given again: the thousands of subscribers of a channel then share
one (with its name and topic strings, ~190 bytes) instead of holding one each"""


@attrs.frozen(slots=True)
class ChannelName:
    """A channel name, parsed: its kind, and the table or the room or topic it names. (The Python client's
    `Channel` is a client-side handle, a different thing.)"""

    name: str
    kind: ChannelKind
    # For table channels the catalog names; for presence and broadcast the room or topic.
    schema: str | None = None
    table: str | None = None
    topic: str | None = None


def parse_channel(name: object) -> ChannelName:
    """Parse a channel name; a recently parsed name gives the same ChannelName object again.

    Raises ChannelError naming the expected format when the name is malformed.
    """
    if not isinstance(name, str):
        raise ChannelError(f"channel must be a string in one of the formats {EXPECTED_FORMATS}")
    return _parse(name)


@functools.lru_cache(maxsize=PARSED_CHANNELS)
def _parse(name: str) -> ChannelName:
    kind, sep, rest = name.partition(":")
    if not sep:
        raise ChannelError(f"invalid channel {name[:300]!r}: expected {EXPECTED_FORMATS}")
    if kind == "table":
        schema, dot, table = rest.partition(".")
        if not dot or not _IDENT.match(schema) or not _IDENT.match(table):
            raise ChannelError(
                f"invalid channel {name[:300]!r}: expected table:{{schema}}.{{table}}, e.g. table:public.users "
                "(exactly one dot; schema and table are identifiers of at most 63 characters, "
                "as stored in the catalog and unquoted)"
            )
        return ChannelName(name, ChannelKind.TABLE, schema=schema, table=table)
    if kind in ("presence", "broadcast"):
        if not _ROOM.match(rest):
            what = "room" if kind == "presence" else "topic"
            raise ChannelError(
                f"invalid channel {name[:300]!r}: expected {kind}:{{{what}}} where {what} is 1-255 characters "
                "without whitespace or control characters"
            )
        return ChannelName(name, ChannelKind(kind), topic=rest)
    raise ChannelError(f"invalid channel {name[:300]!r}: expected {EXPECTED_FORMATS}")
