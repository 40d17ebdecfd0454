"""Loading for the generator: which engine runs, the base model once, LoRA adapters on top of it.

    from ragtune.serve.loading import EngineUnavailable, check_engine

    check_engine("auto", "cpu")            # "llama.cpp" when llama-cpp-python is installed, else "transformers"
    gen = Generator(cfg).load(base=None, adapters={"policies": "runs/adapter"})   # GeneratorLoading.load
    gen.add_adapter("hr", "runs/hr")       # one more adapter, the base not reloaded
    gen.resolve_adapter("runs/hr")         # "hr": a loaded adapter's name, from its name or its dir

`GeneratorLoading` is the loading half of `ragtune.serve.generator.Generator` (a mixin over the state
`Generator.__init__` sets: cfg, engine, lock, model, tokenizer, adapters, ...). On transformers it
loads the model and tokenizer (and the batch scheduler, `ragtune.serve.tf_batching`); on llama.cpp a
cached GGUF and the light tokenizer (`ragtune.serve.light_tokenizer`). Each adapter is checked
against its run card (base model, chat template) before it is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ragtune.errors import UsageError

if TYPE_CHECKING:
    from ragtune.serve.generator import Generator

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
class _Adapter:
    name: str
    path: Path
    template: str | None
    card: dict[str, Any]
    system_prompt: str = ""  # the one every training record carried: the default for this adapter


def _max_positions(model_dir: Path) -> int | None:
    """config.json's max_position_embeddings (what AutoConfig reads for the llama.cpp context), None
    when it is not there as a plain key (transformers then maps the model's own name for it)."""
    import json

    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class GeneratorLoading:
    """The engine, base model and adapters of a `Generator` (see the module docstring)."""

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
        return TfScheduler(self, slots, lock=self.lock, prefill_chunk=self.cfg.serve.prefill_chunk)

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
        from ragtune.serve.llamacpp import LlamaCppEngine, ensure_gguf, resolve_gguf_type

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
        gguf = ensure_gguf(path, type=resolve_gguf_type(self.cfg.generation.gguf_type))
        self.engine_impl = LlamaCppEngine(gguf, n_threads=self.cfg.generation.threads,
                                          n_ctx=min(positions, 32768) if positions else 0,
                                          max_batch=self.cfg.serve.max_batch, lock=self.lock,
                                          prefill_chunk=self.cfg.serve.prefill_chunk).load()
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

    def _render(self, messages: Sequence[dict[str, str]], template: str | None) -> str:
        from ragtune.chat import render

        try:
            return render(self.tokenizer, messages, add_generation_prompt=True, chat_template=template)
        except ValueError as exc:
            raise UsageError(f"model '{self.base_path}': {exc}") from exc
