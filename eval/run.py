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

Steps: plan (questions, adapters, modes, engine) -> costs and notes from the run cards -> load
the generator and the retriever -> answer every mode -> report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ragtune.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, RagtuneError, UsageError
from ragtune.eval.modes import EvalAdapter, adapter_of, parse_adapters, parse_modes, uses_retrieval
from ragtune.eval.questions import Question, load_questions
from ragtune.eval.report import CostRow, human_seconds, write_report
from ragtune.eval.scoring import AnswerRecord, score_answer

log = logging.getLogger(__name__)

AdapterSpecs = str | Sequence[str] | Mapping[str, str] | None


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


@dataclass
class _Plan:
    """Everything decided before a model loads."""

    questions_path: str
    questions: list[Question]
    modes: list[str]
    adapters: dict[str, EvalAdapter]  # those the modes use, in the order given
    index: str
    engine: str  # as asked: auto | transformers | llama.cpp | openai
    max_new_tokens: int
    refused: list[str] = field(default_factory=list)  # modes engine openai cannot run (they need an adapter)

    @property
    def needs_rag(self) -> bool:
        return any(uses_retrieval(m) for m in self.modes)


@dataclass
class _Answers:
    runs: dict[str, list[AnswerRecord]]
    seconds: dict[str, float]  # wall clock of each mode, start to end
    errors: int


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
    plan = _plan(cfg, questions, adapter, index, modes, engine, check=generator is None)
    out = _check_out_dir(Path(out_dir or cfg.eval.out_dir))
    cost, notes = _run_card_costs(plan, cost_files)
    engine_note = ""
    if generator is None:
        generator, engine_note = _load_generator(cfg, plan)
    if plan.needs_rag and retriever is None:
        from ragtune.retrieval.sources import open_retriever

        retriever = open_retriever(cfg, plan.index, without="leave the modes with retrieval out of --modes")
        notes += _gold_not_indexed(cfg, plan)
    answers = _answer_all(cfg, plan, generator, _RecordingRetriever(retriever) if plan.needs_rag else None, progress)
    cost += _answer_costs(answers)
    paths = write_report(out, plan.questions, answers.runs, cost, k=cfg.rag.top_k,
                         meta=_meta(cfg, plan, generator, engine_note),
                         notes=_notes(plan) + _refused_notes(plan, generator) + notes
                         + ([engine_note] if engine_note else []),
                         n_boot=int(cfg.eval.bootstrap), seed=int(cfg.eval.seed), mode_seconds=answers.seconds,
                         adapters=[{"name": a.name, "path": a.path, "recipe": a.recipe, "rag": a.card.get("rag")}
                                   for a in plan.adapters.values()])
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    return EvalResult(out, paths, report, answers.errors, answers.runs)


# --- plan -----------------------------------------------------------------------------------------


def _plan(cfg: Any, questions: str | Path | None, adapter: AdapterSpecs, index: str | None,
          modes: str | Sequence[str] | None, engine: str | None, check: bool) -> _Plan:
    """Check every input before anything slow: questions, adapters and their run cards, modes, engine."""
    from ragtune.runcard import read_runcard

    ecfg = cfg.eval
    engine = engine or ecfg.engine
    if check and engine == "openai":
        from ragtune.serve.remote import check_remote

        check_remote(cfg)
    elif check:
        from ragtune.serve.generator import check_engine

        check_engine(engine, cfg.model.device)
    if int(ecfg.concurrency) < 1:
        raise UsageError(f"eval.concurrency must be at least 1 (questions answered at once), got {ecfg.concurrency}")
    qpath = questions or ecfg.questions
    if not qpath:
        raise UsageError("no questions file: pass --questions FILE.jsonl (or set eval.questions)")
    given = parse_adapters(adapter if adapter else (cfg.model.adapter or None))
    asked = modes if modes is not None else ecfg.modes
    refused: list[str] = []
    if engine == "openai":  # a remote serves its model as it is: only base and rag can run there
        asked, refused = _remote_modes(asked, list(given))
    mode_list = parse_modes(asked, list(given))
    used = {adapter_of(m) for m in mode_list}
    if check:  # its files, before its run card: a whole model given as an adapter is said as such
        from ragtune.modeling import check_adapter_dir

        for name, path in given.items():
            if name in used:
                check_adapter_dir(path, f"adapter '{name}' at")
    adapters = {name: EvalAdapter(name, path, read_runcard(path)) for name, path in given.items() if name in used}
    return _Plan(str(qpath), load_questions(qpath), mode_list, adapters, index or cfg.index.name, engine,
                 int(ecfg.max_new_tokens), refused)


