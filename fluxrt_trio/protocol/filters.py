"""Subscribe filters for table channels: `column=op.value`, e.g. `user_id=eq.42`, `status=in.(open,late)`.

A filter applies to `record` (INSERT, UPDATE) or `old_record` (DELETE) and compares JSON values by type: numbers
numerically, strings as strings, booleans as `true`/`false`; NULL matches only `is.null`.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from .rows import as_decimal

OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is")
EVENTS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "*")

_FILTER = re.compile(r"(?P<column>[^=]+)=(?P<op>[a-z]+)\.(?P<value>.*)\Z", re.DOTALL)


class FilterError(ValueError):
    """A filter that cannot be parsed; the message names the problem and the expected form."""


@attrs.frozen(slots=True)
class Filter:
    column: str
    op: str
    value: str | tuple[str, ...]

    def matches(self, row: dict[str, Any] | None) -> bool:
        """Whether `row` passes. A missing row or column never passes."""
        if row is None or self.column not in row:
            return False
        actual = row[self.column]
        # `in` holds a tuple, every other operator one text (see parse_filter).
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        if self.op == "is":
            return {"null": actual is None, "true": actual is True, "false": actual is False}[values[0]]
        if actual is None:
            return False
        if self.op == "in":
            return any(_compare(actual, v) == 0 for v in values)
        order = _compare(actual, values[0])
        if order is None:
            return self.op == "neq"
        return {
            "eq": order == 0,
            "neq": order != 0,
            "lt": order < 0,
            "lte": order <= 0,
            "gt": order > 0,
            "gte": order >= 0,
        }[self.op]


def _compare(actual: Any, text: str) -> int | None:
    """-1, 0 or 1 comparing a JSON value with the filter's text; None when they cannot be compared."""
    if isinstance(actual, bool):
        if text not in ("true", "false"):
            return None
        return (actual > (text == "true")) - (actual < (text == "true"))
    number = as_decimal(actual) if not isinstance(actual, str) else None
    if number is not None:
        wanted = as_decimal(text)
        if wanted is None:
            return None
        return (number > wanted) - (number < wanted)
    if isinstance(actual, str):
        return (actual > text) - (actual < text)
    return None


def parse_filter(text: str) -> Filter:
    """Parse `column=op.value`. Raises FilterError naming what is wrong."""
    m = _FILTER.match(text)
    if not m:
        raise FilterError(f"invalid filter {text[:200]!r}: expected column=op.value, e.g. user_id=eq.42")
    column, op, value = m["column"].strip(), m["op"], m["value"]
    if op not in OPERATORS:
        raise FilterError(
            f"invalid filter {text[:200]!r}: unknown operator {op!r}; expected one of {', '.join(OPERATORS)}"
        )
    if op == "in":
        if not (value.startswith("(") and value.endswith(")")):
            raise FilterError(f"invalid filter {text[:200]!r}: in takes a list, e.g. status=in.(open,late)")
        items = tuple(v.strip() for v in value[1:-1].split(",") if v.strip())
        if not items:
            raise FilterError(f"invalid filter {text[:200]!r}: the in list is empty")
        return Filter(column, op, items)
    if op == "is" and value not in ("null", "true", "false"):
        raise FilterError(f"invalid filter {text[:200]!r}: is takes null, true or false")
    return Filter(column, op, value)
