"""JWT verification: a token in, an Identity out, with algorithms pinned to the key that verifies them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
from jwt.types import Options

from .config import AuthConfig
from .protocol.identity import Identity

_DEFAULT_ASYMMETRIC = ("RS256", "ES256", "EdDSA")
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


class AuthError(Exception):
    """The token cannot be accepted; the message says why (for logs, never containing the token)."""


@attrs.frozen
class _RetiredKey:
    key: str | bytes
    symmetric: bool
    retired_at: float
    """UNIX time of the reload that replaced it: tokens issued later (by `iat`) are refused"""


MAX_RETIRED_KEYS = 8
"""keys replaced by reloads that still verify the tokens they signed; a restart forgets them all"""


def read_secret(config: AuthConfig) -> str | None:
    """The HS* secret: `jwt_secret`, or the first line of `jwt_secret_file` (read now, so a reload picks up a new one).

    Raises OSError when the file cannot be read.
    """
    if config.jwt_secret_file:
        return Path(config.jwt_secret_file).read_bytes().decode("utf-8", errors="strict").strip() or None
    return config.jwt_secret


class Verifier:
    """Verifies tokens as AuthConfig says.

    HS* algorithms verify only with the secret, and RS*/PS*/ES*/EdDSA only with `jwt_public_key_file`, so a token
    cannot pick its own key type (algorithm confusion). `alg: none` is never accepted. `exp` is required.

    Keys are read when the Verifier is made; `rotated` makes the one for a reloaded configuration. Constructing
    raises OSError when a key file cannot be read.
    """

    def __init__(self, config: AuthConfig, retired: tuple[_RetiredKey, ...] = ()) -> None:
        self.config = config
        self._secret = read_secret(config)
        self._public_key = (
            Path(config.jwt_public_key_file).read_bytes() if config.jwt_public_key_file is not None else None
        )
        self._retired = retired
        if config.algorithms:
            algorithms: tuple[str, ...] = config.algorithms
        else:
            symmetric = self._secret is not None or any(k.symmetric for k in retired)
            asymmetric = self._public_key is not None or any(not k.symmetric for k in retired)
            algorithms = (("HS256",) if symmetric else ()) + (_DEFAULT_ASYMMETRIC if asymmetric else ())
        self.algorithms = frozenset(a for a in algorithms if a.lower() != "none")
        # Every claim check PyJWT makes when it verifies the signature, named, so that the HS* path (which checks the
        # signature itself) keeps them all.
        self._claim_options: Options = {
            "require": ["exp"],
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
            "verify_aud": config.audience is not None,
        }
        self._hmac_checked: Options = {**self._claim_options, "verify_signature": False}
        role = config.anon_role
        # One for every anonymous connection: Identity is immutable, and one of their own (with its claims and
        # policy key) would cost each ~330 bytes.
        self._anonymous = Identity(sub=None, role=role, claims={"role": role})

    def _check_retired(self, claims: dict[str, Any], retired_at: float) -> None:
        """A replaced key still vouches for the tokens it signed before it was replaced (`iat`, which is then
        required), and for no longer than `auth.rotation_grace` after: whoever still holds it cannot sign new ones
        by backdating `iat` and choosing a far `exp`."""
        iat = claims.get("iat")
        if not isinstance(iat, int | float):
            raise AuthError("token rejected: signed with a replaced key and without iat")
        if iat > retired_at:
            raise AuthError("token rejected: signed with a key that was replaced before the token was issued")
        if time.time() > retired_at + self.config.rotation_grace:
            raise AuthError("token rejected: signed with a key replaced longer ago than auth.rotation_grace")

    def rotated(self, config: AuthConfig, now: float | None = None) -> Verifier:
        """The Verifier for a reloaded `config`. A secret or public key that it replaces keeps verifying the tokens
        it signed before `now` until they expire, for at most `auth.rotation_grace` (the newest MAX_RETIRED_KEYS
        replaced keys are kept).

        Raises OSError when a key file cannot be read.
        """
        now = time.time() if now is None else now
        fresh = Verifier(config)
        retired = list(self._retired)
        for old, new, symmetric in (
            (self._secret, fresh._secret, True),
            (self._public_key, fresh._public_key, False),
        ):
            if old is not None and old != new:
                retired.append(_RetiredKey(old, symmetric, now))
        kept = tuple(k for k in retired if k.key not in (fresh._secret, fresh._public_key))[-MAX_RETIRED_KEYS:]
        return Verifier(config, kept) if kept else fresh

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def anonymous(self) -> Identity:
        """The identity of a connection without a token (auth.anon_role): the same object each time, which no one
        may change (its claims included)."""
        return self._anonymous

    def verify(self, token: str) -> Identity:
        """Verify `token` and return its identity.

        Raises AuthError for a malformed token, a disallowed algorithm, a bad signature, a missing or past `exp`,
        a future `nbf`, a wrong `aud`/`iss` when those are configured, or claims holding an integer beyond 64 bits.
        """
        alg = _unverified_alg(token)
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(f"algorithm {alg!r} is not accepted; accepted: {', '.join(sorted(self.algorithms))}")
        symmetric = alg.startswith("HS")
        key: Any = self._secret if symmetric else self._public_key
        candidates: list[tuple[Any, float | None]] = [(key, None)] if key else []
        candidates += [(k.key, k.retired_at) for k in reversed(self._retired) if k.symmetric == symmetric]
        if not candidates:
            raise AuthError(f"no key configured for {alg}")
        mismatch = "Signature verification failed"
        for key, retired_at in candidates:
            try:
                if symmetric:
                    # PyJWT would re-check the configured secret for a PEM or DER key on every token (half its
                    # time); the HMAC is checked here instead, PyJWT still decodes strictly and judges the claims.
                    if not _hmac_matches(token, alg, key):
                        raise jwt.InvalidSignatureError("Signature verification failed")
                    claims = jwt.decode(
                        token,
                        audience=self.config.audience,
                        issuer=self.config.issuer,
                        leeway=self.config.leeway,
                        options=self._hmac_checked,
                    )
                else:
                    claims = jwt.decode(
                        token,
                        key,
                        algorithms=[alg],
                        audience=self.config.audience,
                        issuer=self.config.issuer,
                        leeway=self.config.leeway,
                        options=self._claim_options,
                    )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as exc:
                # Not this key: a retired one (maybe of another type after a switch from RSA to EC) may match.
                mismatch = str(exc)
                continue
            except jwt.PyJWTError as exc:
                raise AuthError(f"token rejected: {exc}") from None
            if retired_at is not None:
                self._check_retired(claims, retired_at)
            break
        else:
            raise AuthError(f"token rejected: {mismatch}")
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
        try:
            return Identity(sub=sub, role=role, claims=claims, expires_at=float(exp) + self.config.leeway)
        except TypeError:
            # Policies are given the claims as JSON; a number orjson cannot write would fail every check later.
            raise AuthError("token rejected: a claim holds an integer beyond 64 bits") from None


def _segment(text: str) -> bytes:
    """One base64url segment of a token; binascii.Error or ValueError when it is not one."""
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))


def _unverified_alg(token: str) -> object:
    """The `alg` of the token's header, unverified (only to choose the key). Raises AuthError when there is no JSON
    object header to read."""
    head, dot, _ = token.partition(".")
    try:
        header = orjson.loads(_segment(head)) if dot else None
    except (ValueError, binascii.Error):
        header = None
    if not isinstance(header, dict):
        raise AuthError("malformed token: no JSON object header before the first '.'")
    return header.get("alg")


def _hmac_matches(token: str, alg: str, key: str | bytes) -> bool:
    """Whether the token's signature is the HMAC of its signing input under `key` with `alg`'s hash. A signature
    segment that is not base64url does not match (PyJWT's strict decoding refuses such tokens anyway)."""
    signing_input, dot, signature = token.rpartition(".")
    try:
        given = _segment(signature)
    except (ValueError, binascii.Error):
        return False
    secret = key.encode("utf-8") if isinstance(key, str) else key
    expected = hmac.digest(secret, signing_input.encode("utf-8"), _HMAC_HASHES[alg])
    return bool(dot) and hmac.compare_digest(expected, given)


def mint(secret: str, sub: str, role: str | None = None, ttl: float = 3600.0, **claims: Any) -> str:
    """Sign an HS256 token for development and tests."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    if role is not None:
        payload["role"] = role
    return jwt.encode(payload, secret, algorithm="HS256")