def _check_out_dir(out: Path) -> Path:
    """The report folder, refused now rather than after every question has been answered: it must not be
    a file, nor lie under one (`--out notes.txt/eval`), and a file must be creatable where the report goes
    (the folder, or the nearest one above it that exists: read-only mounts, /proc, no permission), under
    names the file system takes (NAME_MAX)."""
    import os
    import tempfile

    def exists(p: Path) -> bool:  # False, not an error, for a name too long to look up
        try:
            return p.exists()
        except OSError:
            return False

    flag = "eval.out_dir / --out"
    if exists(out) and not out.is_dir():
        raise UsageError(f"{flag} '{out}' is a file; the report goes in a folder: name another")
    above = next((p for p in out.absolute().parents if exists(p)), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{flag} '{out}': '{above}' is a file, so no folder can be made under it; "
                         "name a folder elsewhere")
    where = out if exists(out) else above
    if where is None:
        return out
    try:
        name_max = os.pathconf(where, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    long = [part for part in out.absolute().relative_to(where.absolute()).parts if len(os.fsencode(part)) > name_max]
    if long:
        raise UsageError(f"{flag} '{out}': the name '{long[0][:40]}...' is {len(os.fsencode(long[0]))} bytes, longer "
                         f"than the {name_max} this file system allows; name a shorter folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ragtune-eval-", suffix=".probe", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} '{out}' cannot be written: creating a file in '{where}' failed "
                         f"({exc.strerror or exc}); name a folder you can write") from None
    return out


def _remote_modes(modes: str | Sequence[str], adapter_names: list[str]) -> tuple[list[str], list[str]]:
    """(modes to run, modes refused) for engine openai: those that need an adapter are refused."""
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    refused = [m for m in items if adapter_of(m) is not None]
    run = [m for m in items if adapter_of(m) is None]
    if refused and not run:
        raise UsageError(f"engine openai cannot run mode(s) {', '.join(refused)}: the remote server serves its model "
                         "as it is and cannot apply an adapter; run --modes base,rag against it (merge an adapter "
                         "with 'ragtune merge' and serve the merged model to score it as base)")
    if refused:
        log.warning("engine openai: running %s; refused %s (they need an adapter, which a remote server cannot "
                    "apply)", ", ".join(run), ", ".join(refused))
    return run, refused


def _run_card_costs(plan: _Plan, cost_files: Sequence[str | Path]) -> tuple[list[CostRow], list[str]]:
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
    for f in cost_files:
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


def _gold_not_indexed(cfg: Any, plan: _Plan) -> list[str]:
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


# --- loading --------------------------------------------------------------------------------------


def _load_generator(cfg: Any, plan: _Plan) -> tuple[Any, str]:
    """The Generator with every adapter the modes use; with engine auto, a model llama.cpp cannot
    take (its GGUF export fails) answers through transformers, and the note says why."""
    if plan.engine == "openai":
        from ragtune.serve.remote import remote_generator

        return remote_generator(cfg), ""
    from ragtune.modeling import quiet_libraries
    from ragtune.serve.generator import Generator

    quiet_libraries()
    adapters = {a.name: a.path for a in plan.adapters.values()} or None
    gen = Generator(cfg, engine=plan.engine)
    if plan.engine != "auto" or gen.engine != "llama.cpp":
        return gen.load(adapters=adapters), ""
    try:
        return gen.load(adapters=adapters), ""
    except RagtuneError as exc:
        from ragtune.runcard import RunCardMismatch

        if isinstance(exc, RunCardMismatch):
            raise
        note = (f"engine auto: llama.cpp could not load this model ({exc}); every mode answered through "
                "transformers instead (pass --engine transformers to skip the attempt)")
        log.warning(note)
        return Generator(cfg, engine="transformers").load(adapters=adapters), note


