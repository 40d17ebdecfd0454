"""The llama.cpp engine: answers from a GGUF file on the CPU, concurrent requests decoded together.

    from ragtune.serve.llamacpp import LlamaCppEngine, ensure_gguf

    base = ensure_gguf("~/.cache/ragtune/models/SmolLM2-135M-Instruct")          # exported once, cached
    lora = {"policies": ensure_gguf(base_dir, adapter_dir="runs/adapter")}        # llama.cpp adapter GGUF
    eng = LlamaCppEngine(base, lora=lora, n_threads=2, max_batch=8).load()
    out = eng.generate(prompt_text, max_new_tokens=64, temperature=0.0, adapter="policies",
                       on_token=lambda delta: print(delta, end=""))
    out["ids"], out["text"], out["prompt_tokens"], out["completion_tokens"], out["ttft_s"], out["decode_s"]

`generate` may be called from many threads at once: every call is a sequence in one llama.cpp
context with `max_batch` sequence slots, and `ragtune.serve.batching.Scheduler` decodes the
running ones together, one batch per step (requests on different adapters never share a batch).
The Generator (`engine="llama.cpp"`) renders prompts and decodes ids with the model's tokenizer
(`ragtune.serve.light_tokenizer` once checked equal to transformers', else transformers') and
calls `generate(prompt_ids=..., on_token_id=...)`, so text, streaming, citations and abstention are
produced as on the transformers engine.

Greedy decoding is an argmax over llama.cpp's logits, so an f16 export gives the ids that
transformers' greedy `generate` gives wherever the top-2 logit margin is clear (checked by
`ragtune export gguf` and tests/export). Sampling applies temperature, then top-p, then draws
with a numpy generator seeded by `seed`, per request (transformers' order; llama.cpp's own chain
applies top-p before temperature). Each slot keeps the KV cache of its last sequence, and a new
request takes the slot that shares the longest prefix with its prompt on the same adapter (a
chat's history, a RAG system prompt). Repetition penalty follows transformers' rule (over prompt
and output; llama.cpp's own penalises the last 64 tokens only), so both engines agree.
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

from ragtune.errors import PromptTooLong, RagtuneError, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with: pip install 'ragtune[llamacpp]' (or ./scripts/setup.sh, which does this; it compiles "
    "llama.cpp for this CPU once, 5-10 minutes)"
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


def resolve_gguf_type(kind: str, for_eval: bool = False) -> str:
    """The GGUF type `generation.gguf_type` asks for. "auto": bf16 where this llama.cpp build multiplies
    bf16 in hardware (its system info reports AVX512_BF16: prefill ~1.5x f16's on such a CPU,
    docs/benchmarks.md; emulated bf16 would be slower than f16), else f16; for eval always f16, whose
    greedy ids are transformers' (a bf16 file rounds activations to bf16 too)."""
    if kind != "auto":
        return kind
    return "f16" if for_eval or not native_bf16() else "bf16"


def native_bf16() -> bool:
    """Does the installed llama.cpp build use the CPU's bf16 instructions (AVX512_BF16)?"""
    try:
        info = import_llama_cpp().llama_print_system_info().decode(errors="replace")
    except (RagtuneError, AttributeError):
        return False
    return bf16_in(info)


def bf16_in(system_info: str) -> bool:
    """Whether llama_print_system_info() text reports native bf16 (what `auto` serves bf16 on)."""
    return "AVX512_BF16 = 1" in system_info


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


_BACKEND = threading.Lock()
_backend_ready = False


def _init_backend(lc: Any) -> None:
    global _backend_ready
    with _BACKEND:
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True


