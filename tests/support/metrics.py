"""Reading `/metrics` the way Prometheus does, for tests that compare what fluxrt shows elsewhere with it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(body: bytes) -> dict[str, float]:
    """Every sample of an exposition, keyed `name{label="value",...}` (labels sorted) or `name` without labels."""
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def series_names(body: bytes) -> set[str]:
    """The names a PromQL query may use: every sample's name, and for families without samples (a labelled counter
    nothing has counted yet) the names their type gives them (counter `_total`, summary `_sum`/`_count`,
    histogram `_bucket`/`_sum`/`_count`, gauge its own)."""
    suffixes = {"counter": ("_total",), "summary": ("_sum", "_count"), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names
