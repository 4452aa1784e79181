"""One-line explanations of Hydra's composition errors (unknown keys, wrong types, missing options)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from codex_ml.conf.store import SCHEMAS


def _fields_at(schema: type[Any], dotted: str) -> list[str] | None:
    """The keys allowed under ``dotted`` (a path of nested dataclasses), or None if not a section."""
    node = schema
    for part in [p for p in dotted.split(".") if p]:
        f = {f.name: f for f in dataclasses.fields(node)}.get(part)
        if f is None or not callable(f.default_factory) or not dataclasses.is_dataclass(f.default_factory()):
            return None
        node = type(f.default_factory())
    return [f.name for f in dataclasses.fields(node)]


def explain(exc: Exception, config_name: str) -> str:
    schema = SCHEMAS.get(f"{config_name}_schema")
    cause = exc.__cause__
    text = str(exc)
    full_key = getattr(cause, "full_key", None)
    msg = str(getattr(cause, "msg", "") or "")
    if type(cause).__name__ == "ConfigAttributeError" and full_key:
        parent, _, key = full_key.rpartition(".")
        allowed = _fields_at(schema, parent) if schema else None
        where = f" in {parent}" if parent else ""
        hint = f"; allowed keys{where}: {', '.join(allowed)}" if allowed else ""
        return f"{full_key}: unknown key{hint}"
    if type(cause).__name__ == "ValidationError" and full_key:
        m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
        if m:
            return f"{full_key}: {m.group(1)!r} is not a valid {m.group(3).lower()}"
        if "is not a ListConfig" in msg:
            return f"{full_key}: must be a list, e.g. {full_key}=[a,b]"
        return f"{full_key}: {msg.splitlines()[0]}"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        listed = f"; allowed: {', '.join(options)}" if options else ""
        return f"{group}={option}: no such option in config group '{group}'{listed}"
    first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
    return f"bad override: {first}"
