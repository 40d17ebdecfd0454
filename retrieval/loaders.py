"""Files -> documents: plain text split into blocks that carry heading path, page and offsets.

    docs = load_file(Path("manual.pdf"), source="manual.pdf")   # list[Document]; raises Skip

Supported: .txt, .md/.markdown, .html/.htm, .pdf (one page number per block), .docx, and .jsonl
(one document per line: "text" plus optional "title", "id" and any other keys as metadata).
A file that cannot be read (unsupported, empty, corrupt, scanned PDF without a text layer) raises
`Skip` whose message is the reason the ingest summary prints. A file whose bytes say it is another
format than its name (a PDF saved as .html, a web page saved as .txt) is read as what it is.
Every block's text goes through `cleaning.clean_chars`; PDF pages also lose their running headers,
footers and page numbers and their end-of-line hyphenation (retrieval/cleaning.py).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ragtune.retrieval.cleaning import clean_chars, hyphenated_words, join_hyphenated, strip_running_lines

log = logging.getLogger(__name__)
TEXT_SUFFIXES = {".txt", ".text"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | {".pdf", ".docx", ".jsonl"}

_PARA_SPLIT = re.compile(r"\n[ \t]*\n+")

# The version of each format's reading, stored with every chunk: raise one when a change gives a
# document of that format other text, and `index sync`/`add` re-read (and re-embed) the documents
# an older reader read (retrieval/ingest_plan.py). Leave the others alone: a bump re-embeds every such file.
READER_VERSIONS = {"text": 1, "markdown": 1, "html": 2, "pdf": 2, "docx": 2, "jsonl": 1}  # docx 2: tables in place
READER_NAMES = {"text": "plain text", "markdown": "Markdown", "html": "HTML", "pdf": "PDF", "docx": "DOCX",
                "jsonl": "JSONL"}


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


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED


def decode_text(data: bytes, what: str = "file") -> str:
    """UTF-8/UTF-16, or the legacy code page `ragtune.text.detect_encoding` recognises; Skip otherwise."""
    from ragtune import text

    if text.is_binary(data):
        raise Skip(f"binary content in a {what} (NUL bytes); not a text file")
    decoded = text.decode(data)
    if decoded is None:
        raise Skip(f"the {what} is not UTF-8 and its encoding cannot be told (no code page reads as text); "
                   "save it as UTF-8")
    return decoded


def load_file(path: Path, source: str, data: bytes | None = None) -> list[Document]:
    """Read one file into documents (JSONL: one per line). Raises Skip with the reason."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise Skip(f"unsupported file type '{suffix or path.name}' (supported: {', '.join(sorted(SUPPORTED))})")
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Skip(f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise Skip("empty file")
    kind = sniff(data, suffix)
    if kind != suffix:
        log.warning("%s: its content is %s, not %s; read as %s", source, _KIND_NAMES[kind],
                    _KIND_NAMES.get(suffix, suffix), _KIND_NAMES[kind])
        suffix = kind
    if suffix in TEXT_SUFFIXES:
        docs = [load_text(decode_text(data), source, path.stem)]
    elif suffix in MARKDOWN_SUFFIXES:
        docs = [load_markdown(decode_text(data), source, path.stem)]
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


def reader_format(path: Path, data: bytes) -> str:
    """The READER_VERSIONS key of the reader `load_file` gives these bytes (what `sniff` says they are)."""
    try:
        suffix = sniff(data, path.suffix.lower())
    except Skip:
        suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    if suffix in HTML_SUFFIXES:
        return "html"
    return suffix.lstrip(".")


_KIND_NAMES = {".pdf": "PDF", ".docx": "DOCX", ".html": "HTML", ".htm": "HTML", ".txt": "plain text",
               ".text": "plain text", ".md": "Markdown", ".markdown": "Markdown", ".jsonl": "JSONL"}
_HTML_START = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.I | re.S)


