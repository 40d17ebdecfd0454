"""Readers of the text formats: plain text (blocks at blank lines), Markdown (CommonMark blocks under
their heading path), reStructuredText and AsciiDoc (paragraphs under their section titles) and JSONL
(one document per line).

    from ragtune.retrieval.text_readers import iter_jsonl, load_markdown, load_sections, load_text

    doc = load_text(text, "notes.txt", "notes")          # one block per paragraph (blank-line separated)
    doc = load_markdown(text, "hr.md", "hr")             # title: the first # heading, else "hr"
    doc = load_sections(text, "guide.rst", "guide", ".rst")   # section titles as the heading path
    good, problems = iter_jsonl(data, "data.jsonl")      # [(line bytes, Document)], ["line 3: ..."]
"""

from __future__ import annotations

import json
import re

from ragtune.retrieval.cleaning import clean_chars
from ragtune.retrieval.documents import _PARA_SPLIT, Document, Skip, _Builder
from ragtune.retrieval.file_formats import decode_text


def load_text(text: str, source: str, title: str) -> Document:
    b = _Builder()
    for para in _PARA_SPLIT.split(text):
        b.add(para)
    return b.document(source, title)


# reStructuredText: a title underlined (and perhaps overlined) with one punctuation character repeated (as long as
# it, or docutils warns, but still reads a title); levels come from the order the styles first appear, as docutils
# assigns them
_RST_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
# AsciiDoc: "= Document title", "== Section" ... (a line of "=" alone is a block delimiter, not a title)
_ADOC_TITLE = re.compile(r"^(={1,6})\s+(\S.*?)\s*$")


def load_sections(text: str, source: str, title: str, kind: str) -> Document:
    """A reStructuredText (`kind` ".rst") or AsciiDoc (".adoc") document: paragraphs (blank-line separated) under
    the path of section titles above them; the document title is the first section title, else `title`.
    Directives, roles and other markup stay as written (the text around them is what a search needs)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    b = _Builder()
    path: list[tuple[int, str]] = []
    styles: list[tuple[str, bool]] = []
    para: list[str] = []
    first = ""

    def flush() -> None:
        for chunk in _PARA_SPLIT.split("\n".join(para)):
            if not _RST_ADORNMENT.match(chunk.strip()):  # an RST transition (a line of ----) is no text
                b.add(chunk, tuple(h for _, h in path))
        para.clear()

    i = 0
    while i < len(lines):
        line, found = lines[i], None
        if kind == ".rst":
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            over = bool(_RST_ADORNMENT.match(line)) and i + 2 < len(lines) and lines[i + 2].rstrip() == line.rstrip()
            name_line = lines[i + 1] if over else line
            under = lines[i + 2] if over else nxt
            m = _RST_ADORNMENT.match(under)
            if (m and name_line.strip() and not _RST_ADORNMENT.match(name_line)
                    and (over or (not name_line[:1].isspace()
                                  and len(under.rstrip()) >= min(len(name_line.strip()), 4)))):
                style = (m.group(1), over)
                if style not in styles:
                    styles.append(style)
                found, skip = (styles.index(style) + 1, name_line.strip()), 3 if over else 2
        else:
            m = _ADOC_TITLE.match(line)
            if m:
                found, skip = (len(m.group(1)), m.group(2)), 1
        if found is None:
            para.append(line)
            i += 1
            continue
        flush()
        level, name = found[0], clean_chars(found[1])
        first = first or name
        path = [(lv, h) for lv, h in path if lv < level] + [(level, name)]
        i += skip
    flush()
    return b.document(source, first or title)


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
        if not doc.blocks:  # never stored, it would count as added on every run
            problems.append(f"line {lineno}: \"text\" is empty (nothing to index); give the line its text "
                            "or delete it")
            continue
        doc.meta = meta
        out.append((raw, doc))
    return out, problems
