"""Who a connection is: the verified claims of its token, or an anonymous identity."""

from __future__ import annotations

from typing import Any

import attrs
import orjson


@attrs.frozen(slots=True)
class Identity:
    """`sub` is None for anonymous connections; `expires_at` is a UNIX time, None when it never expires."""

    sub: str | None
    role: str
    claims: dict[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    expires_at: float | None = None
    policy_key: str = attrs.field(init=False, eq=False, hash=False, repr=False)
    """Same role and same claims, same answer from row-level security: subscribers sharing it share one check.
    Computed once here, because delivery asks for it for every subscriber of every change."""

    def __attrs_post_init__(self) -> None:
        # Raises TypeError for claims that are not JSON orjson can write (an integer beyond 64 bits): such claims
        # could not be given to the database either, so the verifier refuses those tokens.
        claims = orjson.dumps(self.claims, option=orjson.OPT_SORT_KEYS).decode()
        object.__setattr__(self, "policy_key", self.role + "\x00" + claims)

    @property
    def anonymous(self) -> bool:
        return self.sub is None
