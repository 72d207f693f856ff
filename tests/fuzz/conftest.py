"""Hypothesis profiles for the property tests: `ci` (the default, a few hundred examples each, fast enough for
`make test`) and `long` (HYPOTHESIS_PROFILE=long, for a search of minutes). No example database: failures print
their example, and the shared working tree gets no .hypothesis folder."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
