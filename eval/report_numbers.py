"""The numbers of an eval report: per-mode means with bootstrap CIs, speed, paired differences, the
best mode per metric, groups of questions and the questions on which modes disagree.

    from ragtune.eval.report_numbers import summarize

    numbers = summarize(questions, {"base": recs_base, "rag": recs_rag}, n_boot=1000, seed=0)
    numbers["summary"]["rag"]["correct"]      # {"mean", "low", "high", "n"} or None
    numbers["diffs"], numbers["best"], numbers["speed"], numbers["groups"], numbers["disagreements"]

`ragtune.eval.report.build_report` puts them into report.json.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from ragtune.eval import metrics as M
from ragtune.eval.questions import Question
from ragtune.eval.scoring import METRIC_KEYS, METRICS, AnswerRecord

DIFF_METRICS = ("correct", "token_f1", "rouge_l", "contains")
GROUP_STR_KEYS = ("lang", "group")  # string-valued question keys that also define groups
MIN_N_CLEAR = 5  # below this many paired questions no difference is called clear


def _ci_dict(ci: M.CI | None) -> dict[str, float | int] | None:
    return None if ci is None else {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n}


def _column(records: Sequence[AnswerRecord], key: str) -> list[float | None]:
    return [r.scores.get(key) for r in records]


def speed(records: Sequence[AnswerRecord]) -> dict[str, float | None]:
    """Latency percentiles per answer, generated tokens per second, tokens per answer."""
    ok = [r for r in records if not r.error]
    lat = [r.latency_s for r in ok]
    total_s = sum(lat)
    total_tokens = sum(r.completion_tokens for r in ok)
    return {
        "latency_p50_s": M.percentile(lat, 50),
        "latency_p95_s": M.percentile(lat, 95),
        "latency_mean_s": M.mean_defined(lat),
        "tokens_per_s": (total_tokens / total_s) if total_s > 0 else None,
        "prompt_tokens_mean": M.mean_defined([r.prompt_tokens for r in ok]),
        "completion_tokens_mean": M.mean_defined([r.completion_tokens for r in ok]),
        "errors": len(records) - len(ok),
        "n": len(records),
    }


SPEED_COLUMNS = (
    ("mode_s", "time for the mode", None),  # all its answers, start to end
    ("latency_p50_s", "latency p50 (s)", False),
    ("latency_p95_s", "latency p95 (s)", False),
    ("tokens_per_s", "tokens/s", True),
    ("prompt_tokens_mean", "prompt tokens/answer", False),
    ("completion_tokens_mean", "answer tokens", None),  # neither better nor worse
)


def _clear(ci: M.CI | None) -> bool | None:
    """Whether a paired difference is clear of noise: its CI excludes 0 (None: too few questions)."""
    if ci is None or ci.n < MIN_N_CLEAR:
        return None
    return bool(ci.low > 0 or ci.high < 0)


def _group_keys(questions: Sequence[Question]) -> list[str]:
    keys: list[str] = []
    for q in questions:
        for k, v in q.meta.items():
            if k not in keys and (v is True or (k in GROUP_STR_KEYS and isinstance(v, str))):
                keys.append(k)
    return keys


def summarize(
    questions: Sequence[Question],
    runs: Mapping[str, Sequence[AnswerRecord]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    mode_seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """All the numbers of a report (JSON-able), without the per-answer detail. `mode_seconds`: the
    wall clock each mode took, start to end (else the sum of its answers' latencies)."""
    modes = list(runs)
    ids = [q.id for q in questions]
    for mode, recs in runs.items():
        got = [r.question_id for r in recs]
        if got != ids:
            raise ValueError(f"mode '{mode}': records must follow the questions one to one, in order")
    summary = {
        mode: {key: _ci_dict(M.bootstrap_ci(_column(recs, key), n=n_boot, seed=seed)) for key in METRIC_KEYS}
        for mode, recs in runs.items()
    }
    diffs = []
    for key in DIFF_METRICS:
        for b, a in itertools.combinations(modes, 2):  # later mode minus earlier: "rag − base"
            ci = M.bootstrap_diff_ci(_column(runs[a], key), _column(runs[b], key), n=n_boot, seed=seed)
            if ci is not None:
                diffs.append({"metric": key, "a": a, "b": b, **_ci_dict(ci), "clear": _clear(ci)})
    best = {}
    for m in METRICS:
        scored = [(summary[mode][m.key]["mean"], mode) for mode in modes if summary[mode][m.key]]
        if not scored:
            continue
        scored.sort(reverse=m.higher_is_better)
        top = scored[0][1]
        clear = None
        if len(scored) > 1:
            ci = M.bootstrap_diff_ci(_column(runs[top], m.key), _column(runs[scored[1][1]], m.key), n=n_boot, seed=seed)
            clear = _clear(ci)
        ties = [mode for mean, mode in scored if abs(mean - scored[0][0]) < 1e-12]
        best[m.key] = {"mode": top, "ties": ties, "runner_up": scored[1][1] if len(scored) > 1 else None,
                       "clear": clear}
    speeds = {mode: speed(recs) for mode, recs in runs.items()}
    for mode, recs in runs.items():
        total = (mode_seconds or {}).get(mode)
        speeds[mode]["mode_s"] = float(total) if total is not None else sum(r.latency_s for r in recs)
    for key, _label, higher in SPEED_COLUMNS:
        if higher is None:
            continue
        vals = [(speeds[mode][key], mode) for mode in modes if speeds[mode][key] is not None]
        if vals:
            vals.sort(reverse=higher)
            best[key] = {"mode": vals[0][1], "ties": [mo for v, mo in vals if v == vals[0][0]],
                         "runner_up": vals[1][1] if len(vals) > 1 else None, "clear": None}
    groups: dict[str, Any] = {}
    for gk in _group_keys(questions):
        values = sorted({str(q.meta[gk]) for q in questions if gk in q.meta and q.meta[gk] is not False})
        groups[gk] = {}
        for val in values:
            idx = [i for i, q in enumerate(questions) if gk in q.meta and str(q.meta[gk]) == val]
            groups[gk][val] = {
                mode: {key: _ci_dict(M.bootstrap_ci([_column(recs, key)[i] for i in idx], n=n_boot, seed=seed))
                       for key in ("correct", "token_f1", "stale_answer")}
                for mode, recs in runs.items()
            }
    return {
        "modes": modes,
        "n_questions": len(questions),
        "n_unanswerable": sum(not q.answerable for q in questions),
        "bootstrap": {"resamples": n_boot, "seed": seed, "confidence": 0.95},
        "summary": summary,
        "speed": speeds,
        "diffs": diffs,
        "best": best,
        "groups": groups,
        "disagreements": disagreements(questions, runs),
    }


def disagreements(questions: Sequence[Question], runs: Mapping[str, Sequence[AnswerRecord]]) -> list[str]:
    """Ids of the questions that some modes get right and others wrong (by `correct`)."""
    out = []
    for i, q in enumerate(questions):
        verdicts = {recs[i].scores.get("correct") for recs in runs.values()}
        if len(verdicts - {None}) > 1:
            out.append(q.id)
    return out
