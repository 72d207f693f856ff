"""`cluster.redis_url`, parsed: one Redis (`redis://`, `rediss://` with TLS, `unix://`) or a primary found through
Redis Sentinel (`redis+sentinel://`, `rediss+sentinel://`)."""

from __future__ import annotations

import urllib.parse

import attrs

_DIRECT = ("redis", "rediss", "unix")
_SENTINEL = ("redis+sentinel", "rediss+sentinel")
SCHEMES = _DIRECT + _SENTINEL


@attrs.frozen(slots=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    primary: str
    """the name the sentinels monitor the primary under"""
    db: int
    password: str | None
    username: str | None
    tls: bool
    options: tuple[tuple[str, str], ...] = ()
    """query parameters (such as `ssl_ca_certs`), for the connections to the sentinels and to the primary"""


def parse(url: str) -> str | SentinelAddress:
    """A direct URL as given (redis-py reads it), or the sentinels and the primary's name of a Sentinel URL
    `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/primary-name[/db][?option=value&...]` (port
    26379 by default; options as redis-py reads them in a `rediss://` URL, such as `ssl_ca_certs`).

    Raises ValueError naming what is wrong.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"expected a URL starting with one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme in _DIRECT:
        split = urllib.parse.urlsplit(url)
        if scheme != "unix" and not split.hostname:
            raise ValueError("no host: expected e.g. redis://127.0.0.1:6379/0")
        try:
            split.port  # noqa: B018 (raises for a port that is not a number)
        except ValueError:
            raise ValueError("the port is not a number") from None
        return url
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    sentinels = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):
            host, closed, after = item[1:].partition("]")
            if not closed or (after and not after.startswith(":")):
                raise ValueError(f"sentinel address {item!r}: expected [IPv6 address] or [IPv6 address]:port")
            port = after.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError("a sentinel address is empty: expected host[:port] separated by commas")
        if port and not (port.isascii() and port.isdigit()):
            raise ValueError(f"sentinel port {port!r} is not a number")
        if port and not 0 < int(port) < 65536:
            raise ValueError(f"sentinel port {port} is out of range 1-65535")
        sentinels.append((host, int(port) if port else 26379))
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("no primary name: expected redis+sentinel://host:26379/<primary-name>[/db]")
    if len(parts) > 2 or (len(parts) == 2 and not (parts[1].isascii() and parts[1].isdigit())):
        raise ValueError("expected /<primary-name>[/<db number>] after the sentinel addresses")
    return SentinelAddress(
        sentinels=tuple(sentinels),
        primary=urllib.parse.unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        password=urllib.parse.unquote(password) or None,
        username=urllib.parse.unquote(username) or None,
        tls=scheme.startswith("rediss"),
        options=tuple(urllib.parse.parse_qsl(query)),
    )