def sniff(data: bytes, suffix: str) -> str:
    """The suffix of the format `data` really is: a PDF or DOCX by its magic bytes whatever the name
    says, an HTML page saved as .txt by its opening tag; otherwise `suffix` itself."""
    head = data[:1024]
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"%PDF-"):
        return ".pdf"
    if data.startswith(b"PK\x03\x04") and suffix != ".docx":
        if b"word/" in data[:65536]:
            return ".docx"
        raise Skip("a ZIP archive (an office file other than .docx?), not "
                   f"{_KIND_NAMES.get(suffix, suffix)}; save it as .docx, .pdf or text")
    if suffix == ".pdf" and b"%PDF-" not in head:
        what = "an HTML page (a failed download?)" if _HTML_START.match(head) else "no %PDF- header"
        raise Skip(f"not a PDF: {what}; get the PDF again or give the file its real extension")
    if suffix in TEXT_SUFFIXES and _HTML_START.match(head.lstrip(b"\xef\xbb\xbf")):
        return ".html"
    return suffix


_DECLARED = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w.:-]+)|<\?xml[^>]+encoding\s*=\s*["']([\w.:-]+)""", re.I)


def decode_html(data: bytes) -> str:
    """UTF-8 if it is; else the charset the page declares (<meta charset>, <?xml encoding>), read as
    browsers read it (ISO-8859-1 and ASCII as windows-1252); else the legacy code page rule."""
    import codecs

    from ragtune import text

    if text.is_binary(data):
        return decode_text(data)  # refused with the reason
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    m = _DECLARED.search(data[:4096])
    if m:
        name = (m.group(1) or m.group(2)).decode("ascii").lower()
        if name in ("iso-8859-1", "latin1", "latin-1", "us-ascii", "ascii", "iso8859-1"):
            name = "cp1252"
        try:
            codecs.lookup(name)
            return data.decode(name)
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong or unknown declaration: tell the encoding from the bytes
    return decode_text(data)


# --- formats ----------------------------------------------------------------------------------


def load_text(text: str, source: str, title: str) -> Document:
    b = _Builder()
    for para in _PARA_SPLIT.split(text):
        b.add(para)
    return b.document(source, title)


def load_markdown(text: str, source: str, title: str) -> Document:
    """CommonMark blocks through markdown-it-py: ATX and setext headings make the heading path; every
    other top-level block (paragraph, list, table, quote, fenced or indented code, HTML) is one block
    of its source lines, so code that looks like a heading stays code."""
    from markdown_it import MarkdownIt

    text = _strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = text.split("\n")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    b = _Builder()
    path: list[tuple[int, str]] = []
    first_h1 = ""
    for i, tok in enumerate(tokens):
        if tok.level != 0 or tok.map is None or tok.nesting == -1:
            continue  # only top-level blocks; their children are inside the lines taken below
        if tok.type == "heading_open":
            level, name = int(tok.tag[1]), clean_chars(tokens[i + 1].content).strip()
            if level == 1 and not first_h1:
                first_h1 = name
            path = [(lv, h) for lv, h in path if lv < level] + [(level, name)]
            continue
        start, end = tok.map
        b.add("\n".join(lines[start:end]), tuple(h for _, h in path))
    return b.document(source, first_h1 or title)


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text


