"""The PDF reader: the text layer page by page through PDFium (pypdfium2), without running headers,
footers, page numbers and end-of-line hyphenation; one page number per block.

    from ragtune.retrieval.pdf_reader import load_pdf, pdf_pages

    doc = load_pdf(data, "manual.pdf", "manual")     # Skip: encrypted with a password, corrupt, no text layer
    texts, bad, title = pdf_pages(data)              # raw page texts, pages that failed, the /Title
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from ragtune.retrieval.cleaning import clean_chars, hyphenated_words, join_hyphenated, strip_running_lines
from ragtune.retrieval.documents import _PARA_SPLIT, Document, Skip, _Builder

log = logging.getLogger(__name__)


def load_pdf(data: bytes, source: str, title: str) -> Document:
    """The text layer page by page, without running headers, footers, page numbers and end-of-line
    hyphenation. A page PDFium cannot load costs only itself (and a warning)."""
    texts, bad, meta_title = pdf_pages(data)
    if texts and bad == len(texts):
        raise Skip(f"corrupt or unreadable PDF (none of its {bad} pages could be read)")
    if bad:
        log.warning("%s: %d of %d pages could not be read and are left out", source, bad, len(texts))
    b = _Builder()
    compounds = hyphenated_words(texts)
    for number, text in enumerate(strip_running_lines(texts), 1):
        for para in _PARA_SPLIT.split(join_hyphenated(text, compounds)):
            b.add(para, (), number)
    if not b.blocks:
        raise Skip(f"PDF has no text layer ({len(texts)} pages, scanned?); run OCR on it first")
    return b.document(source, meta_title or title)


# PDFium is not thread-safe, not even across documents: one extraction at a time in this process
_PDFIUM_LOCK = threading.Lock()
# PDFium's text: CRLF line ends, and U+0002 where it joined a word hyphenated at a line end
# ("ex\x02pressions"); put the hyphen and line end back so that cleaning.join_hyphenated decides
_PDFIUM_TEXT = re.compile(r"\x02\r?\n?|\r\n?")


def pdf_pages(data: bytes) -> tuple[list[str], int, str]:
    """(text of each page, how many pages could not be loaded, the /Title) through PDFium (pypdfium2).

    PDFium places word spaces by glyph positions where pypdf glued words together on some fonts
    (xdvipdfmx, groff): docs/benchmarks.md, "PDF text extraction". Opening tries the empty user
    password, so "restricted" PDFs (RC4 or AES) are read; one that needs a password, or a file PDFium
    cannot parse at all, raises Skip."""
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if getattr(exc, "err_code", None) == pdfium.raw.FPDF_ERR_PASSWORD:
                raise Skip("encrypted PDF that needs a password; save a copy without one") from None
            reason = re.search(r"PDFium: [^)]*", str(exc))  # "Failed to load document (PDFium: Data format error)."
            raise Skip(f"corrupt or unreadable PDF ({reason.group() if reason else exc})") from None
        try:
            texts: list[str] = []
            bad = 0
            for i in range(len(pdf)):
                try:
                    texts.append(_PDFIUM_TEXT.sub(_pdfium_break, _page_text(pdf, i)))
                except Exception:  # noqa: BLE001 - a damaged page (PdfiumError, a bad text object) costs only itself
                    bad += 1
                    texts.append("")
            try:
                meta_title = clean_chars(" ".join(pdf.get_metadata_value("Title").split()))
            except pdfium.PdfiumError:
                meta_title = ""
        finally:
            pdf.close()
    return texts, bad, meta_title


# the whole text layer: by default PDFium keeps to the page's box, and a table of contents whose lines
# run off the page (docbook-xsl's reference.pdf) would lose 40-65% of its words
_FAR = 1e9


def _page_text(pdf: Any, index: int) -> str:
    page = pdf[index]
    try:
        textpage = page.get_textpage()
        try:
            return str(textpage.get_text_bounded(-_FAR, -_FAR, _FAR, _FAR))
        finally:
            textpage.close()
    finally:
        page.close()


def _pdfium_break(m: re.Match[str]) -> str:
    return "-\n" if m.group().startswith("\x02") else "\n"

