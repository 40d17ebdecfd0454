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
        if not value.strip() and not key.startswith("meta."):  # no document has an empty source, title...
            raise UsageError(f"--filter '{item}': the value is empty (an unset shell variable?), so nothing would "
                             f"match; give the {key} to match, e.g. --filter source=handbook.md")
        val: Any = int(value) if key == "page" and value.strip().isdigit() else value
        if key in out:
            prev = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = prev + [val]
        else:
            out[key] = val
    return out


class FilterError(UsageError):
    """A filter that cannot be applied; `param` names it as the API does (`filters.KEY`)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.param = f"filters.{key}"


def check_filter_key(key: str) -> None:
    if key not in FILTER_KEYS and not (key.startswith("meta.") and len(key) > 5):
        raise FilterError(f"cannot filter on '{key}'; use one of {', '.join(FILTER_KEYS)}, or meta.KEY for JSONL "
                          "metadata", key)


def check_filters(filters: dict[str, Any] | None) -> dict[str, Any]:
    """Filters as a search takes them: known keys, each a string or an integer or a non-empty list of one
    kind (the store matches a list of strings or of integers, not a mix), and `page` in integers."""
    for key, value in (filters or {}).items():
        check_filter_key(key)
        values = value if isinstance(value, list) else [value]
        kinds = {type(v) for v in values}
        if not values or not kinds <= {str, int} or bool in kinds or len(kinds) > 1:
            raise FilterError(f"filter '{key}' must be a string, an integer, or a non-empty list of strings or of "
                              f"integers (not a mix), got {value!r}"[:300], key)
        if key == "page" and kinds != {int}:
            raise FilterError(f"filter 'page' takes page numbers (integers), got {value!r}"[:200], key)
    return filters or {}
