"""The HTML reader: text blocks under their heading path, without navigation, sidebars, headers,
footers, scripts and styles (Sphinx, DocBook, GNU Texinfo and plain pages).

    from ragtune.retrieval.html_reader import load_html

    doc = load_html(decode_html(data), "guide/index.html", "index")
    doc.title                # the first <h1>, else <title>, else the first heading, else "index"
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from ragtune.retrieval.cleaning import clean_chars
from ragtune.retrieval.documents import Document, _Builder


class _HTMLText(HTMLParser):
    BLOCK = {
        "p", "div", "li", "ul", "ol", "pre", "table", "tr", "td", "th", "dd", "dt", "dl", "blockquote",
        "section", "article", "main", "body", "br", "hr", "figure", "figcaption", "caption", "form",
    }
    HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
    SKIP = {"script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "head", "button"}
    SKIP_CLASSES = ("sphinxsidebar", "related", "headerlink", "navigation", "sidebar", "breadcrumb")
    # whole class names only: DocBook's page navigation and tables of contents, Sphinx's footer div, GNU
    # Texinfo's "Next: ..., Previous: ..., Up: ..." line (header before Texinfo 7, nav-panel since), Doxygen's
    # page header
    SKIP_CLASS_NAMES = {"navheader", "navfooter", "toc", "footer", "header", "nav-panel"}
    # a heading's link to itself, shown as a symbol (Node.js's "#", Sphinx's pilcrow, "§"): not part of its name
    SELF_LINK_TEXT = {"#", "\u00b6", "\u00a7", "\U0001f517", ""}
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
        self.self_link_at: int | None = None  # where in heading_buf an <a href="#..."> inside a heading began

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
        if tag == "a" and self.heading_level and (a.get("href") or "").startswith("#"):
            self.self_link_at = len(self.heading_buf)
        if tag in self.HEADINGS:
            self.end_open_heading()
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
        if tag == "a" and self.self_link_at is not None:
            if "".join(self.heading_buf[self.self_link_at:]).strip() in self.SELF_LINK_TEXT:
                del self.heading_buf[self.self_link_at:]
            self.self_link_at = None
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

    def end_open_heading(self) -> None:
        """A heading whose end tag never came (the next heading, or the end of the page): what it
        gathered is kept as text, not dropped with it."""
        if self.heading_level:
            self.heading_level = 0
            self.buf.extend(self.heading_buf)
            self.heading_buf = []

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
    p.end_open_heading()
    p._flush()
    name = p.first_h1 or clean_chars(" ".join(p.title.split())) or p.first_heading or title
    return p.builder.document(source, name)