class _HTMLText(HTMLParser):
    BLOCK = {
        "p", "div", "li", "ul", "ol", "pre", "table", "tr", "td", "th", "dd", "dt", "dl", "blockquote",
        "section", "article", "main", "body", "br", "hr", "figure", "figcaption", "caption", "form",
    }
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
    SKIP = {"script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "head", "button"}
    SKIP_CLASSES = ("sphinxsidebar", "related", "headerlink", "navigation", "sidebar", "breadcrumb")
    # whole class names only: DocBook's page navigation and tables of contents, Sphinx's footer div
    SKIP_CLASS_NAMES = {"navheader", "navfooter", "toc", "footer"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr", "param", "track"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.builder = _Builder()
        self.stack: list[str] = []
        self.skip_depth: int | None = None  # stack depth where a skipped element opened
        self.buf: list[str] = []
        self.pre = 0
        self.heading_level = 0
        self.heading_buf: list[str] = []
        self.path: list[tuple[int, str]] = []
        self.title = ""
        self.in_title = False
        self.first_h1 = ""
        self.first_heading = ""  # the title of a page with no <h1> and no <title> (a DocBook part)

    def _flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        if not self.pre:
            text = re.sub(r"[ \t\r\f\v]+", " ", text)
            text = re.sub(r" *\n *", "\n", text)
        self.builder.add(text.replace("\u00b6", ""), tuple(h for _, h in self.path))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.VOID:
            if tag == "br" and self.skip_depth is None:
                self.buf.append("\n")
            return
        self.stack.append(tag)
        if self.skip_depth is not None:
            return
        a = dict(attrs)
        cls = a.get("class") or ""
        if (tag in self.SKIP or a.get("role") == "navigation" or any(c in cls for c in self.SKIP_CLASSES)
                or not self.SKIP_CLASS_NAMES.isdisjoint(cls.split())):
            self.skip_depth = len(self.stack)
            return
        if tag in self.HEADINGS:
            self._flush()
            self.heading_level = self.HEADINGS[tag]
            self.heading_buf = []
        elif tag in self.BLOCK:
            self._flush()
            if tag == "pre":
                self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.VOID or tag not in self.stack:
            return
        while self.stack:
            open_tag = self.stack.pop()
            depth = len(self.stack) + 1
            if self.skip_depth is not None:
                if depth == self.skip_depth:
                    self.skip_depth = None
            elif open_tag in self.HEADINGS and self.heading_level:
                name = clean_chars(" ".join("".join(self.heading_buf).split()).replace("\u00b6", "")).strip()
                level = self.heading_level
                self.heading_level = 0
                if name:
                    if level == 1 and not self.first_h1:
                        self.first_h1 = name
                    self.first_heading = self.first_heading or name
                    self.path = [(lv, h) for lv, h in self.path if lv < level] + [(level, name)]
            elif open_tag in self.BLOCK:
                self._flush()
                if open_tag == "pre":
                    self.pre = max(0, self.pre - 1)
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
            return
        if self.skip_depth is not None:
            return
        if self.heading_level:
            self.heading_buf.append(data)
        else:
            self.buf.append(data)


def load_html(text: str, source: str, title: str) -> Document:
    p = _HTMLText()
    p.feed(text)
    p.close()
    p._flush()
    name = p.first_h1 or clean_chars(" ".join(p.title.split())) or p.first_heading or title
    return p.builder.document(source, name)


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


def iter_jsonl(data: bytes, file_source: str) -> tuple[list[tuple[bytes, Document]], list[str]]:
    """(line bytes, document) for every good JSONL line, and one problem per bad line ("line N: ...").

    A bad line costs only itself: the good lines of the file are still indexed."""
    out: list[tuple[bytes, Document]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(decode_text(raw, "JSONL line"))
        except Skip as exc:
            problems.append(f"line {lineno}: {exc}")
            continue
        except ValueError as exc:
            problems.append(f"line {lineno}: not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            problems.append(f"line {lineno}: expected an object with a \"text\" string")
            continue
        key = str(obj.get("id") if obj.get("id") is not None else f"L{lineno}")
        if key in seen:
            problems.append(f"line {lineno}: duplicate id '{key}' (first on line {seen[key]}); give each line its own id")
            continue
        seen[key] = lineno
        meta = {k: v for k, v in obj.items() if k not in ("text", "title", "id")}
        title = str(obj.get("title") or key)
        doc = load_text(obj["text"], f"{file_source}#{key}", title)
        doc.meta = meta
        out.append((raw, doc))
    return out, problems
