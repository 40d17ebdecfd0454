"""report.json, report.md and report.png from scored answers of several modes, plus a cost table.

    paths = write_report("runs/eval", questions, {"base": recs_base, "rag": recs_rag, ...},
                         cost=[CostRow("train (LoRA, 5 epochs)", 812.0, "run card metrics.wall_seconds")],
                         k=4, meta={"model": "...", "index": "policies"})

Input: `runs` maps a mode name to one AnswerRecord per question (same order as `questions`);
`cost` is a list of CostRow measured on this machine. Output, each written atomically:

* report.json -- everything: per-mode means with bootstrap CIs, speed, groups, paired
  differences, best mode per metric, the cost table and every answer;
* report.md   -- summary table with CIs, best mode per metric, paired differences, speed, cost,
  groups (e.g. questions whose answer changed), and the questions on which modes disagree;
* report.png  -- bar chart of the answer metrics per mode (95% CI error bars) and latency.
"""

from __future__ import annotations

import datetime as _dt
import io
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ragtune.eval import metrics as M
from ragtune.eval.questions import Question
from ragtune.eval.scoring import METRIC_KEYS, METRICS, AnswerRecord, Metric
from ragtune.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
DIFF_METRICS = ("correct", "token_f1", "rouge_l", "contains")
CHART_METRICS = ("correct", "exact_match", "token_f1", "rouge_l", "contains", "recall_at_k", "citation_accuracy")
GROUP_STR_KEYS = ("lang", "group")  # string-valued question keys that also define groups
MAX_CELL = 160
MIN_N_CLEAR = 5  # below this many paired questions no difference is called clear


@dataclass(frozen=True)
class CostRow:
    """One measured cost: what was done, how long it took here, and where the number comes from."""

    what: str
    seconds: float | None
    detail: str = ""


# --- numbers ------------------------------------------------------------------------------------


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


# --- markdown -----------------------------------------------------------------------------------


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


# --- chart --------------------------------------------------------------------------------------


def render_chart(numbers: Mapping[str, Any], *, k: int) -> bytes:
    """PNG bytes: grouped bars of answer metrics per mode with CI whiskers, and latency per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(numbers["modes"])
    summary = numbers["summary"]
    labels = {m.key: _label(m, k) for m in METRICS}
    keys = [key for key in CHART_METRICS if any(summary[mode][key] for mode in modes)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(modes), 1)
    x = np.arange(len(keys))
    for j, mode in enumerate(modes):
        cis = [summary[mode][key] for key in keys]
        means = [100 * c["mean"] if c else np.nan for c in cis]  # n/a (no retrieval): no bar
        err = np.array([[100 * (c["mean"] - c["low"]) if c else 0.0 for c in cis],
                        [100 * (c["high"] - c["mean"]) if c else 0.0 for c in cis]])
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=mode)
    ax.set_xticks(x, [labels[key] for key in keys], rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_title(f"Answer quality, {numbers['n_questions']} questions")
    ax.legend(fontsize="small")
    p50 = [numbers["speed"][mode]["latency_p50_s"] or 0.0 for mode in modes]
    p95 = [numbers["speed"][mode]["latency_p95_s"] or 0.0 for mode in modes]
    xm = np.arange(len(modes))
    ax2.bar(xm - 0.2, p50, 0.4, label="p50", color="#555555")
    ax2.bar(xm + 0.2, p95, 0.4, label="p95", color="#aaaaaa")
    ax2.set_xticks(xm, modes, rotation=20, ha="right")
    ax2.set_ylabel("seconds per answer")
    ax2.set_title("Latency")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- writing ------------------------------------------------------------------------------------


def build_report(
    questions: Sequence[Question],
    runs: Mapping[str, Sequence[AnswerRecord]],
    cost: Sequence[CostRow] = (),
    *,
    k: int,
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
    mode_seconds: Mapping[str, float] | None = None,
    adapters: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The report.json object. `adapters`: {"name", "path", "recipe", ...} of each adapter a mode used."""
    numbers = summarize(questions, runs, n_boot=n_boot, seed=seed, mode_seconds=mode_seconds)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "adapters": [dict(a) for a in adapters],
        "k": k,
        "metrics": {m.key: {"label": _label(m, k), "higher_is_better": m.higher_is_better, "help": m.help}
                    for m in METRICS},
        **numbers,
        "cost": [asdict(c) for c in cost],
        "notes": list(notes),
        "questions": [
            {"id": q.id, "question": q.question, "reference": q.answer, "answerable": q.answerable,
             "gold_sources": list(q.sources), "meta": q.meta,
             "answers": {mode: runs[mode][i].to_dict() for mode in runs}}
            for i, q in enumerate(questions)
        ],
    }


def write_report(
    out_dir: str | Path,
    questions: Sequence[Question],
    runs: Mapping[str, Sequence[AnswerRecord]],
    cost: Sequence[CostRow] = (),
    **options: Any,
) -> dict[str, Path]:
    """Write report.json, report.md and report.png into `out_dir`; return their paths. `options` are
    build_report's (k, meta, notes, n_boot, seed, mode_seconds, adapters)."""
    if not runs:
        raise ValueError("no modes to report")
    out = Path(out_dir)
    report = build_report(questions, runs, cost, **options)
    k = options["k"]
    md = render_markdown(questions, runs, report, cost, k=k, meta=options.get("meta"), notes=options.get("notes", ()))
    png = render_chart(report, k=k)
    paths = {
        "json": atomic_write_json(out / "report.json", report),
        "png": atomic_write_bytes(out / "report.png", png),
        "md": atomic_write_text(out / "report.md", md),
    }
    return paths
