"""The report's meta, notes and answer-cost rows for a `ragtune eval` run: what was loaded, how it
decoded and retrieved, what the numbers can and cannot say.

    meta = report_meta(cfg, plan, generator, engine_note)
    notes = report_notes(plan) + refused_notes(plan, generator)
    cost += answer_costs(answers)
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ragtune.eval.answering import Answers
from ragtune.eval.plan import Plan
from ragtune.eval.report import CostRow, human_seconds
from ragtune.eval.scoring import AnswerRecord


def answer_costs(answers: Answers) -> list[CostRow]:
    rows = []
    for mode, recs in answers.runs.items():
        rows.append(CostRow(f"answer {len(recs)} questions: {mode}", answers.seconds[mode],
                            f"measured: wall clock of the mode (p50 {human_seconds(_p50(recs))} per answer)"))
    return rows


def report_meta(cfg: Any, plan: Plan, generator: Any, engine_note: str) -> dict[str, str]:
    remote = {"remote model": generator.model, "remote url": generator.url} if getattr(generator, "engine", None) == "openai" else {}
    refused = {"modes refused": ", ".join(plan.refused) + " (engine openai: a remote server cannot apply an adapter)"}
    return {
        **remote,
        **(refused if plan.refused else {}),
        "questions": plan.questions_path,
        "base model": _base_label(generator, cfg),
        "adapters": "; ".join(f"{a.name} = {a.path} ({a.recipe})" for a in plan.adapters.values()) or "–",
        "index": plan.index if plan.needs_rag else "–",
        "engine": _engine_label(generator, cfg) + (" (llama.cpp failed: see the notes)" if engine_note else ""),
        "decoding": f"greedy, max_new_tokens={plan.max_new_tokens}, identical in every mode"
                    + (_batching_label(generator, cfg) if cfg.eval.concurrency > 1 else ""),
        "retrieval": f"top_k={cfg.rag.top_k}, min_score={_min_score_label(cfg)}, search mode={cfg.search.mode}",
        "system prompt": cfg.eval.system_prompt or "(none)",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _min_score_label(cfg: Any) -> str:
    """rag.min_score as set, or for 0 what it stands for: the index embedder's own threshold."""
    from ragtune.retrieval.embedder import DEFAULT_MIN_SCORE, USEM3_MIN_SCORE

    if cfg.rag.min_score:
        return f"{cfg.rag.min_score:g}"
    return (f"0 (the index embedder's own threshold: {DEFAULT_MIN_SCORE:g} for sentence-transformers models, "
            f"{USEM3_MIN_SCORE:g} for usem3; {DEFAULT_MIN_SCORE:g} on a reranker's scale)")


def report_notes(plan: Plan) -> list[str]:
    n = len(plan.questions)
    return [
        f"{n} questions: a difference whose paired interval includes 0 is not evidence that one mode is better.",
        "Training time grows with the training set and epochs; re-syncing grows only with the changed "
        "documents, so the gap in 'absorb a changed document' widens as the corpus grows.",
        "Latency and tokens/s depend on this machine and engine; compare modes within one report.",
    ] + ([f"No question names its gold documents ('sources' in {plan.questions_path}), so the retrieval metrics "
          "(recall@k, MRR, nDCG, citation accuracy) are shown as '–': add \"sources\": [\"file.md\"] to the "
          "answerable questions to measure retrieval."]
         if plan.needs_rag and not any(q.sources for q in plan.questions) else [])


def refused_notes(plan: Plan, generator: Any) -> list[str]:
    if not plan.refused:
        return []
    return [f"engine openai: modes {', '.join(plan.modes)} ran on the remote model '{generator.model}' at "
            f"{generator.url}; modes {', '.join(plan.refused)} were refused: they need an adapter, and a remote "
            "server serves its model as it is (merge the adapter with 'ragtune merge', serve the merged model and "
            "score it as base)."]


def _base_label(generator: Any, cfg: Any) -> str:
    """The model actually loaded (a Generator knows its path), else what the config names."""
    if getattr(generator, "engine", None) == "openai":
        return f"{generator.model} (served at {generator.url})"
    path = getattr(generator, "base_path", None)
    if path:
        return str(path)
    return cfg.model.path or "the default model (SmolLM2-135M-Instruct)"


def _engine_label(generator: Any, cfg: Any) -> str:
    engine = getattr(generator, "engine", None)
    if engine == "llama.cpp":
        return f"llama.cpp ({cfg.generation.gguf_type} GGUF)"
    if engine == "transformers":
        return f"transformers ({getattr(generator, 'device', None) or 'cpu'})"
    if engine == "openai":
        return f"openai (remote: model '{generator.model}' at {generator.url})"
    return str(engine or type(generator).__name__)  # a generator the caller passed in


def _batching_label(generator: Any, cfg: Any) -> str:
    sched = getattr(generator, "batch_scheduler", None)
    if sched is not None:
        shares = " (shared prefixes prefilled once)" if hasattr(sched, "shared_tokens") else ""
        return (f"; each mode's questions queued together sorted by prompt{shares} and decoded {sched.width} at a "
                "time in one batch (the same batches on every run; latency: retrieval + time from a free slot to the "
                "last token)")
    return f"; {cfg.eval.concurrency} questions at a time (latencies include the batch)"


def _p50(recs: Sequence[AnswerRecord]) -> float | None:
    from ragtune.eval.metrics import percentile

    return percentile([r.latency_s for r in recs if not r.error], 50)
