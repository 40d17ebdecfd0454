"""report.md: the summary an eval run prints, rendered from the numbers of report.json.

    from ragtune.eval.report_markdown import human_seconds, render_markdown

    md = render_markdown(questions, runs, report, cost, k=4, meta={"model": "..."}, notes=[...])
    human_seconds(812.0)                       # "13.5 min"

Sections: the answer to "fine-tune or RAG?", adapters, quality, best mode per metric, paired
differences, speed, cost, groups and the questions on which the modes disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ragtune.eval.questions import Question
from ragtune.eval.report_numbers import MIN_N_CLEAR, SPEED_COLUMNS
from ragtune.eval.scoring import METRIC_KEYS, METRICS, AnswerRecord, Metric

if TYPE_CHECKING:
    from ragtune.eval.report import CostRow

MAX_CELL = 160


def _ci_cell(ci: Mapping[str, Any] | None) -> str:
    if not ci:
        return "–"
    return f"{100 * ci['mean']:.0f} [{100 * ci['low']:.0f}–{100 * ci['high']:.0f}]"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _cell(text: Any, limit: int = MAX_CELL) -> str:
    t = " ".join(str(text).split())
    if len(t) > limit:
        t = t[: limit - 1] + "…"
    return t.replace("|", "\\|") or "(empty)"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _label(m: Metric, k: int) -> str:
    return m.label.replace("@k", f"@{k}")


def render_markdown(
    questions: Sequence[Question],
    runs: Mapping[str, Sequence[AnswerRecord]],
    numbers: Mapping[str, Any],
    cost: Sequence[CostRow],
    *,
    k: int,
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """report.md: one section after another, each a function below."""
    modes = list(numbers["modes"])
    labels = {m.key: _label(m, k) for m in METRICS} | {key: label for key, label, _ in SPEED_COLUMNS}
    lines = _md_header(numbers, modes, meta)
    lines += _md_answer(numbers, cost)
    lines += _md_adapters(numbers.get("adapters") or [])
    lines += _md_quality(numbers["summary"], modes, k)
    lines += _md_best(numbers["best"], labels)
    lines += _md_diffs(numbers["diffs"], labels)
    lines += _md_speed(numbers["speed"], modes)
    lines += _md_cost(cost)
    lines += _md_groups(numbers["groups"], modes, labels)
    lines += _md_disagreements(questions, runs, numbers, modes)
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "Files: report.json (all numbers and every answer), report.png (chart).", ""]
    return "\n".join(lines)


def _md_header(numbers: Mapping[str, Any], modes: Sequence[str], meta: Mapping[str, Any] | None) -> list[str]:
    lines = ["# ragtune eval report", "",
             f"{numbers['n_questions']} questions ({numbers['n_unanswerable']} unanswerable), "
             f"modes: {', '.join(modes)}. Scores are percentages over the questions a metric applies to, "
             f"with 95% bootstrap intervals ({numbers['bootstrap']['resamples']} resamples) in brackets."]
    if meta:
        lines += ["", *[f"- {key}: {_cell(v, 300)}" for key, v in meta.items()]]
    return lines


def _paired(diffs: Sequence[Mapping[str, Any]], a: str, b: str, metric: str = "correct") -> dict[str, Any] | None:
    """The paired difference a − b of `metric` from the report's diffs (stored in one direction only)."""
    for d in diffs:
        if d["metric"] != metric:
            continue
        if (d["a"], d["b"]) == (a, b):
            return dict(d)
        if (d["a"], d["b"]) == (b, a):
            return {**d, "a": a, "b": b, "mean": -d["mean"], "low": -d["high"], "high": -d["low"]}
    return None


def _said(d: Mapping[str, Any] | None) -> str:
    """'+21 points [+11, +31]: clearly better' and the like, for the answer section."""
    if d is None:
        return "not measured"
    points = "point" if round(abs(100 * d["mean"])) == 1 else "points"
    cell = f"{100 * d['mean']:+.0f} {points} [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}]"
    if d["clear"] is None:
        return f"{cell}: too few questions to tell"
    if not d["clear"]:
        return f"{cell}: no clear difference (the interval includes 0)"
    return f"{cell}: clearly {'better' if d['mean'] > 0 else 'worse'}"


