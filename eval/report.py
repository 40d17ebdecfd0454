"""report.json, report.md and report.png from scored answers of several modes, plus a cost table.

    paths = write_report("runs/eval", questions, {"base": recs_base, "rag": recs_rag, ...},
                         cost=[CostRow("train (LoRA, 5 epochs)", 812.0, "run card metrics.wall_seconds")],
                         k=4, meta={"model": "...", "index": "policies"})

Input: `runs` maps a mode name to one AnswerRecord per question (same order as `questions`);
`cost` is a list of CostRow measured on this machine. Output, replaced as a set (all three written to
temp names first, then renamed in one after another):

* report.json -- everything: per-mode means with bootstrap CIs, speed, groups, paired
  differences, best mode per metric, the cost table and every answer;
* report.md   -- summary table with CIs, best mode per metric, paired differences, speed, cost,
  groups (e.g. questions whose answer changed), and the questions on which modes disagree;
* report.png  -- bar chart of the answer metrics per mode (95% CI error bars) and latency.

The parts: `ragtune.eval.report_numbers` (summarize: every number), `ragtune.eval.report_markdown`
(render_markdown, human_seconds) and `ragtune.eval.report_chart` (render_chart); every name above can
be imported from this module.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ragtune.eval.questions import Question
from ragtune.eval.report_chart import CHART_METRICS, render_chart
from ragtune.eval.report_markdown import MAX_CELL, _label, human_seconds, render_markdown
from ragtune.eval.report_numbers import (
    DIFF_METRICS,
    GROUP_STR_KEYS,
    MIN_N_CLEAR,
    SPEED_COLUMNS,
    disagreements,
    speed,
    summarize,
)
from ragtune.eval.scoring import METRICS, AnswerRecord
from ragtune.io import atomic_write_set

__all__ = [
    "CHART_METRICS", "DIFF_METRICS", "GROUP_STR_KEYS", "MAX_CELL", "MIN_N_CLEAR", "SCHEMA_VERSION", "SPEED_COLUMNS",
    "CostRow", "build_report", "disagreements", "human_seconds", "render_chart", "render_markdown", "speed",
    "summarize", "write_report",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CostRow:
    """One measured cost: what was done, how long it took here, and where the number comes from."""

    what: str
    seconds: float | None
    detail: str = ""


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
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "png": out / "report.png", "md": out / "report.md"}
    atomic_write_set({  # replaced as a set: never a new report.json beside an old report.md
        paths["json"]: (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        paths["png"]: png,
        paths["md"]: md.encode("utf-8"),
    })
    return paths
