"""auth.Verifier against crafted tokens: the good ones pass, every attack and mistake is an AuthError."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fluxrt_trio.auth import AuthError, Verifier, mint
from fluxrt_trio.config import AuthConfig
from fluxrt_trio.protocol.identity import Identity

SECRET = "test-secret-for-hs-algorithms-" + "0123456789abcdef" * 3  # 64+ bytes, enough for HS512


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def private_pem(rsa_key) -> bytes:
    return rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def public_pem(rsa_key) -> bytes:
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def public_key_file(tmp_path, public_pem) -> str:
    path = tmp_path / "jwt_public.pem"
    path.write_bytes(public_pem)
    return str(path)


def now() -> int:
    return int(time.time())


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": now() + 300, **extra}


def hs256(payload: dict[str, Any], secret: str | bytes = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def handmade(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token signed with HMAC-SHA256 under any key bytes (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def rejected(verifier: Verifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    return str(info.value)


# ---- HS256 ---------------------------------------------------------------------------------------------------


def test_valid_hs256():
    payload = claims(role="editor", email="alice@example.com")
    identity = Verifier(AuthConfig(jwt_secret=SECRET)).verify(hs256(payload))
    assert identity.sub == "alice"
    assert identity.role == "editor"
    assert identity.claims == payload
    assert not identity.anonymous
    assert identity.expires_at is not None
    assert identity.expires_at >= payload["exp"]


def test_a_claim_beyond_64_bits_is_refused_not_left_to_break_policies_later():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    assert "beyond 64 bits" in rejected(verifier, hs256(claims(team=2**70)))
    assert "beyond 64 bits" in rejected(verifier, hs256(claims(nested={"n": [-(2**64)]})))
    assert verifier.verify(hs256(claims(team=2**63 - 1))).claims["team"] == 2**63 - 1


def test_role_defaults_to_default_role():
    identity = Verifier(AuthConfig(jwt_secret=SECRET)).verify(hs256(claims()))
    assert identity.role == "authenticated"
    identity = Verifier(AuthConfig(jwt_secret=SECRET, default_role="member")).verify(hs256(claims()))
    assert identity.role == "member"


@pytest.mark.parametrize("role", ["", 5, None, ["admin"]])
def test_role_must_be_a_non_empty_string(role):
    assert "role" in rejected(Verifier(AuthConfig(jwt_secret=SECRET)), hs256(claims(role=role)))


def test_hs256_handmade_token_matches_pyjwt():
    # The helper used for the confusion attack below does produce tokens the verifier accepts with the right key.
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(), SECRET.encode())
    assert Verifier(AuthConfig(jwt_secret=SECRET)).verify(token).sub == "alice"


def test_bad_signature():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    assert "rejected" in rejected(verifier, hs256(claims(), "another-secret-0123456789abcdef-xyz"))
    # A valid token whose payload was swapped for another.
    header, _, signature = hs256(claims()).split(".")
    forged_payload = b64url(json.dumps(claims(sub="mallory", role="admin")).encode())
    rejected(verifier, f"{header}.{forged_payload}.{signature}")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_each_hs_algorithm_checks_its_own_hash(alg):
    # The HMAC is checked by fluxrt (auth._hmac_matches), not PyJWT: each algorithm with its own hash, no other.
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, algorithms=("HS256", "HS384", "HS512")))
    token = jwt.encode(claims(), SECRET, algorithm=alg)
    assert verifier.verify(token).sub == "alice"
    header, payload, signature = token.split(".")
    other = "HS512" if alg == "HS256" else "HS256"
    relabelled = b64url(json.dumps({"alg": other, "typ": "JWT"}).encode())
    assert "Signature" in rejected(verifier, f"{relabelled}.{payload}.{signature}")
    rejected(verifier, f"{header}.{payload}.{signature[:-4]}")
    rejected(verifier, f"{header}.{payload}.")


def test_a_signature_segment_with_characters_outside_base64url_is_rejected():
    # Python's base64 decoder skips such characters; the signature must still be refused as a whole.
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    header, payload, signature = hs256(claims()).split(".")
    for junk in ("!", "*", " ", "+/"):
        rejected(verifier, f"{header}.{payload}.{signature[:10]}{junk}{signature[10:]}")
        rejected(verifier, f"{header}!.{payload}.{signature}")


def test_claims_pyjwt_checks_are_kept_on_the_hs_path():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    assert "iat" in rejected(verifier, hs256(claims(iat="yesterday")))
    assert "JWT ID" in rejected(verifier, hs256(claims(jti=5)))
    assert "Subject" in rejected(verifier, hs256(claims(sub=5)))


@pytest.mark.parametrize("token", ["", "garbage", "a.b", "a.b.c", "Bearer x.y.z", "....."])
def test_malformed_tokens(token):
    rejected(Verifier(AuthConfig(jwt_secret=SECRET)), token)


def test_alg_none_is_rejected():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    for alg in ("none", "None", "NONE"):
        token = handmade({"alg": alg, "typ": "JWT"}, claims(), None)
        assert "not accepted" in rejected(verifier, token)
    # Even when listed in the configuration.
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, algorithms=("HS256", "none")))
    assert "none" not in verifier.algorithms
    rejected(verifier, jwt.encode(claims(), None, algorithm="none"))


def test_algorithm_not_configured_is_rejected():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, algorithms=("HS512",)))
    assert "not accepted" in rejected(verifier, hs256(claims()))
    assert verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS512")).sub == "alice"


# ---- exp, nbf, leeway ----------------------------------------------------------------------------------------


def test_expired():
    assert "expired" in rejected(Verifier(AuthConfig(jwt_secret=SECRET)), hs256(claims(exp=now() - 3600)))


def test_missing_exp():
    payload = claims()
    del payload["exp"]
    assert "exp" in rejected(Verifier(AuthConfig(jwt_secret=SECRET)), hs256(payload))


def test_non_numeric_exp():
    rejected(Verifier(AuthConfig(jwt_secret=SECRET)), hs256(claims(exp="tomorrow")))


def test_future_nbf():
    assert "nbf" in rejected(Verifier(AuthConfig(jwt_secret=SECRET)), hs256(claims(nbf=now() + 3600)))


def test_past_nbf_is_fine():
    assert Verifier(AuthConfig(jwt_secret=SECRET)).verify(hs256(claims(nbf=now() - 60))).sub == "alice"


def test_leeway_is_honoured():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, leeway=60.0))
    assert verifier.verify(hs256(claims(exp=now() - 30))).sub == "alice"  # expired 30 s ago, within leeway
    assert verifier.verify(hs256(claims(nbf=now() + 30))).sub == "alice"  # valid in 30 s, within leeway
    rejected(verifier, hs256(claims(exp=now() - 120)))
    rejected(verifier, hs256(claims(nbf=now() + 120)))
    strict = Verifier(AuthConfig(jwt_secret=SECRET, leeway=1.0))
    rejected(strict, hs256(claims(exp=now() - 30)))
    rejected(strict, hs256(claims(nbf=now() + 30)))


# ---- aud and iss ---------------------------------------------------------------------------------------------


def test_audience_when_configured():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, audience="fluxbase"))
    assert verifier.verify(hs256(claims(aud="fluxbase"))).sub == "alice"
    assert verifier.verify(hs256(claims(aud=["other", "fluxbase"]))).sub == "alice"
    assert "udience" in rejected(verifier, hs256(claims(aud="other")))
    assert "aud" in rejected(verifier, hs256(claims()))


def test_audience_not_configured_accepts_any():
    assert Verifier(AuthConfig(jwt_secret=SECRET)).verify(hs256(claims(aud="anything"))).sub == "alice"


def test_issuer_when_configured():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, issuer="https://auth.example.com"))
    assert verifier.verify(hs256(claims(iss="https://auth.example.com"))).sub == "alice"
    assert "issuer" in rejected(verifier, hs256(claims(iss="https://evil.example.com")))
    assert "iss" in rejected(verifier, hs256(claims()))


def test_audience_and_issuer_together():
    verifier = Verifier(AuthConfig(jwt_secret=SECRET, audience="a", issuer="i"))
    assert verifier.verify(hs256(claims(aud="a", iss="i"))).claims["iss"] == "i"
    rejected(verifier, hs256(claims(aud="a", iss="x")))
    rejected(verifier, hs256(claims(aud="x", iss="i")))


# ---- asymmetric keys and algorithm confusion -----------------------------------------------------------------


def test_rs256_verified_with_the_public_key_file(public_key_file, private_pem):
    verifier = Verifier(AuthConfig(jwt_public_key_file=public_key_file))
    identity = verifier.verify(jwt.encode(claims(sub="bob", role="admin"), private_pem, algorithm="RS256"))
    assert (identity.sub, identity.role) == ("bob", "admin")


def test_rs256_signed_by_another_key_is_rejected(public_key_file):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert "rejected" in rejected(Verifier(AuthConfig(jwt_public_key_file=public_key_file)), token)


def test_algorithm_confusion_hs256_signed_with_the_public_key_pem(public_key_file, public_pem):
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(role="service_role"), public_pem)
    # Only a public key configured.
    rejected(Verifier(AuthConfig(jwt_public_key_file=public_key_file)), token)
    # A secret and a public key configured: HS256 is accepted, but only with the secret.
    both = Verifier(AuthConfig(jwt_secret=SECRET, jwt_public_key_file=public_key_file))
    assert "HS256" in both.algorithms
    rejected(both, token)
    # Even when the configuration lists HS256 next to RS256 without a secret.
    listed = Verifier(AuthConfig(jwt_public_key_file=public_key_file, algorithms=("HS256", "RS256")))
    rejected(listed, token)


def test_algorithm_confusion_with_the_pem_text_trimmed(public_key_file, public_pem):
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(), public_pem.strip())
    rejected(Verifier(AuthConfig(jwt_public_key_file=public_key_file)), token)


def test_hs_token_rejected_when_only_a_public_key_is_configured(public_key_file):
    verifier = Verifier(AuthConfig(jwt_public_key_file=public_key_file))
    assert not any(alg.startswith("HS") for alg in verifier.algorithms)
    assert "not accepted" in rejected(verifier, hs256(claims()))


def test_rs256_rejected_when_only_a_secret_is_configured(private_pem):
    verifier = Verifier(AuthConfig(jwt_secret=SECRET))
    assert verifier.algorithms == frozenset({"HS256"})
    rejected(verifier, jwt.encode(claims(), private_pem, algorithm="RS256"))


def test_no_keys_means_verification_disabled():
    verifier = Verifier(AuthConfig())
    assert not verifier.enabled
    rejected(verifier, hs256(claims()))


def test_anonymous_identity():
    verifier = Verifier(AuthConfig(anon_role="visitor"))
    identity = verifier.anonymous()
    assert identity == Identity(None, "visitor")
    assert identity.anonymous
    assert identity.claims == {"role": "visitor"}
    # One object for every anonymous connection (bench/RESULTS.md, "Idle memory").
    assert verifier.anonymous() is identity


def test_mint_round_trip():
    token = mint(SECRET, "carol", role="editor", ttl=60, org="acme")
    identity = Verifier(AuthConfig(jwt_secret=SECRET)).verify(token)
    assert (identity.sub, identity.role, identity.claims["org"]) == ("carol", "editor", "acme")
    assert identity.claims["exp"] - identity.claims["iat"] == 60


def test_public_key_file_is_read_once(tmp_path, public_pem, private_pem):
    path = Path(tmp_path / "k.pem")
    path.write_bytes(public_pem)
    verifier = Verifier(AuthConfig(jwt_public_key_file=str(path)))
    path.unlink()
    assert verifier.verify(jwt.encode(claims(), private_pem, algorithm="RS256")).sub == "alice"
