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
import errno
import json
import os
import secrets
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
    return _replace_as_set(out, {
        "json": ("report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")),
        "png": ("report.png", png),
        "md": ("report.md", md.encode("utf-8")),
    })


def _replace_as_set(out: Path, files: Mapping[str, tuple[str, bytes]]) -> dict[str, Path]:
    """Write every file in full to a temp name in `out` (fsynced) and only then rename them over the old
    ones, one right after another: a failure or interruption while writing (a full disk, Ctrl-C) leaves
    the previous set as it was, never a new report.json beside an old report.md. A Ctrl-C that lands
    between the renames finishes them before it is raised."""
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.values():
            staged.append((_write_temp(out / name, data), out / name))
        for _, dst in staged:  # a rename onto a folder would fail midway through the set
            if dst.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a folder is where the report writes a file", str(dst))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        for tmp, dst in staged:
            os.replace(tmp, dst)
    except KeyboardInterrupt:  # the temps are complete: finish the set, then stop
        for tmp, dst in staged:
            if tmp.exists():
                os.replace(tmp, dst)
        raise
    except BaseException:  # a rename refused (a folder where a file goes): no temp files left behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out)
    return {key: out / name for key, (name, _) in files.items()}


def _write_temp(dst: Path, data: bytes) -> Path:
    """`data` in a new file beside `dst`, fsynced, with the mode `dst` has (or a plain open()'s)."""
    for _ in range(100):
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temp name beside {dst}")
    try:
        if dst.exists():
            os.fchmod(fd, dst.stat().st_mode & 0o7777)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (best effort: some file systems cannot open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
