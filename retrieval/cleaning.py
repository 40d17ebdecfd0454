"""Extracted text -> text worth embedding: the repairs that real PDFs and web pages need.

    text = clean_chars(text)                      # ligatures spelled out, invisible characters dropped
    pages = strip_running_lines(pages)            # PDF: page headers, footers and page numbers removed
    text = join_hyphenated(text, compounds)       # PDF: "orienta-\\ntion" -> "orientation"

Why: the embedder's tokenizer reads "ﬁle" (U+FB01) as an unknown piece and "zero\\u200bwidth" as
three pieces, and BM25 reads "docu\\u00admentation" as two words, so such text matches neither
arm of a search. A running header ("Chapter 3: Objects, their modes and attributes 15",
"gnuplot 5.4 22") repeats in the first chunk of every page and pulls unrelated pages together.

Failure modes, on purpose: a line that repeats at the top or bottom of at least half the pages is
taken for a header even if it is content; a hyphen at a line end between two letters is taken for
hyphenation and removed, unless the document also writes that compound with its hyphen inside a
line (then "debian-security" keeps it), so a compound seen only at line ends ("built-\\nin")
becomes "builtin". No-break spaces are left as they are: both tokenizers read them as spaces.
"""

from __future__ import annotations

import re
from collections import defaultdict

# the Latin ligatures of the Alphabetic Presentation Forms block, spelled out
_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
              "\ufb05": "st", "\ufb06": "st"}
# soft hyphen, zero-width space, word joiner, and a byte-order mark inside the text: invisible, but
# they cut words in two for the tokenizers (zero-width joiners are kept: Indic and emoji need them)
_INVISIBLE = "\u00ad\u200b\u2060\ufeff"
_CHARS = str.maketrans({**_LIGATURES, **dict.fromkeys(_INVISIBLE, None)})
_ODD = re.compile("[" + "".join(_LIGATURES) + _INVISIBLE + "]")

_HYPHENATED = re.compile(r"(\w*[^\W\d_])-\n([^\W\d_A-Z]\w*)")
_COMPOUND = re.compile(r"\w+(?:-\w+)+")
_ROMAN = re.compile(r"(?<![^\W\d_])[ivxlc]+(?![^\W\d_])")  # lowercase only: "I" starts sentences
_ROMAN_VALUES = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}
EDGE_LINES = 2  # lines looked at at each end of a page
MIN_REPEATS = 3  # pages a running line must be seen on


def clean_chars(text: str) -> str:
    """Ligatures as their letters; soft hyphens, zero-width spaces and stray BOMs removed."""
    return text.translate(_CHARS) if _ODD.search(text) else text


def hyphenated_words(texts: list[str]) -> set[str]:
    """The hyphenated compounds written inside a line ("debian-security"), lowercased."""
    return {w.lower() for t in texts for w in _COMPOUND.findall(t)}


def join_hyphenated(text: str, compounds: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """Undo end-of-line hyphenation: a letter, a hyphen, and a lowercase letter on the next line make
    one word, unless `compounds` (hyphenated_words of the document) holds it with its hyphen."""

    def join(m: re.Match[str]) -> str:
        left, right = m.group(1), m.group(2)
        return f"{left}-{right}" if f"{left}-{right}".lower() in compounds else left + right

    return _HYPHENATED.sub(join, text)


def _roman(s: str) -> int | None:
    values = [_ROMAN_VALUES[c] for c in s]
    total = sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))
    return total if 0 < total < 400 else None


def _shape(line: str) -> tuple[str, list[int]]:
    """The line with its numbers masked, and the numbers (arabic and lowercase roman) in order."""
    numbers: list[int] = []

    def mask(m: re.Match[str]) -> str:
        value = int(m.group()) if m.group().isdigit() else _roman(m.group())
        if value is None:
            return m.group()
        numbers.append(value)
        return "#"

    line = " ".join(line.split())
    return re.sub(r"\d+|" + _ROMAN.pattern, mask, line), numbers


def strip_running_lines(pages: list[str]) -> list[str]:
    """Drop the page headers, footers and page numbers that repeat across pages.

    Looks only at the first and last EDGE_LINES non-blank lines of each page (one at each end of a
    page of 2 * EDGE_LINES lines or fewer, where the edges would be the whole page). A line is running
    when (a) the same line ends at least half the pages, MIN_REPEATS at least ("BASH(1) General
    Commands Manual BASH(1)"), or (b) with its numbers masked it recurs on MIN_REPEATS pages or more
    with a number that keeps step with the page ("gnuplot 5.4 22", "Chapter 3: Objects ... 15", a
    bare "15"): that number minus the page index is the same on all of them. Chapter titles, which
    recur with numbers that do not follow the pages, are kept, and a page is never emptied: where
    every line of a page would go (a form or slide repeated page after page), the page stays whole."""
    if len(pages) < MIN_REPEATS:
        return pages
    lines = [p.split("\n") for p in pages]
    exact: dict[str, list[tuple[int, int]]] = defaultdict(list)
    shaped: dict[str, list[tuple[int, int, list[int]]]] = defaultdict(list)
    for pi, page in enumerate(lines):
        filled = [i for i, line in enumerate(page) if line.strip()]
        edge = EDGE_LINES if len(filled) > 2 * EDGE_LINES else 1
        for li in sorted(set(filled[:edge] + filled[-edge:])):
            exact[" ".join(page[li].split())].append((pi, li))
            shape, numbers = _shape(page[li])
            if numbers:
                shaped[shape].append((pi, li, numbers))
    drop: set[tuple[int, int]] = set()
    for where in exact.values():
        on_pages = len({pi for pi, _ in where})
        if on_pages >= MIN_REPEATS and on_pages * 2 >= len(pages):
            drop |= set(where)
    for found in shaped.values():
        steps: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
        for pi, li, numbers in found:
            for j, n in enumerate(numbers):
                steps[(j, n - pi)].add((pi, li))
        for spots in steps.values():
            if len({pi for pi, _ in spots}) >= MIN_REPEATS:
                drop |= spots
    if not drop:
        return pages
    out = []
    for pi, page in enumerate(lines):
        kept = [line for li, line in enumerate(page) if (pi, li) not in drop]
        out.append("\n".join(kept) if any(line.strip() for line in kept) else pages[pi])
    return out
