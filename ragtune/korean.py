"""Korean text: which characters are Hangul, and the one Kiwi analyzer every part shares.

    from ragtune.korean import has_hangul, kiwi
    if has_hangul(text):
        for tok in kiwi().tokenize(text): ...   # tok.form, tok.tag, tok.start, tok.len

Hangul is every block Unicode assigns to it: Jamo (U+1100-11FF), compatibility Jamo (U+3130-318F),
Jamo Extended-A (U+A960-A97F), syllables (U+AC00-D7A3) and Jamo Extended-B (U+D7B0-D7FF). The
lexical index (retrieval/sparse.py) and the answer metrics (eval/metrics.py) decide with this one
rule whether a text goes through Kiwi, so a question is tokenized alike in search and in scoring.

Kiwi loads its model in a few seconds and about 100 MB, so there is one instance per process,
built on first use under a lock (a server's threads or eval's workers asking at once still get
the same one).
"""

from __future__ import annotations

import re
import threading
from typing import Any

HANGUL_RANGES = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff"
HANGUL = re.compile(f"[{HANGUL_RANGES}]")
INSTALL_HINT = "Korean text needs kiwipiepy: pip install kiwipiepy kiwipiepy-model (ragtune's dependencies)"

_kiwi: Any = None
_lock = threading.Lock()


def has_hangul(text: str) -> bool:
    return HANGUL.search(text) is not None


def kiwi() -> Any:
    """The process's Kiwi analyzer, loaded once."""
    global _kiwi
    if _kiwi is not None:
        return _kiwi
    with _lock:
        if _kiwi is None:
            try:
                from kiwipiepy import Kiwi
            except ImportError as exc:  # pragma: no cover - a dependency
                from ragtune.errors import RagtuneError

                raise RagtuneError(INSTALL_HINT) from exc
            _kiwi = Kiwi()
    return _kiwi
