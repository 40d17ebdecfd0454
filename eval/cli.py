"""Argument parser for `ragtune eval` (imports stay light)."""

from __future__ import annotations

from typing import Any

from ragtune.cli import _add_stub


def register(sub: Any) -> None:
    _add_stub(sub, "eval", "base vs fine-tuned vs RAG vs fine-tuned+RAG, side by side", "issue 6")
