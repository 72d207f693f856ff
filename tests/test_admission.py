"""Admission as values: the node, per-user, anonymous-share and per-address limits, handshakes under way, release,
and a token change moving a connection in and out of the anonymous counts."""

from __future__ import annotations

import pytest

from fluxrt_trio.admission import Admission, address_key, anonymous_places
from fluxrt_trio.config import ConfigError, load_config
from fluxrt_trio.protocol.identity import Identity

ANON = Identity(sub=None, role="anon", claims={"role": "anon"})
A, B = "10.0.0.1", "10.0.0.2"


def user(sub: str) -> Identity:
    return Identity(sub=sub, role="authenticated", claims={"sub": sub})


def admission(**limits: float) -> Admission[str]:
    values = {"max_connections": 10, "max_connections_per_user": 3, **limits}
    return Admission(
        int(values.pop("max_connections")),
        int(values.pop("max_connections_per_user")),
        max_anonymous_per_address=int(values.pop("max_anonymous_per_address", 50)),
        anonymous_share=values.pop("anonymous_share", 0.5),
        max_pending_handshakes_per_address=int(values.pop("max_pending_handshakes_per_address", 64)),
    )


def test_node_limit_counts_everyone_and_names_the_setting():
    adm = admission(max_connections=3, anonymous_share=1.0)
    assert adm.admit("c1", user("alice"), A) is None
    assert adm.admit("c2", ANON, A) is None
    assert adm.admit("c3", user("bob"), B) is None
    refusal = adm.admit("c4", user("carol"), B)
    assert refusal is not None and "realtime.max_connections = 3" in refusal
    assert set(adm.connections) == {"c1", "c2", "c3"}
    assert adm.rejected == {"node_limit": 1}


def test_per_user_limit():
    adm = admission(max_connections_per_user=2)
    assert adm.admit("c1", user("alice"), A) is None
    assert adm.admit("c2", user("alice"), B) is None
    refusal = adm.admit("c3", user("alice"), A)
    assert refusal is not None and "realtime.max_connections_per_user = 2" in refusal
    assert adm.admit("c3", user("bob"), A) is None
    assert adm.rejected == {"user_limit": 1}


def test_anonymous_connections_take_at_most_their_share_and_the_rest_stays_for_tokens():
    adm = admission(max_connections=10, anonymous_share=0.5)
    for n in range(5):
        assert adm.admit(f"anon{n}", ANON, f"10.0.1.{n}") is None
    refusal = adm.admit("anon5", ANON, "10.0.1.9")
    assert refusal is not None
    assert "realtime.anonymous_share = 0.5" in refusal and "at most 5" in refusal and "token" in refusal
    for n in range(5):
        assert adm.admit(f"user{n}", user(f"u{n}"), A) is None
    assert "realtime.max_connections = 10" in (adm.admit("user5", user("u5"), A) or "")
    assert adm.rejected == {"anonymous_share": 1, "node_limit": 1}


def test_anonymous_connections_are_limited_per_address_and_others_are_not_affected():
    adm = admission(max_anonymous_per_address=2, anonymous_share=1.0)
    assert adm.admit("a1", ANON, A) is None
    assert adm.admit("a2", ANON, A) is None
    refusal = adm.admit("a3", ANON, A)
    assert refusal is not None and "realtime.max_anonymous_per_address = 2" in refusal
    # Another address, and a token from the same address, still get in.
    assert adm.admit("b1", ANON, B) is None
    assert adm.admit("u1", user("alice"), A) is None
    assert adm.anonymous == 3 and adm.anonymous_per_address == {A: 2, B: 1}
    assert adm.rejected == {"anonymous_address_limit": 1}


def test_a_token_without_sub_counts_as_anonymous():
    keyholder = Identity(sub=None, role="anon", claims={"role": "anon", "iss": "supabase"})
    adm = admission(max_anonymous_per_address=1)
    assert adm.admit("c1", keyholder, A) is None
    assert adm.admit("c2", keyholder, A) is not None


