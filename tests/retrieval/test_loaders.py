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


# --- what real documents carry (audit on Debian's manuals: r-doc-pdf, bash-doc, debian-reference,
# --- aptitude-doc-en, freedombox-doc-en, libxslt1-dev, python3.11-doc)


def test_pdf_running_headers_page_numbers_and_hyphenation_removed(tmp_path: Path) -> None:
    bodies = ["The impeller must be in-\nspected every month.", "Check the seals for wear and tear.",
              "Replace the bearings after two thousand hours.", "Log every service in the ledger."]
    p = make_pdf(tmp_path / "pump.pdf", [f"Chapter 2: Maintenance {n + 11}\n{b}\n{n + 11}" for n, b in enumerate(bodies)])
    doc = _one(p)
    assert "Maintenance" not in doc.text and "\n11" not in doc.text
    assert "inspected every month" in doc.text
    assert [b.page for b in doc.blocks] == [1, 2, 3, 4]


def test_ligatures_and_invisible_characters_normalised(tmp_path: Path) -> None:
    p = tmp_path / "groff.txt"
    p.write_text("The \ufb01le system \ufb02ag is docu\u00admented with zero\u200bwidth care.", encoding="utf-8")
    assert _one(p).text == "The file system flag is documented with zerowidth care."


def _encrypted(src: Path, out: Path, user_password: str, algorithm: str = "RC4-128") -> Path:
    from pypdf import PdfWriter

    w = PdfWriter(clone_from=str(src))
    w.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    w.write(str(out))
    return out


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_pdf_with_password_is_skipped_saying_so(tmp_path: Path, algorithm: str) -> None:
    p = _encrypted(make_pdf(tmp_path / "a.pdf", ["Secret text."]), tmp_path / "locked.pdf", "pw", algorithm)
    with pytest.raises(Skip, match="needs a password"):
        load_file(p, "locked.pdf")


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_encrypted_pdf_without_a_password_is_read(tmp_path: Path, algorithm: str) -> None:
    """A "restricted" PDF (empty user password: opens without asking, printing or copying limited),
    common for company documents; PDFium tries the empty password itself."""
    src = make_pdf(tmp_path / "a.pdf", ["Restricted text about remote work."])
    assert "Restricted text about remote work." in _one(_encrypted(src, tmp_path / "r.pdf", "", algorithm)).text


def test_pdf_words_spaced_by_kerning_alone_are_not_run_together(tmp_path: Path) -> None:
    """debian-reference.en.pdf (xdvipdfmx) has no space characters: each word is a string of a TJ
    array and the gap between words a kerning of -249/1000 em. Its fonts' code 32 is a glyph 564
    units wide ('='), which pypdf took for the space and so read "Therearetwomethodsofassociatingafile";
    PDFium goes by where the glyphs are. The same PDF in small: Times-Roman whose code 32 is that wide."""
    from pypdf import PdfWriter
    from pypdf.generic import ArrayObject, NameObject, NumberObject
    from reportlab.pdfbase.pdfmetrics import getFont
    from reportlab.pdfgen import canvas

    words = ["There", "are", "two", "methods", "of", "associating", "a", "file"]
    c = canvas.Canvas(str(tmp_path / "k.pdf"))
    t = c.beginText(72, 720)
    t.setFont("Times-Roman", 10)
    t._code.append("[" + "-249".join(f"({w})" for w in words) + "] TJ")  # no space character at all
    c.drawText(t)
    c.showPage()
    c.save()
    w = PdfWriter(clone_from=str(tmp_path / "k.pdf"))
    font = w.pages[0]["/Resources"]["/Font"]
    for name in font:
        f = font[name].get_object()
        f[NameObject("/FirstChar")], f[NameObject("/LastChar")] = NumberObject(32), NumberObject(255)
        widths = [564] + [int(x) for x in getFont("Times-Roman").widths[33:256]]
        f[NameObject("/Widths")] = ArrayObject([NumberObject(x) for x in widths])
    w.write(str(tmp_path / "xdvipdfmx-like.pdf"))
    assert _one(tmp_path / "xdvipdfmx-like.pdf").text == "There are two methods of associating a file"


