"""The generator: one base model, any number of LoRA adapters, answers with or without retrieval.

    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    gen = Generator(cfg)                                   # cheap: stores settings
    gen.load(base=None, adapters={"policies": "runs/adapter"})   # base once, adapters on top
    ans = gen.answer([{"role": "user", "content": "How many remote days?"}],
                     adapter="policies", retriever=None, max_new_tokens=64, temperature=0.0)
    ans.text, ans.sources, ans.mode, ans.prompt_tokens, ans.completion_tokens, ans.timings

    s = gen.stream(messages, adapter=None, retriever=r)    # retrieval runs here: s.sources is ready
    for delta in s: print(delta, end="")                   # text deltas, concatenating to s.answer.text
    s.answer                                               # the Answer, once the stream is exhausted

Interface (used by `ask`, `chat`, the server and eval):
- `Generator(cfg, engine=None, lock=None)`; `load(base=None, adapters=None) -> self` with `base` a model
  dir ("" / None = `model.path`, else the prepared default) and `adapters` {name: dir} (None =
  `model.adapter` when set). `add_adapter(name, dir)` loads one more without reloading the base.
- `answer(messages, adapter=None, retriever=None, max_new_tokens=None, temperature=None, top_p=None,
  seed=None, rag=None) -> Answer`; `stream(...)` takes the same arguments and returns an `AnswerStream`.
  `stop` is a list of strings that end the answer (not included in it). `grammar` (from
  `ragtune.serve.constrained`) constrains every token of the answer; `tools` (a
  `ragtune.serve.tools.ToolPlan`) puts functions in the prompt (`Answer.tool_rendering` says how).
  `rag` is a RagConfig (top_k, min_score, not_found_message, system_prompt; None = `cfg.rag`).
  `adapter` is a loaded adapter's name (or its dir); None answers with the base model alone, which
  gives the same tokens whether or not adapters are loaded (peft's adapters are disabled, not merged).
  `retriever` is anything with `search(query, top_k=...) -> list[hit]` (a `ragtune.retrieval.search.Retriever`).
- Greedy when temperature is 0. Generation holds `lock` (one model call at a time): up to
  `serve.max_batch` concurrent callers decode together, the lock held around each step — on llama.cpp
  in one llama.cpp batch (`ragtune.serve.batching`), on transformers in padded batches over a
  DynamicCache (`ragtune.serve.tf_batching`, `gen.batcher`). With `serve.max_batch: 1`, or a model whose
  cache cannot be padded, or `generation.cache: static` on CUDA, transformers' `generate` answers one
  caller at a time and the others queue. Each adapter answers with the chat template from its run card, and with the system
  prompt its training records all shared (the run card's `system_prompt`) unless the messages bring one.

Device (cuda > mps > cpu) and dtype come from `model.device` / `model.dtype` ("auto" chooses).
Engine (`generation.engine`, or `engine=`): "transformers" (torch, any device), "llama.cpp" (a GGUF
exported once and cached by `ensure_gguf`, LoRA adapters converted to llama.cpp's format, CPU only;
needs `pip install 'ragtune[llamacpp]'`), or "auto" (llama.cpp on the CPU when it is installed, else
transformers). Both engines render prompts and decode ids with the model's tokenizer, so text,
streaming, citations and abstention are produced the same way; on llama.cpp that is jinja2 + `tokenizers`
(no torch, no transformers) once checked equal to transformers' tokenizer (`ragtune.serve.light_tokenizer`).
A remote OpenAI-compatible server (engine "openai") answers through
`ragtune.serve.remote.RemoteGenerator(cfg, url, model, api_key).load()`, which has the same `answer`
and `stream` and keeps retrieval, sources and abstention here.
On CUDA, `generation.cache: static` uses transformers' static KV cache and its own compile path.
Adapters answer through lean LoRA forwards (`ragtune.serve.fast_lora`, `generation.fast_lora`).

The parts, each readable on its own: `ragtune.serve.loading` (engine choice, base model, adapters:
`GeneratorLoading`), `ragtune.serve.decoding` (the model runs, one path per engine: `GeneratorDecoding`),
`ragtune.serve.stops` (incremental detokenizing, stop strings) and `ragtune.serve.streaming`
(`AnswerStream`). This module prepares each request (retrieval, prompt, budget) and assembles its Answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ragtune.errors import PromptTooLong, RagtuneError, UsageError
from ragtune.serve.decoding import GeneratorDecoding
from ragtune.serve.loading import EngineUnavailable, GeneratorLoading, _Adapter, check_engine
from ragtune.serve.prompt_ids import mask_typed, prompt_ids
from ragtune.serve.stops import cut_at_stop, held_back
from ragtune.serve.streaming import AnswerStream

__all__ = ["Answer", "AnswerStream", "EngineUnavailable", "Generator", "check_engine", "cut_at_stop", "held_back",
           "warn_rag_layout_differs", "warn_rag_trained_without_index"]

log = logging.getLogger(__name__)

_RAG_WARNED: set[Any] = set()


def warn_rag_layout_differs(card: dict[str, Any], name: str, question_first: bool) -> None:
    """One warning per adapter trained on retrieval-built prompts laid out otherwise than it is served
    (rag.question_first on one side only): it reads best in the layout it learned."""
    rag = card.get("rag") if isinstance(card, dict) else None
    trained = bool((rag or {}).get("question_first", False))
    if not rag or trained == question_first or ("layout", name) in _RAG_WARNED:
        return
    _RAG_WARNED.add(("layout", name))
    log.warning("adapter '%s' was trained with rag.question_first=%s but is served with rag.question_first=%s; "
                "set rag.question_first=%s for the prompt layout it was trained on", name, str(trained).lower(),
                str(question_first).lower(), str(trained).lower())


def warn_rag_trained_without_index(card: dict[str, Any], name: str) -> None:
    """One warning per adapter trained on retrieval-built prompts (its run card's `rag` block) that
    answers without an index: it learned to read sources and now gets none."""
    rag = card.get("rag") if isinstance(card, dict) else None
    if not rag or name in _RAG_WARNED:
        return
    _RAG_WARNED.add(name)
    log.warning("adapter '%s' was trained with sources retrieved from index '%s' (data.rag) but answers without "
                "an index here; give it one (--index %s, or the deployment's index) for the answers it was trained "
                "to give", name, rag.get("index", "?"), rag.get("index", "NAME"))

@dataclass
class Answer:
    text: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "base"  # base | ft | rag | ft+rag
    prompt_tokens: int = 0
    completion_tokens: int = 0
    abstained: bool = False  # retrieval found nothing above rag.min_score: text is rag.not_found_message
    finish_reason: str = "stop"  # stop | length | cancelled
    timings: dict[str, float] = field(default_factory=dict)  # retrieval_s queue_s prefill_s ttft_s decode_s total_s decode_tokens_per_s
    adapter: str | None = None
    best_score: float | None = None  # best retrieval relevance (dense cosine or rerank score)
    tool_rendering: str | None = None  # tools given: "template" (the model's own) or "generic" (ragtune.serve.tools)
    prompt: str = field(default="", repr=False)  # the rendered prompt, for debugging

    def to_dict(self, with_prompt: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {"answer": d.pop("text"), **d}
        if not with_prompt:
            d.pop("prompt")
        return d


@dataclass
class _Job:
    """Everything decided before the model runs: prompt ids, sampling, sources."""

    messages: list[dict[str, str]]
    adapter: str | None
    mode: str
    sources: list[dict[str, Any]]
    abstained: bool
    best_score: float | None
    not_found: str
    prompt: str
    input_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    t_start: float
    retrieval_s: float
    grammar: str | None = None  # llguidance grammar the answer must follow (ragtune.serve.constrained)
    rendering: str | None = None  # how tools reached the prompt: "template" | "generic" (ragtune.serve.tools)


class Generator(GeneratorLoading, GeneratorDecoding):
    def __init__(self, cfg: Any, engine: str | None = None, lock: Any = None):
        self.cfg = cfg
        self.engine = check_engine(engine or cfg.generation.engine, cfg.model.device)
        self.engine_impl: Any = None  # the LlamaCppEngine when engine is llama.cpp
        self.lock = lock or threading.Lock()
        self._retrieval_lock = threading.Lock()
        self.model: Any = None  # a PeftModel once an adapter is loaded
        self.tokenizer: Any = None
        self.base_path: Path | None = None
        self.base_hash = ""
        self.device = "cpu"
        self.adapters: dict[str, _Adapter] = {}
        self._fast: Any = None  # FastLora over the peft model (generation.fast_lora)
        self.batcher: Any = None  # the TfScheduler when the transformers engine batches (serve.max_batch > 1)
        self._eos: list[int] = []
        self._max_positions = 0

    def warmup(self) -> float:
        """One short generation so the first real request does not pay kernel set-up; returns seconds."""
        t0 = time.perf_counter()
        self.answer([{"role": "user", "content": "Hi"}], max_new_tokens=2, temperature=0.0)
        return time.perf_counter() - t0

    # --- answering ----------------------------------------------------------------------------

    def answer(self, messages: Sequence[dict[str, str]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, rag: Any = None,
               stop: Sequence[str] | None = None, grammar: str | None = None, tools: Any = None) -> Answer:
        """One complete answer (runs in the calling thread, holding the generation lock)."""
        job = self.prepare(messages, adapter, retriever, max_new_tokens, temperature, top_p, seed, rag, stop,
                           grammar, tools)
        return self._complete(job)

    def _complete(self, job: _Job) -> Answer:
        """A prepared job's whole answer (`answer`, and each of `answer_all`'s threads)."""
        if job.abstained:
            return self._abstain_answer(job)
        ids: list[int] = []
        stats = self._run(job, ids.append, None)
        text, hit = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), job.stop)
        if hit:
            stats["finish_reason"] = "stop"
        return self._finish(job, text, ids, stats)

    @property
    def batch_scheduler(self) -> Any:
        """The engine's batch scheduler (llama.cpp's, or transformers' with serve.max_batch > 1), else None."""
        if self.engine_impl is not None:
            return getattr(self.engine_impl, "scheduler", None)
        return self.batcher

    @property
    def context_length(self) -> int:
        """Tokens a prompt and its answer share: llama.cpp's n_ctx, else the model's max_position_embeddings
        (0: unknown, nothing checked)."""
        return self._max_positions

    def answer_all(self, requests: Sequence[tuple[Sequence[dict[str, str]], Any]], adapter: str | None = None,
                   max_new_tokens: int | None = None, temperature: float | None = None, seed: int | None = None,
                   wave: int = 256, on_done: Any = None) -> list[Answer | RagtuneError]:
        """Many answers, decoded together in a fixed order: `requests` are (messages, retriever) pairs;
        each result is its Answer, or the RagtuneError it raised (a prompt that does not fit, ...).

        Every prompt is prepared (retrieved for) first, one after another; then each wave of up to
        `wave` of them is handed to the batch scheduler while it is held (`StepThread.hold`), in
        order, so it admits them in that order at the same step boundaries on every run. A batched
        engine's float rounding depends on which sequences share a step; with thread timing deciding
        that, two runs of an eval could differ in a few answers. Without a scheduler the answers run
        one after another (the same answers as `answer`). For a process that is the scheduler's only
        client (eval, `ask --questions`): a server's requests arriving meanwhile would join the waves.
        `on_done(i)` is called as each result lands (from the answering threads: a progress bar).
        The prompts are queued sorted by their token ids, so prompts that begin alike (one system
        instruction, the same sources) sit side by side and the scheduler prefills each shared prefix
        once (`Scheduler` lends a running sequence's cells); the results stay in `requests`' order."""
        jobs: list[Any] = []
        for messages, retriever in requests:
            try:
                jobs.append(self.prepare(messages, adapter, retriever, max_new_tokens, temperature, None, seed))
            except RagtuneError as exc:
                jobs.append(exc)
        out: list[Any] = [None] * len(jobs)

        def run(i: int, job: _Job) -> None:
            try:
                out[i] = self._complete(job)
            except Exception as exc:  # noqa: BLE001 - handed back (RagtuneError) or raised below (a bug)
                out[i] = exc
            if on_done is not None:
                on_done(i)

        sched = self.batch_scheduler
        todo: list[int] = []
        for i, job in enumerate(jobs):
            if isinstance(job, RagtuneError) or job.abstained:
                out[i] = job if isinstance(job, RagtuneError) else self._abstain_answer(job)
                if on_done is not None:
                    on_done(i)
            elif sched is None:
                run(i, job)
            else:
                todo.append(i)
        todo.sort(key=lambda i: (jobs[i].input_ids, i))
        with sched.throughput() if todo else contextlib.nullcontext():
            for start in range(0, len(todo), max(1, wave)):
                threads = []
                with sched.hold():
                    for i in todo[start:start + max(1, wave)]:
                        before = sched.submitted
                        t = threading.Thread(target=run, args=(i, jobs[i]), name="ragtune-answer-all", daemon=True)
                        t.start()
                        threads.append(t)
                        while sched.submitted == before and t.is_alive():  # its request is queued (or it failed)
                            time.sleep(0.0002)
                for t in threads:
                    t.join()
        for o in out:
            if isinstance(o, Exception) and not isinstance(o, RagtuneError):
                raise o
        return out

    def stream(self, messages: Sequence[dict[str, str]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None, rag: Any = None,
               stop: Sequence[str] | None = None, grammar: str | None = None,
               tools: Any = None) -> "AnswerStream":
        """Retrieve now (so `.sources` is ready), generate lazily in a worker thread as it is iterated."""
        job = self.prepare(messages, adapter, retriever, max_new_tokens, temperature, top_p, seed, rag, stop,
                           grammar, tools)
        return AnswerStream(self, job)

    def prepare(self, messages: Sequence[dict[str, str]], adapter: str | None = None, retriever: Any = None,
                max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, rag: Any = None,
                stop: Sequence[str] | None = None, grammar: str | None = None, tools: Any = None) -> _Job:
        from ragtune.chat import rag_messages
        from ragtune.serve.answer import retrieve

        if not self.loaded:
            raise UsageError("Generator: call load() before answering")
        t_start = time.perf_counter()
        gcfg, rcfg = self.cfg.generation, rag or self.cfg.rag
        msgs = [{k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id", "name") if k in m}
                for m in messages]  # tool turns keep tool_calls / tool_call_id / name (ragtune.serve.tools)
        if not any(m["role"] == "user" for m in msgs):
            raise UsageError("messages need at least one user turn")
        name = self.resolve_adapter(adapter)
        mode = "ft" if name else "base"
        if name and self.adapters[name].system_prompt and not any(m["role"] == "system" for m in msgs):
            # the adapter learned its answers under this system prompt: without it, it answers worse
            msgs.insert(0, {"role": "system", "content": self.adapters[name].system_prompt})
        if name and retriever is None:
            warn_rag_trained_without_index(self.adapters[name].card, name)
        elif name and retriever is not None:
            warn_rag_layout_differs(self.adapters[name].card, name, rcfg.question_first)
        sources: list[dict[str, Any]] = []
        abstained, best, retrieval_s = False, None, 0.0
        if retriever is not None:
            mode = "ft+rag" if name else "rag"
            with self._retrieval_lock:
                got = retrieve(retriever, msgs, rcfg.top_k, rcfg.min_score)
            sources, abstained, best, retrieval_s = got.sources, got.abstain, got.best_score, got.seconds
            if not abstained:
                msgs = rag_messages(msgs, sources, rcfg.system_prompt, rcfg.question_first)
        template = self.adapters[name].template if name else None
        rendering = None
        masked, plan, typed = mask_typed(self.tokenizer, msgs, tools)  # typed <|im_start|> stays text (prompt_ids.py)
        if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in masked):
            from ragtune.serve.tools import render_with_tools  # `tools` is a ragtune.serve.tools.ToolPlan

            try:
                prompt, rendering = render_with_tools(self.tokenizer, masked, plan, template)
            except ValueError as exc:
                raise UsageError(f"model '{self.base_path}': {exc}") from exc
        else:
            prompt = self._render(masked, template)
        ids, prompt = prompt_ids(self.tokenizer, prompt, typed)
        new = int(gcfg.max_new_tokens if max_new_tokens is None else max_new_tokens)
        if new < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {new}")
        if self._max_positions:
            if len(ids) >= self._max_positions:
                fix = f" or lower rag.top_k ({rcfg.top_k})" if sources else ""
                raise PromptTooLong(
                    f"the prompt is {len(ids)} tokens but the model's context is {self._max_positions}; "
                    f"shorten the conversation{fix}", prompt_tokens=len(ids), context=self._max_positions
                )
            new = min(new, self._max_positions - len(ids))
        temp = float(gcfg.temperature if temperature is None else temperature)
        if temp < 0:
            raise UsageError(f"temperature must be >= 0, got {temp}")
        return _Job(
            messages=msgs, adapter=name, mode=mode, sources=sources, abstained=abstained, best_score=best,
            not_found=rcfg.not_found_message, prompt=prompt, input_ids=ids, max_new_tokens=new, temperature=temp,
            top_p=float(gcfg.top_p if top_p is None else top_p), seed=seed, stop=[x for x in (stop or []) if x],
            t_start=t_start,
            retrieval_s=retrieval_s, grammar=grammar, rendering=rendering,
        )

    def _finish(self, job: _Job, text: str, ids: list[int], stats: dict[str, Any]) -> Answer:
        n = stats["tokens"]
        decode_s = stats["decode_s"]
        timings = {
            "retrieval_s": job.retrieval_s,
            "queue_s": stats["queue_s"],
            "prefill_s": stats["prefill_s"],
            "ttft_s": stats["first"] - job.t_start - stats["queue_s"],
            "decode_s": decode_s,
            "total_s": stats["end"] - job.t_start,
            "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        }
        return Answer(text=text, sources=job.sources, mode=job.mode, prompt_tokens=len(job.input_ids),
                      completion_tokens=n, abstained=False, finish_reason=stats["finish_reason"],
                      timings={k: round(v, 6) for k, v in timings.items()}, adapter=job.adapter,
                      best_score=job.best_score, prompt=job.prompt, tool_rendering=job.rendering)

    def _abstain_answer(self, job: _Job) -> Answer:
        total = time.perf_counter() - job.t_start
        return Answer(text=job.not_found, sources=[], mode=job.mode, prompt_tokens=0,
                      completion_tokens=0, abstained=True, finish_reason="stop",
                      timings={"retrieval_s": round(job.retrieval_s, 6), "total_s": round(total, 6)},
                      adapter=job.adapter, best_score=job.best_score, prompt="")
