"""Every metric against cases worked out by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest

from ragtune.eval import metrics as M

# --- tokens -------------------------------------------------------------------------------------


def test_english_tokens_drop_case_punctuation_and_articles() -> None:
    assert M.normalize_tokens("The Remote-Work policy: 3 days/week!") == ["remote", "work", "policy", "3", "days", "week"]
    assert M.normalize_tokens("An expense of $1,500.") == ["expense", "of", "1500"]
    assert M.normalize_tokens("2.5 %") == ["2.5"]
    assert M.normalize_tokens("") == [] and M.normalize_tokens(None) == []


def test_korean_tokens_are_content_morphemes() -> None:
    # particles 은/이/의, copula 이, ending 다 dropped
    assert M.normalize_tokens("서울은 한국의 수도이다") == ["서울", "한국", "수도"]
    assert M.normalize_tokens("서울이 수도") == ["서울", "수도"]
    # 하(XSA) and ㅂ니다(EF) dropped; the number splits from its counter 일
    assert M.normalize_tokens("재택근무는 주 3일까지 가능합니다.") == ["재택근무", "주", "3", "일", "가능"]
    # mixed text: thousands separator removed, Latin words follow the English rule
    assert M.normalize_tokens("경비는 1,500,000원까지") == ["경비", "1500000", "원"]
    assert M.normalize_tokens("The VPN은 필수") == ["vpn", "필수"]


# --- answers --------------------------------------------------------------------------------------


def test_exact_match() -> None:
    assert M.exact_match("The answer is Paris.", "answer is paris") == 1.0
    assert M.exact_match("Paris", "Paris, France") == 0.0
    assert M.exact_match("서울이 수도", "서울은 수도") == 1.0  # only the particle differs
    assert M.exact_match("", "") == 1.0


def test_token_f1_english() -> None:
    # pred [three, days, per, week] ref [up, to, three, days]: common 2; P=2/4 R=2/4 -> 0.5
    assert M.token_f1("Three days per week", "Up to three days") == pytest.approx(0.5)
    # multiset overlap: pred [days, days] ref [days]: common 1; P=1/2 R=1 -> 2/3
    assert M.token_f1("days days", "days") == pytest.approx(2 / 3)
    assert M.token_f1("nothing shared", "other words") == 0.0
    assert M.token_f1("", "x") == 0.0 and M.token_f1("", "") == 1.0


def test_token_f1_korean_via_morphemes() -> None:
    # [서울, 한국, 수도] vs [서울, 수도]: common 2; P=2/3 R=1 -> F1 = 2*(2/3)/(5/3) = 0.8
    assert M.token_f1("서울은 한국의 수도이다", "서울이 수도") == pytest.approx(0.8)
    # [연차, 휴가, 15, 일] vs [휴가, 연, 15, 일]: common 3; P=R=3/4 -> 0.75
    assert M.token_f1("연차 휴가는 15일입니다", "휴가는 연 15일") == pytest.approx(0.75)


def test_lcs_and_rouge_l() -> None:
    assert M.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example
    assert M.lcs_length([], ["a"]) == 0
    # pred [days, three, per, week] ref [three, days, per, week]: LCS 3 (three per week); P=R=3/4
    assert M.rouge_l("days three per week", "three days per week") == pytest.approx(0.75)
    # token F1 ignores order: the same pair scores 1.0 there
    assert M.token_f1("days three per week", "three days per week") == pytest.approx(1.0)
    # LCS [서울, 수도] = 2; P=2/3 R=1 -> 0.8
    assert M.rouge_l("서울은 한국의 수도이다", "서울이 수도") == pytest.approx(0.8)
    # beta=2 weights recall: P=2/3, R=1: 5*P*R/(R+4P) = (10/3)/(11/3) = 10/11
    assert M.rouge_l("서울은 한국의 수도이다", "서울이 수도", beta=2.0) == pytest.approx(10 / 11)


def test_contains_reference() -> None:
    assert M.contains_reference("You may work remotely up to 3 days a week.", "3 days") == 1.0
    assert M.contains_reference("days 3", "3 days") == 0.0  # contiguous and in order
    assert M.contains_reference("재택근무는 주 3일까지 가능합니다", "3일") == 1.0
    assert M.contains_reference("서울은 한국의 수도이다", "서울이 수도") == 0.0  # 한국 in between
    assert M.contains_reference("anything", "") == 0.0  # an empty reference is never contained


def test_contains_answer_accepts_a_short_answer_the_question_frames() -> None:
    q = "How many days per week can I work remotely?"
    # the strict rule misjudges the short answer: [3] does not contain [3, days, per, week]
    assert M.contains_reference("3", "3 days per week") == 0.0
    # the key is [3, days, week] less what the question states {days, per, week, ...} -> [3]
    assert M.answer_key("3 days per week", q) == ["3"]
    assert M.contains_answer("3", "3 days per week", q) == 1.0
    assert M.contains_answer("Three.", "3 days per week", q) == 0.0  # digits are not spelt numbers
    assert M.contains_answer("2", "3 days per week", q) == 0.0
    assert M.contains_answer("13", "3 days per week", q) == 0.0  # tokens, not substrings
    # without the question nothing may be left out but glue words: [3] lacks [days, week]
    assert M.contains_answer("3", "3 days per week") == 0.0
    # glue words worded differently: content [3, days, week] in [up, 3, days, week] ("a" is an article)
    assert M.contains_answer("Up to 3 days a week", "3 days per week") == 1.0
    # "10:00-15:00": content [10, 00, 15, 00] == the reference's without "to"
    assert M.contains_answer("Core hours are 10:00-15:00.", "10:00 to 15:00") == 1.0
    # the key must be contiguous and in order: [3, days] is not a run of [days, 3]
    assert M.contains_answer("days: 3", "3 days", "What is the limit?") == 0.0
    # a question that states the whole reference leaves an empty key: only the reference counts
    assert M.answer_key("Tuesday", "Is Tuesday the office day?") == []
    assert M.contains_answer("Yes", "Tuesday", "Is Tuesday the office day?") == 0.0
    assert M.contains_answer("Yes, on Tuesday", "Tuesday", "Is Tuesday the office day?") == 1.0
    # negations are content: key [not, reimbursed] is not in [reimbursed]
    assert M.contains_answer("Fines are reimbursed.", "not reimbursed", "Are parking fines paid back?") == 0.0
    # Korean: [8, 일] less the question's morphemes [연차, 이월, 한도, 며칠] -> [8, 일], a run of
    # [최대, 8, 일, 이월, 수, 있] (the particle 까지 and the endings are dropped)
    assert M.answer_key("8일", "연차 이월 한도는 며칠인가요?") == ["8", "일"]
    assert M.contains_answer("최대 8일까지 이월할 수 있습니다.", "8일", "연차 이월 한도는 며칠인가요?") == 1.0


# --- retrieval ------------------------------------------------------------------------------------


def test_same_source_normalisation_and_suffix() -> None:
    assert M.same_source("./docs_v2\\leave.md", "docs_v2/leave.md")
    assert M.same_source("docs_v2/leave.md", "leave.md")
    assert not M.same_source("docs_v2/myleave.md", "leave.md")  # whole path components only
    assert not M.same_source("", "")


def test_recall_at_k() -> None:
    ranked = ["a.md", "b.md", "a.md", "c.md"]
    assert M.recall_at_k(ranked, ["a.md", "c.md"], k=2) == 0.5  # c.md is at position 4
    assert M.recall_at_k(ranked, ["a.md", "c.md"], k=4) == 1.0
    assert M.recall_at_k(ranked, ["a.md", "a.md"], k=1) == 1.0  # gold is a set
    assert M.recall_at_k(ranked, ["z.md"], k=4) == 0.0
    assert M.recall_at_k(ranked, [], k=4) is None


def test_mrr() -> None:
    assert M.mrr(["x.md", "y.md", "gold.md"], ["gold.md"]) == pytest.approx(1 / 3)
    assert M.mrr(["gold.md"], ["other.md", "gold.md"]) == 1.0
    assert M.mrr(["x.md"], ["gold.md"]) == 0.0
    assert M.mrr(["x.md"], []) is None


def test_ndcg_duplicates_gain_once() -> None:
    # ranked [a, a, b], gold {a, b}, k=3: gains 1, 0 (duplicate), 1
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3) = 1.6309
    expected = 1.5 / (1 + 1 / math.log2(3))
    assert M.ndcg_at_k(["a.md", "a.md", "b.md"], ["a.md", "b.md"], k=3) == pytest.approx(expected)
    # if duplicates counted, the same list would score DCG 1 + 0.6309 + 0.5 > IDCG: impossible > 1
    assert M.ndcg_at_k(["a.md", "a.md", "a.md"], ["a.md"], k=3) == 1.0
    # gold at position 2 only: (1/log2(3)) / 1
    assert M.ndcg_at_k(["x.md", "a.md"], ["a.md"], k=2) == pytest.approx(1 / math.log2(3))
    assert M.ndcg_at_k(["x.md", "a.md"], ["a.md"], k=1) == 0.0
    assert M.ndcg_at_k(["x.md"], [], k=3) is None


# --- citations and abstention -----------------------------------------------------------------------


def test_cited_numbers_formats() -> None:
    assert M.cited_numbers("Three days [1].") == {1}
    assert M.cited_numbers("See [2,3] and [2, 4].") == {2, 3, 4}
    assert M.cited_numbers("Both [1][2]; also [ 5 ; 6 ]") == {1, 2, 5, 6}
    assert M.cited_numbers("Range [7-9]") == {7, 8, 9}
    assert M.cited_numbers("not [x], not a link [3](http://x), none") == set()
    assert M.cited_numbers("") == set() and M.cited_numbers(None) == set()


def test_strip_citations() -> None:
    assert M.strip_citations("Fifteen days [1]. See [2,3] and [x](http://u) [4]") == "Fifteen days. See and [x](http://u)"
    assert M.strip_citations(None) == ""


def test_cited_sources_and_citation_accuracy() -> None:
    sources = [{"n": 1, "source": "docs/leave.md"}, {"n": 2, "source": "docs/travel.md"}]
    cited = M.cited_sources("Fifteen days [1][2], see also [9].", sources)
    assert cited == ["docs/leave.md", "docs/travel.md", None]  # [9] points at nothing
    # one of three citations is gold
    assert M.citation_accuracy(cited, ["leave.md"]) == pytest.approx(1 / 3)
    assert M.citation_accuracy(["docs/leave.md"], ["leave.md"]) == 1.0
    assert M.citation_accuracy([], ["leave.md"]) is None  # nothing cited: not judged
    assert M.citation_accuracy(["docs/leave.md"], []) is None
    # without "n", sources are numbered by position
    assert M.cited_sources("[2]", [{"source": "a.md"}, {"source": "b.md"}]) == ["b.md"]


def test_abstained() -> None:
    msg = "I could not find this in the documents."
    assert M.abstained("I could not find this in the documents. [1]", msg)
    assert M.abstained("Sorry, I can’t find that.", msg)  # curly apostrophe
    assert M.abstained("문서에서 찾을 수 없습니다.", msg)
    assert not M.abstained("Fifteen days of leave.", msg)
    assert not M.abstained("", msg)


# --- aggregation ------------------------------------------------------------------------------------


def test_percentile_and_mean_defined() -> None:
    assert M.percentile([1, 2, 3, 4], 50) == 2.5
    assert M.percentile([1, 2, 3, 4, None], 95) == pytest.approx(3.85)  # None skipped; rank 0.95*3 = 2.85 -> 3 + 0.85*(4-3)
    assert M.percentile([], 50) is None
    assert M.mean_defined([1.0, None, 0.0]) == 0.5
    assert M.mean_defined([None]) is None


def test_bootstrap_ci_constant_and_two_point() -> None:
    assert M.bootstrap_ci([0.7] * 10) == M.CI(0.7, 0.7, 0.7, 10)
    # [0, 1]: resampled means are 0, .5, 1 with prob 1/4, 1/2, 1/4 -> 2.5% and 97.5% quantiles 0 and 1
    ci = M.bootstrap_ci([0.0, 1.0], n=2000)
    assert (ci.mean, ci.low, ci.high, ci.n) == (0.5, 0.0, 1.0, 2)
    assert M.bootstrap_ci([None, None]) is None
    # deterministic for a seed
    vals = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert M.bootstrap_ci(vals, seed=3) == M.bootstrap_ci(vals, seed=3)
    ci = M.bootstrap_ci(vals)
    assert ci.low < 0.7 < ci.high and 0.0 <= ci.low and ci.high <= 1.0


def test_paired_bootstrap_diff_cancels_question_difficulty() -> None:
    # b is a shifted by 0.1 on every question: the paired difference is exactly 0.1
    a = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8]
    b = [x - 0.1 for x in a]
    d = M.bootstrap_diff_ci(a, b)
    assert d.mean == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    # the unpaired intervals overlap heavily, so only the paired test sees the difference
    ca, cb = M.bootstrap_ci(a), M.bootstrap_ci(b)
    assert ca.low < cb.high
    # None pairs are dropped: (1-0) and (1-1) remain -> mean 0.5
    assert M.bootstrap_diff_ci([1, None, 1], [0, 1, 1]).mean == 0.5
    with pytest.raises(ValueError, match="equal lengths"):
        M.bootstrap_diff_ci([1], [1, 2])
