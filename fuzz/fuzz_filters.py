"""Fuzz `parse_filter` and `Filter.matches`: any text is a Filter or a FilterError; a filter decides any row as
Postgres sends it (`decode_image`, numbers kept as written) with a bool, and `neq` is `eq`'s negation wherever the
column holds a value."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["fluxrt_trio"]):
    from fluxrt_trio.protocol.filters import Filter, FilterError, parse_filter
    from fluxrt_trio.protocol.rows import decode_image

VALUES = (
    "null",
    "true",
    "false",
    "0",
    "-1",
    "42",
    "1e3",
    "12345678901234567890123",
    "3.14",
    '"42"',
    '"abc"',
    "[]",
    "{}",
)


def row_from(fdp: atheris.FuzzedDataProvider, column: str) -> dict[str, object] | None:
    """A row holding `column`, with a value picked from the interesting ones or fuzzed as JSON text."""
    value = fdp.PickValueInList(list(VALUES)) if fdp.ConsumeBool() else fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
    try:
        image = decode_image('{"c": ' + value + "}")
    except ValueError:
        # Not JSON: Postgres never sends such a row.
        return None
    if not isinstance(image, dict) or "c" not in image:
        return None
    return {column: image["c"]}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.PickValueInList(["eq", "neq", "lt", "lte", "gt", "gte", "in", "is", ""])
    text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 32)) + ("=" + op + "." if op else "")
    text += fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
    try:
        condition = parse_filter(text)
    except FilterError as exc:
        assert "expected" in str(exc) or "takes" in str(exc) or "empty" in str(exc), str(exc)
        return
    row = row_from(fdp, condition.column)
    for candidate in (row, None, {}, {condition.column: None}):
        assert isinstance(condition.matches(candidate), bool)
    if row is not None and condition.op in ("eq", "neq"):
        eq = Filter(condition.column, "eq", condition.value).matches(row)
        neq = Filter(condition.column, "neq", condition.value).matches(row)
        assert neq == (not eq) or row[condition.column] is None, (text, row, eq, neq)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
