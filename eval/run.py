"""`ragtune eval`: the same held-out questions answered four ways, scored side by side, with costs.

    ragtune eval --questions examples/policies/questions.jsonl --adapter runs/adapter \
        --index policies --modes base,ft,rag,ft+rag --out runs/eval --cost runs/sync-v2.json

    res = run_eval(cfg, questions="q.jsonl", adapter="runs/adapter", index="policies")

Modes: base (the base model alone), ft (base + adapter), rag (base + retrieved sources),
ft+rag (both). Every mode answers every question with identical decoding: greedy,
`eval.max_new_tokens`, the same system prompt (`eval.system_prompt`, e.g. the one the adapter
was trained with). Latency is the wall clock of one answer, retrieval included, after one
untimed warm-up answer per model. Writes report.json, report.md and report.png into the out dir.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from ragtune.eval.questions import Question, load_questions
from ragtune.eval.report import CostRow, human_seconds, write_report
from ragtune.eval.scoring import AnswerRecord, score_answer

log = logging.getLogger(__name__)

MODES = ("base", "ft", "rag", "ft+rag")
FT_NAME = "ft"  # the adapter's name inside the generator


@dataclass
class EvalResult:
    out_dir: Path
    paths: dict[str, Path]
    report: dict[str, Any]
    errors: int = 0
    runs: dict[str, list[AnswerRecord]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.errors else EXIT_OK


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    bad = [m for m in items if m not in MODES]
    if bad or not items:
        raise UsageError(f"--modes: unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {','.join(MODES)}")
    return list(dict.fromkeys(items))


class _RecordingRetriever:
    """Passes searches through and keeps the last ranked hits, so retrieval metrics see exactly
    what the generator retrieved (also when it then abstains and drops them)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: list[dict[str, Any]] | None = None

    def search(self, query: str, top_k: int | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        hits = self.inner.search(query, top_k=top_k, **kwargs)
        self.last = list(hits)
        return hits


def _messages(q: Question, system_prompt: str) -> list[dict[str, str]]:
    msgs = q.messages()
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def run_eval(
    cfg: Any,
    *,
    questions: str | Path | None = None,
    adapter: str | None = None,
    index: str | None = None,
    modes: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    cost_files: Sequence[str | Path] = (),
    progress: bool = True,
    generator: Any = None,
    retriever: Any = None,
    engine: str | None = None,
) -> EvalResult:
    """Answer, score and report. `generator`/`retriever` may be passed in already loaded.
    `engine` ("auto" | "transformers" | "llama.cpp", None = generation.engine) answers every mode."""
    from ragtune.eval.cost import load_cost_file, training_cost

    if engine and generator is None:
        from ragtune.serve.generator import check_engine

        check_engine(engine, cfg.model.device)  # before anything slow
    ecfg = cfg.eval
    qpath = questions or ecfg.questions
    if not qpath:
        raise UsageError("no questions file: pass --questions FILE.jsonl (or set eval.questions)")
    mode_list = parse_modes(modes if modes is not None else ecfg.modes)
    qs = load_questions(qpath)
    adapter = adapter if adapter is not None else (cfg.model.adapter or None)
    index_name = index or cfg.index.name
    needs_ft = any(m.startswith("ft") for m in mode_list)
    needs_rag = any("rag" in m for m in mode_list)
    if needs_ft and not adapter:
        raise UsageError(
            "modes ft and ft+rag need an adapter: pass --adapter DIR (a 'ragtune train' output) "
            "or leave them out, e.g. --modes base,rag"
        )
    cost: list[CostRow] = []
    seen_note = ""
    if adapter and needs_ft:
        cost += training_cost(adapter)  # also checks the run card before any model loads
        seen_note = _seen_in_training(adapter, qs)
    for f in cost_files:
        cost += load_cost_file(f)

    if generator is None:
        from ragtune.modeling import quiet_libraries
        from ragtune.serve.generator import Generator

        quiet_libraries()

        generator = Generator(cfg, engine=engine).load(adapters={FT_NAME: str(adapter)} if needs_ft else None)
    if needs_rag and retriever is None:
        from ragtune.serve.answer import open_retriever

        retriever = open_retriever(cfg, index_name)
    recorder = _RecordingRetriever(retriever) if needs_rag else None

    max_new = int(ecfg.max_new_tokens)
    for ad in ([None, FT_NAME] if needs_ft else [None]):  # warm-up: first-call costs are not latency
        generator.answer([{"role": "user", "content": "Hello"}], adapter=ad, max_new_tokens=2, temperature=0.0)

    runs: dict[str, list[AnswerRecord]] = {}
    errors = 0
    bar = _progress(len(mode_list) * len(qs), progress)
    try:
        for mode in mode_list:
            recs = []
            t_mode = time.perf_counter()
            bar.set_description(f"eval {mode}")
            for q in qs:
                rec = _answer_one(generator, recorder if "rag" in mode else None, q, mode, cfg, max_new)
                errors += bool(rec.error)
                recs.append(rec)
                bar.update(1)
            runs[mode] = recs
            if progress and bar.disable:  # stderr is a file or pipe: a line per mode, not a redrawn bar
                log.info("eval %s: %d answers in %.0fs", mode, len(recs), time.perf_counter() - t_mode)
    finally:
        bar.close()

    for mode, recs in runs.items():
        total = sum(r.latency_s for r in recs)
        cost.append(CostRow(f"answer {len(recs)} questions: {mode}", total,
                            f"measured: sum of per-answer wall clock (p50 {human_seconds(_p50(recs))})"))
    out = Path(out_dir or ecfg.out_dir)
    meta = {
        "questions": str(qpath),
        "base model": cfg.model.path or "default (SmolLM2-135M-Instruct)",
        "adapter": str(adapter) if needs_ft else "–",
        "index": index_name if needs_rag else "–",
        "engine": _engine_label(generator, cfg),
        "decoding": f"greedy, max_new_tokens={max_new}, identical in every mode",
        "retrieval": f"top_k={cfg.rag.top_k}, min_score={cfg.rag.min_score}, search mode={cfg.search.mode}",
        "system prompt": ecfg.system_prompt or "(none)",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    notes = [
        f"{len(qs)} questions: intervals are wide at this size; a difference whose paired interval includes 0 "
        "is not evidence that one mode is better.",
        "Training time grows with the training set and epochs; re-syncing grows only with the changed "
        "documents, so the gap in 'absorb a changed document' widens as the corpus grows.",
        "Latency and tokens/s depend on this machine and engine; compare modes within one report.",
    ] + ([seen_note] if seen_note else [])
    paths = write_report(out, qs, runs, cost, k=cfg.rag.top_k, meta=meta, notes=notes,
                         n_boot=int(ecfg.bootstrap), seed=int(ecfg.seed))
    import json

    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    return EvalResult(out, paths, report, errors, runs)


def _seen_in_training(adapter: str | Path, qs: Sequence[Question]) -> str:
    """A report note (and a warning) naming the questions the adapter was trained on, if any."""
    from ragtune.runcard import read_runcard
    from ragtune.train.data import check_file, fold

    train_file = Path(read_runcard(adapter).get("data", {}).get("train_file") or "")
    if not train_file.is_file():
        return ""  # a carried adapter: its training data stayed behind
    asked = {fold(m["content"]) for r in check_file(train_file).records for m in r.messages if m["role"] == "user"}
    seen = [q for q in qs if fold(q.question) in asked]
    if not seen:
        return ""
    ids = ", ".join(q.id for q in seen[:8]) + (", ..." if len(seen) > 8 else "")
    note = (f"{len(seen)} of {len(qs)} questions are also asked in the adapter's training data ({train_file}: {ids}): "
            "on them ft and ft+rag measure memory, not generalisation; hold them out of training for a fair comparison.")
    log.warning(note)
    return note


def _engine_label(generator: Any, cfg: Any) -> str:
    engine = getattr(generator, "engine", None)
    if engine == "llama.cpp":
        return f"llama.cpp ({cfg.generation.gguf_type} GGUF)"
    if engine == "transformers":
        return f"transformers ({getattr(generator, 'device', None) or 'cpu'})"
    return str(engine or type(generator).__name__)  # a generator the caller passed in


def _p50(recs: Sequence[AnswerRecord]) -> float | None:
    from ragtune.eval.metrics import percentile

    return percentile([r.latency_s for r in recs if not r.error], 50)


def _answer_one(gen: Any, recorder: _RecordingRetriever | None, q: Question, mode: str, cfg: Any,
                max_new: int) -> AnswerRecord:
    msgs = _messages(q, cfg.eval.system_prompt)
    if recorder is not None:
        recorder.last = None
    t0 = time.perf_counter()
    try:
        ans = gen.answer(msgs, adapter=FT_NAME if mode.startswith("ft") else None, retriever=recorder,
                         max_new_tokens=max_new, temperature=0.0, seed=int(cfg.eval.seed))
    except UsageError as exc:  # e.g. the prompt does not fit the context: score as an empty answer
        log.warning("question %s (%s): %s", q.id, mode, exc)
        return score_answer(q, "", not_found_message=cfg.rag.not_found_message, k=cfg.rag.top_k,
                            latency_s=time.perf_counter() - t0, error=str(exc))
    latency = time.perf_counter() - t0
    return score_answer(
        q, ans.text, ans.sources,
        retrieved=recorder.last if recorder is not None else None,
        not_found_message=cfg.rag.not_found_message, k=cfg.rag.top_k, latency_s=latency,
        prompt_tokens=ans.prompt_tokens, completion_tokens=ans.completion_tokens, abstained=ans.abstained,
    )


class _NoBar:
    disable = True

    def update(self, n: int) -> None: ...
    def set_description(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="answer", dynamic_ncols=True, disable=None)  # None: off unless a terminal
