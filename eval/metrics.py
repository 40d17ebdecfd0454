"""Answer, retrieval, citation, abstention and latency metrics, plus bootstrap intervals.

    from ragtune.eval import metrics as M
    M.token_f1("서울은 한국의 수도이다", "서울이 수도")      # 0.8 (morphemes, particles dropped)
    M.bootstrap_diff_ci(f1_rag, f1_base)                 # paired: CI(mean, low, high)

Pure functions over strings, lists and numbers (numpy only). Answers are compared as token
lists after `normalize_tokens`:

* NFKC, lowercase; thousands separators inside numbers removed ("1,500" -> "1500").
* Text outside Hangul becomes word tokens: runs of digits (with decimals, "2.5") and runs of
  letters; punctuation and the English articles a/an/the are dropped (as SQuAD does).
* When the text contains Hangul it is analysed with Kiwi (ragtune.korean: the
  one analyzer and Hangul rule the lexical index uses too): each Hangul
  morpheme is kept by its form, except grammatical ones that carry no content of their own:
  particles (J*), endings (E*), the copula 이다 (VCP) and the verb/adjective-forming suffixes
  하다 (XSV/XSA). So "서울은", "서울이" and "서울" all become ["서울"]. Non-Hangul tokens in that
  text go through the same word rule as above, so mixed text matches plain text.

`contains_answer` (the `correct` and `contains` metrics of every mode) also accepts an answer
that leaves out the words its question already states: "3" is right for "How many days per
week can I work remotely?" when the reference is "3 days per week".

Retrieval metrics take a ranked list of source paths (one per retrieved chunk, so a document
can appear several times) and the set of gold source paths:

* k counts positions in the ranked list (the chunks the model actually sees);
* a document counts once, at its first (best) position; later duplicates gain nothing and
  are not "misses" either (they still take up a position, as in the context window);
* paths match when equal after normalisation ("./a\\b.md" == "a/b.md") or when one is a
  path-suffix of the other ("docs_v2/leave.md" matches gold "leave.md"), because gold
  sources are written relative to the docs folder while an index may record a longer root.

Functions whose value is undefined for an input (no gold sources, no citations, no
unanswerable questions) return None; aggregate with `mean_defined`/`bootstrap_ci`, which skip
None, and report how many values were defined.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from ragtune.korean import has_hangul, kiwi

# --- normalisation and tokens --------------------------------------------------------------------

ARTICLES = frozenset({"a", "an", "the"})
# Glue words an answer may word differently ("3 days a week" for "3 days per week"): ignored by
# `contains_answer` only. Never negations or quantities ("not", "no", "only", "more", "least").
FUNCTION_WORDS = frozenset({"per", "to", "of", "in", "on", "at", "for", "by", "from", "up", "each", "every"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORD = re.compile(r"\d+(?:\.\d+)*|[^\W\d_]+")
# Kiwi tags of Hangul morphemes that are grammar, not content.
_DROP_TAG_PREFIXES = ("J", "E")
_DROP_TAGS = frozenset({"VCP", "XSV", "XSA"})


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text) if w not in ARTICLES]


@functools.lru_cache(maxsize=65536)
def _tokens_cached(text: str) -> tuple[str, ...]:
    text = _THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower())
    if not has_hangul(text):
        return tuple(_words(text))
    out: list[str] = []
    for tok in kiwi().tokenize(text):
        surface = text[tok.start : tok.start + tok.len]
        if has_hangul(tok.form) or has_hangul(surface):
            if tok.tag.startswith(_DROP_TAG_PREFIXES) or tok.tag in _DROP_TAGS:
                continue
            out.append(tok.form)
        else:
            out.extend(_words(surface))
    return tuple(out)


def normalize_tokens(text: str | None) -> list[str]:
    """Content tokens of `text` (see the module docstring for the rules)."""
    if not text:
        return []
    return list(_tokens_cached(str(text)))


# --- answers --------------------------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised token sequences are identical (both empty counts as a match)."""
    return float(normalize_tokens(prediction) == normalize_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of token multisets. Both empty -> 1.0; one empty -> 0.0."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)), one row of memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure over normalised tokens: LCS-based precision and recall, weighted by beta."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def _has_run(seq: Sequence[str], run: Sequence[str]) -> bool:
    n = len(run)
    return 0 < n <= len(seq) and any(list(seq[i : i + n]) == list(run) for i in range(len(seq) - n + 1))


def contains_reference(prediction: str, reference: str) -> float:
    """1.0 when the reference's token sequence appears contiguously in the prediction's.

    An empty reference contains nothing (0.0), so a blank reference never scores as correct.
    """
    return float(_has_run(normalize_tokens(prediction), normalize_tokens(reference)))


def content_tokens(text: str | None) -> list[str]:
    """`normalize_tokens` without FUNCTION_WORDS ("3 days per week" -> [3, days, week])."""
    return [t for t in normalize_tokens(text) if t not in FUNCTION_WORDS]


def answer_key(reference: str, question: str = "") -> list[str]:
    """The part of the reference an answer must state: its content tokens, less those the
    question already states ("3 days per week" asked as "How many days per week ...?" -> [3])."""
    asked = set(normalize_tokens(question))
    return [t for t in content_tokens(reference) if t not in asked]


def contains_answer(prediction: str, reference: str, question: str = "") -> float:
    """1.0 when the prediction contains the reference (`contains_reference`) or, failing that, the
    reference's key (`answer_key`) as a contiguous run of the prediction's content tokens.

    So a short answer that leaves out what the question says is right ("3" to "How many days per
    week can I work remotely?" with reference "3 days per week"), and so is one that words the
    reference's glue differently ("3 days a week", "10:00-15:00" for "10:00 to 15:00"). A key
    that is empty (the question states the whole reference) never matches: the answer must then
    contain the reference itself. The rule is the same for every mode and for old answers.
    """
    if contains_reference(prediction, reference):
        return 1.0
    return float(_has_run(content_tokens(prediction), answer_key(reference, question)))


# --- retrieval ------------------------------------------------------------------------------------


def normalize_source(path: str) -> str:
    p = str(path).strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return re.sub(r"/+", "/", p).strip("/")


def same_source(a: str, b: str) -> bool:
    """Equal after normalisation, or one is a whole-component path suffix of the other."""
    a, b = normalize_source(a), normalize_source(b)
    if not a or not b:
        return False
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def _gold_hits(ranked: Sequence[str], gold: Iterable[str]) -> list[int]:
    """For each ranked position: index of the gold doc it newly covers, or -1 (miss/duplicate)."""
    gold = [g for g in gold if normalize_source(g)]
    seen: set[int] = set()
    out = []
    for src in ranked:
        hit = next((i for i, g in enumerate(gold) if same_source(src, g)), -1)
        if hit in seen:
            hit = -1
        elif hit >= 0:
            seen.add(hit)
        out.append(hit)
    return out


def recall_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float | None:
    """Share of gold documents found in the first k positions; None without gold sources."""
    gold = list(dict.fromkeys(normalize_source(g) for g in gold if normalize_source(g)))
    if not gold:
        return None
    hits = _gold_hits(list(ranked)[:k], gold)
    return sum(h >= 0 for h in hits) / len(gold)


def mrr(ranked: Sequence[str], gold: Iterable[str]) -> float | None:
    """1 / position of the first gold document (0.0 if none is retrieved); None without gold."""
    gold = [g for g in gold if normalize_source(g)]
    if not gold:
        return None
    for i, src in enumerate(ranked, 1):
        if any(same_source(src, g) for g in gold):
            return 1.0 / i
    return 0.0


def ndcg_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float | None:
    """Binary-relevance nDCG@k; a gold document gains only at its first position; None without gold."""
    gold = list(dict.fromkeys(normalize_source(g) for g in gold if normalize_source(g)))
    if not gold:
        return None
    hits = _gold_hits(list(ranked)[:k], gold)
    dcg = sum(1.0 / math.log2(i + 2) for i, h in enumerate(hits) if h >= 0)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), k)))
    return dcg / ideal if ideal else 0.0


