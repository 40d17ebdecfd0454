"""The llama.cpp engine: answers from a GGUF file on the CPU, with LoRA adapters switched per request.

    from ragtune.serve.llamacpp import LlamaCppEngine, ensure_gguf

    base = ensure_gguf("~/.cache/ragtune/models/SmolLM2-135M-Instruct")          # exported once, cached
    lora = {"policies": ensure_gguf(base_dir, adapter_dir="runs/adapter")}        # llama.cpp adapter GGUF
    eng = LlamaCppEngine(base, lora=lora, n_threads=2).load()
    out = eng.generate(prompt_text, max_new_tokens=64, temperature=0.0, adapter="policies",
                       on_token=lambda delta: print(delta, end=""))
    out["ids"], out["text"], out["prompt_tokens"], out["completion_tokens"], out["ttft_s"], out["decode_s"]

Greedy decoding is an argmax over llama.cpp's logits, so an f16 export gives the ids that
transformers' greedy `generate` gives wherever the top-2 logit margin is clear (checked by
`ragtune export gguf` and tests/export). Sampling applies temperature, then top-p, then draws
with a numpy generator seeded by `seed` (transformers' order; llama.cpp's own chain applies top-p
before temperature). The KV cache keeps the longest common prefix of consecutive prompts with the
same adapter (a chat's history, a RAG system prompt), and is dropped when the adapter changes.

Integration with `ragtune.serve.generator.Generator` (`engine="llama.cpp"`, wired as follows):

1. `check_engine`: accept "llama.cpp" (and "auto": llama.cpp when `pick_device(model.device)` is
   "cpu" and `llama_cpp_available()` is true, else transformers).
2. `Generator.load(base, adapters)`: keep loading the *tokenizer* with transformers (rendering the
   chat template, `prepare()`'s prompt ids, the context check and the `_Decoder` stay as they are);
   instead of `load_model`, call `gguf = ensure_gguf(path, type="f16")` (or a new `generation.gguf_type` setting)
   and `self.engine_impl = LlamaCppEngine(gguf, n_threads=cfg.generation.threads, n_ctx=max_positions).load()`.
   Set `self._eos` from `generation_config.json` as today (read it with `GenerationConfig.from_pretrained`)
   and `self._max_positions` from config.json. `self.model` stays None, so use a separate "loaded" flag.
3. `Generator.add_adapter(name, dir)`: keep every run-card check as is; replace the peft part with
   `self.engine_impl.add_lora(name, ensure_gguf(self.base_path, adapter_dir=p))`.
4. `Generator._run(job, on_token, cancel)`: under `self.lock`, call
   `r = self.engine_impl.generate(prompt_ids=job.input_ids, max_new_tokens=job.max_new_tokens,
   temperature=job.temperature, top_p=job.top_p, seed=job.seed, on_token_id=token, cancel=cancel,
   adapter=job.adapter, stop_ids=self._eos, repeat_penalty=cfg.generation.repetition_penalty)` where
   `token` is the existing closure (first-token time, count, last id); return the same stats dict
   (`queue_s`, `prefill_s` = time to first token, `first`, `decode_s`, `end`, `tokens`,
   `finish_reason` = `r["finish_reason"]`). `answer()` and `AnswerStream` need no change: they decode
   the ids with the transformers tokenizer, so text, streaming deltas, citations and abstention are
   identical between engines. (`on_token` here is a text-delta callback for standalone use.)
5. `warmup()` works unchanged. `ragtune eval --engine` only passes `engine=` to `Generator`.

Repetition penalty: llama.cpp penalises the last 64 tokens, transformers the whole context; the
engine implements transformers' rule itself (over prompt + output) so both engines agree.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'ragtune[llamacpp]' "
    "(or ./scripts/setup.sh, which does this; it compiles llama.cpp once, 5-10 minutes)"
)


def llama_cpp_available() -> bool:
    """True when `llama_cpp` can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise RagtuneError(f"the llama.cpp engine needs the 'llama-cpp-python' package; {INSTALL_HINT}") from exc
    return llama_cpp


def ensure_gguf(model_dir: str | Path, adapter_dir: str | Path | None = None, type: str = "f16",
                merged: bool = False) -> Path:
    """The cached GGUF for a model dir (exported once, keyed by content hash).

    With `adapter_dir`: the adapter converted to llama.cpp's LoRA format (for `lora=` over the base
    GGUF, so one base serves every adapter); with `merged=True` instead, the adapter merged into
    its base and exported as one model GGUF. Cached under $RAGTUNE_HOME/gguf/<source-hash>/.
    """
    from ragtune.export.cache import cached_gguf

    return cached_gguf(model_dir, adapter_dir=adapter_dir, type=type, merged=merged)


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def _default_threads(gguf_path: Path) -> int:
    """Every usable core, except one for a tiny file (< 64 MB, a test model): its many small ops
    make OpenMP barriers the cost, and on a shared CPU a descheduled thread stalls each one."""
    try:
        if gguf_path.stat().st_size < 64 * 2**20:
            return 1
    except OSError:
        pass
    return _usable_cpus()


