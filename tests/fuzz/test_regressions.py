"""Crashes and holes the fuzzers found, kept as plain examples (bench/RESULTS.md, Fuzzing, tells the story)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxrt_trio.config import ConfigError, load_config


@pytest.mark.parametrize("value", [".nan", ".inf", "'" + "9" * 400 + "s'"])
def test_a_duration_that_is_not_finite_is_refused(tmp_path: Path, value: str) -> None:
    """NaN passed `<= 0`, and an endless interval was taken as given."""
    path = tmp_path / "fluxrt.yaml"
    path.write_text(f"realtime:\n  heartbeat_interval: {value}\n")
    with pytest.raises(ConfigError, match=r"realtime\.heartbeat_interval: expected a finite duration"):
        load_config(path, environ={})


@pytest.mark.parametrize("value", ["2024-13-01", "9" * 5000])
def test_a_plain_value_yaml_cannot_build_is_a_config_error(tmp_path: Path, value: str) -> None:
    """YAML reads these as a date or an integer, and raised ValueError (not YAMLError) out of load_config."""
    path = tmp_path / "fluxrt.yaml"
    path.write_text(f"auth:\n  audience: {value}\n")
    with pytest.raises(ConfigError, match=r"a value cannot be read .*; quote it to keep it as text"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FLUXRT_REALTIME_MAX_MESSAGE_SIZE", "9" * 5000, "expected a size"),
        ("FLUXRT_REALTIME_HEARTBEAT_INTERVAL", "2024-13-01", "expected a duration"),
    ],
)
def test_such_a_value_in_the_environment_is_taken_as_text(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"environment {variable}: .*: {expected}"):
        load_config(None, environ={variable: value})


def test_a_rate_too_large_for_a_float(tmp_path: Path) -> None:
    """`float(10**400)` raised OverflowError, reported as `int too large to convert to float`: a whole number is
    kept whole, and a rate's count has at most 30 digits."""
    path = tmp_path / "fluxrt.yaml"
    path.write_text(f"realtime:\n  message_rate_limit: {'9' * 400}\n")
    assert load_config(path, environ={}).realtime.message_rate_limit == 10**400 - 1
    path.write_text(f"realtime:\n  message_rate_limit: '{'9' * 400}/h'\n")
    with pytest.raises(ConfigError, match=r"realtime\.message_rate_limit: expected messages per minute"):
        load_config(path, environ={})
