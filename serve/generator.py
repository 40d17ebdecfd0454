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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ragtune.errors import PromptTooLong, RagtuneError, UsageError

log = logging.getLogger(__name__)

ENGINES_IMPLEMENTED = ("auto", "transformers", "llama.cpp")
PROBE_MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


class EngineUnavailable(UsageError):
    def __init__(self, engine: str):
        if engine == "llama.cpp":
            msg = ("engine 'llama.cpp' needs the llama-cpp-python package: pip install 'ragtune[llamacpp]' "
                   "(./scripts/setup.sh does it), or use engine: transformers (generation.engine, "
                   "--engine, or the deployment's engine)")
        else:
            msg = (f"engine '{engine}' is not one of {', '.join(ENGINES_IMPLEMENTED)} (generation.engine, "
                   "--engine, or the deployment's engine)")
        super().__init__(msg)


_RAG_WARNED: set[str] = set()


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


def llama_cpp_available() -> bool:
    from ragtune.serve.llamacpp import llama_cpp_available as available

    return available()


def check_engine(engine: str, device: str = "auto") -> str:
    """The engine that will run: "transformers" or "llama.cpp" ("auto": llama.cpp on the CPU when
    llama-cpp-python is installed). Raises EngineUnavailable for llama.cpp without the package."""
    if engine not in ENGINES_IMPLEMENTED:
        raise EngineUnavailable(engine)
    if engine == "llama.cpp":
        if not llama_cpp_available():
            raise EngineUnavailable(engine)
        return "llama.cpp"
    if engine == "auto" and llama_cpp_available():
        if device == "cpu":
            return "llama.cpp"
        if device == "auto":
            from ragtune.modeling import accelerator_possible, pick_device

            if not accelerator_possible() or pick_device("auto") == "cpu":  # no GPU device: torch not imported
                return "llama.cpp"
    return "transformers"


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
class _Adapter:
    name: str
    path: Path
    template: str | None
    card: dict[str, Any]
    system_prompt: str = ""  # the one every training record carried: the default for this adapter


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


class _Decoder:
    """Incremental detokenizer: deltas whose concatenation equals decoding all ids at once.

    Each token decodes a short window, not the whole answer: the ids from `_prefix` (the tokens of the
    last delta, the left context that byte merges, leading-space rules and clean-up need) to the end,
    and emits what it adds past the decoded context. A window ending in an unfinished multi-byte
    character, or one whose text rewrites its context, waits for the next token (the window grows).
    `finish` decodes everything once and emits what is still missing."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0  # window start: context whose text is already emitted
        self._read = 0  # ids before this are in `emitted`

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        context = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(text) <= len(context) or text.endswith("\ufffd") or not text.startswith(context):
            return ""  # nothing new yet, an unfinished multi-byte character, or a merge that rewrites the tail: wait
        delta = text[len(context):]
        self.emitted += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


class _Sink:
    """A transformers streamer that hands each new token id to a callback (the prompt is skipped)."""

    def __init__(self, on_token: Any):
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one occurred."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@functools.lru_cache(maxsize=64)
def _failure(stop: str) -> tuple[int, ...]:
    """KMP failure function: f[i] = length of the longest proper prefix of stop[:i+1] that is also its suffix."""
    f = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = f[k - 1]
        if stop[i] == stop[k]:
            k += 1
        f[i] = k
    return tuple(f)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string: the longest proper prefix of
    a stop that the text ends with. Linear in the stops' lengths (a KMP pass over the text's last
    len(stop) characters), so a long stop string cannot make each streamed token quadratic."""
    best = 0
    for x in stops:
        if len(x) < 2:
            continue
        f = _failure(x)
        k = 0
        for ch in text[-(len(x) - 1):]:
            while k and (k == len(x) or ch != x[k]):
                k = f[k - 1]
            if ch == x[k]:
                k += 1
        if k == len(x):  # the text ends with the whole stop: its longest proper prefix that is a suffix
            k = f[-1]
        best = max(best, k)
    return best


