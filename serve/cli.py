"""Argument parsers for `ragtune ask`, `ragtune chat`, `ragtune serve` (imports stay light)."""

from __future__ import annotations

from typing import Any

from ragtune.cli import _add_stub


def register(sub: Any) -> None:
    _add_stub(sub, "ask", "answer one question, with or without retrieval", "issue 5")
    _add_stub(sub, "chat", "interactive multi-turn chat", "issue 5")
    _add_stub(sub, "serve", "OpenAI-compatible HTTP server", "issue 5")
