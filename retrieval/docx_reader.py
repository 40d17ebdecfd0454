"""The DOCX reader: paragraphs and tables in document order under the heading path of their
`Heading N` styles (python-docx).

    from ragtune.retrieval.docx_reader import load_docx

    doc = load_docx(data, "policy.docx", "policy")   # title: the Title style, else core properties, else "policy"
"""

from __future__ import annotations

import re

from ragtune.retrieval.cleaning import clean_chars
from ragtune.retrieval.documents import Document, Skip, _Builder


def load_docx(data: bytes, source: str, title: str) -> Document:
    """Paragraphs and tables in document order: `Heading N` styles make the heading path, a table is
    one block per row under the heading above it (a merged cell counted once)."""
    import io

    import docx
    from docx.table import Table

    try:
        d = docx.Document(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - python-docx and zipfile raise many types on damaged files
        raise Skip(f"corrupt or unreadable DOCX ({type(exc).__name__}: {exc})") from None
    b = _Builder()
    path: list[tuple[int, str]] = []
    doc_title = ""
    for item in d.iter_inner_content():
        heading = tuple(h for _, h in path)
        if isinstance(item, Table):
            for row in item.rows:
                cells = list({id(c._tc): c for c in row.cells}.values())  # a merged cell repeats per column
                b.add(" | ".join(" ".join(c.text.split()) for c in cells), heading)
            continue
        style = (item.style.name if item.style is not None else "") or ""
        text = item.text.strip()
        if not text:
            continue
        if style == "Title":
            doc_title = doc_title or clean_chars(text)
            continue
        m = re.match(r"Heading (\d)", style)
        if m:
            level = int(m.group(1))
            path = [(lv, h) for lv, h in path if lv < level] + [(level, clean_chars(text))]
            continue
        b.add(text, heading)
    return b.document(source, doc_title or (d.core_properties.title or "").strip() or title)


