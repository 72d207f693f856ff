"""Presence state of one room: who is here, as keys with one meta per tracking connection."""

from __future__ import annotations

from typing import Any

import attrs

Meta = dict[str, Any]


@attrs.frozen(slots=True)
class Diff:
    joins: dict[str, list[Meta]]
    leaves: dict[str, list[Meta]]

    def payload(self) -> dict[str, Any]:
        return {"joins": self.joins, "leaves": self.leaves}


class PresenceRoom:
    """Keys (a user's `sub`) each hold one meta `{"ref": R, "state": {...}}` per tracking connection."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[str, dict[str, Meta]] = {}

    def track(self, key: str, ref: str, state: dict[str, Any]) -> Diff:
        """Track or re-track `ref` under `key`. A re-track leaves the old meta and joins the new one."""
        metas = self._keys.setdefault(key, {})
        old = metas.get(ref)
        meta = {"ref": ref, "state": state}
        metas[ref] = meta
        return Diff({key: [meta]}, {key: [old]} if old is not None else {})

    def untrack(self, key: str, ref: str) -> Diff | None:
        """Remove `ref` from `key`; None when it was not tracked."""
        metas = self._keys.get(key)
        if metas is None or ref not in metas:
            return None
        old = metas.pop(ref)
        if not metas:
            del self._keys[key]
        return Diff({}, {key: [old]})

    def is_tracked(self, key: str, ref: str) -> bool:
        return ref in self._keys.get(key, ())

    def state(self) -> dict[str, list[Meta]]:
        """The whole room, as sent in a `sync`."""
        return {key: list(metas.values()) for key, metas in self._keys.items()}

    def __len__(self) -> int:
        return len(self._keys)