def _generator_names(generator: Any, plan: _Plan) -> dict[str, str]:
    """Each adapter's name inside the generator (a loaded Generator names a folder given twice once)."""
    resolve = getattr(generator, "resolve_adapter", None)
    if resolve is None:
        return {name: name for name in plan.adapters}
    return {name: resolve(str(a.path)) for name, a in plan.adapters.items()}


# --- answering ------------------------------------------------------------------------------------


def _answer_all(cfg: Any, plan: _Plan, generator: Any, recorder: _RecordingRetriever | None,
                progress: bool) -> _Answers:
    names = _generator_names(generator, plan)
    for ad in [None, *names.values()]:  # warm-up: first-call costs are not latency
        generator.answer([{"role": "user", "content": "Hello"}], adapter=ad, max_new_tokens=2, temperature=0.0)
    runs: dict[str, list[AnswerRecord]] = {}
    seconds: dict[str, float] = {}
    errors = 0
    bar = _progress(len(plan.modes) * len(plan.questions), progress)
    try:
        for mode in plan.modes:
            bar.set_description(f"eval {mode}")
            ad = adapter_of(mode)
            rec = recorder if uses_retrieval(mode) else None
            t_mode = time.perf_counter()

            def one(q: Question, rec: _RecordingRetriever | None = rec, ad: str | None = ad) -> AnswerRecord:
                # a recorder per question: concurrent answers each keep their own ranked hits
                mine = _RecordingRetriever(rec.inner) if rec is not None else None
                r = _answer_one(generator, mine, q, mode, names.get(ad) if ad else None, cfg, plan.max_new_tokens)
                bar.update(1)
                return r

            workers = max(1, int(cfg.eval.concurrency))
            if workers == 1:
                recs = [one(q) for q in plan.questions]
            elif getattr(generator, "batch_scheduler", None) is not None:
                recs = _answer_batched(generator, rec, plan.questions, mode, names.get(ad) if ad else None, cfg,
                                       plan.max_new_tokens, lambda _i: bar.update(1))
            else:  # a remote engine: its server batches as it likes; ours only keeps it busy
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ragtune-eval") as pool:
                    recs = list(pool.map(one, plan.questions))  # in question order
            errors += sum(bool(r.error) for r in recs)
            runs[mode], seconds[mode] = recs, time.perf_counter() - t_mode
            if progress and bar.disable:  # stderr is a file or pipe: a line per mode, not a redrawn bar
                log.info("eval %s: %d answers in %.0fs", mode, len(recs), seconds[mode])
    finally:
        bar.close()
    return _Answers(runs, seconds, errors)


def _messages(q: Question, system_prompt: str) -> list[dict[str, str]]:
    msgs = q.messages()
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _answer_batched(gen: Any, rec: _RecordingRetriever | None, questions: Sequence[Question], mode: str,
                    adapter: str | None, cfg: Any, max_new: int, on_done: Any = None) -> list[AnswerRecord]:
    """A mode's questions through the engine's batch scheduler in a fixed order (`Generator.answer_all`:
    sorted by prompt, so shared prefixes are prefilled once), so a re-run gives the same answers.
    Latency is an answer's retrieval plus its time from admission to its last token: all of a mode's
    questions are queued at once, so waiting for a slot is left out."""
    recorders = [_RecordingRetriever(rec.inner) if rec is not None else None for _ in questions]
    got = gen.answer_all([(_messages(q, cfg.eval.system_prompt), r) for q, r in zip(questions, recorders)],
                         adapter=adapter, max_new_tokens=max_new, temperature=0.0, seed=int(cfg.eval.seed),
                         on_done=on_done)
    out = []
    for q, r, ans in zip(questions, recorders, got):
        if isinstance(ans, UsageError):  # e.g. the prompt does not fit the context: score as an empty answer
            out.append(_unanswered(q, mode, ans, cfg, 0.0))
            continue
        if isinstance(ans, BaseException):
            raise ans
        t = ans.timings
        latency = t.get("retrieval_s", 0.0) + t.get("prefill_s", 0.0) + t.get("decode_s", 0.0)
        out.append(_scored(q, ans, r, cfg, latency if not ans.abstained else t.get("total_s", 0.0)))
    return out


