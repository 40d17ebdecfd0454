"""What every reader returns: a Document of Blocks (heading path, page, offset), built by _Builder;
and Skip, the reason a file is not indexed.

    from ragtune.retrieval.documents import Block, Document, Skip, _Builder

    b = _Builder()
    b.add("Expenses are paid monthly.", heading=("Finance",), page=3)   # cleaned; empty text is dropped
    doc: Document = b.document("manual.pdf", "Manual")     # doc.text joins the blocks; each keeps its start offset
    raise Skip("empty file")                               # str(exc): the reason the ingest summary prints
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ragtune.retrieval.cleaning import clean_chars

_PARA_SPLIT = re.compile(r"\n[ \t]*\n+")


class Skip(Exception):
    """A file that is not indexed; str(exc) is the reason."""


@dataclass
class Block:
    """A paragraph-level unit: chunks never cross a change of heading or page."""

    text: str
    heading: tuple[str, ...] = ()
    page: int | None = None
    start: int = 0  # char offset in Document.text


@dataclass
class Document:
    source: str  # relative to the ingest root ("a/b.md", or "data.jsonl#id" for JSONL lines)
    title: str
    text: str = ""
    blocks: list[Block] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class _Builder:
    """Accumulates blocks and the document text so that text[start:start+len] == block.text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.blocks: list[Block] = []

    def add(self, text: str, heading: tuple[str, ...] = (), page: int | None = None) -> None:
        text = clean_chars(text).strip()
        if not text:
            return
        if self.parts:
            self.parts.append("\n\n")
            self.length += 2
        self.blocks.append(Block(text, heading, page, self.length))
        self.parts.append(text)
        self.length += len(text)

    def document(self, source: str, title: str, meta: dict[str, Any] | None = None) -> Document:
        return Document(source, title, "".join(self.parts), self.blocks, meta or {})
