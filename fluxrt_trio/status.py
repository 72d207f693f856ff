"""The status page (`GET /`, `GET /status`) and what it reads (`GET /api/stats`): pure, like api.py, but for
`page()`, which reads status.html from the package once.

Values in, values out: the server hands in counts and counters (`Snapshot`) and keeps a `Samples` ring of them, one
every SAMPLE_INTERVAL seconds; `stats_body` turns both into the JSON the page draws. The page itself is one static
file of the package (status.html), its script and style inline so that nothing is fetched but `/api/stats`; its
Content-Security-Policy allows exactly those two inline elements, by hash.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import heapq
import importlib.resources
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import orjson

SAMPLE_INTERVAL = 2.0
"""seconds between samples"""
SAMPLES = 300
"""samples kept: ten minutes"""
TOP_CHANNELS = 10
"""channels listed by subscribers"""
PAGE_PATHS = ("/", "/status")


@attrs.frozen(slots=True)
class Snapshot:
    """What the node counts at one moment; counters (`*_total`) only grow while the process runs."""

    at: float
    """seconds, monotonic"""
    connections: int
    subscriptions: Mapping[str, int]
    """by channel kind"""
    messages_in_total: int
    messages_out_total: int
    errors_total: int
    slow_consumer_closes_total: int
    changefeed_lag: float | None
    """None without a database, or before the changefeed's first read"""


class Samples:
    """The last SAMPLES snapshots, oldest first (a ring: adding one past the limit drops the oldest)."""

    __slots__ = ("_ring", "size")

    def __init__(self, size: int = SAMPLES) -> None:
        self.size = size
        self._ring: collections.deque[Snapshot] = collections.deque(maxlen=size)

    def add(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` as the newest; its `at` must not be before the newest kept one's."""
        if self._ring and snapshot.at < self._ring[-1].at:
            raise ValueError(f"sample at {snapshot.at} is older than the newest kept ({self._ring[-1].at})")
        self._ring.append(snapshot)

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self._ring)


def _rate(newer: int, older: int, seconds: float) -> float:
    return (newer - older) / seconds if seconds > 0 else 0.0


def series(samples: Iterable[Snapshot], now: float) -> dict[str, list[float | None]]:
    """The samples as columns for the sparklines: `t` (seconds before `now`, negative), the gauges at each sample,
    and each counter's rate per second over the interval that ends there (the first sample has none: the rates
    start at the second). `changefeed_lag_s` is None where the node had no lag to report."""
    kept = list(samples)
    columns: dict[str, list[float | None]] = {
        "t": [],
        "connections": [],
        "subscriptions": [],
        "changefeed_lag_s": [],
        "messages_in_per_s": [],
        "messages_out_per_s": [],
        "errors_per_s": [],
        "slow_consumer_closes_per_s": [],
    }
    for i, sample in enumerate(kept):
        columns["t"].append(round(sample.at - now, 3))
        columns["connections"].append(sample.connections)
        columns["subscriptions"].append(sum(sample.subscriptions.values()))
        columns["changefeed_lag_s"].append(None if sample.changefeed_lag is None else round(sample.changefeed_lag, 3))
        if i == 0:
            continue
        before = kept[i - 1]
        seconds = sample.at - before.at
        for name, counter in (
            ("messages_in_per_s", "messages_in_total"),
            ("messages_out_per_s", "messages_out_total"),
            ("errors_per_s", "errors_total"),
            ("slow_consumer_closes_per_s", "slow_consumer_closes_total"),
        ):
            columns[name].append(round(_rate(getattr(sample, counter), getattr(before, counter), seconds), 3))
    return columns


def top_channels(sizes: Iterable[tuple[str, int]], n: int = TOP_CHANNELS) -> list[dict[str, Any]]:
    """The `n` channels with the most subscribers on this node, most first; ties by name."""
    top = heapq.nsmallest(n, sizes, key=lambda item: (-item[1], item[0]))
    return [{"channel": name, "subscribers": count} for name, count in top]


def stats_body(
    now: Snapshot,
    samples: Samples,
    *,
    node: Mapping[str, Any],
    max_connections: int,
    errors_by_code: Mapping[str, int],
    top: list[dict[str, Any]],
    database: str,
    cluster: Mapping[str, Any] | None,
) -> bytes:
    """`GET /api/stats`'s body: the counts of `now` (the same values `/metrics` shows at that moment), the latest
    rates (over the newest sampling interval; 0 before there are two samples) and the samples' columns."""
    columns = series(samples, now.at)
    rates = {name: (values[-1] if values else 0.0) for name, values in columns.items() if name.endswith("_per_s")}
    body = {
        "node": dict(node),
        "connections": now.connections,
        "max_connections": max_connections,
        "subscriptions": dict(now.subscriptions),
        "messages": {
            "in_total": now.messages_in_total,
            "out_total": now.messages_out_total,
            "in_per_s": rates["messages_in_per_s"],
            "out_per_s": rates["messages_out_per_s"],
        },
        "changefeed_lag_s": None if now.changefeed_lag is None else round(now.changefeed_lag, 3),
        "database": database,
        "cluster": None if cluster is None else dict(cluster),
        "top_channels": top,
        "slow_consumer_closes": {
            "total": now.slow_consumer_closes_total,
            "per_s": rates["slow_consumer_closes_per_s"],
        },
        "errors": {"total": now.errors_total, "per_s": rates["errors_per_s"], "by_code": dict(errors_by_code)},
        "samples": {"interval_s": SAMPLE_INTERVAL, "window_s": SAMPLE_INTERVAL * samples.size, **columns},
    }
    return orjson.dumps(body)


@attrs.frozen(slots=True)
class Page:
    """The status page as served: its bytes, an ETag of them, and the headers every answer carries."""

    body: bytes
    etag: str
    headers: tuple[tuple[str, str], ...]


_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


def content_security_policy(html: bytes) -> str:
    """A policy allowing nothing but the page's inline `<script>` and `<style>` elements (by their SHA-256) and
    requests to its own origin; `ValueError` if the page has other than one of each (a hash would then miss one)."""
    found: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, content in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(content).digest()).decode("ascii")
        found[kind].append(f"'sha256-{digest}'")
    if len(found[b"script"]) != 1 or len(found[b"style"]) != 1:
        raise ValueError("the status page must hold exactly one <script> and one <style> element, without attributes")
    return (
        f"default-src 'none'; script-src {found[b'script'][0]}; style-src {found[b'style'][0]}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def page_for(html: bytes) -> Page:
    """`html` as the status page: the ETag is its SHA-256 (a new version of fluxrt changes it), the answers are
    revalidated on every load (no-cache) and carry the policy above."""
    etag = '"' + hashlib.sha256(html).hexdigest()[:32] + '"'
    headers = (
        ("content-security-policy", content_security_policy(html)),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("etag", etag),
    )
    return Page(html, etag, headers)


@functools.cache
def page() -> Page:
    """The package's status.html as the status page (read once)."""
    return page_for(importlib.resources.files("fluxrt_trio").joinpath("status.html").read_bytes())


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header names `etag` (or is `*`): answer 304 without the body."""
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