def _unanswered(q: Question, mode: str, exc: Exception, cfg: Any, latency: float) -> AnswerRecord:
    log.warning("question %s (%s): %s", q.id, mode, exc)
    return score_answer(q, "", not_found_message=cfg.rag.not_found_message, k=cfg.rag.top_k, latency_s=latency,
                        error=str(exc))


def _scored(q: Question, ans: Any, recorder: _RecordingRetriever | None, cfg: Any, latency: float) -> AnswerRecord:
    return score_answer(
        q, ans.text, ans.sources, retrieved=recorder.last if recorder is not None else None,
        not_found_message=cfg.rag.not_found_message, k=cfg.rag.top_k, latency_s=latency,
        prompt_tokens=ans.prompt_tokens, completion_tokens=ans.completion_tokens, abstained=ans.abstained,
    )


def _batching_label(generator: Any, cfg: Any) -> str:
    sched = getattr(generator, "batch_scheduler", None)
    if sched is not None:
        shares = " (shared prefixes prefilled once)" if hasattr(sched, "shared_tokens") else ""
        return (f"; each mode's questions queued together sorted by prompt{shares} and decoded {sched.width} at a "
                "time in one batch (the same batches on every run; latency: retrieval + time from a free slot to the "
                "last token)")
    return f"; {cfg.eval.concurrency} questions at a time (latencies include the batch)"


def _answer_one(gen: Any, recorder: _RecordingRetriever | None, q: Question, mode: str, adapter: str | None,
                cfg: Any, max_new: int) -> AnswerRecord:
    msgs = _messages(q, cfg.eval.system_prompt)
    t0 = time.perf_counter()
    try:
        ans = gen.answer(msgs, adapter=adapter, retriever=recorder, max_new_tokens=max_new, temperature=0.0,
                         seed=int(cfg.eval.seed))
    except UsageError as exc:  # e.g. the prompt does not fit the context: score as an empty answer
        return _unanswered(q, mode, exc, cfg, time.perf_counter() - t0)
    return _scored(q, ans, recorder, cfg, time.perf_counter() - t0)


# --- report inputs --------------------------------------------------------------------------------


def _answer_costs(answers: _Answers) -> list[CostRow]:
    rows = []
    for mode, recs in answers.runs.items():
        rows.append(CostRow(f"answer {len(recs)} questions: {mode}", answers.seconds[mode],
                            f"measured: wall clock of the mode (p50 {human_seconds(_p50(recs))} per answer)"))
    return rows


def _meta(cfg: Any, plan: _Plan, generator: Any, engine_note: str) -> dict[str, str]:
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


def _notes(plan: _Plan) -> list[str]:
    n = len(plan.questions)
    return [
        f"{n} questions: a difference whose paired interval includes 0 is not evidence that one mode is better.",
        "Training time grows with the training set and epochs; re-syncing grows only with the changed "
        "documents, so the gap in 'absorb a changed document' widens as the corpus grows.",
        "Latency and tokens/s depend on this machine and engine; compare modes within one report.",
    ]


def _refused_notes(plan: _Plan, generator: Any) -> list[str]:
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


def _p50(recs: Sequence[AnswerRecord]) -> float | None:
    from ragtune.eval.metrics import percentile

    return percentile([r.latency_s for r in recs if not r.error], 50)


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
