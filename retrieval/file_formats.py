"""What a file is and how its bytes become text: the suffixes ragtune reads, the format the bytes
really are (`sniff`), and decoding of text and HTML in UTF-8, UTF-16 or a legacy code page.

    from ragtune.retrieval.file_formats import SUPPORTED, decode_html, decode_text, is_supported, sniff

    is_supported(Path("notes.md"))           # by suffix: SUPPORTED, none at all (README: plain text), or .gz of either
    sniff(data, ".txt")                      # ".html" for a web page saved as .txt, ".pdf" for %PDF- bytes
    decode_text(data)                        # str, or Skip with the reason (binary, unknown encoding)
    decode_html(data)                        # UTF-8, else the charset the page declares, else as decode_text
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from ragtune.retrieval.documents import Skip

TEXT_SUFFIXES = {".txt", ".text"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SECTION_SUFFIXES = {".rst": ".rst", ".adoc": ".adoc", ".asciidoc": ".adoc"}  # -> text_readers.load_sections' kind
SUPPORTED = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | HTML_SUFFIXES | set(SECTION_SUFFIXES) | {".pdf", ".docx", ".jsonl"}


GZ_MAX = 256 << 20  # bytes a .gz document may decompress to (a gzip bomb is refused, not read into memory)


def is_supported(path: Path, text_suffixes: Iterable[str] = ()) -> bool:
    """A suffix ragtune reads, or a name without one (README, LICENSE, NOTES, Debian's copyright), read as plain
    text when its bytes are text (`peek_binary` tells before the whole file is read), or either gzip-compressed
    (README.md.gz, FAQ.gz: how Debian ships /usr/share/doc); or one of `text_suffixes` (index.text_suffixes)."""
    suffix = path.suffix.lower()
    return (suffix in SUPPORTED or not suffix or inner_name(path) is not None
            or suffix in {x.lower() for x in text_suffixes})


def readable() -> str:
    """What ragtune reads, as the messages about skipped or missing documents say it."""
    return f"{', '.join(sorted(SUPPORTED))}, names without an extension as text, and either gzip-compressed"


def inner_name(path: Path) -> Path | None:
    """The name a .gz document had before it was compressed (README.md for README.md.gz), when ragtune reads that
    kind of file (not .jsonl, whose lines are planned before reading); else None."""
    if path.suffix.lower() != ".gz":
        return None
    inner = Path(path.stem)
    return inner if not inner.suffix or inner.suffix.lower() in SUPPORTED - {".jsonl"} else None


def file_type(path: Path) -> str:
    """The type a skipped file is counted under: its suffix ('.Debian.gz' for changelog.Debian.gz), else its name."""
    if path.suffix.lower() == ".gz" and len(path.suffixes) > 1:
        return "".join(path.suffixes[-2:])
    return path.suffix or path.name


def gunzip(data: bytes, head: int = 0) -> bytes:
    """A .gz document's bytes (only its first `head` when given, enough to tell its format, with no check of the
    rest); Skip for a corrupt file or one that decompresses past GZ_MAX."""
    import gzip
    import io
    import zlib

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(head or GZ_MAX + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise Skip(f"a corrupt or cut gzip file ({exc}); get the file again") from None
    if not head and len(out) > GZ_MAX:
        raise Skip(f"decompresses to more than {GZ_MAX >> 20} MB; decompress it yourself if it is a document")
    return out


def peek_binary(path: Path) -> bool:
    """Whether a file without a suffix starts as binary (an executable, an image): NUL bytes in its first 8 KB,
    read without reading the rest."""
    from ragtune import text

    if path.suffix:
        return False
    with open(path, "rb") as f:
        return text.is_binary(f.read(8192))


def decode_text(data: bytes, what: str = "file") -> str:
    """UTF-8/UTF-16, or the legacy code page `ragtune.text.detect_encoding` recognises; Skip otherwise."""
    from ragtune import text

    if text.is_binary(data):
        utf16 = _bomless_utf16(data)
        if utf16 is None:
            raise Skip(f"binary content in a {what} (NUL bytes); not a text file")
        return utf16
    decoded = text.decode(data)
    if decoded is None:
        raise Skip(f"the {what} is not UTF-8 and its encoding cannot be told (no code page reads as text); "
                   "save it as UTF-8")
    return decoded


def _bomless_utf16(data: bytes) -> str | None:
    """UTF-16 text saved without a byte-order mark (some Windows tools write it so), else None: the
    NUL bytes are the high bytes of Latin characters, so they sit at every other position and nowhere
    else; binary data puts them anywhere."""
    if len(data) < 4 or len(data) % 2:
        return None
    even, odd = data[0::2], data[1::2]
    for codec, high, low in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if high.count(0) < 0.5 * len(high) or low.count(0):
            continue
        try:
            decoded = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if sum(c.isprintable() or c in "\t\r\n\f" for c in decoded) >= 0.98 * len(decoded):
            return decoded
    return None


_KIND_NAMES = {".pdf": "PDF", ".docx": "DOCX", ".html": "HTML", ".htm": "HTML", ".txt": "plain text",
               ".text": "plain text", ".md": "Markdown", ".markdown": "Markdown", ".jsonl": "JSONL",
               ".rst": "reStructuredText", ".adoc": "AsciiDoc", ".asciidoc": "AsciiDoc"}
_HTML_START = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.I | re.S)


SNIFF_BYTES = 65536  # what `sniff` looks at: a DOCX's "word/" entry within the first 64 KB


def sniff(data: bytes, suffix: str) -> str:
    """The suffix of the format `data` really is: a PDF or DOCX by its magic bytes whatever the name
    says, an HTML page saved as .txt by its opening tag; otherwise `suffix` itself."""
    head = data[:1024]
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"%PDF-"):
        return ".pdf"
    if data.startswith(b"PK\x03\x04") and suffix != ".docx":
        if b"word/" in data[:SNIFF_BYTES]:
            return ".docx"
        raise Skip("a ZIP archive (an office file other than .docx?), not "
                   f"{_KIND_NAMES.get(suffix, suffix or 'text')}; save it as .docx, .pdf or text")
    if suffix == ".pdf" and b"%PDF-" not in head:
        what = "an HTML page (a failed download?)" if _HTML_START.match(head) else "no %PDF- header"
        raise Skip(f"not a PDF: {what}; get the PDF again or give the file its real extension")
    if (suffix in TEXT_SUFFIXES or not suffix) and _HTML_START.match(head.lstrip(b"\xef\xbb\xbf")):
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