def _md_answer(numbers: Mapping[str, Any], cost: Sequence[CostRow]) -> list[str]:
    """The question the report exists for, answered from its own numbers: what retrieval adds, what
    each adapter adds with and without it, which answers went stale, and what keeping current costs."""
    from ragtune.eval.modes import adapter_of, uses_retrieval

    modes, summary, diffs = list(numbers["modes"]), numbers["summary"], numbers["diffs"]
    correct = {m: (summary.get(m) or {}).get("correct") for m in modes}
    if not any(correct.values()):
        return []
    lines = ["", "## Fine-tune or RAG? What these questions say", ""]
    best = numbers["best"].get("correct") or {}
    if best.get("mode"):
        top = correct[best["mode"]]
        line = f"- Most correct: **{' = '.join(best['ties'])}**, {100 * top['mean']:.0f}% [{100 * top['low']:.0f}–{100 * top['high']:.0f}]"
        if len(best["ties"]) == 1 and best.get("runner_up"):
            line += f"; against the next, {best['runner_up']}: {_said(_paired(diffs, best['mode'], best['runner_up']))}"
        lines.append(line + ".")
    if "base" in modes and "rag" in modes:
        lines.append(f"- Retrieval alone (rag − base): {_said(_paired(diffs, 'rag', 'base'))}.")
    for name in dict.fromkeys(a for a in (adapter_of(m) for m in modes) if a):
        if name in modes and "base" in modes:
            lines.append(f"- Adapter {name} without sources ({name} − base): {_said(_paired(diffs, name, 'base'))}.")
        if f"{name}+rag" in modes and "rag" in modes:
            lines.append(f"- Adapter {name} on top of retrieval ({name}+rag − rag): "
                         f"{_said(_paired(diffs, f'{name}+rag', 'rag'))}.")
    stale = {m: (summary.get(m) or {}).get("stale_answer") for m in modes}
    shown = [f"{m} {100 * v['mean']:.0f}%" for m, v in stale.items() if v and v.get("n")]
    if shown:
        n = next(v["n"] for v in stale.values() if v and v.get("n"))
        lines.append(f"- Old answers on the {n} question{'s' if n != 1 else ''} whose answer changed: {', '.join(shown)}.")
    keep = [c for c in cost if c.what.startswith("absorb a changed document") and c.seconds is not None]
    if keep:
        lines.append("- Keeping current after a document changes: "
                     + "; ".join(f"{c.what.split(': ', 1)[-1]} {human_seconds(c.seconds)}" for c in keep) + ".")
    rag_modes = [m for m in modes if uses_retrieval(m)]
    if rag_modes and len(modes) > 1:
        lines.append("- Reading it: a difference counts when its interval excludes 0. Retrieval is kept current "
                     "by a re-sync; an adapter by re-training. Add fine-tuning where an adapter+rag is clearly "
                     "ahead of rag and its training time is affordable at every update.")
    return lines


def _md_adapters(adapters: Sequence[Mapping[str, Any]]) -> list[str]:
    if not adapters:
        return []
    rows = [[_cell(a["name"]), _cell(a.get("path", "")), _cell(a.get("recipe", ""), 300)] for a in adapters]
    return ["", "## Adapters", "", *_table(["adapter", "folder", "training recipe (from its run card)"], rows)]


def _md_quality(summary: Mapping[str, Any], modes: Sequence[str], k: int) -> list[str]:
    rows = []
    for m in METRICS:
        if all(summary[mode][m.key] is None for mode in modes):
            continue
        n = max((summary[mode][m.key] or {}).get("n", 0) for mode in modes)
        rows.append([f"{_label(m, k)} ({'↑' if m.higher_is_better else '↓'})", str(n)]
                    + [_ci_cell(summary[mode][m.key]) for mode in modes])
    return ["", "## Quality", "", *_table(["metric", "n", *modes], rows)]


def _verdict(key: str, b: Mapping[str, Any]) -> str:
    if len(b["ties"]) > 1:
        return "tie"
    if b["runner_up"] is None:
        return f"only {b['mode']} measures this"
    if b["clear"] is None:
        return "–" if key not in METRIC_KEYS else f"too few questions to tell (n < {MIN_N_CLEAR})"
    if b["clear"]:
        return f"yes, ahead of {b['runner_up']} (paired CI excludes 0)"
    return f"no: within noise of {b['runner_up']}"


