"""One answer, scored: the per-question record that `ragtune eval` collects for every mode.

    rec = score_answer(q, text, sources, not_found_message=cfg.rag.not_found_message, k=4,
                       latency_s=0.8, prompt_tokens=412, completion_tokens=21)

`AnswerRecord.scores` maps a metric name (see METRICS) to a float in [0, 1] or None where the
metric does not apply to this question (answer metrics on an unanswerable question, retrieval
metrics without gold sources or without retrieval, citation accuracy without citations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ragtune.eval import metrics as M
from ragtune.eval.questions import Question


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    help: str = ""


# Per-question metrics, in report order. `correct` is the headline: for an answerable question
# the answer contains the reference and does not abstain; for an unanswerable one it abstains.
METRICS: tuple[Metric, ...] = (
    Metric("correct", "correct", True, "answerable: contains the reference (words the question states may be "
           "left out) and does not abstain; unanswerable: abstains"),
    Metric("exact_match", "exact match", True, "normalised tokens identical to the reference"),
    Metric("token_f1", "token F1", True, "token overlap F1 (Korean by morphemes)"),
    Metric("rouge_l", "ROUGE-L", True, "longest-common-subsequence F-measure"),
    Metric("contains", "contains ref.", True, "the reference's tokens appear, in order, in the answer; "
           "words the question already states may be left out"),
    Metric("recall_at_k", "recall@k", True, "share of gold documents among the top k retrieved"),
    Metric("mrr", "MRR", True, "1 / rank of the first gold document"),
    Metric("ndcg_at_k", "nDCG@k", True, "binary-relevance nDCG over the top k"),
    Metric("citation_accuracy", "citation acc.", True, "share of cited sources that are gold"),
    Metric("abstention", "abstains when unanswerable", True, "on unanswerable questions"),
    Metric("false_abstention", "abstains when answerable", False, "on answerable questions"),
    Metric("stale_answer", "gives the old answer", False, "questions with an old_answer: it contains it "
           "(the same rule as contains ref.)"),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


@dataclass
class AnswerRecord:
    """What one mode did with one question."""

    question_id: str
    answer: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # {"n","source","title","page","heading","score","text"}
    abstained: bool = False
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: dict[str, float | None] = field(default_factory=dict)
    cited: list[int] = field(default_factory=list)
    error: str = ""  # set when answering failed; the scores are then those of an empty answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnswerRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def _ranked_source(hit: dict[str, Any], gold: Sequence[str]) -> str:
    """The document a hit stands for in the retrieval metrics: a gold one among the copies of its text that
    search.dedupe folded into it (`duplicates`), else its own."""
    names = [str(hit.get("source", ""))] + [str(d.get("source", "")) for d in hit.get("duplicates") or []]
    return next((n for n in names if any(M.same_source(n, g) for g in gold)), names[0])


def score_answer(
    q: Question,
    text: str,
    sources: Sequence[dict[str, Any]] = (),
    *,
    retrieved: Sequence[dict[str, Any]] | None = None,
    not_found_message: str,
    k: int,
    latency_s: float = 0.0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    abstained: bool | None = None,
    error: str = "",
) -> AnswerRecord:
    """Score `text` (and the sources it was given) against question `q`.

    `sources` are the numbered sources the answer was given (its [n] citations refer to them);
    `retrieved` is the ranked list the retriever returned, when it differs from `sources` (the
    generator drops the hits when it abstains): retrieval metrics use it, else `sources`.
    `abstained` is the generator's own verdict (it declined before generating because retrieval
    was below threshold); the text is checked for a refusal as well.
    """
    text = text or ""
    did_abstain = bool(abstained) or M.abstained(text, not_found_message)
    s: dict[str, float | None] = {key: None for key in METRIC_KEYS}
    if q.answerable:
        ref, bare = q.answer, M.strip_citations(text)  # "[1]" is not part of the answer
        s["exact_match"] = M.exact_match(bare, ref)
        s["token_f1"] = M.token_f1(bare, ref)
        s["rouge_l"] = M.rouge_l(bare, ref)
        s["contains"] = M.contains_answer(bare, ref, q.question)
        s["correct"] = float(bool(s["contains"]) and not did_abstain)
        s["false_abstention"] = float(did_abstain)
        old = q.meta.get("old_answer")
        if isinstance(old, str) and old.strip():
            s["stale_answer"] = M.contains_answer(bare, old, q.question)
    else:
        s["abstention"] = float(did_abstain)
        s["correct"] = float(did_abstain)
    hits = sources if retrieved is None else retrieved
    if hits and q.sources:
        ranked = [_ranked_source(x, q.sources) for x in hits]
        s["recall_at_k"] = M.recall_at_k(ranked, q.sources, k)
        s["mrr"] = M.mrr(ranked, q.sources)
        s["ndcg_at_k"] = M.ndcg_at_k(ranked, q.sources, k)
    if sources:
        s["citation_accuracy"] = M.citation_accuracy(M.cited_sources(text, sources), q.sources)
    return AnswerRecord(
        question_id=q.id,
        answer=text,
        sources=[dict(x) for x in sources],
        abstained=did_abstain,
        latency_s=float(latency_s),
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        scores=s,
        cited=sorted(M.cited_numbers(text)),
        error=error,
    )
