"""Loaders: structure, page numbers and offsets from real files; bad files skipped with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.retrieval.loaders import Skip, load_file
from tests.retrieval.conftest import FAQ_JSONL, HR_MD, SECURITY_HTML, make_pdf


def _one(path: Path) -> object:
    (doc,) = load_file(path, path.name)
    for b in doc.blocks:  # offsets are exact
        assert doc.text[b.start : b.start + len(b.text)] == b.text
    return doc


def test_markdown_headings_and_title(tmp_path: Path) -> None:
    p = tmp_path / "hr.md"
    p.write_text(HR_MD + "\n```\n# not a heading\n```\n", encoding="utf-8")
    doc = _one(p)
    assert doc.title == "HR Handbook"
    heads = [b.heading for b in doc.blocks]
    assert ("HR Handbook", "Remote work") in heads and ("HR Handbook", "Leave") in heads
    assert doc.blocks[-1].text.startswith("```") and doc.blocks[-1].heading == ("HR Handbook", "Leave")


def test_html_skips_navigation_and_tracks_headings(tmp_path: Path) -> None:
    p = tmp_path / "s.html"
    p.write_text(SECURITY_HTML, encoding="utf-8")
    doc = _one(p)
    assert doc.title == "Security"
    assert "Navigation junk" not in doc.text
    by_text = {b.text: b.heading for b in doc.blocks}
    assert by_text["Passwords must be at least fourteen characters long and rotated yearly."] == ("Security", "Passwords")


def test_pdf_page_numbers(tmp_path: Path) -> None:
    p = make_pdf(tmp_path / "m.pdf", ["Introduction to the manual.", "Safety: wear gloves at all times.", "Index page."])
    doc = _one(p)
    pages = {b.page for b in doc.blocks if "gloves" in b.text}
    assert pages == {2}
    assert [b.page for b in doc.blocks] == sorted(b.page for b in doc.blocks)


def test_docx_headings(tmp_path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Travel policy", level=1)
    d.add_paragraph("Book economy class for flights under six hours.")
    p = tmp_path / "t.docx"
    d.save(str(p))
    doc = _one(p)
    assert doc.blocks[0].heading == ("Travel policy",) and "economy" in doc.blocks[0].text


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    p = tmp_path / "faq.jsonl"
    p.write_text(FAQ_JSONL, encoding="utf-8")
    docs = load_file(p, "faq.jsonl")
    assert [d.source for d in docs] == ["faq.jsonl#expenses", "faq.jsonl#L2"]
    assert docs[0].meta == {"dept": "finance"} and docs[1].title == "Opening hours"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.txt", b"  \n", "empty file"),
        ("bin.txt", b"abc\x00\x01\x02def", "binary content"),
        ("bad.pdf", b"%PDF-1.4 this is not really a pdf", "PDF"),
        ("bad.docx", b"PK not a zip", "DOCX"),
        ("bad.jsonl", b'{oops\n', "line 1"),
        ("nofield.jsonl", b'{"body": "x"}\n', "\"text\""),
        ("pic.png", b"\x89PNG", "unsupported file type"),
    ],
)
def test_bad_files_raise_skip_with_reason(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(Skip, match=reason):
        load_file(p, name)


def test_pdf_without_text_layer_is_skipped(tmp_path: Path) -> None:
    from reportlab.pdfgen import canvas

    p = tmp_path / "scan.pdf"
    c = canvas.Canvas(str(p))
    c.rect(100, 100, 200, 200, fill=1)  # a drawing, no text
    c.showPage()
    c.save()
    with pytest.raises(Skip, match="no text layer"):
        load_file(p, "scan.pdf")


def test_cp949_korean_text(tmp_path: Path) -> None:
    p = tmp_path / "legacy.txt"
    p.write_bytes("서울은 한국의 수도입니다.".encode("cp949"))
    assert "서울" in _one(p).text