def _md_best(best: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    rows = [[labels.get(key, key), " = ".join(b["ties"]) if len(b["ties"]) > 1 else b["mode"], _verdict(key, b)]
            for key, b in best.items()]
    return ["", "## Best mode per metric", "", *_table(["metric", "best", "clear winner?"], rows)]


def _md_diffs(diffs: Sequence[Mapping[str, Any]], labels: Mapping[str, str]) -> list[str]:
    if not diffs:
        return []
    rows = []
    for d in diffs:
        if d["metric"] not in ("correct", "token_f1"):
            continue
        sig = " *" if d["clear"] else ""
        rows.append([labels[d["metric"]], f"{d['a']} − {d['b']}",
                     f"{100 * d['mean']:+.0f} [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}]{sig}", str(d["n"])])
    return ["", "## Paired differences (a − b, percentage points, 95% CI)", "",
            *_table(["metric", "modes", "difference", "n"], rows),
            "", f"`*`: the interval excludes 0 (and n ≥ {MIN_N_CLEAR}). Every metric's differences are in report.json."]


def _md_speed(speeds: Mapping[str, Any], modes: Sequence[str]) -> list[str]:
    rows = []
    for key, label, _ in SPEED_COLUMNS:
        if key == "mode_s":
            rows.append([label] + [human_seconds(speeds[mode].get(key)) for mode in modes])
            continue
        digits = 0 if "tokens" in key and "per_s" not in key else (1 if key == "tokens_per_s" else 2)
        rows.append([label] + [_num(speeds[mode][key], digits) for mode in modes])
    errors = [speeds[mode]["errors"] for mode in modes]
    if any(errors):
        rows.append(["failed answers"] + [str(e) for e in errors])
    return ["", "## Speed (measured here)", "", *_table(["", *modes], rows)]


def _md_cost(cost: Sequence[CostRow]) -> list[str]:
    if not cost:
        return []
    rows = [[_cell(c.what), human_seconds(c.seconds), _cell(c.detail, 300)] for c in cost]
    return ["", "## Cost (measured on this machine)", "", *_table(["what", "time", "how measured"], rows)]


def _md_groups(groups: Mapping[str, Any], modes: Sequence[str], labels: Mapping[str, str]) -> list[str]:
    lines: list[str] = []
    for gk, by_value in groups.items():
        rows = []
        for val, per_mode in by_value.items():
            for key in ("correct", "stale_answer"):
                cells = [per_mode[mode][key] for mode in modes]
                if all(c is None for c in cells):
                    continue
                n = max((c or {}).get("n", 0) for c in cells)
                rows.append([f"{gk}={val}", labels[key], str(n)] + [_ci_cell(c) for c in cells])
        lines += ["", f"## Questions by `{gk}`", "", *_table(["questions", "metric", "n", *modes], rows)]
    return lines


def _md_disagreements(questions: Sequence[Question], runs: Mapping[str, Sequence[AnswerRecord]],
                      numbers: Mapping[str, Any], modes: Sequence[str]) -> list[str]:
    ids = set(numbers["disagreements"])
    lines = ["", f"## Where the modes disagree ({len(ids)} of {numbers['n_questions']} questions)", ""]
    if not ids:
        return lines + ["Every mode got the same questions right."]
    lines += ["✓ = correct (contains the reference, or abstains on an unanswerable question).", ""]
    rows = []
    for i, q in enumerate(questions):
        if q.id not in ids:
            continue
        ref = q.answer if q.answerable else "(unanswerable: should abstain)"
        flags = [key for key, v in q.meta.items() if v is True]  # e.g. changed_in_v2
        head = f"**{_cell(q.id)}**{' (' + ', '.join(flags) + ')' if flags else ''}: {_cell(q.question)}"
        answers = []
        for mode in modes:
            r = runs[mode][i]
            mark = "✓" if r.scores.get("correct") else "✗"
            answers.append(f"{mark} {_cell(r.error and 'ERROR: ' + r.error or r.answer)}")
        rows.append([head, _cell(ref), *answers])
    return lines + _table(["question", "reference", *modes], rows)

