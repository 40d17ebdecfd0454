"""Readers of the text formats: plain text (blocks at blank lines), Markdown (CommonMark blocks under
their heading path) and JSONL (one document per line).

    from ragtune.retrieval.text_readers import iter_jsonl, load_markdown, load_text

    doc = load_text(text, "notes.txt", "notes")          # one block per paragraph (blank-line separated)
    doc = load_markdown(text, "hr.md", "hr")             # title: the first # heading, else "hr"
    good, problems = iter_jsonl(data, "data.jsonl")      # [(line bytes, Document)], ["line 3: ..."]
"""

from __future__ import annotations

import json

from ragtune.retrieval.cleaning import clean_chars
from ragtune.retrieval.documents import _PARA_SPLIT, Document, Skip, _Builder
from ragtune.retrieval.file_formats import decode_text


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