def test_pdf_page_that_cannot_be_read_costs_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import pypdfium2

    from ragtune.retrieval import pdf_reader

    p = make_pdf(tmp_path / "m.pdf", ["Pumps are checked monthly.", "A damaged page.", "Seals are replaced yearly."])
    real = pdf_reader._page_text

    def flaky(pdf: object, index: int) -> str:
        if index == 1:
            raise pypdfium2.PdfiumError("Failed to load page.")
        return real(pdf, index)

    monkeypatch.setattr(pdf_reader, "_page_text", flaky)
    doc = _one(p)
    assert [b.page for b in doc.blocks] == [1, 3] and "damaged" not in doc.text
    assert "1 of 3 pages could not be read" in caplog.text
    monkeypatch.setattr(pdf_reader, "_page_text", lambda pdf, index: 1 / 0)
    with pytest.raises(Skip, match=r"corrupt or unreadable PDF \(none of its 3 pages could be read\)"):
        load_file(p, "m.pdf")


def test_truncated_pdf_is_skipped_as_corrupt(tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "m.pdf", ["Wear gloves at all times."] * 3).read_bytes()
    (tmp_path / "cut.pdf").write_bytes(data[: len(data) * 6 // 10])  # an interrupted download
    with pytest.raises(Skip, match=r"corrupt or unreadable PDF \(PDFium: Data format error\)"):
        load_file(tmp_path / "cut.pdf", "cut.pdf")


def test_file_read_as_what_its_bytes_are(tmp_path: Path) -> None:
    import docx

    pdf = make_pdf(tmp_path / "m.pdf", ["Wear gloves at all times."])
    (tmp_path / "manual.html").write_bytes(pdf.read_bytes())
    assert "gloves" in _one(tmp_path / "manual.html").text
    (tmp_path / "page.txt").write_text("<!DOCTYPE html>\n" + SECURITY_HTML, encoding="utf-8")
    page = _one(tmp_path / "page.txt")
    assert "<p>" not in page.text and "Navigation junk" not in page.text and page.title == "Security"
    d = docx.Document()
    d.add_paragraph("Book economy class.")
    d.save(str(tmp_path / "travel.pdf"))
    assert "economy" in _one(tmp_path / "travel.pdf").text
    (tmp_path / "report.pdf").write_text("<html><body><h1>404 Not Found</h1></body></html>", encoding="utf-8")
    with pytest.raises(Skip, match="not a PDF: an HTML page"):
        load_file(tmp_path / "report.pdf", "report.pdf")


DOCBOOK_HTML = """<html><head><meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1"></head><body>
<div class="navheader"><table><tr><td>Prev</td><td>Chapter 2. Reference guide</td><td>Next</td></tr></table></div>
<section class="article"><div class="titlepage"><h2 class="title">Calibre</h2></div>
<div class="toc"><p><b>Table of Contents</b></p><dl><dt>1.1. What is this FAQ?</dt></dl></div>
<p>Written by St\xe9phane, the library is shared with every user.</p></section>
<div class="footer">\xa9 Copyright 2001-2026. Created using Sphinx.</div>
<div class="navfooter">Up | Home | Chapter 3. Packages</div></body></html>"""


def test_html_docbook_navigation_toc_footer_skipped_declared_charset_and_heading_title(tmp_path: Path) -> None:
    p = tmp_path / "Calibre.part.html"
    p.write_bytes(DOCBOOK_HTML.encode("latin-1"))
    doc = _one(p)
    assert doc.text == "Written by St\u00e9phane, the library is shared with every user."
    assert doc.title == "Calibre"


# a page of a GNU manual (makeinfo 6.8, as libffi's in Debian's libffi8), and the same in makeinfo 7's markup
TEXINFO_HTML = """<html><head><title>Thread Safety (libffi)</title></head><body lang="en">
<div class="section" id="Thread-Safety">
<div class="header"><p>Previous: <a href="Closure-Example.html">Closure Example</a>, Up: <a href="Using-libffi.html">Using
libffi</a> &nbsp; [<a href="Index.html">Index</a>]</p></div><hr>
<h3 class="section">2.7 Thread Safety</h3>
<p><code>libffi</code> is not completely thread-safe.</p>
</div></body></html>"""


@pytest.mark.parametrize("nav", ["header", "nav-panel"])
def test_html_texinfo_navigation_line_skipped(tmp_path: Path, nav: str) -> None:
    """The "Previous: Closure Example, Up: Using libffi [Index]" line was indexed as a chunk of its own, and it
    ranked first for questions about closures on every page near the closure pages."""
    p = tmp_path / "Thread-Safety.html"
    p.write_text(TEXINFO_HTML.replace('class="header"', f'class="{nav}"'), encoding="utf-8")
    doc = _one(p)
    assert [(b.heading, b.text) for b in doc.blocks] == [(("2.7 Thread Safety",), "libffi is not completely thread-safe.")]


def test_html_heading_self_links_are_not_part_of_the_heading(tmp_path: Path) -> None:
    """Node.js's API pages end every heading with a "#" link to itself: the heading path read 'Readline# >
    Example: Read file stream line-by-Line#'. A heading that is a link, or names C#, keeps its text."""
    p = tmp_path / "readline.html"
    p.write_text('<h2>Readline<span><a class="mark" href="#readline" id="readline">#</a></span>'
                 '<a aria-hidden="true" class="legacy" id="readline_readline"></a></h2>'
                 '<h3>Using C# <a href="#c">from here</a><a class="anchor" href="#use">\u00a7</a></h3><p>Text.</p>',
                 encoding="utf-8")
    assert [b.heading for b in _one(p).blocks] == [("Readline", "Using C# from here")]


RST = """==========
User guide
==========

Intro paragraph.

Installing
----------

Run the installer.

.. code-block:: sh

   ./install.sh

Options
~~~~~~~

Pass --quiet.

----

Removing
--------

Delete the folder.
"""

ADOC = """= Parking Guide
:toc:

== Where to park

Use the north lot.

=== Permits

Ask reception.

----
a listing, not a title
----
"""


def test_rst_and_asciidoc_sections_give_the_heading_path(tmp_path: Path) -> None:
    """Sphinx sources (.rst) and AsciiDoc manuals were skipped as unsupported types; their section titles are now
    the heading path (RST levels in the order the adornment styles first appear, as docutils assigns them), a
    transition or an AsciiDoc block delimiter is not a title, and directives stay as text."""
    (tmp_path / "guide.rst").write_text(RST, encoding="utf-8")
    doc = _one(tmp_path / "guide.rst")
    assert doc.title == "User guide"
    assert [(b.heading, b.text) for b in doc.blocks] == [
        (("User guide",), "Intro paragraph."), (("User guide", "Installing"), "Run the installer."),
        (("User guide", "Installing"), ".. code-block:: sh"), (("User guide", "Installing"), "./install.sh"),
        (("User guide", "Installing", "Options"), "Pass --quiet."), (("User guide", "Removing"), "Delete the folder.")]
    (tmp_path / "parking.asciidoc").write_text(ADOC, encoding="utf-8")
    doc = _one(tmp_path / "parking.asciidoc")
    assert doc.title == "Parking Guide"
    assert [(b.heading, b.text) for b in doc.blocks] == [
        (("Parking Guide",), ":toc:"), (("Parking Guide", "Where to park"), "Use the north lot."),
        (("Parking Guide", "Where to park", "Permits"), "Ask reception."),
        (("Parking Guide", "Where to park", "Permits"), "----\na listing, not a title\n----")]


def test_docx_tables_in_document_order_under_their_heading(tmp_path: Path) -> None:
    import docx

    d = docx.Document()
    d.add_heading("Dosage", level=1)
    t = d.add_table(rows=2, cols=3)
    t.cell(0, 0).merge(t.cell(0, 2)).text = "Adult dose"
    for i, v in enumerate(["Paracetamol", "500 mg", "every 6 h"]):
        t.cell(1, i).text = v
    d.add_heading("Storage", level=1)
    d.add_paragraph("Keep below 25 degrees.")
    p = tmp_path / "drug.docx"
    d.save(str(p))
    doc = _one(p)
    assert [(b.heading, b.text) for b in doc.blocks] == [
        (("Dosage",), "Adult dose"), (("Dosage",), "Paracetamol | 500 mg | every 6 h"),
        (("Storage",), "Keep below 25 degrees.")]
