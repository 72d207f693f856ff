"""Reload without sockets: which settings apply live, key rotation in the Verifier, limits on an open session."""

from __future__ import annotations

import signal
import time
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fluxrt_trio.auth import MAX_RETIRED_KEYS, AuthError, Verifier, mint
from fluxrt_trio.cli import main
from fluxrt_trio.config import AuthConfig, Config, DatabaseConfig, RealtimeConfig, ServerConfig, plan_reload
from fluxrt_trio.protocol.identity import Identity
from fluxrt_trio.protocol.limits import Allowance, Verdict
from fluxrt_trio.protocol.messages import ErrorCode
from fluxrt_trio.protocol.session import Session, SessionLimits

OLD = "old-secret-" + "o" * 40
NEW = "new-secret-" + "n" * 40


# ---- which settings apply --------------------------------------------------------------------------------------


def test_live_settings_change_and_restart_only_ones_are_reported_and_kept():
    running = Config(server=ServerConfig(port=8080), database=DatabaseConfig(dsn="postgresql://a/db"))
    new = Config(
        server=ServerConfig(port=9090, allowed_origins=("https://app.example",)),
        database=DatabaseConfig(dsn="postgresql://b/db"),
        realtime=RealtimeConfig(max_connections=5),
        auth=AuthConfig(jwt_secret=NEW, roles=("editor",)),
    )
    plan = plan_reload(running, running, new)
    assert set(plan.changed) == {"server.allowed_origins", "realtime.max_connections", "auth.jwt_secret"}
    assert set(plan.needs_restart) == {"server.port", "database.dsn", "auth.roles"}
    assert plan.config.server.port == 8080 and plan.config.database.dsn == "postgresql://a/db"
    assert plan.config.auth.roles == ()
    assert plan.config.server.allowed_origins == ("https://app.example",)
    assert plan.config.realtime.max_connections == 5 and plan.config.auth.jwt_secret == NEW


def test_what_start_up_filled_in_is_not_reported_as_changed():
    # The embedded database: the file names a folder, the running server a DSN it made up at start.
    started = Config(database=DatabaseConfig(embedded=".fluxrt/db"))
    running = attrs.evolve(started, database=DatabaseConfig(dsn="postgresql://postgres@127.0.0.1:5555/postgres"))
    plan = plan_reload(started, running, started)
    assert plan.changed == () and plan.needs_restart == ()
    assert plan.config == running


def test_an_unchanged_configuration_changes_nothing():
    config = Config(auth=AuthConfig(jwt_secret=OLD))
    plan = plan_reload(config, config, config)
    assert plan == type(plan)(config, (), ())


# ---- key rotation ----------------------------------------------------------------------------------------------


def test_tokens_signed_with_a_replaced_secret_before_the_reload_stay_valid_until_they_expire():
    rotated_at = time.time()
    verifier = Verifier(AuthConfig(jwt_secret=OLD)).rotated(AuthConfig(jwt_secret=NEW), now=rotated_at)
    assert verifier.verify(mint(OLD, "alice", iat=int(rotated_at) - 60)).sub == "alice"
    assert verifier.verify(mint(NEW, "bob")).sub == "bob"
    expired = jwt.encode({"sub": "alice", "iat": int(rotated_at) - 600, "exp": int(rotated_at) - 300}, OLD)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(expired)
    with pytest.raises(AuthError, match="replaced before the token was issued"):
        verifier.verify(mint(OLD, "mallory", iat=int(rotated_at) + 1))
    with pytest.raises(AuthError, match="Signature"):
        verifier.verify(mint("never-configured-" + "x" * 40, "eve"))


def test_a_replaced_key_vouches_only_for_tokens_with_iat_and_only_within_the_grace():
    rotated_at = time.time()
    config = AuthConfig(jwt_secret=NEW, rotation_grace=3600)
    verifier = Verifier(AuthConfig(jwt_secret=OLD)).rotated(config, now=rotated_at)
    without_iat = jwt.encode({"sub": "alice", "exp": int(rotated_at) + 300}, OLD)
    with pytest.raises(AuthError, match="without iat"):
        verifier.verify(without_iat)
    # Whoever still holds the old key could backdate iat and pick a far exp: the grace bounds that.
    long_ago = Verifier(AuthConfig(jwt_secret=OLD)).rotated(config, now=rotated_at - 3601)
    backdated = mint(OLD, "mallory", iat=int(rotated_at) - 7200, ttl=30 * 86400)
    with pytest.raises(AuthError, match="rotation_grace"):
        long_ago.verify(backdated)
    assert verifier.verify(backdated).sub == "mallory"  # within the grace, as any token from before the reload