# --- citations and abstention -----------------------------------------------------------------------

_CITE = re.compile(r"\[\s*(\d+(?:\s*(?:,|;|-|–)\s*\d+)*)\s*\](?!\()")
_MAX_RANGE = 50


def cited_numbers(text: str | None) -> set[int]:
    """Source numbers cited as [1], [2,3], [2; 3], [1][2] or [1-3]; not markdown links [1](url)."""
    out: set[int] = set()
    for m in _CITE.finditer(text or ""):
        for part in re.split(r"[,;]", m.group(1)):
            ends = [int(x) for x in re.split(r"[-–]", part)]
            if len(ends) == 1:
                out.add(ends[0])
            elif len(ends) == 2 and ends[0] <= ends[1] and ends[1] - ends[0] <= _MAX_RANGE:
                out.update(range(ends[0], ends[1] + 1))
    return out


def strip_citations(text: str | None) -> str:
    """The text without its [n] citation markers, so citing does not cost answer-metric points."""
    bare = re.sub(r"[ \t]+", " ", _CITE.sub("", text or ""))
    return re.sub(r" ([.,;:!?])", r"\1", bare).strip()


def cited_sources(text: str | None, sources: Sequence[dict[str, Any]]) -> list[str | None]:
    """Map the numbers cited in `text` to source paths via each source's "n" (1-based by position
    when "n" is absent). A number with no such source maps to None: a citation to nothing."""
    by_n = {int(s.get("n", i)): str(s.get("source", "")) for i, s in enumerate(sources, 1)}
    return [by_n.get(n) for n in sorted(cited_numbers(text))]


