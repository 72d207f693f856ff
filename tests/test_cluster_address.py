"""`cluster.redis_url` parsed (cluster/address.py): direct URLs pass through for redis-py, Sentinel URLs become the
sentinels' addresses, the primary's name, the database, the credentials and TLS."""

from __future__ import annotations

import pytest

from fluxrt_trio.cluster.address import SCHEMES, SentinelAddress, parse


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "redis://redis.internal:6380/3",
        "redis://user:secret@127.0.0.1:6379/1",
        "redis://:secret@127.0.0.1",
        "redis://[::1]:6379/0",
        "rediss://cache.example.com:6380/0",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
    ],
)
def test_a_direct_url_is_given_back_as_it_is(url: str) -> None:
    assert parse(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "expected a URL starting with one of"),
        ("127.0.0.1:6379", "expected a URL starting with one of"),
        ("http://127.0.0.1:6379", "expected a URL starting with one of"),
        ("redis+cluster://h:1/m", "expected a URL starting with one of"),
        ("sentinel://h/m", "expected a URL starting with one of"),
        ("redis:/127.0.0.1", "expected a URL starting with one of"),
        ("redis://", "no host"),
        ("redis://:6379/0", "no host"),
        ("rediss:///0", "no host"),
        ("redis://127.0.0.1:port/0", "not a number"),
        ("rediss://h:63a/0", "not a number"),
    ],
)
def test_a_bad_direct_url_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(url)


def test_the_error_for_an_unknown_scheme_names_every_scheme() -> None:
    with pytest.raises(ValueError) as caught:
        parse("memcached://h")
    for scheme in SCHEMES:
        assert f"{scheme}://" in str(caught.value)


def test_a_sentinel_url_with_one_sentinel_and_the_defaults() -> None:
    assert parse("redis+sentinel://10.0.0.5/mymaster") == SentinelAddress(
        sentinels=(("10.0.0.5", 26379),), primary="mymaster", db=0, password=None, username=None, tls=False
    )


def test_rediss_sentinel_means_tls() -> None:
    address = parse("rediss+sentinel://s1:26380/mymaster")
    assert isinstance(address, SentinelAddress)
    assert address.tls
    assert address.sentinels == (("s1", 26380),)


@pytest.mark.parametrize(
    ("hosts", "sentinels"),
    [
        ("s1:26380,s2:26381,s3", (("s1", 26380), ("s2", 26381), ("s3", 26379))),
        ("s1, s2:1 , s3", (("s1", 26379), ("s2", 1), ("s3", 26379))),
        ("[::1]:26380", (("::1", 26380),)),
        ("[::1]", (("::1", 26379),)),
        ("[2001:db8::7]:26381,10.0.0.1:26382,[::1]", (("2001:db8::7", 26381), ("10.0.0.1", 26382), ("::1", 26379))),
        ("sentinel.example.com:65535", (("sentinel.example.com", 65535),)),
    ],
)
def test_sentinel_lists_with_ports_defaults_and_ipv6_brackets(hosts: str, sentinels: tuple[tuple[str, int]]) -> None:
    address = parse(f"redis+sentinel://{hosts}/mymaster")
    assert isinstance(address, SentinelAddress)
    assert address.sentinels == sentinels
    assert address.primary == "mymaster"


@pytest.mark.parametrize(
    ("path", "primary", "db"),
    [
        ("/mymaster", "mymaster", 0),
        ("/mymaster/", "mymaster", 0),
        ("/mymaster/0", "mymaster", 0),
        ("/mymaster/15", "mymaster", 15),
        ("/mymaster/3/", "mymaster", 3),
        ("/my%20master%2Fx/2", "my master/x", 2),
    ],
)
def test_sentinel_primary_name_and_db_number(path: str, primary: str, db: int) -> None:
    address = parse(f"redis+sentinel://s1{path}")
    assert isinstance(address, SentinelAddress)
    assert (address.primary, address.db) == (primary, db)


@pytest.mark.parametrize(
    ("credentials", "username", "password"),
    [
        ("", None, None),
        (":secret@", None, "secret"),
        ("alice:secret@", "alice", "secret"),
        ("alice@", "alice", None),
        ("alice:@", "alice", None),
        ("al%40ice:p%40ss%3Aw%2Fd@", "al@ice", "p@ss:w/d"),
        ("alice:pa:ss@", "alice", "pa:ss"),
        ("a@b:c@", "a@b", "c"),
    ],
)
def test_sentinel_credentials_are_percent_decoded(credentials: str, username: str | None, password: str | None) -> None:
    address = parse(f"redis+sentinel://{credentials}s1:26379,s2/mymaster/1")
    assert isinstance(address, SentinelAddress)
    assert (address.username, address.password) == (username, password)
    assert address.sentinels == (("s1", 26379), ("s2", 26379))
    assert (address.primary, address.db) == ("mymaster", 1)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://", "a sentinel address is empty"),
        ("redis+sentinel:///mymaster", "a sentinel address is empty"),
        ("redis+sentinel://s1,,s2/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://s1,/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://:26379/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://[]:26379/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://u:p@/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://::1/mymaster", "a sentinel address is empty"),
        ("redis+sentinel://s1:port/mymaster", "is not a number"),
        ("redis+sentinel://s1:-1/mymaster", "is not a number"),
        ("redis+sentinel://[::1]:x/mymaster", "is not a number"),
        ("redis+sentinel://[::1]x:26380/mymaster", "sentinel"),
        ("redis+sentinel://s1", "no primary name"),
        ("redis+sentinel://s1/", "no primary name"),
        ("redis+sentinel://s1//", "no primary name"),
        ("redis+sentinel://s1/mymaster/db", "expected /<primary-name>"),
        ("redis+sentinel://s1/mymaster/-1", "expected /<primary-name>"),
        ("redis+sentinel://s1/mymaster/1/2", "expected /<primary-name>"),
    ],
)
def test_a_bad_sentinel_url_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(url)


@pytest.mark.parametrize(
    ("tail", "primary", "db", "options"),
    [
        ("/mymaster?ssl_ca_certs=%2Fetc%2Fca.pem", "mymaster", 0, (("ssl_ca_certs", "/etc/ca.pem"),)),
        (
            "/mymaster/2?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
            "mymaster",
            2,
            (("ssl_ca_certs", "/etc/ca.pem"), ("ssl_cert_reqs", "required")),
        ),
        ("/mymaster/3/?socket_keepalive=true", "mymaster", 3, (("socket_keepalive", "true"),)),
        ("/mymaster?", "mymaster", 0, ()),
        ("/mymaster", "mymaster", 0, ()),
    ],
)
def test_sentinel_options_after_the_path(tail: str, primary: str, db: int, options: tuple[tuple[str, str]]) -> None:
    address = parse(f"rediss+sentinel://u:p%3F@s1:26380,[::1]{tail}")
    assert address == SentinelAddress(
        sentinels=(("s1", 26380), ("::1", 26379)),
        primary=primary,
        db=db,
        password="p?",
        username="u",
        tls=True,
        options=options,
    )


def test_sentinel_options_are_not_part_of_the_primary_name() -> None:
    address = parse("redis+sentinel://s1/mymaster?ssl_ca_certs=/x")
    assert isinstance(address, SentinelAddress)
    assert address.primary == "mymaster"
