"""`parse_channel`, `parse_filter` and `Filter.matches` on any input: a value or the documented error, never another
exception; what parses re-serialises to the same name; `neq` is `eq`'s negation wherever the column holds a value."""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from fluxrt_trio.protocol.channels import ChannelError, ChannelKind, ChannelName, parse_channel
from fluxrt_trio.protocol.filters import OPERATORS, Filter, FilterError, parse_filter
from fluxrt_trio.protocol.rows import decode_image

from .strategies import json_values

IDENT = r"[A-Za-z_][A-Za-z0-9_$]{0,62}"
names = st.sampled_from(["table:", "presence:", "broadcast:", ""]).flatmap(
    lambda kind: st.text(max_size=80).map(lambda rest: kind + rest)
)


def parsed(name: object) -> ChannelName | None:
    try:
        return parse_channel(name)
    except ChannelError as exc:
        assert ":{" in str(exc), "the error shows the expected format"
        return None


@given(names | st.text() | json_values)
def test_any_channel_name_parses_or_is_refused(name: object) -> None:
    channel = parsed(name)
    if channel is None:
        return
    assert channel.name == name
    assert parse_channel(channel.name) == channel
    rebuilt = f"table:{channel.schema}.{channel.table}" if channel.kind is ChannelKind.TABLE else None
    assert (rebuilt or f"{channel.kind.value}:{channel.topic}") == name


@given(st.from_regex(IDENT, fullmatch=True), st.from_regex(IDENT, fullmatch=True))
def test_every_table_identifier_pair_parses(schema: str, table: str) -> None:
    channel = parse_channel(f"table:{schema}.{table}")
    assert (channel.kind, channel.schema, channel.table) == (ChannelKind.TABLE, schema, table)


filters = st.builds(
    lambda column, op, value: f"{column}={op}.{value}",
    st.text(max_size=12),
    st.sampled_from([*OPERATORS, "like", ""]),
    st.text(max_size=20) | st.sampled_from(["null", "true", "false", "42", "-1.5", "(a,b)", "(1, 2,3)", "()", "(,)"]),
)


def parsed_filter(text: str) -> Filter | None:
    try:
        return parse_filter(text)
    except FilterError as exc:
        assert "invalid filter" in str(exc)
        return None


# Rows as the change feed hands them over: Postgres jsonb text through decode_image (numbers kept as written).
values = json_values | st.sampled_from(["12345678901234567890123", "1e400", "-0.0", "1E-5", "0.10"]).map(
    lambda number: (decode_image('{"c": ' + number + "}") or {})["c"]
)


@given(filters | st.text(max_size=60), values)
def test_any_filter_parses_or_is_refused_and_decides_any_row(text: str, value: Any) -> None:
    condition = parsed_filter(text)
    if condition is None:
        return
    for row in ({condition.column: value}, {"other": value}, {}, None):
        assert isinstance(condition.matches(row), bool)


@given(st.text(max_size=12), st.text(max_size=20), values)
def test_neq_is_the_negation_of_eq_wherever_the_column_holds_a_value(column: str, value: str, actual: Any) -> None:
    eq, neq = parsed_filter(f"{column}=eq.{value}"), parsed_filter(f"{column}=neq.{value}")
    assume(eq is not None and neq is not None)
    assert eq is not None and neq is not None
    row = {eq.column: actual}
    if actual is None:
        assert not eq.matches(row) and not neq.matches(row)
    else:
        assert neq.matches(row) is not eq.matches(row)


@given(st.from_regex(r"[A-Za-z0-9.\-]{1,12}", fullmatch=True), values)
def test_a_one_item_in_list_agrees_with_eq(value: str, actual: Any) -> None:
    row = {"c": actual}
    assert parse_filter(f"c=in.({value})").matches(row) is parse_filter(f"c=eq.{value}").matches(row)
