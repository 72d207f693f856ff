"""Configuration values (durations, sizes, rates, counts, fractions) from the file or the environment, whatever
their text: a Config holding a usable value, or a ConfigError each of whose lines names where and which key."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fluxrt_trio.config import Config, ConfigError, load_config

KEYS = {
    "server.handshake_timeout": "duration",
    "realtime.heartbeat_interval": "duration",
    "database.poll_interval": "duration",
    "realtime.max_message_size": "size",
    "realtime.max_presence_state_size": "size",
    "realtime.message_rate_limit": "rate",
    "realtime.max_subscriptions_per_connection": "count",
    "realtime.anonymous_share": "fraction",
    "realtime.history_size": "count or zero",
    "realtime.history_ttl": "duration",
    "cluster.node_timeout": "duration",
    "cluster.max_backlog": "size",
    "api.rate_limit": "rate",
    "api.rate_burst": "count",
    "api.publish_timeout": "duration",
}
TRICKY = [".nan", ".inf", "-.inf", "1e400", "0x1F", "0o17", "1_000", "2024-13-01", "9" * 5000, "~", "0", "-1", "1ms"]
# Scalars as an operator would type them, unquoted in YAML (where YAML may read them as numbers, dates or nulls).
plain = st.sampled_from(TRICKY) | st.from_regex(r"[0-9a-zA-Z.+\-_ /]{0,24}", fullmatch=True).filter(
    lambda s: s.strip() == s and not s.startswith(("-", "?"))
)
data = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.lists(st.integers(), max_size=2)
)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def check(result: Config | ConfigError, key: str, *names: str) -> None:
    """A usable value, or problems that each name the key (or where it came from)."""
    if isinstance(result, ConfigError):
        assert result.problems
        for problem in result.problems:
            assert any(name in problem for name in (key, *names)), problem
        return
    section, field = key.split(".")
    value = getattr(getattr(result, section), field)
    kind = KEYS[key]
    if kind == "duration":
        assert isinstance(value, float) and math.isfinite(value) and value > 0, value
    elif kind == "fraction":
        assert isinstance(value, float) and 0 < value <= 1, value
    elif kind == "count or zero":
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, value
    else:
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, value


def loaded(path: Path | None, environ: dict[str, str]) -> Config | ConfigError:
    try:
        return load_config(path, environ=environ)
    except ConfigError as exc:
        return exc


@given(st.sampled_from(sorted(KEYS)), plain)
def test_a_plain_value_in_the_file(folder: Path, key: str, text: str) -> None:
    section, field = key.split(".")
    path = folder / "fluxrt.yaml"
    path.write_text(f"{section}:\n  {field}: {text}\n", encoding="utf-8")
    check(loaded(path, {}), key, str(path))


@given(st.sampled_from(sorted(KEYS)), data)
def test_any_yaml_value_in_the_file(folder: Path, key: str, value: Any) -> None:
    section, field = key.split(".")
    path = folder / "fluxrt.yaml"
    path.write_text(yaml.safe_dump({section: {field: value}}), encoding="utf-8")
    check(loaded(path, {}), key)


@given(st.sampled_from(sorted(KEYS)), plain | st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40))
def test_any_value_in_the_environment(key: str, text: str) -> None:
    variable = "FLUXRT_" + key.replace(".", "_").upper()
    check(loaded(None, {variable: text}), key, variable)
