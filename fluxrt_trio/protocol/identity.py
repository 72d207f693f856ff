"""Who a connection is: the verified claims of its token, or an anonymous identity."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(slots=True)
class Identity:
    """`sub` is None for anonymous connections; `expires_at` is a UNIX time, None when it never expires."""

    sub: str | None
    role: str
    claims: dict[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    expires_at: float | None = None

    @property
    def anonymous(self) -> bool:
        return self.sub is None