class LlamaCppEngine:
    """One GGUF model in llama.cpp, any number of LoRA adapter GGUFs, `max_batch` sequence slots.

    Construct cheaply, `load()` explicitly. One scheduler thread owns the llama.cpp context (it is
    not re-entrant); `generate` hands it a sequence and waits. `lock` (the Generator's) is held
    around each decode step, so generators that share it never run the CPU at the same time.
    `flash_attn=False` is llama.cpp's unfused attention over every slot's cells (bench/bench_rag_batch.py).
    `prefill_chunk` caps the prompt tokens a step carries while other sequences decode (0: up to n_batch).
    """

    def __init__(self, gguf_path: str | Path, lora: dict[str, str | Path] | None = None, n_threads: int = 0,
                 n_ctx: int = 0, n_batch: int = 512, max_batch: int = 1, lock: Any = None, verbose: bool = False,
                 flash_attn: bool = True, prefill_chunk: int = 0):
        self.gguf_path = Path(gguf_path).expanduser()
        self.flash_attn = bool(flash_attn)
        self.lora_paths = {k: Path(v).expanduser() for k, v in (lora or {}).items()}
        self.n_threads = int(n_threads) or _default_threads(self.gguf_path)
        self.requested_ctx = int(n_ctx)
        self.n_batch = int(n_batch)
        if not 1 <= int(max_batch) <= 256:
            raise UsageError(f"max_batch must be between 1 and 256 (llama.cpp's sequence limit), got {max_batch}")
        self.n_seq = int(max_batch)
        self.prefill_chunk = int(prefill_chunk)  # prompt tokens per step while others decode (0: n_batch)
        self.lock = lock
        self.verbose = verbose
        self.model: Any = None  # llama_cpp._internals.LlamaModel
        self.ctx: Any = None  # llama_cpp._internals.LlamaContext
        self.scheduler: Any = None
        self._lc: Any = None
        self._batch: Any = None
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None
        self._eog: frozenset[int] = frozenset()
        self.n_vocab = 0
        self._lock = threading.RLock()

    # --- loading ------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.ctx is not None

    def load(self) -> "LlamaCppEngine":
        lc = import_llama_cpp()
        if not self.gguf_path.is_file():
            raise UsageError(
                f"GGUF file '{self.gguf_path}' does not exist; make one with "
                "'ragtune export gguf MODEL_DIR --out FILE.gguf' (or ensure_gguf(model_dir))"
            )
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        from ragtune.serve.batching import Scheduler

        t0 = time.perf_counter()
        set_verbose(self.verbose)
        _init_backend(lc)
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        try:
            self.model = _internals.LlamaModel(path_model=str(self.gguf_path), params=mp, verbose=self.verbose)
        except ValueError as exc:
            raise RagtuneError(
                f"llama.cpp cannot load '{self.gguf_path}' ({exc}); export it again with 'ragtune export gguf' "
                "(the file may be damaged or from an incompatible llama.cpp version)"
            ) from exc
        n_ctx = self.requested_ctx or min(self.model.n_ctx_train() or 4096, 4096)
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = self.n_batch = min(self.n_batch, n_ctx)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.n_seq_max = self.n_seq
        cp.kv_unified = True  # one buffer of n_ctx cells shared by the slots: memory does not grow with max_batch
        # Flash attention skips the cells the mask hides. Without it every token attends over the whole span
        # of cells in use, every slot's (masked, but computed): a 250-token RAG prompt prefilled beside 7
        # running ones cost 3x its prefill alone. V in f32: flash attention accumulates in V's type, and an f16
        # accumulator would round more than the unfused path, whose greedy ids equal transformers'.
        if self.flash_attn:
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cp.type_v = lc.GGML_TYPE_F32
        else:
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        try:
            self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=self.verbose)
        except ValueError as exc:
            self.model.close()
            self.model = None
            raise RagtuneError(f"llama.cpp cannot create a context of {n_ctx} tokens for '{self.gguf_path}' "
                               f"({exc}); lower the context or serve.max_batch ({self.n_seq})") from exc
        self._lc = lc
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = self.model.n_vocab()
        vocab = self.model.vocab
        self._eog = frozenset(t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(vocab, t))
        for name, path in list(self.lora_paths.items()):
            self._init_lora(name, path)
        self.scheduler = Scheduler(self, lock=self.lock, prefill_chunk=self.prefill_chunk)
        log.info("llama.cpp loaded %s (%d threads, n_ctx %d, %d slots, LoRA adapters: %d) in %.2fs", self.gguf_path,
                 self.n_threads, n_ctx, self.n_seq, len(self._adapters), time.perf_counter() - t0)
        return self

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
        ptr = self._lc.llama_adapter_lora_init(self.model.model, str(path).encode("utf-8"))
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
        return int(self._lc.llama_n_ctx(self.ctx.ctx)) if self.loaded else 0

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def metadata(self) -> dict[str, str]:
        return dict(self.model.metadata()) if self.loaded else {}

    def close(self) -> None:
        with self._lock:
            if self.scheduler is not None:
                self.scheduler.close()
                self.scheduler = None
            if self._batch is not None:
                self._lc.llama_batch_free(self._batch)
                self._batch = None
            if self.ctx is not None:
                self.ctx.close()
            if self.model is not None:
                self.model.close()
            self.ctx = self.model = None
            self._adapters.clear()
            self._active = None

    # --- tokens -------------------------------------------------------------------------------

    def _need_loaded(self) -> None:
        if not self.loaded:
            raise UsageError("LlamaCppEngine: call load() first")

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text` as a chat prompt: special tokens parsed, no BOS added (like transformers'
        `tokenizer(prompt, add_special_tokens=False)` on a rendered chat template)."""
        self._need_loaded()
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (transformers' `skip_special_tokens=True`)."""
        self._need_loaded()
        return self.model.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    # --- the scheduler's step primitives (called from its thread only) -------------------------

    def set_adapter(self, adapter: str | None) -> None:
        if adapter == self._active:
            return
        lc = self._lc
        if adapter is None:
            rc = lc.llama_set_adapters_lora(self.ctx.ctx, None, 0, None)
        else:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapters[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(self.ctx.ctx, arr, 1, scales)
        if rc != 0:
            raise RagtuneError(f"llama.cpp could not switch to adapter '{adapter}' (code {rc})")
        self._active = adapter

    def seq_rm(self, seq: int, keep: int) -> None:
        """Drop sequence `seq`'s cached tokens from position `keep` on."""
        self._lc.llama_memory_seq_rm(self.ctx.memory, seq, keep, -1)

    def seq_cp(self, src: int, dst: int, n: int) -> None:
        """Give sequence `dst` the cached tokens of `src` at positions [0, n). In the unified cache this
        tags the same cells with both sequences: nothing is copied or computed again."""
        self._lc.llama_memory_seq_cp(self.ctx.memory, src, dst, 0, n)

    def decode(self, items: Sequence[tuple[int, Sequence[int], int, bool]]) -> list[Any]:
        """One llama_decode of `items` = (sequence, tokens, first position, logits for the last token?);
        returns the logits rows asked for, in order (views, valid until the next decode)."""
        import numpy as np

        lc, b = self._lc, self._batch
        n, rows = 0, []
        for seq, toks, pos0, want in items:
            for j, t in enumerate(toks):
                b.token[n] = t
                b.pos[n] = pos0 + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = 0
                n += 1
            if want:
                b.logits[n - 1] = 1
                rows.append(n - 1)
        b.n_tokens = n
        rc = lc.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RagtuneError(f"llama.cpp could not decode a batch of {n} tokens (code {rc}"
                               + (": no room in the KV cache" if rc == 1 else "") + ")")
        return [np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx.ctx, i), shape=(self.n_vocab,)) for i in rows]

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompt_text: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, on_token: Callable[[str], Any] | None = None,
                 cancel: Any = None, adapter: str | None = None, *,
                 prompt_ids: Sequence[int] | None = None, on_token_id: Callable[[int], Any] | None = None,
                 stop_ids: Sequence[int] | None = None, repeat_penalty: float = 1.0,
                 reuse_prefix: bool = True, constraint: Any = None) -> dict[str, Any]:
        """Generate after `prompt_text` (tokenized with `tokenize`) or `prompt_ids`; thread-safe.

        Greedy when temperature is 0. `on_token(text_delta)` streams text (deltas concatenate to
        the returned text); `on_token_id(id)` streams ids; both run in the scheduler thread. Stops
        at an end-of-generation token (`stop_ids`, default: the GGUF vocabulary's EOG tokens; the
        stop token is in `ids`, not in `text`), at `max_new_tokens`, or when `cancel` is set
        (checked every step: a cancelled request leaves its slot at once), or when `constraint`
        (a `ragtune.serve.constrained.Constraint`, which masks every step's logits) has ended.
        """
        from ragtune.serve.batching import SeqRequest

        self._need_loaded()
        if (prompt_text is None) == (prompt_ids is None):
            raise UsageError("LlamaCppEngine.generate: give exactly one of prompt_text or prompt_ids")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        if adapter is not None and adapter not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise UsageError(f"adapter '{adapter}' is not loaded in the llama.cpp engine (loaded: {loaded})")
        t0 = time.perf_counter()
        ids_in = self.tokenize(prompt_text) if prompt_ids is None else [int(i) for i in prompt_ids]
        if not ids_in:
            raise UsageError("LlamaCppEngine.generate: the prompt is empty")
        n_ctx = self.n_ctx
        if len(ids_in) >= n_ctx:
            raise PromptTooLong(
                f"the prompt is {len(ids_in)} tokens but the llama.cpp context is {n_ctx}; shorten it or "
                "load the engine with a larger n_ctx"
            )
        text_parts: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = frozenset(int(s) for s in stop_ids) if stop_ids else self._eog

        def token(tok: int) -> None:
            if on_token_id is not None:
                on_token_id(tok)
            if tok in stops:
                return
            delta = decoder.decode(self.model.detokenize([tok], special=False))
            if delta:
                text_parts.append(delta)
                if on_token is not None:
                    on_token(delta)

        req = SeqRequest(prompt=ids_in, budget=min(int(max_new_tokens), n_ctx - len(ids_in)),
                         temperature=float(temperature), top_p=float(top_p), seed=seed, adapter=adapter, stops=stops,
                         repeat_penalty=float(repeat_penalty), reuse_prefix=reuse_prefix, on_token=token, cancel=cancel,
                         constraint=constraint)
        self.scheduler.submit(req).wait()
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            if on_token is not None:
                on_token(tail)
        first = req.t_first if req.t_first is not None else req.t_end
        n = len(req.ids)
        decode_s = req.t_end - first
        return {
            "ids": list(req.ids),
            "text": "".join(text_parts),
            "prompt_tokens": len(ids_in),
            "completion_tokens": n,
            "queue_s": req.t_admit - t0,
            "ttft_s": first - t0,
            "decode_s": decode_s,
            "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "finish_reason": req.finish,
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
