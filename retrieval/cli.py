"""Argument parsers for `ragtune index` and `ragtune search` (imports stay light)."""

from __future__ import annotations

from typing import Any

from ragtune.cli import _add_stub


def register(sub: Any) -> None:
    _add_stub(sub, "index", "add, sync, remove, list documents in an index", "issue 4")
    _add_stub(sub, "search", "hybrid search over an index", "issue 4")
