"""Measured costs for the eval report: training, indexing, absorbing a change, answering.

    rows = training_cost("runs/adapter", name="plain")     # from the run card ragtune.json
    rows += load_cost_file("runs/sync-v2.json")            # saved `ragtune index sync --json` output
    with Timer() as t: do_something(); t.seconds

Every number comes from a measurement on this machine: a run card's `metrics.wall_seconds`, an
`index add/sync --json` result's `seconds`, or a timer around the work. The one derived row, the
re-train that absorbing a change takes, is the training time and says so. The row's `detail`
says where its number came from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from ragtune.errors import UsageError
from ragtune.eval.report import CostRow

T = TypeVar("T")


class Timer:
    """`with Timer() as t: ...` then `t.seconds` (wall clock, perf_counter)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Call fn and return (its result, wall seconds)."""
    with Timer() as t:
        out = fn(*args, **kwargs)
    return out, t.seconds


def _number(value: Any, where: str, key: str, *, integer: bool = False) -> float:
    """A measured count or number of seconds from a JSON file, or a UsageError naming the file and key."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value < 0:
        kind = "a whole number of 0 or more" if integer else "a number of seconds, 0 or more"
        raise UsageError(f"{where}: key '{key}': expected {kind} as a JSON number (e.g. {7 if integer else 12.5}), "
                         f"got {value!r}")
    return float(value)


def _row_seconds(row: dict[str, Any], path: Path, i: int) -> float | None:
    return None if row["seconds"] is None else _number(row["seconds"], f"{path}, row {i}", "seconds")


def training_cost(adapter_dir: str | Path, name: str = "") -> list[CostRow]:
    """Training wall time from the adapter's run card, and what absorbing a change costs it (a re-train)."""
    from ragtune.runcard import read_runcard

    card = read_runcard(adapter_dir)
    return _runcard_rows(card, f"{adapter_dir}/ragtune.json", name)


def _runcard_rows(card: dict[str, Any], where: str, name: str = "") -> list[CostRow]:
    metrics = card.get("metrics") or {}
    secs = metrics.get("wall_seconds")
    if secs is None:
        raise UsageError(f"{where}: run card has no metrics.wall_seconds; was the adapter trained by 'ragtune train'?")
    secs = _number(secs, where, "metrics.wall_seconds")
    data = card.get("data") or {}
    train_cfg = (card.get("config") or {}).get("train") or {}
    device = (card.get("training") or {}).get("device", "")
    parts = []
    if data.get("train_records"):
        parts.append(f"{data['train_records']} records")
    if metrics.get("train_tokens"):
        parts.append(f"{metrics['train_tokens']:,} tokens")
    if train_cfg.get("max_steps", -1) and train_cfg.get("max_steps", -1) > 0:
        parts.append(f"{train_cfg['max_steps']} steps")
    elif train_cfg.get("epochs"):
        parts.append(f"{train_cfg['epochs']:g} epochs")
    if device:
        parts.append(device)
    who = f" of adapter '{name}'" if name else ""
    how = " on retrieval-built prompts" if card.get("rag") else ""
    what = f"train: LoRA fine-tune{who}{how}" + (f" ({', '.join(parts)})" if parts else "")
    return [
        CostRow(what, secs, f"measured: metrics.wall_seconds in {where}"),
        CostRow(f"absorb a changed document: re-train {f'adapter {name!r}' if name else 'the adapter'} "
                "(= its training time, not measured)", secs,
                "not measured: the training time above, which a re-train with the same data and settings repeats; "
                "until then the fine-tuned model answers from what it learned"),
    ]


def ingest_cost(result: dict[str, Any], where: str = "") -> CostRow:
    """One row from `ragtune index add/sync --json` output (an IngestResult dict)."""
    if "seconds" not in result:
        raise UsageError(f"{where or 'ingest result'}: no 'seconds' key; save the output of 'ragtune index sync --json'")
    src = f" in {where}" if where else ""
    where = where or "ingest result"
    seconds = _number(result["seconds"], where, "seconds")
    changed = len(result.get("replaced") or [])
    reread = len(result.get("reread") or [])  # unchanged files read again by a newer reader
    added = len(result.get("added") or [])  # new files only: replaced and re-read ones are listed apart
    deleted = len(result.get("deleted") or [])
    # chunks_reused: written with the vector their unchanged text had
    kept = int(_number(result.get("chunks_reused") or 0, where, "chunks_reused", integer=True))
    chunks = int(_number(result.get("chunks_written") or 0, where, "chunks_written", integer=True)) - kept
    if changed or deleted or reread or result.get("unchanged"):
        again = f", {reread} re-read by a newer reader" if reread else ""
        also = f", {kept} unchanged chunks kept" if kept else ""
        what = (f"absorb a changed document: re-sync the index ({changed} replaced, {added} added, "
                f"{deleted} deleted{again}, {result.get('unchanged', 0)} unchanged; {chunks} chunks embedded{also})")
    else:
        what = f"index: embed and store {added} documents ({chunks} chunks)"
    return CostRow(what, seconds, f"measured: 'ragtune index --json' seconds{src}")


def load_cost_file(path: str | Path) -> list[CostRow]:
    """Rows from a JSON file: a run card, an `index add/sync --json` result, or a list of
    {"what", "seconds", "detail"} rows measured some other way."""
    p = Path(path)
    if p.is_dir():
        if not (p / "ragtune.json").is_file():
            raise UsageError(f"--cost '{path}': a folder without a run card (ragtune.json); give a training output "
                             "folder, a run card or saved 'ragtune index sync --json' output")
        p = p / "ragtune.json"
    if not p.is_file():
        raise UsageError(f"--cost '{path}': file not found; give a run card (ragtune.json) or saved "
                         "'ragtune index sync --json' output")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"--cost '{p}': not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "metrics" in data and "base_model" in data:
        return _runcard_rows(data, str(p))
    if isinstance(data, dict) and "chunks_written" in data:
        return [ingest_cost(data, str(p))]
    if isinstance(data, list) and all(isinstance(r, dict) and "what" in r and "seconds" in r for r in data):
        return [CostRow(str(r["what"]), _row_seconds(r, p, i),
                        str(r.get("detail", f"from {p}"))) for i, r in enumerate(data, 1)]
    raise UsageError(
        f"--cost '{p}': not a run card, an 'index add/sync --json' result, or a list of "
        '{"what", "seconds", "detail"} rows'
    )
