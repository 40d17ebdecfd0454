"""Argument parsers for `ragtune data`, `ragtune train`, `ragtune merge` (imports stay light)."""

from __future__ import annotations

from typing import Any

from ragtune.cli import _add_stub


def register(sub: Any) -> None:
    _add_stub(sub, "data", "check, convert and split chat JSONL", "issue 3")
    _add_stub(sub, "train", "LoRA fine-tuning with TRL", "issue 3")
    _add_stub(sub, "merge", "merge an adapter into its base model", "issue 3")
