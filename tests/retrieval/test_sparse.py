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


def test_english_stemming_and_stop_words() -> None:
    assert tokenize("running") == tokenize("runs") == ["run"]
    assert tokenize("continents") == tokenize("continent")
    assert tokenize("the") == [] and "the" not in tokenize("The capital of the country")
    assert tokenize("The runners", stemmer="none") == ["the", "runners"]  # an index built without stemming
    enc = SparseEncoder(avg_len=5)
    qi, _ = enc.query("Which continents are the largest?")
    di, _ = enc.document("Asia is the largest continent.")
    assert term_index("the") not in qi and set(qi) & set(di) == {term_index("contin"), term_index("largest")}


def test_korean_terms_unchanged_by_stemming() -> None:
    assert tokenize("서울은 한국의 수도입니다.") == tokenize("서울은 한국의 수도입니다.", stemmer="none")
    assert "서울" in tokenize("서울은 한국의 수도입니다.")


def test_length_normalisation_follows_the_average_length() -> None:
    long_doc = "cat " + "filler " * 19  # 20 terms
    short_avg, long_avg = SparseEncoder(avg_len=5), SparseEncoder(avg_len=40)
    w_short = dict(zip(*short_avg.document(long_doc)))[term_index("cat")]
    w_long = dict(zip(*long_avg.document(long_doc)))[term_index("cat")]
    # BM25 by hand: tf=1, k1=1.2, b=0.75, len=20
    assert abs(w_short - 2.2 / (1 + 1.2 * (0.25 + 0.75 * 20 / 5))) < 1e-9
    assert abs(w_long - 2.2 / (1 + 1.2 * (0.25 + 0.75 * 20 / 40))) < 1e-9
    assert w_long > w_short  # a document longer than the index's average is penalised


def test_unknown_stemmer_is_a_clear_error() -> None:
    import pytest

    from ragtune.retrieval.sparse import check_stemmer

    with pytest.raises(ValueError, match="unknown stemmer 'klingon'; use none or one of .*english"):
        check_stemmer("klingon")


def test_queries_drop_question_words_documents_keep_them() -> None:
    enc = SparseEncoder(avg_len=5)
    qi, _ = enc.query("How do I make my script executable?")
    assert sorted(qi) == sorted(term_index(t) for t in ("make", "script", "execut"))
    di, _ = enc.document("How the script is made executable: chmod.")
    assert term_index("how") in di  # documents are encoded as before: no re-index
    only, _ = enc.query("Who are you?")  # function words alone: kept rather than no lexical query at all
    assert term_index("who") in only and term_index("you") in only
    assert SparseEncoder(avg_len=5, stemmer="none").query("how do I")[0]  # no stop-words without English stemming
