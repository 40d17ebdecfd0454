"""Sparse lexical vectors, BM25: term weights here, IDF in Qdrant (Modifier.IDF).

    enc = SparseEncoder(avg_len=87.5, stemmer="english")   # avg_len: the index's own (meta "sparse")
    idx, val = enc.document("The runner was running.")      # BM25 term-frequency weights
    idx, val = enc.query("runs")                             # 1.0 per distinct term

The store multiplies each query term by its IDF over the collection (Qdrant's BM25 IDF,
ln(1 + (N - n + 0.5) / (n + 0.5))), so dot(query, doc) is BM25 with k1=1.2, b=0.75 and the
document length normalised by the index's average length in lexical terms (not a guess).
Korean (any text with Hangul) goes through Kiwi's morphological analyzer and keeps content
morphemes (nouns, verb/adjective stems, roots, foreign words, numbers), so "서울은" matches
"서울"; everything else, and Kiwi's non-Korean tokens, through a Unicode word tokenizer with
case folding, stop-words dropped (English list, for the english/porter stemmers) and Snowball
stemming through PyStemmer ("continents" and "continent" are one term). Terms map to 32-bit
indices with crc32 (stable across processes and machines).
"""

from __future__ import annotations

import re
import threading
import zlib
from collections import Counter
from typing import Any

from ragtune.korean import has_hangul, kiwi

SPARSE_VERSION = 2  # bump when tokenization or weighting changes: documents must be re-encoded
K1 = 1.2
B = 0.75
DEFAULT_STEMMER = "english"

_WORD = re.compile(r"\w+", re.UNICODE)
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")
# Kiwi tags kept: nouns, verb/adjective stems, roots, foreign words, numbers, hanja, adverbs
_KEEP_TAGS = ("NNG", "NNP", "NR", "NP", "VV", "VA", "XR", "SL", "SN", "SH", "MAG", "W_")
# Lucene's English stop-word set (what Elasticsearch's `english` analyzer drops), plus contractions' parts
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with s t d ll m re ve".split()
)

# Queries also drop the function words of Snowball's English stop list (what people ask with: "how do I",
# "what is", "can you"), which Lucene's short list keeps. Query side only: documents keep them, so no
# index is re-encoded; on the Python and Debian FAQ sets this raised BM25 recall@1 from 0.56 to 0.61 and
# 0.29 to 0.43 (bench/bench_quality.py, docs/benchmarks.md).
QUERY_STOPWORDS = ENGLISH_STOPWORDS | frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself its itself them theirs themselves what which who whom those am were been being have has had "
    "having do does did doing would should could ought cannot can let about against between through during "
    "before after above below from up down out off over under again further once here when where why how "
    "all any both each few more most other some nor only own same so than too very".split()
)

_stemmers: dict[str, Any] = {}
_stem_lock = threading.Lock()


def check_stemmer(name: str) -> str:
    """'' or 'none' (no stemming) or a Snowball algorithm name; ValueError naming the choices."""
    if name in ("", "none"):
        return "none"
    try:
        import Stemmer
    except ImportError as exc:  # pragma: no cover - a dependency
        raise RuntimeError("stemming needs PyStemmer: pip install PyStemmer") from exc
    if name not in Stemmer.algorithms():
        raise ValueError(f"unknown stemmer '{name}'; use none or one of {', '.join(sorted(Stemmer.algorithms()))}")
    return name


def _get_stemmer(name: str) -> Any:
    with _stem_lock:
        st = _stemmers.get(name)
        if st is None:
            import Stemmer

            st = _stemmers[name] = Stemmer.Stemmer(name, 10000)
        return st


class Tokenizer:
    """Lexical terms of a text under one stemmer: the same for documents and queries."""

    def __init__(self, stemmer: str = DEFAULT_STEMMER, query: bool = False) -> None:
        self.stemmer = check_stemmer(stemmer)
        english = self.stemmer in ("english", "porter")
        self.stop = (QUERY_STOPWORDS if query else ENGLISH_STOPWORDS) if english else frozenset()

    def _words(self, text: str) -> list[str]:
        """Unicode words, case-folded, stop-words out, stemmed; runs of Chinese/Japanese characters
        become bigrams (never stemmed)."""
        out: list[str] = []
        latin: list[str] = []
        for w in _WORD.findall(text.casefold()):
            if _CJK_RUN.fullmatch(w):
                if len(w) > 2:
                    out.extend(w[i : i + 2] for i in range(len(w) - 1))
                else:
                    out.append(w)
            elif w not in self.stop:
                latin.append(w)
        if latin and self.stemmer != "none":
            latin = _get_stemmer(self.stemmer).stemWords(latin)
        return latin + out if out else latin

    def __call__(self, text: str) -> list[str]:
        """Terms of a text: Kiwi morphemes where there is Hangul, stemmed Unicode words elsewhere."""
        if not has_hangul(text):
            return self._words(text)
        out: list[str] = []
        for tok in kiwi().tokenize(text):
            if not tok.tag.startswith(_KEEP_TAGS):
                continue
            if has_hangul(tok.form):
                out.append(tok.form)
            else:  # Latin words, numbers: the same tokens a non-Korean text would give
                out.extend(self._words(tok.form))
        return out


def tokenize(text: str, stemmer: str = DEFAULT_STEMMER) -> list[str]:
    return Tokenizer(stemmer)(text)


def term_index(term: str) -> int:
    return zlib.crc32(term.encode("utf-8"))


class SparseEncoder:
    def __init__(self, avg_len: float = 100.0, stemmer: str = DEFAULT_STEMMER) -> None:
        if not avg_len > 0:
            raise ValueError(f"avg_len must be positive, got {avg_len}")
        self.avg_len = float(avg_len)
        self.tokenize = Tokenizer(stemmer)
        self.tokenize_query = Tokenizer(stemmer, query=True)

    def counts(self, text: str) -> tuple[Counter[int], int]:
        """Term-index counts and the document's length in lexical terms."""
        terms = self.tokenize(text)
        return Counter(term_index(t) for t in terms), len(terms)

    def weigh(self, tf: Counter[int], length: int) -> tuple[list[int], list[float]]:
        """BM25 term-frequency part: tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))."""
        norm = K1 * (1 - B + B * length / self.avg_len)
        idx = sorted(tf)
        return idx, [tf[i] * (K1 + 1) / (tf[i] + norm) for i in idx]

    def document(self, text: str) -> tuple[list[int], list[float]]:
        return self.weigh(*self.counts(text))

    def query(self, text: str) -> tuple[list[int], list[float]]:
        """1.0 per distinct term, query stop-words out; a query of function words alone keeps them
        (better a weak lexical match than none: "Who are you?" still finds its page)."""
        terms = self.tokenize_query(text) or self.tokenize(text)
        idx = sorted({term_index(t) for t in terms})
        return idx, [1.0] * len(idx)


def sparse_meta(avg_len: float, n_chunks: int, n_terms: int, stemmer: str) -> dict[str, Any]:
    """The index metadata's "sparse" block: format version and the statistics documents were weighed with."""
    return {"version": SPARSE_VERSION, "tokenizer": "kiwi+unicode+snowball", "stemmer": stemmer,
            "weights": "bm25 tf (k1 1.2, b 0.75), idf in store", "avg_len": float(avg_len),
            "n_chunks": int(n_chunks), "n_terms": int(n_terms)}
