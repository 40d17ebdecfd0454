"""`ragtune eval`: the same held-out questions answered in every mode, scored side by side, with costs.

    ragtune eval --questions examples/policies/questions.jsonl --index policies \
        --adapter plain=runs/plain --adapter rag-trained=runs/raft --out runs/eval --cost runs/sync-v2.json

    res = run_eval(cfg, questions="q.jsonl", adapter=["plain=runs/plain", "rag-trained=runs/raft"], index="policies")

Modes (ragtune.eval.modes): base (the base model alone), rag (base + retrieved sources), and for
each adapter NAME (base + adapter) and NAME+rag (both); a bare adapter DIR is named `ft`. Every
mode answers every question with identical decoding: greedy, `eval.max_new_tokens`, the same
system prompt (`eval.system_prompt`, e.g. the one the adapters were trained with), through one
engine (`eval.engine`/--engine; auto = llama.cpp on the CPU when installed, which answers from the
f16 GGUF export with transformers' greedy ids). Latency is the wall clock of one answer, retrieval
included, after one untimed warm-up answer per model; each mode's total time is reported too.
Writes report.json, report.md and report.png into the out dir.

`--engine openai` scores an OpenAI-compatible server (generation.url/model/api_key, as `ragtune ask`
uses it): base and rag run on the remote model, retrieval and prompts stay here; modes that need an
adapter are refused (a remote serves its model as it is), named in the report's meta and notes.

Steps, each in its module: plan (ragtune.eval.plan: questions, adapters, modes, engine, the report
folder) -> costs and notes from the run cards and the index (ragtune.eval.input_notes) -> load the
generator and the retriever, answer every mode (ragtune.eval.answering) -> meta, notes and answer
costs (ragtune.eval.report_inputs) -> report (ragtune.eval.report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL
from ragtune.eval.answering import RecordingRetriever, answer_all, load_generator
from ragtune.eval.input_notes import gold_not_indexed, run_card_costs
from ragtune.eval.plan import AdapterSpecs, check_out_dir, make_plan
from ragtune.eval.report import write_report
from ragtune.eval.report_inputs import answer_costs, refused_notes, report_meta, report_notes
from ragtune.eval.scoring import AnswerRecord


@dataclass
class EvalResult:
    out_dir: Path
    paths: dict[str, Path]
    report: dict[str, Any]
    errors: int = 0
    runs: dict[str, list[AnswerRecord]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0; 3 when some answers failed; 1 when every one did (nothing was measured)."""
        if not self.errors:
            return EXIT_OK
        total = sum(len(recs) for recs in self.runs.values())
        return EXIT_FAILED if total and self.errors >= total else EXIT_PARTIAL


def run_eval(
    cfg: Any,
    *,
    questions: str | Path | None = None,
    adapter: AdapterSpecs = None,
    index: str | None = None,
    modes: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    cost_files: Sequence[str | Path] = (),
    progress: bool = True,
    generator: Any = None,
    retriever: Any = None,
    engine: str | None = None,
) -> EvalResult:
    """Answer, score and report. `adapter`: "DIR", "NAME=DIR", a list of them or {name: dir}
    (None = model.adapter). `generator`/`retriever` may be passed in already loaded.
    `engine` ("auto" | "transformers" | "llama.cpp" | "openai", None = eval.engine) answers every mode.
    On llama.cpp, `generation.gguf_type: auto` answers from the f16 file, whose greedy ids are transformers'."""
    if cfg.generation.gguf_type == "auto":
        from ragtune.serve.llamacpp import resolve_gguf_type

        cfg = replace(cfg, generation=replace(cfg.generation, gguf_type=resolve_gguf_type("auto", for_eval=True)))
    plan = make_plan(cfg, questions, adapter, index, modes, engine, check=generator is None)
    out = check_out_dir(Path(out_dir or cfg.eval.out_dir))
    cost, notes = run_card_costs(plan, cost_files)
    engine_note = ""
    if generator is None:
        generator, engine_note = load_generator(cfg, plan)
    if plan.needs_rag and retriever is None:
        from ragtune.retrieval.sources import open_retriever

        retriever = open_retriever(cfg, plan.index, without="leave the modes with retrieval out of --modes")
        notes += gold_not_indexed(cfg, plan)
    answers = answer_all(cfg, plan, generator, RecordingRetriever(retriever) if plan.needs_rag else None, progress)
    cost += answer_costs(answers)
    paths = write_report(out, plan.questions, answers.runs, cost, k=cfg.rag.top_k,
                         meta=report_meta(cfg, plan, generator, engine_note),
                         notes=report_notes(plan) + refused_notes(plan, generator) + notes
                         + ([engine_note] if engine_note else []),
                         n_boot=int(cfg.eval.bootstrap), seed=int(cfg.eval.seed), mode_seconds=answers.seconds,
                         adapters=[{"name": a.name, "path": a.path, "recipe": a.recipe, "rag": a.card.get("rag")}
                                   for a in plan.adapters.values()])
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    return EvalResult(out, paths, report, answers.errors, answers.runs)
