"""Files -> documents: plain text split into blocks that carry heading path, page and offsets.

    docs = load_file(Path("manual.pdf"), source="manual.pdf")   # list[Document]; raises Skip

Supported: .txt, .md/.markdown, .html/.htm, .pdf (one page number per block), .docx, and .jsonl
(one document per line: "text" plus optional "title", "id" and any other keys as metadata).
A file that cannot be read (unsupported, empty, corrupt, scanned PDF without a text layer) raises
`Skip` whose message is the reason the ingest summary prints. A file whose bytes say it is another
format than its name (a PDF saved as .html, a web page saved as .txt) is read as what it is.
Every block's text goes through `cleaning.clean_chars`; PDF pages also lose their running headers,
footers and page numbers and their end-of-line hyphenation (retrieval/cleaning.py).

The parts: `ragtune.retrieval.documents` (Document, Block, Skip), `ragtune.retrieval.file_formats`
(supported suffixes, sniffing, decoding), the readers `ragtune.retrieval.text_readers` (text,
Markdown, JSONL), `ragtune.retrieval.html_reader`, `ragtune.retrieval.pdf_reader` and
`ragtune.retrieval.docx_reader`. This module picks the reader for a file and keeps the readers'
versions; every name above can be imported from it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from ragtune.retrieval.documents import Block, Document, Skip
from ragtune.retrieval.docx_reader import load_docx
from ragtune.retrieval.file_formats import (
    _KIND_NAMES,
    HTML_SUFFIXES,
    MARKDOWN_SUFFIXES,
    SECTION_SUFFIXES,
    SNIFF_BYTES,
    SUPPORTED,
    TEXT_SUFFIXES,
    decode_html,
    decode_text,
    file_type,
    gunzip,
    inner_name,
    is_supported,
    readable,
    sniff,
)
from ragtune.retrieval.html_reader import load_html
from ragtune.retrieval.pdf_reader import load_pdf, pdf_pages
from ragtune.retrieval.text_readers import iter_jsonl, load_markdown, load_sections, load_text

__all__ = [
    "HTML_SUFFIXES", "MARKDOWN_SUFFIXES", "READER_NAMES", "READER_VERSIONS", "SUPPORTED", "TEXT_SUFFIXES", "Block",
    "Document", "Skip", "decode_html", "decode_text", "is_supported", "iter_jsonl", "load_docx", "load_file",
    "load_html", "load_markdown", "load_pdf", "load_text", "pdf_pages", "reader_format", "sniff",
]

log = logging.getLogger(__name__)

# The version of each format's reading, stored with every chunk: raise one when a change gives a
# document of that format other text, and `index sync`/`add` re-read the documents an older reader
# read (retrieval/ingest_plan.py); only chunks whose text changed are embedded again (ingest_write).
# pdf/html 2: PDFium and the clean-up; docx 2: tables in place; text/markdown/jsonl 2: clean_chars
# (ligatures, invisible characters); html 3: the text after a heading that is never closed; html 4: GNU
# Texinfo's navigation line dropped, a heading's link to itself ("#") left out of its name.
READER_VERSIONS = {"text": 2, "markdown": 2, "html": 4, "pdf": 2, "docx": 2, "jsonl": 2, "rst": 1, "asciidoc": 1}
READER_NAMES = {"text": "plain text", "markdown": "Markdown", "html": "HTML", "pdf": "PDF", "docx": "DOCX",
                "jsonl": "JSONL", "rst": "reStructuredText", "asciidoc": "AsciiDoc"}


def load_file(path: Path, source: str, data: bytes | None = None, as_text: bool = False) -> list[Document]:
    """Read one file into documents (JSONL: one per line). Raises Skip with the reason. `as_text`: a suffix
    ragtune has no reader for is read as plain text (index.text_suffixes: .py, .log)."""
    if as_text and path.suffix and path.suffix.lower() not in SUPPORTED | {".gz"}:
        path = path.with_suffix(".txt")
    inner = inner_name(path)
    if inner is not None:  # README.md.gz: read as README.md once decompressed
        if data is None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise Skip(f"cannot read: {exc.strerror or exc}") from None
        return load_file(inner, source, gunzip(data))
    suffix = path.suffix.lower()
    if suffix and suffix not in SUPPORTED:
        raise Skip(f"unsupported file type '{file_type(path)}' (supported: {readable()})")
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Skip(f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise Skip("empty file")
    kind = sniff(data, suffix)
    if kind != suffix:
        if suffix:  # a name without a suffix claims no format: read as what its bytes are, unremarked
            log.warning("%s: its content is %s, not %s; read as %s", source, _KIND_NAMES[kind],
                        _KIND_NAMES.get(suffix, suffix), _KIND_NAMES[kind])
        suffix = kind
    if suffix in TEXT_SUFFIXES or not suffix:  # a name without a suffix: plain text, or refused as binary
        docs = [load_text(decode_text(data), source, path.stem)]
    elif suffix in MARKDOWN_SUFFIXES:
        docs = [load_markdown(decode_text(data), source, path.stem)]
    elif suffix in SECTION_SUFFIXES:
        docs = [load_sections(decode_text(data), source, path.stem, SECTION_SUFFIXES[suffix])]
    elif suffix in HTML_SUFFIXES:
        docs = [load_html(decode_html(data), source, path.stem)]
    elif suffix == ".pdf":
        docs = [load_pdf(data, source, path.stem)]
    elif suffix == ".docx":
        docs = [load_docx(data, source, path.stem)]
    else:
        good, problems = iter_jsonl(data, source)
        if not good and problems:
            raise Skip("; ".join(problems))
        docs = [doc for _, doc in good]
    docs = [d for d in docs if d.blocks]
    if not docs:
        raise Skip("no text found")
    return docs


def reader_format(path: Path, data: bytes, text_suffixes: Iterable[str] = ()) -> str:
    """The READER_VERSIONS key of the reader `load_file` gives these bytes (what `sniff` says they are)."""
    if path.suffix.lower() in {x.lower() for x in text_suffixes}:
        path = path.with_suffix(".txt")
    inner = inner_name(path)
    if inner is not None:
        try:  # the head tells the format: the whole file is decompressed once, when it is read
            return reader_format(inner, gunzip(data, head=SNIFF_BYTES))
        except Skip:
            return reader_format(inner, b"")
    try:
        suffix = sniff(data, path.suffix.lower())
    except Skip:
        suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES or not suffix:
        return "text"
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    if suffix in SECTION_SUFFIXES:
        return {".rst": "rst", ".adoc": "asciidoc"}[SECTION_SUFFIXES[suffix]]
    if suffix in HTML_SUFFIXES:
        return "html"
    return suffix.lstrip(".")