def citation_accuracy(cited: Sequence[str | None], gold: Iterable[str]) -> float | None:
    """Share of cited sources that are gold sources (None entries count as wrong).

    None when nothing was cited or there are no gold sources: the answer cannot be judged.
    """
    gold = [g for g in gold if normalize_source(g)]
    if not cited or not gold:
        return None
    good = sum(1 for c in cited if c is not None and any(same_source(c, g) for g in gold))
    return good / len(cited)


ABSTAIN_PATTERNS = (
    "could not find",
    "couldn't find",
    "cannot find",
    "can't find",
    "not found in the documents",
    "no information",
    "찾을 수 없",
    "찾지 못",
)


def abstained(text: str | None, not_found_message: str = "", patterns: Sequence[str] = ABSTAIN_PATTERNS) -> bool:
    """True when the answer declines: it contains the not-found message (as tokens) or a known
    phrase of refusal ("could not find", "찾을 수 없"...)."""
    if not text:
        return False
    if not_found_message and contains_reference(text, not_found_message):
        return True
    low = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    return any(p in low for p in patterns)


# --- aggregation ------------------------------------------------------------------------------------


def _defined(values: Iterable[float | None]) -> np.ndarray:
    arr = np.array([float(v) for v in values if v is not None], dtype=float)
    return arr[~np.isnan(arr)]


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None/NaN; None when there are none."""
    arr = _defined(values)
    return float(arr.mean()) if arr.size else None


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """q-th percentile (0-100, linear interpolation between closest ranks); None when empty."""
    arr = _defined(values)
    return float(np.percentile(arr, q)) if arr.size else None


class CI(NamedTuple):
    """A point estimate with a (1 - alpha) percentile-bootstrap interval, and how many values."""

    mean: float
    low: float
    high: float
    n: int


def _bootstrap(values: np.ndarray, n: int, seed: int, alpha: float,
               stat: Callable[[np.ndarray], np.ndarray]) -> CI:
    m = values.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, size=(n, m))
    stats = stat(values[idx])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    point = float(stat(values[None, :])[0])
    return CI(point, float(low), float(high), int(m))


def _mean_rows(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def bootstrap_ci(values: Iterable[float | None], n: int = 1000, seed: int = 0, alpha: float = 0.05) -> CI | None:
    """Mean and percentile-bootstrap CI over questions (None values skipped); None when empty."""
    arr = _defined(values)
    if not arr.size:
        return None
    return _bootstrap(arr, n, seed, alpha, _mean_rows)


def bootstrap_diff_ci(a: Sequence[float | None], b: Sequence[float | None], n: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> CI | None:
    """Mean of a - b with a paired bootstrap CI: the same questions are resampled for both modes,
    so question difficulty cancels. Pairs where either value is None are skipped."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    arr = _defined(diffs)
    if not arr.size:
        return None
    return _bootstrap(arr, n, seed, alpha, _mean_rows)