def test_sighup_is_ignored_from_the_start_of_the_command():
    # Until serving installs its handler, a reload request (SIGHUP) must not kill a starting fluxrt.
    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(SystemExit):
            main(["--version"])
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_rotating_back_and_forth_keeps_only_the_newest_retired_keys():
    verifier = Verifier(AuthConfig(jwt_secret="s0-" + "x" * 40))
    t0 = time.time() - 1000
    for i in range(1, MAX_RETIRED_KEYS + 3):
        verifier = verifier.rotated(AuthConfig(jwt_secret=f"s{i}-" + "x" * 40), now=t0 + i)
    issued = int(t0)
    assert verifier.verify(mint(f"s{MAX_RETIRED_KEYS + 1}-" + "x" * 40, "a", iat=issued)).sub == "a"
    assert verifier.verify(mint("s3-" + "x" * 40, "a", iat=issued)).sub == "a"
    with pytest.raises(AuthError):
        verifier.verify(mint("s1-" + "x" * 40, "a", iat=issued))
    # Going back to a retired secret makes it current again, with no issued-before limit.
    back = verifier.rotated(AuthConfig(jwt_secret="s3-" + "x" * 40))
    assert back.verify(mint("s3-" + "x" * 40, "a")).sub == "a"


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_public_key_file_is_read_again_on_reload_and_the_old_key_type_keeps_working(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwt.pem"
    path.write_bytes(_pem(rsa_key))
    config = AuthConfig(jwt_public_key_file=str(path))
    verifier = Verifier(config)
    issued = int(time.time()) - 5
    rs = jwt.encode({"sub": "alice", "iat": issued, "exp": issued + 300}, rsa_key, algorithm="RS256")
    path.write_bytes(_pem(ec_key))  # the same path, a new key: rotation by replacing the file
    verifier = verifier.rotated(config)
    es = jwt.encode({"sub": "bob", "iat": issued, "exp": issued + 300}, ec_key, algorithm="ES256")
    assert verifier.verify(es).sub == "bob"
    assert verifier.verify(rs).sub == "alice"


def test_a_secret_file_is_read_again_on_reload(tmp_path):
    path = tmp_path / "jwt-secret"
    path.write_text(OLD + "\n")
    config = AuthConfig(jwt_secret_file=str(path))
    verifier = Verifier(config)
    assert verifier.verify(mint(OLD, "alice")).sub == "alice"
    path.write_text(NEW + "\n")
    verifier = verifier.rotated(config)
    assert verifier.verify(mint(NEW, "bob")).sub == "bob"


def test_an_unreadable_key_file_fails_the_rotation_and_leaves_the_verifier_as_it_was(tmp_path):
    path = tmp_path / "jwt-secret"
    path.write_text(OLD)
    verifier = Verifier(AuthConfig(jwt_secret_file=str(path)))
    path.unlink()
    with pytest.raises(OSError):
        verifier.rotated(AuthConfig(jwt_secret_file=str(path)))
    assert verifier.verify(mint(OLD, "alice")).sub == "alice"


# ---- limits on an open session ---------------------------------------------------------------------------------


def test_a_lowered_allowance_applies_at_once_and_a_raised_one_refills_faster():
    allowance = Allowance(10)
    for t in range(5):
        assert allowance.charge(float(t)) is Verdict.ALLOW
    allowance.resize(2)
    assert allowance.bucket.tokens <= 2
    assert allowance.charge(5.0) is Verdict.ALLOW
    assert allowance.charge(5.0) is Verdict.ALLOW
    assert allowance.charge(5.0) is Verdict.REJECT
    allowance.resize(600)
    assert allowance.charge(6.0) is Verdict.ALLOW  # 600/min refills ten per second


def _broadcast(session: Session, ref: str) -> list[Any]:
    return session.receive(f'{{"type":"broadcast","channel":"broadcast:x","payload":{{}},"ref":"{ref}"}}', 0.0)


def test_new_limits_decide_the_next_messages_of_an_open_session_and_keep_what_it_holds():
    session = Session("c1", Identity("alice", "authenticated"), SessionLimits(max_subscriptions=3))
    for name in ("a", "b"):
        [check] = session.receive(f'{{"type":"subscribe","channel":"broadcast:{name}"}}', 0.0)
        session.answered(check, None)
    session.set_limits(SessionLimits(max_subscriptions=1, message_rate_limit=1))
    assert set(session.subscriptions) == {"broadcast:a", "broadcast:b"}
    [check] = session.receive('{"type":"subscribe","channel":"broadcast:c","ref":"s"}', 0.0)
    [refusal] = session.answered(check, None)
    assert refusal.message.code is ErrorCode.SUBSCRIPTION_FAILED and "at most 1" in refusal.message.message
    assert not any(getattr(getattr(e, "message", None), "code", None) for e in _broadcast(session, "1"))
    [limited] = [e for e in _broadcast(session, "2") if hasattr(e, "message")]
    assert limited.message.code is ErrorCode.RATE_LIMITED
