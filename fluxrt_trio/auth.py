"""JWT verification: a token in, an Identity out, with algorithms pinned to the key that verifies them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from .config import AuthConfig
from .protocol.identity import Identity

_DEFAULT_ASYMMETRIC = ("RS256", "ES256", "EdDSA")


class AuthError(Exception):
    """The token cannot be accepted; the message says why (for logs, never containing the token)."""


class Verifier:
    """Verifies tokens as AuthConfig says.

    HS* algorithms verify only with `jwt_secret`, and RS*/PS*/ES*/EdDSA only with `jwt_public_key_file`, so a token
    cannot pick its own key type (algorithm confusion). `alg: none` is never accepted. `exp` is required.
    """

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._secret = config.jwt_secret
        self._public_key = (
            Path(config.jwt_public_key_file).read_bytes() if config.jwt_public_key_file is not None else None
        )
        if config.algorithms:
            algorithms = config.algorithms
        else:
            algorithms = (("HS256",) if self._secret else ()) + (
                _DEFAULT_ASYMMETRIC if self._public_key is not None else ()
            )
        self.algorithms = frozenset(a for a in algorithms if a.lower() != "none")

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def anonymous(self) -> Identity:
        role = self.config.anon_role
        return Identity(sub=None, role=role, claims={"role": role})

    def verify(self, token: str) -> Identity:
        """Verify `token` and return its identity.

        Raises AuthError for a malformed token, a disallowed algorithm, a bad signature, a missing or past `exp`,
        a future `nbf`, or a wrong `aud`/`iss` when those are configured.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(f"algorithm {alg!r} is not accepted; accepted: {', '.join(sorted(self.algorithms))}")
        key: Any = self._secret if alg.startswith("HS") else self._public_key
        if not key:
            raise AuthError(f"no key configured for {alg}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp"], "verify_aud": self.config.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"token rejected: {exc}") from None
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthError("token rejected: sub must be a string")
        role = claims.get("role", self.config.default_role)
        if not isinstance(role, str) or not role:
            raise AuthError("token rejected: role must be a non-empty string")
        exp = claims["exp"]
        if not isinstance(exp, int | float):
            raise AuthError("token rejected: exp must be a number")
        # The effective role joins the claims, so that auth.role() and policies see the role fluxrt assumes.
        claims = {**claims, "role": role}
        return Identity(sub=sub, role=role, claims=claims, expires_at=float(exp) + self.config.leeway)


def mint(secret: str, sub: str, role: str | None = None, ttl: float = 3600.0, **claims: Any) -> str:
    """Sign an HS256 token for development and tests."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    if role is not None:
        payload["role"] = role
    return jwt.encode(payload, secret, algorithm="HS256")
