"""Short text forms of server messages, for assertions that compare what clients received."""

from __future__ import annotations

from typing import Any


def summary(message: dict[str, Any]) -> str:
    """`"<op> <id>"` for a broadcast, plus `" old"` when it carries old_record and `" -secret"` without the secret
    column; `"error <code>"` for an error; the type for anything else."""
    if message["type"] == "broadcast":
        payload = message["payload"]
        image = payload.get("record") or payload["old_record"]
        text = f"{payload['type']} {image['id']}"
        if "old_record" in payload:
            text += " old"
        if "secret" not in image:
            text += " -secret"
        return text
    if message["type"] == "error":
        return f"error {message['code']}"
    return message["type"]