class LlamaCppEngine:
    """One GGUF model in llama.cpp, any number of LoRA adapter GGUFs switched per call.

    Construct cheaply, `load()` explicitly. Calls are serialised by an internal lock (llama.cpp
    contexts are not re-entrant); the Generator's own lock sits above it.
    """

    def __init__(self, gguf_path: str | Path, lora: dict[str, str | Path] | None = None, n_threads: int = 0,
                 n_ctx: int = 0, n_batch: int = 512, verbose: bool = False):
        self.gguf_path = Path(gguf_path).expanduser()
        self.lora_paths = {k: Path(v).expanduser() for k, v in (lora or {}).items()}
        self.n_threads = int(n_threads) or _default_threads(self.gguf_path)
        self.requested_ctx = int(n_ctx)
        self.n_batch = int(n_batch)
        self.verbose = verbose
        self.llm: Any = None
        self._lc: Any = None
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None
        self._eog: frozenset[int] = frozenset()
        self._lock = threading.RLock()

    # --- loading ------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.llm is not None

    def load(self) -> "LlamaCppEngine":
        lc = import_llama_cpp()
        if not self.gguf_path.is_file():
            raise UsageError(
                f"GGUF file '{self.gguf_path}' does not exist; make one with "
                "'ragtune export gguf MODEL_DIR --out FILE.gguf' (or ensure_gguf(model_dir))"
            )
        from llama_cpp import Llama

        t0 = time.perf_counter()
        n_ctx_train = self._n_ctx_train()
        n_ctx = self.requested_ctx or min(n_ctx_train or 4096, 4096)
        try:
            self.llm = Llama(model_path=str(self.gguf_path), n_ctx=n_ctx, n_batch=min(self.n_batch, n_ctx),
                             n_threads=self.n_threads, n_threads_batch=self.n_threads, n_gpu_layers=0,
                             verbose=self.verbose)
        except ValueError as exc:
            raise RagtuneError(
                f"llama.cpp cannot load '{self.gguf_path}' ({exc}); export it again with 'ragtune export gguf' "
                "(the file may be damaged or from an incompatible llama.cpp version)"
            ) from exc
        self._lc = lc
        vocab = self.llm._model.vocab
        self._eog = frozenset(t for t in range(self.llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, t))
        for name, path in list(self.lora_paths.items()):
            self._init_lora(name, path)
        log.info("llama.cpp loaded %s (%d threads, n_ctx %d, LoRA adapters: %d) in %.2fs", self.gguf_path,
                 self.n_threads, n_ctx, len(self._adapters), time.perf_counter() - t0)
        return self

    def _n_ctx_train(self) -> int:
        from ragtune.export.header import gguf_metadata

        try:
            arch = gguf_metadata(self.gguf_path, ["general.architecture"]).get("general.architecture", "")
            return int(gguf_metadata(self.gguf_path, [f"{arch}.context_length"]).get(f"{arch}.context_length", 0))
        except Exception:  # noqa: BLE001 - only a default size is at stake; llama.cpp reports a bad file
            return 0

    def add_lora(self, name: str, gguf_path: str | Path) -> str:
        """Load one more LoRA adapter GGUF over the loaded base (no reload of the base)."""
        with self._lock:
            if name in self._adapters:
                raise UsageError(f"adapter name '{name}' is already loaded from '{self.lora_paths[name]}'")
            self.lora_paths[name] = Path(gguf_path).expanduser()
            if self.loaded:
                self._init_lora(name, self.lora_paths[name])
        return name

    def _init_lora(self, name: str, path: Path) -> None:
        if not path.is_file():
            raise UsageError(
                f"LoRA GGUF '{path}' (adapter '{name}') does not exist; make it with "
                "'ragtune export gguf ADAPTER_DIR --lora --out FILE.gguf'"
            )
        ptr = self._lc.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
        if not ptr:
            raise RagtuneError(
                f"llama.cpp cannot load LoRA '{path}' over '{self.gguf_path}'; the adapter must be converted for "
                "this base model ('ragtune export gguf ADAPTER_DIR --lora')"
            )
        self._adapters[name] = ptr

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx()) if self.loaded else 0

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata) if self.loaded else {}

    def close(self) -> None:
        with self._lock:
            if self.llm is not None:
                self.llm.close()
            self.llm = None
            self._adapters.clear()

    # --- tokens -------------------------------------------------------------------------------

    def _need_loaded(self) -> None:
        if not self.loaded:
            raise UsageError("LlamaCppEngine: call load() first")

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` as a chat prompt: special tokens parsed, no BOS added (like transformers'
        `tokenizer(prompt, add_special_tokens=False)` on a rendered chat template)."""
        self._need_loaded()
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (transformers' `skip_special_tokens=True`)."""
        self._need_loaded()
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    # --- generation ---------------------------------------------------------------------------

    def _set_adapter(self, adapter: str | None) -> None:
        if adapter == self._active:
            return
        lc = self._lc
        if adapter is None:
            rc = lc.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            if adapter not in self._adapters:
                loaded = ", ".join(self._adapters) or "none"
                raise UsageError(f"adapter '{adapter}' is not loaded in the llama.cpp engine (loaded: {loaded})")
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapters[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, scales)
        if rc != 0:
            raise RagtuneError(f"llama.cpp could not switch to adapter '{adapter}' (code {rc})")
        self._active = adapter
        self.llm.n_tokens = 0  # the cached prefix was computed with other weights

    def _logits(self) -> Any:
        import numpy as np

        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def _prefill(self, ids: list[int], reuse_prefix: bool) -> None:
        llm = self.llm
        keep = 0
        if reuse_prefix and llm.n_tokens > 0:
            cached = llm.input_ids[: llm.n_tokens]
            for a, b in zip(cached, ids):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(ids) - 1)  # at least one token to evaluate, for fresh logits
        llm.n_tokens = keep
        llm.eval(ids[keep:])

    def generate(self, prompt_text: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_token: Callable[[str], Any] | None = None,
                 cancel: threading.Event | None = None, adapter: str | None = None, *,
                 prompt_ids: Sequence[int] | None = None, on_token_id: Callable[[int], Any] | None = None,
                 stop_ids: Sequence[int] | None = None, repeat_penalty: float = 1.0,
                 reuse_prefix: bool = True) -> dict[str, Any]:
        """Generate after `prompt_text` (tokenized with `tokenize`) or `prompt_ids`.

        Greedy when temperature is 0. `on_token(text_delta)` streams text (deltas concatenate to
        the returned text); `on_token_id(id)` streams ids. Stops at an end-of-generation token
        (`stop_ids`, default: the GGUF vocabulary's EOG tokens; the stop token is in `ids`, not in
        `text`), at `max_new_tokens`, or when `cancel` is set.
        """
        import numpy as np

        self._need_loaded()
        if (prompt_text is None) == (prompt_ids is None):
            raise UsageError("LlamaCppEngine.generate: give exactly one of prompt_text or prompt_ids")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        with self._lock:
            t0 = time.perf_counter()
            ids_in = self.tokenize(prompt_text) if prompt_ids is None else [int(i) for i in prompt_ids]
            if not ids_in:
                raise UsageError("LlamaCppEngine.generate: the prompt is empty")
            n_ctx = self.n_ctx
            if len(ids_in) >= n_ctx:
                raise UsageError(
                    f"the prompt is {len(ids_in)} tokens but the llama.cpp context is {n_ctx}; shorten it or "
                    "load the engine with a larger n_ctx"
                )
            budget = min(int(max_new_tokens), n_ctx - len(ids_in))
            stops = frozenset(int(s) for s in stop_ids) if stop_ids else self._eog
            rng = np.random.default_rng(seed)
            self._set_adapter(adapter)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            out: list[int] = []
            text_parts: list[str] = []
            seen = np.zeros(self.llm.n_vocab(), dtype=bool)
            if repeat_penalty != 1.0:
                seen[np.asarray(ids_in)] = True
            t_first = None
            finish = "length"
            self._prefill(ids_in, reuse_prefix)
            while len(out) < budget:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                logits = self._logits()
                if repeat_penalty != 1.0:
                    logits = logits.copy()
                    sel = logits[seen]
                    logits[seen] = np.where(sel > 0, sel / repeat_penalty, sel * repeat_penalty)
                tok = _pick(logits, temperature, top_p, rng)
                out.append(tok)
                seen[tok] = True
                if t_first is None:
                    t_first = time.perf_counter()
                if on_token_id is not None:
                    on_token_id(tok)
                if tok in stops:
                    finish = "stop"
                    break
                piece = self.llm.detokenize([tok], special=False)
                delta = decoder.decode(piece)
                if delta:
                    text_parts.append(delta)
                    if on_token is not None:
                        on_token(delta)
                if len(out) >= budget:
                    break
                self.llm.eval([tok])
            tail = decoder.decode(b"", final=True)
            if tail:
                text_parts.append(tail)
                if on_token is not None:
                    on_token(tail)
            t_end = time.perf_counter()
        first = t_first if t_first is not None else t_end
        n = len(out)
        decode_s = t_end - first
        return {
            "ids": out,
            "text": "".join(text_parts),
            "prompt_tokens": len(ids_in),
            "completion_tokens": n,
            "ttft_s": first - t0,
            "decode_s": decode_s,
            "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "finish_reason": finish,
            "adapter": adapter,
        }


def _pick(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy argmax at temperature 0; else temperature, then nucleus (top-p), then a draw."""
    import numpy as np

    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if 0 < top_p < 1:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))
