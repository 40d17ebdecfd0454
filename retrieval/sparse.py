"""Sparse lexical vectors, BM25-style: term weights here, IDF in Qdrant (Modifier.IDF).

    enc = SparseEncoder()
    idx, val = enc.document("서울은 한국의 수도입니다.")   # BM25 term-frequency weights
    idx, val = enc.query("서울")                           # 1.0 per distinct term

The store multiplies each query term by its IDF over the collection, so dot(query, doc) is BM25.
Korean (any text with Hangul) goes through Kiwi's morphological analyzer and keeps content
morphemes (nouns, verb/adjective stems, roots, foreign words, numbers), so "서울은" matches
"서울"; everything else, and Kiwi's non-Korean tokens, through a Unicode word tokenizer with
case folding. Terms map to 32-bit indices with crc32 (stable across processes and machines).
"""

from __future__ import annotations

import re
import threading
import zlib
from collections import Counter
from typing import Any

SPARSE_VERSION = 1  # bump when tokenization changes: documents must be re-encoded
K1 = 1.2
B = 0.75

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_WORD = re.compile(r"\w+", re.UNICODE)
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")
# Kiwi tags kept: nouns, verb/adjective stems, roots, foreign words, numbers, hanja, adverbs
_KEEP_TAGS = ("NNG", "NNP", "NR", "NP", "VV", "VA", "XR", "SL", "SN", "SH", "MAG", "W_")

_kiwi: Any = None
_kiwi_lock = threading.Lock()


def _get_kiwi() -> Any:
    global _kiwi
    with _kiwi_lock:
        if _kiwi is None:
            try:
                from kiwipiepy import Kiwi
            except ImportError as exc:  # pragma: no cover - a dependency
                raise RuntimeError(
                    "Korean tokenization needs kiwipiepy: pip install kiwipiepy kiwipiepy-model"
                ) from exc
            _kiwi = Kiwi()
        return _kiwi


def _words(text: str) -> list[str]:
    """Unicode words, case-folded; runs of Chinese/Japanese characters become bigrams."""
    out: list[str] = []
    for w in _WORD.findall(text.casefold()):
        if _CJK_RUN.fullmatch(w) and len(w) > 2:
            out.extend(w[i : i + 2] for i in range(len(w) - 1))
        else:
            out.append(w)
    return out


def tokenize(text: str) -> list[str]:
    """Terms of a text: Kiwi morphemes where there is Hangul, Unicode words elsewhere."""
    if not _HANGUL.search(text):
        return _words(text)
    out: list[str] = []
    for tok in _get_kiwi().tokenize(text):
        if not tok.tag.startswith(_KEEP_TAGS):
            continue
        if _HANGUL.search(tok.form):
            out.append(tok.form)
        else:  # Latin words, numbers: the same tokens a non-Korean text would give
            out.extend(_words(tok.form))
    return out


def term_index(term: str) -> int:
    return zlib.crc32(term.encode("utf-8"))


class SparseEncoder:
    def __init__(self, avg_len: float = 120.0) -> None:
        self.avg_len = avg_len

    def document(self, text: str) -> tuple[list[int], list[float]]:
        """BM25 term-frequency part: tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))."""
        terms = tokenize(text)
        tf = Counter(term_index(t) for t in terms)
        norm = K1 * (1 - B + B * len(terms) / self.avg_len)
        idx = sorted(tf)
        return idx, [tf[i] * (K1 + 1) / (tf[i] + norm) for i in idx]

    def query(self, text: str) -> tuple[list[int], list[float]]:
        idx = sorted({term_index(t) for t in tokenize(text)})
        return idx, [1.0] * len(idx)
