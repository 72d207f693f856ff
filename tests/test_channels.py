"""parse_channel against the channel table of docs/protocol.md: every format, its boundaries, and the error messages."""

from __future__ import annotations

import pytest

from fluxrt_trio.protocol.channels import ChannelError, ChannelKind, ChannelName, parse_channel

TABLE_FORMAT = "table:{schema}.{table}"
ALL_FORMATS = ("table:{schema}.{table}", "presence:{room}", "broadcast:{topic}")


# ---- table:{schema}.{table} ----------------------------------------------------------------------------------


def test_table_channel_from_the_reference():
    assert parse_channel("table:public.users") == ChannelName(
        "table:public.users", ChannelKind.TABLE, schema="public", table="users"
    )


@pytest.mark.parametrize(
    ("name", "schema", "table"),
    [
        ("table:app.orders", "app", "orders"),
        ("table:_private._t", "_private", "_t"),
        ("table:Public.Users", "Public", "Users"),  # case-sensitive, as stored in the catalog
        ("table:s1.t2", "s1", "t2"),
        ("table:a$.b$c", "a$", "b$c"),  # `$` allowed after the first character
        ("table:a_1$.B_2$", "a_1$", "B_2$"),
    ],
)
def test_table_channel_identifiers(name, schema, table):
    channel = parse_channel(name)
    assert channel.kind is ChannelKind.TABLE
    assert channel.name == name
    assert (channel.schema, channel.table, channel.topic) == (schema, table, None)


def test_table_identifiers_of_63_characters_are_accepted():
    ident = "a" * 63
    channel = parse_channel(f"table:{ident}.{ident}")
    assert channel.schema == ident
    assert channel.table == ident


@pytest.mark.parametrize(
    "name",
    [
        "table:" + "a" * 64 + ".users",  # schema of 64 characters
        "table:public." + "b" * 64,  # table of 64 characters
        "table:" + "a" * 64 + "." + "b" * 64,
    ],
)
def test_table_identifiers_of_64_characters_are_rejected(name):
    with pytest.raises(ChannelError, match=r"table:\{schema\}\.\{table\}"):
        parse_channel(name)


@pytest.mark.parametrize(
    "name",
    [
        "table:users",  # no dot
        "table:public.users.extra",  # two dots
        "table:a..b",
        "table:.users",  # empty schema
        "table:public.",  # empty table
        "table:",
        "table:.",
        "table:$public.users",  # `$` not allowed first
        "table:public.$users",
        "table:1abc.users",  # digit first
        "table:public.9t",
        'table:"public"."users"',  # quoting is not the client's business
        "table:public.us-ers",
        "table:pub lic.users",
        "table: public.users",
        "table:public.users ",
        "table:public.users\n",
        "table:public.users\x00",
        "table:públic.users",  # non-ASCII letters are not identifier characters here
        "table:public.users:x",
    ],
)
def test_malformed_table_channels_are_rejected_showing_the_format(name):
    with pytest.raises(ChannelError) as info:
        parse_channel(name)
    assert TABLE_FORMAT in str(info.value)
    assert "table:public.users" in str(info.value)  # an example of the right shape


# ---- presence:{room} and broadcast:{topic} -------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "kind"), [("presence", ChannelKind.PRESENCE), ("broadcast", ChannelKind.BROADCAST)])
@pytest.mark.parametrize(
    "room",
    [
        "chat-room-1",
        "notifications",
        "x",
        "a:b:c",  # colons after the prefix belong to the room
        "a.b.c",
        "Ünïcödé-房间",
        "emoji-🎉",
        "table:public.users",  # a room may look like another channel
        "!#$%&()*+,/;<=>?@[]^`{|}~",
    ],
)
def test_rooms_and_topics(prefix, kind, room):
    channel = parse_channel(f"{prefix}:{room}")
    assert channel == ChannelName(f"{prefix}:{room}", kind, topic=room)
    assert channel.schema is None
    assert channel.table is None


