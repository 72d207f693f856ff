"""Row images as JSON values that keep Postgres' digits: `numeric` and integers beyond 64 bits are carried as
written (never through a float) and re-emitted verbatim."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson


class JsonNumber:
    """A JSON number kept as written."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return self.text

    def decimal(self) -> Decimal:
        return Decimal(self.text)


def _int(text: str) -> int | JsonNumber:
    # orjson writes integers of up to 64 bits; longer ones travel as written (and never meet int()'s digit limit).
    if len(text) > 19:
        return JsonNumber(text)
    value = int(text)
    return value if -(2**63) <= value < 2**64 else JsonNumber(text)


def decode_image(text: str | None) -> dict[str, Any] | None:
    """A row image from Postgres' jsonb text; None stays None."""
    if text is None:
        return None
    image: dict[str, Any] = json.loads(text, parse_float=JsonNumber, parse_int=_int)
    return image


def encode_default(value: Any) -> Any:
    """orjson `default=` hook for the numbers `decode_image` kept as written."""
    if isinstance(value, JsonNumber):
        return orjson.Fragment(value.text)
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Compact JSON with kept numbers re-emitted verbatim."""
    return orjson.dumps(value, default=encode_default)


def as_decimal(value: Any) -> Decimal | None:
    """The numeric value of a JSON number (kept or not) or of a numeric string, or None when it is neither (NaN and
    infinities included)."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, JsonNumber):
            number = value.decimal()
        elif isinstance(value, int):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, str):
            number = Decimal(value)
        else:
            return None
    except InvalidOperation:
        return None
    # NaN and infinities do not order; JSON has no such numbers anyway.
    return number if number.is_finite() else None
