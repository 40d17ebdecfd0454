"""Answering every mode of a `ragtune eval` plan: load the generator with the adapters the modes use,
then answer each mode's questions (one at a time, through the engine's batch scheduler, or a few at a
time against a remote server) and score each answer.

    generator, note = load_generator(cfg, plan)
    answers = answer_all(cfg, plan, generator, RecordingRetriever(retriever), progress=True)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ragtune.errors import RagtuneError, UsageError
from ragtune.eval.modes import adapter_of, uses_retrieval
from ragtune.eval.plan import Plan
from ragtune.eval.questions import Question
from ragtune.eval.scoring import AnswerRecord, score_answer

log = logging.getLogger(__name__)


@dataclass
class Answers:
    runs: dict[str, list[AnswerRecord]]
    seconds: dict[str, float]  # wall clock of each mode, start to end
    errors: int


class RecordingRetriever:
    """Passes searches through and keeps the last ranked hits, so retrieval metrics see exactly
    what the generator retrieved (also when it then abstains and drops them)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: list[dict[str, Any]] | None = None

    def search(self, query: str, top_k: int | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        hits = self.inner.search(query, top_k=top_k, **kwargs)
        self.last = list(hits)
        return hits


def load_generator(cfg: Any, plan: Plan) -> tuple[Any, str]:
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


def _generator_names(generator: Any, plan: Plan) -> dict[str, str]:
    """Each adapter's name inside the generator (a loaded Generator names a folder given twice once)."""
    resolve = getattr(generator, "resolve_adapter", None)
    if resolve is None:
        return {name: name for name in plan.adapters}
    return {name: resolve(str(a.path)) for name, a in plan.adapters.items()}


def answer_all(cfg: Any, plan: Plan, generator: Any, recorder: RecordingRetriever | None,
                progress: bool) -> Answers:
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

            def one(q: Question, rec: RecordingRetriever | None = rec, ad: str | None = ad) -> AnswerRecord:
                # a recorder per question: concurrent answers each keep their own ranked hits
                mine = RecordingRetriever(rec.inner) if rec is not None else None
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
    return Answers(runs, seconds, errors)


def _messages(q: Question, system_prompt: str) -> list[dict[str, str]]:
    msgs = q.messages()
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _answer_batched(gen: Any, rec: RecordingRetriever | None, questions: Sequence[Question], mode: str,
                    adapter: str | None, cfg: Any, max_new: int, on_done: Any = None) -> list[AnswerRecord]:
    """A mode's questions through the engine's batch scheduler in a fixed order (`Generator.answer_all`:
    sorted by prompt, so shared prefixes are prefilled once), so a re-run gives the same answers.
    Latency is an answer's retrieval plus its time from admission to its last token: all of a mode's
    questions are queued at once, so waiting for a slot is left out."""
    recorders = [RecordingRetriever(rec.inner) if rec is not None else None for _ in questions]
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


def _scored(q: Question, ans: Any, recorder: RecordingRetriever | None, cfg: Any, latency: float) -> AnswerRecord:
    return score_answer(
        q, ans.text, ans.sources, retrieved=recorder.last if recorder is not None else None,
        not_found_message=cfg.rag.not_found_message, k=cfg.rag.top_k, latency_s=latency,
        prompt_tokens=ans.prompt_tokens, completion_tokens=ans.completion_tokens, abstained=ans.abstained,
    )


def _answer_one(gen: Any, recorder: RecordingRetriever | None, q: Question, mode: str, adapter: str | None,
                cfg: Any, max_new: int) -> AnswerRecord:
    msgs = _messages(q, cfg.eval.system_prompt)
    t0 = time.perf_counter()
    try:
        ans = gen.answer(msgs, adapter=adapter, retriever=recorder, max_new_tokens=max_new, temperature=0.0,
                         seed=int(cfg.eval.seed))
    except UsageError as exc:  # e.g. the prompt does not fit the context: score as an empty answer
        return _unanswered(q, mode, exc, cfg, time.perf_counter() - t0)
    return _scored(q, ans, recorder, cfg, time.perf_counter() - t0)


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
