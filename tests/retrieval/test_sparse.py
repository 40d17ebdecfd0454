"""Sparse terms: Kiwi morphemes for Korean, Unicode words elsewhere, consistent between the two."""

from __future__ import annotations

from ragtune.retrieval.sparse import SparseEncoder, term_index, tokenize


def test_korean_particles_are_stripped() -> None:
    assert "서울" in tokenize("서울은 한국의 수도입니다.")
    assert tokenize("서울") == ["서울"]
    assert "재택근무" in tokenize("재택근무를 할 수 있습니다")


def test_latin_words_agree_inside_and_outside_korean_text() -> None:
    assert tokenize("Python 3.11 API") == ["python", "3", "11", "api"]
    ko = tokenize("Python 3.11은 API를 쓴다")
    assert {"python", "3", "11", "api"} <= set(ko)


def test_bm25_document_weights_saturate_and_query_is_binary() -> None:
    enc = SparseEncoder(avg_len=10)
    idx, val = enc.document("cat cat cat dog")
    w = dict(zip(idx, val))
    assert w[term_index("cat")] > w[term_index("dog")] > 0
    assert w[term_index("cat")] < 3 * w[term_index("dog")]  # tf saturates
    qi, qv = enc.query("cat cat")
    assert qi == [term_index("cat")] and qv == [1.0]
