"""`--filter key=value` for search, parsed before any index opens (stdlib only, so `search --server`
stays light).

    parse_filters(["source=a.md", "source=b.md", "page=3"])   # {"source": ["a.md", "b.md"], "page": 3}
"""

from __future__ import annotations

from typing import Any

from ragtune.errors import UsageError

FILTER_KEYS = ("source", "file", "root", "title", "doc_id", "page")


def parse_filters(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> filter dict; repeated keys become "any of"."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--filter '{item}': expected key=value, e.g. --filter source=handbook.md")
        check_filter_key(key)
        val: Any = int(value) if key == "page" and value.strip().isdigit() else value
        if key in out:
            prev = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = prev + [val]
        else:
            out[key] = val
    return out


def check_filter_key(key: str) -> None:
    if key not in FILTER_KEYS and not (key.startswith("meta.") and len(key) > 5):
        raise UsageError(f"cannot filter on '{key}'; use one of {', '.join(FILTER_KEYS)}, or meta.KEY for JSONL metadata")