def test_reference_examples():
    assert parse_channel("presence:chat-room-1").topic == "chat-room-1"
    assert parse_channel("broadcast:notifications").kind is ChannelKind.BROADCAST
    assert parse_channel("broadcast:chat").topic == "chat"


@pytest.mark.parametrize("prefix", ["presence", "broadcast"])
def test_room_of_255_characters_is_accepted(prefix):
    room = "r" * 255
    assert parse_channel(f"{prefix}:{room}").topic == room


@pytest.mark.parametrize("prefix", ["presence", "broadcast"])
def test_room_of_255_non_ascii_characters_is_accepted(prefix):
    # The limit is in characters, not bytes.
    room = "é" * 255
    assert parse_channel(f"{prefix}:{room}").topic == room


@pytest.mark.parametrize(("prefix", "what"), [("presence", "room"), ("broadcast", "topic")])
def test_room_of_256_characters_is_rejected(prefix, what):
    with pytest.raises(ChannelError) as info:
        parse_channel(f"{prefix}:" + "r" * 256)
    assert f"{prefix}:{{{what}}}" in str(info.value)
    assert "255" in str(info.value)


@pytest.mark.parametrize(("prefix", "what"), [("presence", "room"), ("broadcast", "topic")])
def test_empty_room_is_rejected(prefix, what):
    with pytest.raises(ChannelError) as info:
        parse_channel(f"{prefix}:")
    assert f"{prefix}:{{{what}}}" in str(info.value)


@pytest.mark.parametrize("prefix", ["presence", "broadcast"])
@pytest.mark.parametrize(
    "room",
    [
        "a b",
        " a",
        "a ",
        "a\tb",
        "a\nb",
        "a\rb",
        "a\x0bb",  # vertical tab
        "a\x0cb",  # form feed
        "\u00a0",  # no-break space
        "a\u2003b",  # em space
        "a\u2028b",  # line separator
        "a\u3000b",  # ideographic space
        "a\x00b",  # NUL
        "a\x01b",
        "a\x1bb",  # ESC
        "a\x1fb",
        "a\x7fb",  # DEL
        "a\x85b",  # C1: next line
        "a\x9fb",  # last C1 control
    ],
)
def test_whitespace_and_control_characters_are_rejected(prefix, room):
    with pytest.raises(ChannelError, match=r"whitespace or control characters"):
        parse_channel(f"{prefix}:{room}")


# ---- anything else -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "users",
        "public.users",
        ":users",
        "tables:public.users",
        "Table:public.users",  # prefixes are case-sensitive
        "TABLE:public.users",
        "Presence:room",
        "postgres_changes:public.users",
        "realtime:room",
        "room:lobby",
        " table:public.users",
        "presence",
        "broadcast",
    ],
)
def test_unknown_prefixes_are_rejected_listing_every_format(name):
    with pytest.raises(ChannelError) as info:
        parse_channel(name)
    message = str(info.value)
    for fmt in ALL_FORMATS:
        assert fmt in message


@pytest.mark.parametrize("value", [None, 42, 4.2, True, b"table:public.users", ["table:public.users"], {}])
def test_non_strings_are_rejected_listing_every_format(value):
    with pytest.raises(ChannelError) as info:
        parse_channel(value)
    message = str(info.value)
    assert "string" in message
    for fmt in ALL_FORMATS:
        assert fmt in message


def test_channel_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_channel("nope")


def test_error_message_quotes_the_bad_name():
    with pytest.raises(ChannelError, match=r"'table:users'"):
        parse_channel("table:users")


def test_error_message_for_a_huge_name_stays_bounded():
    with pytest.raises(ChannelError) as info:
        parse_channel("x" * 100_000)
    assert len(str(info.value)) < 1000


def test_a_name_parsed_again_gives_the_same_channel_name():
    # The subscribers of a channel share one ChannelName (bench/RESULTS.md, "Idle memory"); the name is built at
    # run time, so that it is not the same str object as the literal below.
    first = parse_channel("".join(["broadcast:", "shared"]))
    assert parse_channel("broadcast:shared") is first