def _run_stats(t_wait: float, t0: float, first: float, t1: float, tokens: int, reason: str) -> dict[str, Any]:
    """What a `Generator._run*` path reports: queue, prefill and decode seconds, tokens, why it ended."""
    return {"queue_s": t0 - t_wait, "prefill_s": first - t0, "first": first, "decode_s": t1 - first,
            "end": t1, "tokens": tokens, "finish_reason": reason}


class Generator:
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

    # --- loading ------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.model is not None or self.engine_impl is not None

    def load(self, base: str | None = None, adapters: dict[str, str] | None = None) -> "Generator":
        """Load the base model once, then every adapter on top of it."""
        from ragtune.modeling import (
            eos_token_ids,
            load_model,
            load_tokenizer,
            model_hash,
            pick_device,
            resolve_model_path,
        )

        mcfg = self.cfg.model
        path = resolve_model_path(base or mcfg.path or self._adapters_base(adapters), "model.path")
        if self.engine == "llama.cpp":
            self._load_llama_cpp(path)
            return self._load_adapters(adapters)
        import torch

        self.device = pick_device(mcfg.device)
        if self.device == "cpu" and self.cfg.generation.threads > 0:
            torch.set_num_threads(self.cfg.generation.threads)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(path, trust_remote_code=mcfg.trust_remote_code)
        self.model = load_model(path, device=self.device, dtype=mcfg.dtype, trust_remote_code=mcfg.trust_remote_code)
        self.base_path = path
        self.base_hash = model_hash(path)
        self._eos = eos_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self._max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        log.info("loaded %s on %s (%s) in %.1fs", path, self.device, next(self.model.parameters()).dtype,
                 time.perf_counter() - t0)
        self.batcher = self._make_batcher()
        return self._load_adapters(adapters)

    def _make_batcher(self) -> Any:
        """The TfScheduler that decodes up to `serve.max_batch` requests together, or None (one at a time):
        max_batch 1, `generation.cache: static` on CUDA (its compiled batch-1 path), or a model whose
        cache cannot be left-padded (ragtune.serve.tf_batching.batchable)."""
        from ragtune.serve.tf_batching import TfScheduler, batchable

        slots = int(self.cfg.serve.max_batch)
        if slots <= 1:
            return None
        if self.cfg.generation.cache == "static" and self.device == "cuda":
            log.info("generation.cache=static: answering one request at a time (serve.max_batch=%d unused)", slots)
            return None
        why = batchable(self.model)
        if why:
            log.info("model %s answers one request at a time: %s", self.base_path, why)
            return None
        return TfScheduler(self, slots, lock=self.lock)

    def _adapters_base(self, adapters: dict[str, str] | None) -> str:
        if adapters is None:
            adapters = {"": self.cfg.model.adapter} if self.cfg.model.adapter else {}
        from ragtune.runcard import trained_base

        return trained_base(adapters.values())

    def _load_adapters(self, adapters: dict[str, str] | None) -> "Generator":
        mcfg = self.cfg.model
        if adapters is None:
            adapters = {Path(mcfg.adapter).name: mcfg.adapter} if mcfg.adapter else {}
        for name, adir in adapters.items():
            self.add_adapter(name, adir)
        return self

    def _load_llama_cpp(self, path: Path) -> None:
        """The model from a cached GGUF; the tokenizer (rendering, prompt ids, decoding) through jinja2 +
        `tokenizers` once checked equal to transformers' for this model (serve/light_tokenizer.py), else
        transformers' (and the check is made, for the next load)."""
        from ragtune.modeling import eos_token_ids, model_hash
        from ragtune.serve import light_tokenizer
        from ragtune.serve.llamacpp import LlamaCppEngine, ensure_gguf

        mcfg = self.cfg.model
        self.device = "cpu"
        t0 = time.perf_counter()
        self.base_path = path
        self.base_hash = model_hash(path)
        light, why, recheck = (None, "trust_remote_code is on", False) if mcfg.trust_remote_code else \
            light_tokenizer.load_checked(path, self.base_hash)
        positions = _max_positions(path) if light is not None else None
        if light is not None and positions is not None:
            self.tokenizer = light
            self._eos = eos_token_ids(light, light_tokenizer.generation_eos(path))
        else:
            from transformers import AutoConfig

            from ragtune.modeling import load_tokenizer

            log.debug("chat tokenizer: %s; using transformers'", why or "no max_position_embeddings in config.json")
            self.tokenizer = load_tokenizer(path, trust_remote_code=mcfg.trust_remote_code)
            if recheck:
                light_tokenizer.record_check(self.tokenizer, path, self.base_hash)
            self._eos = eos_token_ids(self.tokenizer, model_dir=path)
            mconf = AutoConfig.from_pretrained(str(path), trust_remote_code=mcfg.trust_remote_code,
                                               local_files_only=True)
            positions = int(getattr(mconf, "max_position_embeddings", 0) or 0)
        gguf = ensure_gguf(path, type=self.cfg.generation.gguf_type)
        self.engine_impl = LlamaCppEngine(gguf, n_threads=self.cfg.generation.threads,
                                          n_ctx=min(positions, 32768) if positions else 0,
                                          max_batch=self.cfg.serve.max_batch, lock=self.lock).load()
        self._max_positions = self.engine_impl.n_ctx
        log.info("loaded %s with llama.cpp (%s) in %.1fs", path, gguf, time.perf_counter() - t0)

    def add_adapter(self, name: str, path: str | Path) -> str:
        """Load a LoRA adapter over the loaded base (checked against its run card); returns its name."""
        from ragtune.modeling import check_adapter_dir, text_sha256
        from ragtune.runcard import RunCardMismatch, check_compatible, read_runcard, trained_system_prompt

        if not self.loaded:
            raise UsageError("Generator.add_adapter: call load() first")
        p = check_adapter_dir(path)
        for a in self.adapters.values():
            if a.path == p:
                return a.name
        if name in self.adapters:
            raise UsageError(f"adapter name '{name}' is already used by '{self.adapters[name].path}'")
        card = read_runcard(p)
        tpl_info = card.get("chat_template") or {}
        template = tpl_info.get("template") or None
        if template and tpl_info.get("hash") and text_sha256(template) != tpl_info["hash"]:
            raise RunCardMismatch(
                f"adapter '{p}': the chat template in {p / 'ragtune.json'} does not match its recorded hash "
                f"({tpl_info['hash'][:12]}); the run card was edited or damaged, train again or restore it"
            )
        check_compatible(card, self.base_hash, str(self.base_path), text_sha256(template) if template else None)
        try:
            self._render(PROBE_MESSAGES, template)
        except Exception as exc:  # a template the base tokenizer cannot run
            raise RunCardMismatch(
                f"adapter '{p}': its chat template does not render with the base model's tokenizer ({exc}); "
                "serve it with the base model it was trained on"
            ) from exc
        if template and template != self.tokenizer.chat_template:
            log.info("adapter %s answers with the chat template it was trained with (not the base model's)", name)
        t0 = time.perf_counter()
        if self.engine_impl is not None:
            from ragtune.serve.llamacpp import ensure_gguf

            self.engine_impl.add_lora(name, ensure_gguf(self.base_path, adapter_dir=p))
            self.adapters[name] = _Adapter(name, p, template, card, trained_system_prompt(card))
            log.info("loaded adapter %s from %s into llama.cpp in %.2fs", name, p, time.perf_counter() - t0)
            return name
        from peft import PeftModel

        from ragtune.modeling import adapter_mismatch

        try:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(p), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(p), adapter_name=name, is_trainable=False)
        except RuntimeError as exc:
            raise adapter_mismatch(exc, p, self.base_path) or exc
        self.model.eval()
        if self.cfg.generation.fast_lora:
            from ragtune.serve.fast_lora import FastLora

            if self._fast is None:
                self._fast = FastLora(self.model)
            self._fast.prepare(name)
        self.adapters[name] = _Adapter(name, p, template, card, trained_system_prompt(card))
        log.info("loaded adapter %s from %s in %.2fs", name, p, time.perf_counter() - t0)
        return name

    def warmup(self) -> float:
        """One short generation so the first real request does not pay kernel set-up; returns seconds."""
        t0 = time.perf_counter()
        self.answer([{"role": "user", "content": "Hi"}], max_new_tokens=2, temperature=0.0)
        return time.perf_counter() - t0

    def resolve_adapter(self, adapter: str | None) -> str | None:
        if not adapter:
            return None
        if adapter in self.adapters:
            return adapter
        p = Path(adapter).expanduser()
        if p.exists():
            for a in self.adapters.values():
                if a.path == p.resolve():
                    return a.name
        loaded = ", ".join(self.adapters) or "none"
        raise UsageError(f"adapter '{adapter}' is not loaded (loaded: {loaded}); pass it to Generator.load(adapters=...)")

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
        `on_done(i)` is called as each result lands (from the answering threads: a progress bar)."""
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
        todo = []
        for i, job in enumerate(jobs):
            if isinstance(job, RagtuneError) or job.abstained:
                out[i] = job if isinstance(job, RagtuneError) else self._abstain_answer(job)
                if on_done is not None:
                    on_done(i)
            elif sched is None:
                run(i, job)
            else:
                todo.append(i)
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
        sources: list[dict[str, Any]] = []
        abstained, best, retrieval_s = False, None, 0.0
        if retriever is not None:
            mode = "ft+rag" if name else "rag"
            with self._retrieval_lock:
                got = retrieve(retriever, msgs, rcfg.top_k, rcfg.min_score)
            sources, abstained, best, retrieval_s = got.sources, got.abstain, got.best_score, got.seconds
            if not abstained:
                msgs = rag_messages(msgs, sources, rcfg.system_prompt)
        template = self.adapters[name].template if name else None
        rendering = None
        if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
            from ragtune.serve.tools import render_with_tools  # `tools` is a ragtune.serve.tools.ToolPlan

            try:
                prompt, rendering = render_with_tools(self.tokenizer, msgs, tools, template)
            except ValueError as exc:
                raise UsageError(f"model '{self.base_path}': {exc}") from exc
        else:
            prompt = self._render(msgs, template)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        new = int(gcfg.max_new_tokens if max_new_tokens is None else max_new_tokens)
        if new < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {new}")
        if self._max_positions:
            if len(ids) >= self._max_positions:
                fix = f" or lower rag.top_k ({rcfg.top_k})" if sources else ""
                raise PromptTooLong(
                    f"the prompt is {len(ids)} tokens but the model's context is {self._max_positions}; "
                    f"shorten the conversation{fix}"
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

    # --- internals ----------------------------------------------------------------------------

    def _render(self, messages: Sequence[dict[str, str]], template: str | None) -> str:
        from ragtune.chat import render

        try:
            return render(self.tokenizer, messages, add_generation_prompt=True, chat_template=template)
        except ValueError as exc:
            raise UsageError(f"model '{self.base_path}': {exc}") from exc

    @contextlib.contextmanager
    def _adapter_ctx(self, name: str | None) -> Iterator[None]:
        if not self.adapters:
            yield
        elif self._fast is not None and self._fast.supports(name):
            with self._fast.active(name):
                yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _generation_kwargs(self, job: _Job) -> dict[str, Any]:
        from transformers import GenerationConfig

        g = self.cfg.generation
        sample = job.temperature > 0
        kw: dict[str, Any] = dict(
            max_new_tokens=job.max_new_tokens,
            do_sample=sample,
            eos_token_id=self._eos,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0],
            repetition_penalty=g.repetition_penalty,
        )
        if sample:
            kw.update(temperature=job.temperature, top_p=job.top_p, top_k=0)
        if job.stop:
            kw["stop_strings"] = list(job.stop)
        if g.cache == "static":
            if self.device == "cuda":
                kw["cache_implementation"] = "static"
            else:
                log.debug("generation.cache=static is CUDA-only; using the dynamic cache on %s", self.device)
        out: dict[str, Any] = {"generation_config": GenerationConfig(**kw)}
        if job.stop:
            out["tokenizer"] = self.tokenizer  # transformers matches stop strings through it
        return out

    def _run(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """Run generate under the lock; returns timing and stop facts."""
        if self.engine_impl is not None:
            return self._run_llama_cpp(job, on_token, cancel)
        if self.batcher is not None:
            return self._run_scheduled(job, on_token, cancel)
        if (self.cfg.generation.cache == "static" and self.device == "cuda" and job.temperature <= 0
                and job.grammar is None and not job.stop):
            from ragtune.serve.static_decode import supported

            if supported(self.model):
                return self._run_static(job, on_token, cancel)
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        times: dict[str, float] = {}
        count = [0, -1]  # tokens, last id

        def token(tid: int) -> None:
            if count[0] == 0:
                times["first"] = time.perf_counter()
            count[0] += 1
            count[1] = tid
            on_token(tid)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flag = cancel is not None and cancel.is_set()
                return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

        t_wait = time.perf_counter()
        with self.lock:
            t0 = time.perf_counter()
            if job.seed is not None:
                torch.manual_seed(job.seed)
            ids = torch.tensor([job.input_ids], device=self.model.device)
            extra: dict[str, Any] = {}
            if job.grammar is not None:
                extra["logits_processor"] = _grammar_processor(self.constraint(job.grammar), len(job.input_ids))
            with self._adapter_ctx(job.adapter), torch.inference_mode():
                self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Sink(token),
                    stopping_criteria=StoppingCriteriaList([_Cancel()]), **self._generation_kwargs(job), **extra,
                )
            t1 = time.perf_counter()
        first = times.get("first", t1)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif count[1] in self._eos:
            reason = "stop"
        else:
            reason = "length" if count[0] >= job.max_new_tokens else "stop"
        return _run_stats(t_wait, t0, first, t1, count[0], reason)

    def _run_static(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """A greedy answer through the static-cache decoder whose step is compiled into CUDA graphs
        (serve/static_decode.py): generate's greedy ids without its per-token host work."""
        from ragtune.serve.static_decode import StaticGreedy

        times: dict[str, float] = {}

        def token(tid: int) -> None:
            times.setdefault("first", time.perf_counter())
            on_token(tid)

        t_wait = time.perf_counter()
        with self.lock:
            t0 = time.perf_counter()
            dec = getattr(self, "_static", None)
            if dec is None or dec.model is not self.model:  # adapters loaded since: a decoder for the new model
                dec = self._static = StaticGreedy(self.model, compile=True,
                                                  repetition_penalty=float(self.cfg.generation.repetition_penalty))
            with self._adapter_ctx(job.adapter):
                ids, reason = dec.generate(list(job.input_ids), job.max_new_tokens, frozenset(self._eos), token, cancel)
            t1 = time.perf_counter()
        first = times.get("first", t1)
        return _run_stats(t_wait, t0, first, t1, len(ids), reason)

    def _run_llama_cpp(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        return self._run_scheduled(job, on_token, cancel)

    def _run_scheduled(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """`_run` through a batch scheduler (llama.cpp's, or transformers' `batcher`): the same ids,
        callbacks and stats; stop strings end the sequence at the step they complete."""
        times: dict[str, float] = {}
        count = [0]
        stopped = threading.Event()  # a stop string completed (transformers' stop_strings)
        dec = _Decoder(self.tokenizer) if job.stop else None
        longest = max((len(x) for x in job.stop), default=1)

        def token(tid: int) -> None:
            if count[0] == 0:
                times["first"] = time.perf_counter()
            count[0] += 1
            on_token(tid)
            if dec is not None:
                delta = dec.add(tid)  # a stop string completes inside the new text and its tail before it
                if delta and cut_at_stop(dec.emitted[-(len(delta) + longest - 1):], job.stop)[1]:
                    stopped.set()

        class _Either:
            def is_set(self) -> bool:
                return stopped.is_set() or (cancel is not None and cancel.is_set())

        constraint = self.constraint(job.grammar) if job.grammar is not None else None
        t_wait = time.perf_counter()  # the engine's scheduler batches concurrent calls (serve.max_batch slots)
        if self.engine_impl is not None:
            r = self.engine_impl.generate(
                prompt_ids=job.input_ids, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                top_p=job.top_p, seed=job.seed, on_token_id=token, cancel=_Either(), adapter=job.adapter,
                stop_ids=self._eos or None, repeat_penalty=float(self.cfg.generation.repetition_penalty),
                constraint=constraint,
            )
        else:
            from ragtune.serve.tf_batching import SeqRequest

            req = self.batcher.submit(SeqRequest(
                prompt=list(job.input_ids), budget=job.max_new_tokens, temperature=job.temperature,
                top_p=job.top_p, seed=job.seed, adapter=job.adapter, stops=frozenset(self._eos),
                repeat_penalty=float(self.cfg.generation.repetition_penalty), constraint=constraint,
                on_token=token, cancel=_Either(),
            )).wait()
            r = {"queue_s": req.t_admit - req.t_submit, "finish_reason": req.finish}
        t1 = time.perf_counter()
        t0 = t_wait + r["queue_s"]
        first = times.get("first", t1)
        reason = r["finish_reason"]
        if reason == "cancelled" and stopped.is_set() and not (cancel is not None and cancel.is_set()):
            reason = "stop"
        return _run_stats(t_wait, t0, first, t1, count[0], reason)

    def constraint(self, grammar: str) -> Any:
        """A fresh `ragtune.serve.constrained.Constraint` for `grammar` over this model's vocabulary."""
        from ragtune.serve.constrained import grammars_for

        if self.engine_impl is not None:
            n_vocab = self.engine_impl.n_vocab
        else:
            n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        return grammars_for(self, self.tokenizer, n_vocab, self._eos).constraint(grammar)

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


def _grammar_processor(constraint: Any, n_prompt: int) -> Any:
    """A transformers LogitsProcessorList that masks each step's scores with `constraint` (batch of one)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Grammar(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if input_ids.shape[1] > n_prompt:  # the token picked last step advances the grammar
                constraint.accept(int(input_ids[0, -1]))
            ok = torch.from_numpy(constraint.allowed()).to(scores.device)
            n = min(ok.shape[0], scores.shape[-1])
            scores[:, :n] = scores[:, :n].masked_fill(~ok[:n], float("-inf"))
            scores[:, n:] = float("-inf")
            return scores

    return LogitsProcessorList([_Grammar()])


def _max_positions(model_dir: Path) -> int | None:
    """config.json's max_position_embeddings (what AutoConfig reads for the llama.cpp context), None
    when it is not there as a plain key (transformers then maps the model's own name for it)."""
    import json

    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


_END = object()


class _StreamText:
    """A stream's token ids as text deltas: detokenized incrementally, cut at the first stop string,
    and holding back what may be the start of one."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.dec = _Decoder(tokenizer)
        self.stop = stop
        self.sent = 0
        self.hit = False

    def add(self, token_id: int) -> str:
        if not self.dec.add(token_id) or self.hit:
            return ""
        text, self.hit = cut_at_stop(self.dec.emitted, self.stop)
        if not self.hit:
            text = text[: len(text) - held_back(text, self.stop)]
        if len(text) <= self.sent:
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta

    def finish(self) -> tuple[str, str]:
        """(the last delta, the whole answer's text); `hit` says whether a stop string ended it."""
        self.dec.finish()
        text, self.hit = cut_at_stop(self.dec.emitted, self.stop)
        return text[self.sent:] if len(text) > self.sent else "", text


class AnswerStream:
    """Iterate for text deltas; `.sources` is known from the start, `.answer` once exhausted.

    Generation runs in a worker thread that holds the generator's lock; `close()` (or abandoning
    the iterator) stops it at the next token, so a client that hangs up frees the model.
    On an event loop, `async for` reads the same deltas without a thread hop per token: the worker
    posts each token id to the loop (`call_soon_threadsafe`), and tokens that arrived together come
    out as one delta; `await aclose()` stops the worker.
    """

    def __init__(self, gen: Generator, job: _Job):
        self.gen = gen
        self.job = job
        self.sources = job.sources
        self.mode = job.mode
        self.abstained = job.abstained
        self.prompt_tokens = 0 if job.abstained else len(job.input_ids)
        self.answer: Answer | None = None
        self._cancel = threading.Event()
        self._it = self._run()
        self._aq: Any = None  # the asyncio.Queue of `async for`, made at its first step
        self._astate: tuple[_StreamText, dict[str, Any]] | None = None

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating at the next token; safe from another thread while one is iterating."""
        self._cancel.set()
        try:
            self._it.close()
        except ValueError:  # being iterated in another thread: the cancel flag ends it
            pass

    def _start(self, put: Any) -> dict[str, Any]:
        """Start the worker thread, which hands `put` each token id, then _END or its exception;
        returns the dict it fills with the run's stats before _END."""
        gen, job = self.gen, self.job
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result.update(gen._run(job, put, self._cancel))
                put(_END)
            except BaseException as exc:  # handed to the consumer
                put(exc)

        threading.Thread(target=work, name="ragtune-generate", daemon=True).start()
        return result

    def _end(self, st: _StreamText, result: dict[str, Any]) -> str:
        tail, text = st.finish()
        if st.hit:
            result["finish_reason"] = "stop"
        self.answer = self.gen._finish(self.job, text, st.dec.ids, result)
        return tail

    def _run(self) -> Iterator[str]:
        if self.job.abstained:
            self.answer = self.gen._abstain_answer(self.job)
            yield self.answer.text
            return
        q: queue.Queue[Any] = queue.Queue()
        result = self._start(q.put)
        st = _StreamText(self.gen.tokenizer, self.job.stop)
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                delta = st.add(item)
                if delta:
                    yield delta
            tail = self._end(st, result)
            if tail:
                yield tail
        finally:
            self._cancel.set()  # no-op when finished; stops the worker when the consumer left early

    # --- on an event loop ---------------------------------------------------------------------

    def __aiter__(self) -> "AnswerStream":
        return self

    async def __anext__(self) -> str:
        import asyncio

        if self._aq is None:
            self._aq = asyncio.Queue()
            if self.job.abstained:
                self.answer = self.gen._abstain_answer(self.job)
                return self.answer.text  # _astate stays None: the next step ends the stream
            loop, aq = asyncio.get_running_loop(), self._aq

            def put(item: Any) -> None:
                try:
                    loop.call_soon_threadsafe(aq.put_nowait, item)
                except RuntimeError:  # the loop is closed (the server stopped): stop generating
                    self._cancel.set()

            self._astate = (_StreamText(self.gen.tokenizer, self.job.stop), self._start(put))
        if self._astate is None:
            raise StopAsyncIteration
        st, result = self._astate
        while True:
            items = [await self._aq.get()]
            while not self._aq.empty():  # what arrived meanwhile goes out in one delta
                items.append(self._aq.get_nowait())
            out = []
            for item in items:
                if item is _END:
                    self._astate = None
                    self._cancel.set()
                    out.append(self._end(st, result))
                    break
                if isinstance(item, BaseException):
                    self._astate = None
                    self._cancel.set()
                    raise item
                out.append(st.add(item))
            text = "".join(out)
            if text:
                return text
            if self._astate is None:
                raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop generating at the next token (the worker sees the flag; nothing to await)."""
        self._cancel.set()
        self._astate = None
