"""Split a chat JSONL file into train and eval files, deterministically.

    ragtune data split train.jsonl --eval-fraction 0.1 --seed 42 [--out-dir DIR] [--force] [--skip-invalid]

    from ragtune.train.data_split import split, split_items

    tr, ev, n_train, n_eval, left_out = split("train.jsonl", 0.1, seed=42)   # train.train.jsonl, train.eval.jsonl
    train, held = split_items(items, 0.1, seed=42, key=prompt_key)          # the same rule over any list

Records asking the same question stay on one side, so the eval file never holds a question the model
was trained on. The file is checked first (ragtune.train.data_check, structure only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from ragtune.errors import CheckFailed, UsageError
from ragtune.train.data_check import check_file
from ragtune.train.data_files import _refuse_existing, read_lines, refuse_file_as_folder
from ragtune.train.records import prompt_key


def split(path: str | Path, eval_fraction: float, seed: int = 42, out_dir: str | Path | None = None,
          force: bool = False, skip_invalid: bool = False) -> tuple[Path, Path, int, int, int]:
    """Deterministic train/eval split of the file's records (same file + fraction + seed = same split).

    The file is checked as `train` checks it (structure only): invalid records stop the split unless
    `skip_invalid`, which leaves them out. Existing outputs are replaced only with `force`.
    Returns (train file, eval file, train records, eval records, invalid records left out)."""
    from ragtune.io import atomic_write_text

    src = Path(path)
    if not 0 < eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    d = Path(out_dir) if out_dir else src.parent
    refuse_file_as_folder(d, "--out-dir")
    tr, ev = d / f"{src.stem}.train.jsonl", d / f"{src.stem}.eval.jsonl"
    if not force:
        _refuse_existing([tr, ev], "--out-dir DIR to write elsewhere")
    rep = check_file(src)
    rep.stats = {}  # no token checks here: the report lists the problems only
    whole = any(p.kind == "not_jsonl" for p in rep.problems)  # records are not lines: nothing to skip
    valid = len(rep.records) + len(rep.tool_lines)
    if rep.problems and (not skip_invalid or whole or not valid):
        fix = "" if whole or not valid else f", or pass --skip-invalid to split the {valid} valid records"
        raise CheckFailed(f"{src} has problems; nothing was split:\n{rep.format()}\nfix the lines above (or write the "
                          f"valid records with 'ragtune data check {src} --write-clean CLEAN.jsonl' and split that)"
                          + fix)
    lines = [ln.decode("utf-8") for n, ln in read_lines(src) if ln.strip() and n not in rep.rejected]
    if len(lines) < 2:
        raise UsageError(f"'{src}' holds {len(lines)} {'valid ' if rep.rejected else ''}record(s); a split needs at least 2")
    train_lines, eval_lines = split_items(lines, eval_fraction, seed, key=_line_prompt)
    if not eval_lines:  # one question in every record: holding it out would leave nothing to train on
        raise UsageError(f"'{src}': every record asks the same question, and a question's records stay on one "
                         "side (the eval file never holds a trained question): there is nothing to hold out; add "
                         "records with other questions, or write an eval file yourself")
    atomic_write_text(tr, "".join(ln.rstrip("\r") + "\n" for ln in train_lines))
    atomic_write_text(ev, "".join(ln.rstrip("\r") + "\n" for ln in eval_lines))
    return tr, ev, len(train_lines), len(eval_lines), len(rep.rejected)


def _line_prompt(line: str) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return line
    return prompt_key(obj.get("messages")) if isinstance(obj, dict) else line


def split_items(items: list[Any], eval_fraction: float, seed: int,
                key: Callable[[Any], Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Hold out about round(n * fraction) items (at least 1 when n > 1) chosen by a seeded shuffle; order kept.

    Items with the same `key` (records asking the same question) stay on one side, so the held-out
    part never contains a question the model was trained on.
    """
    n = len(items)
    k = int(round(n * eval_fraction))
    k = min(max(k, 1), n - 1) if n > 1 else 0
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault(key(x) if key else i, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # all singletons: the same draw as shuffling the indexes
    held: set[int] = set()
    for g in order:
        if len(held) >= k:
            break
        if len(held) + len(g) < n:  # keep something to train on
            held.update(g)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