def test_release_gives_every_count_back_and_is_idempotent():
    adm = admission(max_anonymous_per_address=1, max_connections_per_user=1)
    adm.admit("a", ANON, A)
    adm.admit("u", user("alice"), A)
    adm.release("a", ANON)
    adm.release("a", ANON)
    adm.release("u", user("alice"))
    assert not adm.connections and adm.anonymous == 0
    assert not adm.anonymous_per_address and not adm.per_user
    assert adm.admit("a2", ANON, A) is None
    assert adm.admit("u2", user("alice"), A) is None


def test_authenticating_moves_a_connection_out_of_the_anonymous_counts_and_back():
    adm = admission(max_anonymous_per_address=1, max_connections_per_user=1)
    assert adm.admit("c", ANON, A) is None
    assert adm.admit("other", ANON, A) is not None
    assert adm.readmit("c", ANON, user("alice")) is None
    assert adm.anonymous == 0 and adm.per_user == {"alice": 1}
    # Its anonymous place is free again.
    assert adm.admit("other", ANON, A) is None
    # Going back to anonymous needs a free anonymous place from its address: there is none now.
    refusal = adm.readmit("c", user("alice"), ANON)
    assert refusal is not None and "max_anonymous_per_address" in refusal and "current token stays" in refusal
    assert adm.per_user == {"alice": 1} and adm.anonymous_per_address == {A: 1}
    adm.release("other", ANON)
    assert adm.readmit("c", user("alice"), ANON) is None
    assert adm.per_user == {} and adm.anonymous_per_address == {A: 1}
    adm.release("c", ANON)
    assert not adm.anonymous_per_address and adm.anonymous == 0


def test_changing_user_is_held_to_the_new_users_limit():
    adm = admission(max_connections_per_user=1)
    adm.admit("c1", user("alice"), A)
    adm.admit("c2", user("bob"), A)
    refusal = adm.readmit("c2", user("bob"), user("alice"))
    assert refusal is not None and "current token stays" in refusal
    assert adm.per_user == {"alice": 1, "bob": 1}
    # Refused token changes are not connections refused.
    assert adm.rejected == {}
    assert adm.readmit("c2", user("bob"), user("carol")) is None
    assert adm.per_user == {"alice": 1, "carol": 1}


def test_the_anonymous_connection_itself_does_not_block_its_own_token_change_to_another_anonymous_token():
    adm = admission(max_anonymous_per_address=1)
    adm.admit("c", ANON, A)
    assert adm.readmit("c", ANON, Identity(sub=None, role="anon", claims={"role": "anon", "v": 2})) is None
    assert adm.anonymous_per_address == {A: 1}


def test_lowered_limits_keep_what_is_admitted_and_refuse_what_comes():
    adm = admission(max_anonymous_per_address=5, anonymous_share=1.0)
    for n in range(4):
        adm.admit(f"a{n}", ANON, A)
    adm.max_anonymous_per_address = 2
    assert len(adm.connections) == 4
    assert adm.admit("a4", ANON, A) is not None
    adm.anonymous_share = 0.1
    assert "at most 1" in (adm.admit("b", ANON, B) or "")


# ---- in a cluster: the per-user count of every node -------------------------------------------------------


class Nodes:
    """The other nodes' per-user counts as a cluster reports them (`elsewhere`), and what this node reported of its
    own (`counted`)."""

    def __init__(self, **elsewhere: int) -> None:
        self.held = dict(elsewhere)
        self.asked: list[str] = []
        self.reported: list[tuple[str, int]] = []

    def elsewhere(self, sub: str) -> int:
        self.asked.append(sub)
        return self.held.get(sub, 0)

    def counted(self, sub: str, n: int) -> None:
        self.reported.append((sub, n))


def clustered(nodes: Nodes, max_connections_per_user: int = 3) -> Admission[str]:
    return Admission(10, max_connections_per_user, elsewhere=nodes.elsewhere, counted=nodes.counted)


