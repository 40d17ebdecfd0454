"""Chunking: token-aware (Korean never overflows), structure-following, exact offsets, overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.retrieval.chunking import Chunker
from ragtune.retrieval.loaders import load_markdown, load_text


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path):  # the real WordPiece tokenizer of the default embedder
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)


def _check(doc, chunks, tokenizer, size: int) -> None:
    for ch in chunks:
        assert ch.text == doc.text[ch.start : ch.end]
        assert len(tokenizer(ch.text, add_special_tokens=False)["input_ids"]) <= size


def test_korean_chunks_never_overflow(tokenizer) -> None:
    text = " ".join(["직원은 주 3일까지 재택근무를 할 수 있으며 관리자의 승인이 필요합니다."] * 60)  # one paragraph
    doc = load_text(text + "\n\n" + "서울은 한국의 수도입니다. " * 50, "ko.txt", "ko")
    ch = Chunker(tokenizer, size=64, overlap=8)
    chunks = ch.chunk(doc)
    assert len(chunks) > 5
    _check(doc, chunks, tokenizer, 64)
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch_ in enumerate(doc.text) if not ch_.isspace())  # nothing lost


def test_long_sentence_is_windowed_with_overlap(tokenizer) -> None:
    doc = load_text("word " * 500, "w.txt", "w")  # no sentence ends: token windows
    chunks = Chunker(tokenizer, size=50, overlap=10).chunk(doc)
    _check(doc, chunks, tokenizer, 50)
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))  # consecutive windows overlap


def test_chunks_follow_headings_and_pack_paragraphs(tokenizer) -> None:
    md = "# A\n\npara one.\n\npara two.\n\n## B\n\npara three.\n"
    doc = load_markdown(md, "x.md", "x")
    chunks = Chunker(tokenizer, size=100, overlap=0).chunk(doc)
    assert [(c.heading, c.text) for c in chunks] == [(("A",), "para one.\n\npara two."), (("A", "B"), "para three.")]


def test_sentence_overlap_between_chunks(tokenizer) -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    doc = load_text(text, "s.txt", "s")
    chunks = Chunker(tokenizer, size=40, overlap=12).chunk(doc)
    _check(doc, chunks, tokenizer, 40)
    assert len(chunks) > 3
    assert all(b.start < a.end for a, b in zip(chunks, chunks[1:]))


def test_long_blocks_chunk_without_the_too_long_sequence_warning(tokenizer) -> None:
    # counting a 750-token paragraph before splitting it is not an overflow: no warning for the user
    # (transformers records the warning in deprecation_warnings whether or not its logging shows it)
    fresh = type(tokenizer).from_pretrained(tokenizer.name_or_path, local_files_only=True)
    doc = load_text("alpha beta gamma delta. " * 150, "long.txt", "long")
    chunks = Chunker(fresh, size=64, overlap=8).chunk(doc)
    assert len(chunks) > 5
    assert "sequence-length-is-longer-than-the-specified-maximum" not in fresh.deprecation_warnings
