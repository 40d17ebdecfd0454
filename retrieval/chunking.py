"""Documents -> chunks, sized in the embedding model's own tokens.

    chunker = Chunker(tokenizer, size=254, overlap=32)
    chunks = chunker.chunk(doc)          # list[Chunk]; chunk.text == doc.text[chunk.start:chunk.end]
    chunker.signature()                  # 'v1-s254-o32', stored with every chunk; parse_signature reads it back

Structure first: a chunk never crosses a heading or a page; within a section whole paragraphs are
packed up to `size` tokens; a paragraph too long is split into sentences, a sentence too long into
token windows. Overlap repeats the trailing units (sentences or tokens) of the previous chunk up
to `overlap` tokens. Token counts come from the tokenizer the embedder uses, so Korean and other
CJK text, which costs several tokens per character, never overflows the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ragtune.retrieval.loaders import Document

CHUNKER_VERSION = 1  # bump when the splitting rules change: every document is re-chunked

_SIGNATURE = re.compile(r"v(\d+)-s(\d+)-o(\d+)")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"'”’)\]]*\s+|\n+")


@dataclass
class Chunk:
    text: str
    start: int
    end: int
    heading: tuple[str, ...]
    page: int | None
    tokens: int


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int


def chunker_signature(size: int, overlap: int) -> str:
    """Recorded on every chunk: a document chunked with other settings is re-chunked on sync."""
    return f"v{CHUNKER_VERSION}-s{size}-o{max(0, min(overlap, size // 2))}"


def parse_signature(sig: str | None) -> tuple[int, int, int] | None:
    """(version, size, overlap) of a chunker signature, None for one that is not; the size and overlap
    give back the same signature (at the current version): `chunker_signature(*parse_signature(s)[1:])`."""
    m = _SIGNATURE.fullmatch(sig or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


class Chunker:
    def __init__(self, tokenizer: Any, size: int, overlap: int) -> None:
        if size < 8:
            from ragtune.errors import UsageError

            raise UsageError(f"chunk.size {size} is too small; use at least 8 tokens")
        self.tok = tokenizer
        self.size = size
        self.overlap = max(0, min(overlap, size // 2))

    def signature(self) -> str:
        return chunker_signature(self.size, self.overlap)

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        # verbose=False: counting a long block before splitting it is not "running it through the model"
        enc = self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                       return_token_type_ids=False, verbose=False)["input_ids"]
        return [len(ids) for ids in enc]

    def chunk(self, doc: Document) -> list[Chunk]:
        sections: list[list[int]] = []
        for i, b in enumerate(doc.blocks):
            if sections and (doc.blocks[sections[-1][0]].heading, doc.blocks[sections[-1][0]].page) == (b.heading, b.page):
                sections[-1].append(i)
            else:
                sections.append([i])
        counts = self.count([b.text for b in doc.blocks])
        out: list[Chunk] = []
        for sec in sections:
            first = doc.blocks[sec[0]]
            units: list[_Unit] = []
            for i in sec:
                b = doc.blocks[i]
                u = _Unit(b.start, b.start + len(b.text), counts[i])
                units.extend(self._split(doc.text, u) if u.tokens > self.size else [u])
            for s, e, n in self._pack(units):
                out.append(Chunk(doc.text[s:e], s, e, first.heading, first.page, n))
        return out

    # --- splitting ----------------------------------------------------------------------------

    def _split(self, text: str, unit: _Unit) -> list[_Unit]:
        """A unit over `size`: sentences, and token windows for sentences still too long."""
        spans = []
        pos = unit.start
        for m in _SENTENCE_END.finditer(text, unit.start, unit.end):
            if m.start() > pos:
                spans.append((pos, m.start()))
            pos = m.end()
        if pos < unit.end:
            spans.append((pos, unit.end))
        counts = self.count([text[s:e] for s, e in spans])
        out: list[_Unit] = []
        for (s, e), n in zip(spans, counts):
            if n <= self.size:
                out.append(_Unit(s, e, n))
            else:
                out.extend(self._windows(text, s, e))
        return out

    def _windows(self, text: str, start: int, end: int) -> list[_Unit]:
        """Token windows of `size`, each starting `size - overlap` tokens after the previous."""
        enc = self.tok(text[start:end], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
        step = max(1, self.size - self.overlap)
        out = []
        i = 0
        while i < len(offsets):
            window = offsets[i : i + self.size]
            out.append(_Unit(start + window[0][0], start + window[-1][1], len(window)))
            if i + self.size >= len(offsets):
                break
            i += step
        return out

    # --- packing ------------------------------------------------------------------------------

    def _pack(self, units: list[_Unit]) -> list[tuple[int, int, int]]:
        """Greedy: fill up to `size`; the next chunk starts with the tail that fits in `overlap`."""
        chunks: list[tuple[int, int, int]] = []
        cur: list[_Unit] = []
        total = 0
        i = 0
        while i < len(units):
            u = units[i]
            if cur and total + u.tokens > self.size:
                chunks.append((cur[0].start, cur[-1].end, total))
                tail: list[_Unit] = []
                t = 0
                for prev in reversed(cur):
                    if t + prev.tokens > self.overlap or t + prev.tokens + u.tokens > self.size:
                        break
                    tail.insert(0, prev)
                    t += prev.tokens
                if len(tail) == len(cur):  # no progress otherwise
                    tail, t = [], 0
                cur, total = tail, t
                continue
            cur.append(u)
            total += u.tokens
            i += 1
        if cur:
            chunks.append((cur[0].start, cur[-1].end, total))
        return chunks