def test_a_user_at_the_limit_counted_across_nodes_is_refused_and_a_release_frees_a_place():
    nodes = Nodes(alice=2)
    adm = clustered(nodes)
    assert adm.admit("c1", user("alice"), A) is None
    # Two on the other nodes and one here: the third is the limit.
    refusal = adm.admit("c2", user("alice"), B)
    assert refusal is not None
    assert "realtime.max_connections_per_user = 3, counted on every node" in refusal
    assert adm.rejected == {"user_limit": 1}
    assert adm.per_user == {"alice": 1} and set(adm.connections) == {"c1"}
    # Another user is not held to alice's count.
    assert adm.admit("b1", user("bob"), A) is None
    # A release here frees a place for a connection here...
    adm.release("c1", user("alice"))
    assert adm.admit("c2", user("alice"), B) is None
    assert adm.admit("c3", user("alice"), B) is not None
    # ... and so does one on another node.
    nodes.held["alice"] = 1
    assert adm.admit("c3", user("alice"), B) is None
    assert adm.per_user == {"alice": 2, "bob": 1}
    assert adm.rejected == {"user_limit": 2}


def test_a_user_at_the_limit_on_the_other_nodes_alone_is_refused():
    adm = clustered(Nodes(alice=3))
    refusal = adm.admit("c1", user("alice"), A)
    assert refusal is not None and "counted on every node" in refusal
    assert not adm.connections and not adm.per_user


def test_a_token_change_to_a_user_at_the_limit_across_nodes_is_refused_and_the_current_token_stays():
    nodes = Nodes(alice=3)
    adm = clustered(nodes)
    assert adm.admit("c", user("bob"), A) is None
    refusal = adm.readmit("c", user("bob"), user("alice"))
    assert refusal is not None and "counted on every node" in refusal and "current token stays" in refusal
    assert adm.per_user == {"bob": 1}
    assert nodes.reported[-1] == ("bob", 1)
    nodes.held["alice"] = 2
    assert adm.readmit("c", user("bob"), user("alice")) is None
    assert adm.per_user == {"alice": 1}


def test_anonymous_connections_are_not_counted_across_nodes():
    nodes = Nodes()
    adm = clustered(nodes)
    keyholder = Identity(sub=None, role="anon", claims={"role": "anon", "iss": "supabase"})
    assert adm.admit("a1", ANON, A) is None
    assert adm.admit("a2", keyholder, A) is None
    assert adm.readmit("a1", ANON, keyholder) is None
    adm.release("a1", keyholder)
    assert nodes.asked == [] and nodes.reported == []


def test_counted_is_told_the_nodes_new_count_on_every_admit_release_and_readmit():
    nodes = Nodes()
    adm = clustered(nodes)
    adm.admit("c1", user("alice"), A)
    adm.admit("c2", user("alice"), B)
    adm.admit("c3", user("bob"), A)
    assert nodes.reported == [("alice", 1), ("alice", 2), ("bob", 1)]
    adm.release("c1", user("alice"))
    adm.release("c1", user("alice"))  # a second release counts nothing out
    assert nodes.reported[3:] == [("alice", 1)]
    assert adm.readmit("c2", user("alice"), user("bob")) is None
    assert nodes.reported[4:] == [("alice", 0), ("bob", 2)]
    # The same user under a fresh token: nothing moves.
    assert adm.readmit("c2", user("bob"), user("bob")) is None
    # Anonymous and back: out of the user's count, then into it again.
    assert adm.readmit("c2", user("bob"), ANON) is None
    assert adm.readmit("c2", ANON, user("bob")) is None
    assert nodes.reported[6:] == [("bob", 1), ("bob", 2)]
    adm.release("c2", user("bob"))
    adm.release("c3", user("bob"))
    assert nodes.reported[8:] == [("bob", 1), ("bob", 0)]
    assert not adm.per_user


def test_a_refused_admit_reports_no_count_and_a_refused_token_change_ends_on_the_count_it_had():
    nodes = Nodes(alice=3)
    adm = clustered(nodes, max_connections_per_user=3)
    assert adm.admit("a", user("alice"), A) is not None
    assert nodes.reported == []
    adm.admit("b", user("bob"), A)
    assert adm.readmit("b", user("bob"), user("alice")) is not None
    # What the other nodes read last is this node's count: bob still holds his one connection.
    assert nodes.reported[-1] == ("bob", 1)
    assert {sub: n for sub, n in nodes.reported} == {"bob": 1}


