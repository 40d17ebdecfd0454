"""What a `ragtune eval` report says about its inputs: each adapter's training cost (from its run card)
and the questions it was trained on; gold sources that no document of the index matches.

    cost, notes = run_card_costs(plan, ["runs/sync.json"])
    notes += gold_not_indexed(cfg, plan)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ragtune.eval.modes import EvalAdapter
from ragtune.eval.plan import Plan
from ragtune.eval.questions import Question
from ragtune.eval.report import CostRow

log = logging.getLogger(__name__)


def run_card_costs(plan: Plan, cost_files: Sequence[str | Path]) -> tuple[list[CostRow], list[str]]:
    """Training rows of every adapter, the given cost files, and notes on trained-on questions."""
    from ragtune.eval.cost import load_cost_file, training_cost

    cost: list[CostRow] = []
    notes: list[str] = []
    for a in plan.adapters.values():
        if (a.card.get("metrics") or {}).get("wall_seconds") is None:
            notes.append(f"adapter '{a.name}' ({a.path}): its run card records no training time "
                         "(metrics.wall_seconds), so the cost table has no training row for it.")
        else:
            cost += training_cost(a.path, name=a.name)
        note = _seen_in_training(a, plan.questions)
        if note:
            notes.append(note)
    counted = {(Path(a.path) / "ragtune.json").resolve(): f"adapter '{a.name}'" for a in plan.adapters.values()}
    for f in cost_files:
        key = Path(f).resolve()
        key = key / "ragtune.json" if key.is_dir() else key
        if key in counted:  # a file given twice, or an adapter's own run card: its rows would count twice
            log.warning("--cost '%s': already counted (as %s); skipped", f, counted[key])
            continue
        counted[key] = f"--cost '{f}'"
        cost += load_cost_file(f)
    return cost, notes


def _seen_in_training(adapter: EvalAdapter, qs: Sequence[Question]) -> str:
    """A report note (and a warning) naming the questions the adapter was trained on, if any."""
    from ragtune.train.data import check_file, fold

    train_file = Path((adapter.card.get("data") or {}).get("train_file") or "")
    if not train_file.is_file():
        return ""  # a carried adapter: its training data stayed behind
    asked = {fold(m["content"]) for r in check_file(train_file).records for m in r.messages if m["role"] == "user"}
    seen = [q for q in qs if fold(q.question) in asked]
    if not seen:
        return ""
    ids = ", ".join(q.id for q in seen[:8]) + (", ..." if len(seen) > 8 else "")
    note = (f"{len(seen)} of {len(qs)} questions are also asked in adapter '{adapter.name}''s training data "
            f"({train_file}: {ids}): on them its modes measure memory, not generalisation; hold them out of "
            "training for a fair comparison.")
    log.warning(note)
    return note


def gold_not_indexed(cfg: Any, plan: Plan) -> list[str]:
    """A note (and a warning) naming gold sources that no document of the index matches: a typo or a path
    not relative to the indexed folder scores recall 0 whatever is retrieved, and says nothing."""
    from ragtune.eval.metrics import same_source
    from ragtune.retrieval.index_manage import list_documents

    indexed = [d["source"] for d in list_documents(cfg, plan.index)]
    missing: dict[str, list[str]] = {}
    for q in plan.questions:
        for src in q.sources:
            if not any(same_source(src, doc) for doc in indexed):
                missing.setdefault(src, []).append(q.id)
    if not missing:
        return []
    named = "; ".join(f"'{src}' ({', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})"
                      for src, ids in list(missing.items())[:8])
    note = (f"{len(missing)} gold source(s) in {plan.questions_path} match no document of index '{plan.index}': "
            f"{named}{'; ...' if len(missing) > 8 else ''}. Their questions score recall 0 whatever is retrieved: "
            f"give sources relative to the folder that was indexed ('ragtune index list --index {plan.index}' shows "
            "them), or index the missing documents.")
    log.warning(note)
    return [note]
