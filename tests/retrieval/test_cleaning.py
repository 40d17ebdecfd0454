"""cleaning: ligatures and invisible characters, running page headers/footers, end-of-line hyphenation.

The page texts are shaped like the extraction of real manuals (R-intro.pdf, gnuplot.pdf, bash.pdf
from Debian's r-doc-pdf, gnuplot-doc, bash-doc): pypdf's then, and PDFium's as loaders.pdf_pages
hands it on now (line ends as "\n", a hyphen PDFium marked as a line-end one put back as "-\n")."""

from __future__ import annotations

from ragtune.retrieval.cleaning import clean_chars, hyphenated_words, join_hyphenated, strip_running_lines


def test_ligatures_spelled_out_and_invisible_characters_dropped() -> None:
    assert clean_chars("the \ufb01le system \ufb02ag, e\ufb03cient") == "the file system flag, efficient"
    assert clean_chars("docu\u00admentation zero\u200bwidth \ufeffstart") == "documentation zerowidth start"
    assert clean_chars("no\u00a0break stays, \u200djoiner stays") == "no\u00a0break stays, \u200djoiner stays"


def _pages(n: int, header: str, footer: str = "") -> list[str]:
    return [
        "\n".join(x for x in (header.format(p=p + 1), f"Opening line of section {p * 7}.", "Shared wording.",
                              f"Middle line {p * 3}.", f"Closing line {p * p}.", footer.format(p=p + 1)) if x)
        for p in range(n)
    ]


def test_header_with_page_number_removed() -> None:
    pages = strip_running_lines(_pages(6, "gnuplot 5.4 {p}"))
    assert all("gnuplot" not in p for p in pages)
    assert pages[2].startswith("Opening line of section 14.\nShared wording.")


def test_header_without_number_on_every_page_and_bare_page_numbers_removed() -> None:
    pages = strip_running_lines(_pages(5, "BASH(1) General Commands Manual BASH(1)", "{p}"))
    assert pages[0] == "Opening line of section 0.\nShared wording.\nMiddle line 0.\nClosing line 0."


def test_chapter_header_whose_number_follows_the_page_removed_even_on_few_pages() -> None:
    texts = _pages(20, "Chapter 2: Basics {p}")  # page labels run ahead of the page index: "Chapter 2: Basics 7"
    texts = [t.replace(f"Basics {i + 1}\n", f"Basics {i + 7}\n") for i, t in enumerate(texts)]
    texts[5:] = [f"Other content {i}.\nmore" for i in range(15)]  # the chapter covers 5 of 20 pages
    out = strip_running_lines(texts)
    assert all("Chapter 2" not in p for p in out[:5])


def test_content_repeated_on_some_page_ends_is_kept() -> None:
    words = ["plot", "splot", "fit", "set", "show", "load", "save", "replot", "print", "pause"]
    texts = [f"The {words[p % 10]} command, form {p % 3}.\nIt takes options.\nSyntax:" if p % 4 == 0
             else f"The {words[p % 10]} command, variant {p * p}.\nExample: {words[(p + 3) % 10]}" for p in range(40)]
    out = strip_running_lines(texts)  # "Syntax:" ends 10 of 40 pages and carries no page number
    assert out == texts
    chapters = [f"Chapter {c}\nThe {words[c]} chapter begins." if p == 0
                else f"About {words[(c + p) % 10]} in depth.\nSee the {words[c * p % 10]} notes." for c in range(1, 6) for p in range(4)]
    assert strip_running_lines(chapters) == chapters  # "Chapter N" on chapter starts does not follow the pages


def test_short_pages_keep_their_content() -> None:
    """A form or slide deck: every line of a 4-line page is at an edge, and some repeat on every page."""
    form = [f"Request {p + 1}\nName: ______\nDate: ______\nSigned" for p in range(5)]
    assert strip_running_lines(form) == ["Name: ______\nDate: ______" for _ in range(5)]  # one edge line each end
    tiny = [f"Table {p + 1}\nitem a | 3" for p in range(4)]  # every line would go: the pages stay whole
    assert strip_running_lines(tiny) == tiny


def test_short_documents_untouched() -> None:
    texts = ["Header\nbody one", "Header\nbody two"]
    assert strip_running_lines(texts) == texts


def test_end_of_line_hyphenation_joined_unless_the_document_hyphenates_the_word() -> None:
    texts = ["Object orienta-\ntion is discussed, see debian-\nsecurity.", "Use debian-security for updates."]
    compounds = hyphenated_words(texts)
    assert join_hyphenated(texts[0], compounds) == "Object orientation is discussed, see debian-security."
    assert join_hyphenated("options --\nverbose and 5-\n6 and word-\nNext") == "options --\nverbose and 5-\n6 and word-\nNext"