def test_handshakes_under_way_are_limited_per_address():
    adm = admission(max_pending_handshakes_per_address=2)
    assert adm.begin_handshake("h1", A) is None
    assert adm.begin_handshake("h2", A) is None
    refusal = adm.begin_handshake("h3", A)
    assert refusal is not None and "server.max_pending_handshakes_per_address = 2" in refusal
    assert adm.begin_handshake("h4", B) is None
    adm.end_handshake("h1")
    adm.end_handshake("h1")
    adm.end_handshake("never-begun")
    assert adm.pending_per_address == {A: 1, B: 1}
    assert adm.begin_handshake("h5", A) is None
    assert adm.rejected == {"pending_handshakes": 1}


@pytest.mark.parametrize(
    ("share", "max_connections", "places"), [(0.5, 1000, 500), (0.7, 10, 7), (0.29, 100, 29), (0.5, 1, 0), (1.0, 3, 3)]
)
def test_anonymous_places_round_down_without_binary_surprises(share, max_connections, places):
    assert anonymous_places(share, max_connections) == places


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
        # Not addresses in the one form the kernel writes: counted as given, not as 1.2.3.4.
        ("01.2.3.4", "01.2.3.4"),
        ("1.2.3.4\x00", "1.2.3.4\x00"),
    ],
)
def test_address_key_groups_ipv6_by_64(host, key):
    assert address_key(host) == key


# ---- the settings ---------------------------------------------------------------------------------------------


def test_the_settings_load_with_their_defaults_and_units():
    config = load_config(
        None,
        {
            "FLUXRT_REALTIME_ANONYMOUS_SHARE": "0.25",
            "FLUXRT_REALTIME_MAX_ANONYMOUS_PER_ADDRESS": "7",
            "FLUXRT_SERVER_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "8",
            "FLUXRT_SERVER_HANDSHAKE_TIMEOUT": "1500ms",
        },
    )
    assert config.realtime.anonymous_share == 0.25 and config.realtime.max_anonymous_per_address == 7
    assert config.server.max_pending_handshakes_per_address == 8 and config.server.handshake_timeout == 1.5
    defaults = load_config(None, {})
    assert defaults.realtime.anonymous_share == 0.5 and defaults.realtime.max_anonymous_per_address == 50
    assert defaults.server.max_pending_handshakes_per_address == 64 and defaults.server.handshake_timeout == 10


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FLUXRT_REALTIME_ANONYMOUS_SHARE", "0", "realtime.anonymous_share: expected a fraction greater than 0"),
        ("FLUXRT_REALTIME_ANONYMOUS_SHARE", "1.5", "auth.allow_anonymous: false"),
        ("FLUXRT_REALTIME_ANONYMOUS_SHARE", "half", "such as 0.5"),
        ("FLUXRT_REALTIME_MAX_ANONYMOUS_PER_ADDRESS", "0", "realtime.max_anonymous_per_address: expected a whole"),
        ("FLUXRT_SERVER_MAX_PENDING_HANDSHAKES_PER_ADDRESS", "-1", "server.max_pending_handshakes_per_address"),
        ("FLUXRT_SERVER_HANDSHAKE_TIMEOUT", "0", "greater than zero, got 0"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_expected(variable, value, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, {variable: value})
    (problem,) = info.value.problems
    assert problem.startswith(f"environment {variable}: ") and expected in problem, problem


def test_a_share_that_leaves_no_anonymous_place_is_refused_unless_anonymous_is_off():
    environ = {"FLUXRT_REALTIME_MAX_CONNECTIONS": "3", "FLUXRT_REALTIME_MAX_CONNECTIONS_PER_USER": "3"}
    with pytest.raises(ConfigError) as info:
        load_config(None, {**environ, "FLUXRT_REALTIME_ANONYMOUS_SHARE": "0.3"})
    (problem,) = info.value.problems
    assert "realtime.anonymous_share: 0.3 of realtime.max_connections (3) leaves no place" in problem
    assert "auth.allow_anonymous: false" in problem
    config = load_config(
        None,
        {
            **environ,
            "FLUXRT_REALTIME_ANONYMOUS_SHARE": "0.3",
            "FLUXRT_AUTH_ALLOW_ANONYMOUS": "false",
            "FLUXRT_AUTH_JWT_SECRET": "s" * 32,
        },
    )
    assert config.realtime.anonymous_share == 0.3
