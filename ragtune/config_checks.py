"""What numeric settings may be, and the rules across settings: checked by load_config, every problem
collected in `problems` as a line naming the file or override ("where") and the key.

    from ragtune.config_checks import RANGES
    RANGES["train.lora.dropout"].describe()       # 'at least 0 and below 1'
    problems: list[str] = []
    in_range(0, "search.top_k", "cfg.yaml", problems)   # False; problems[0] names the key and its range
    check_together(cfg, given_keys, "cfg.yaml", problems)  # epochs vs max_steps, LoRA targets, overlap vs size, ...

A setting not in RANGES takes any finite number.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ragtune.config_schema import ChunkConfig

if TYPE_CHECKING:
    from ragtune.config_schema import Config

# the key a problem line names: "WHERE: key 'train.epochs': ..." or "WHERE: unknown key 'trian' ..."
PROBLEM_KEY = re.compile(r"(unknown key|key) '([^'\[]+)")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take; `means` says what its special values stand for."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    means: str = ""
    also: float | None = None  # one value outside low..high that is allowed too (an "unset" that `means` explains)

    def allows(self, v: float) -> bool:
        return v == self.also or ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                                  and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def describe(self) -> str:
        low = "" if self.low is None else f"{'more than' if self.low_open else 'at least'} {_num(self.low)}"
        high = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {_num(self.high)}"
        also = "" if self.also is None else f"{_num(self.also)} or "
        return also + " and ".join(x for x in (low, high) if x) + (f" ({self.means})" if self.means else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# Every numeric setting's allowed values, checked while loading so a bad one stops every command before
# any model loads. Settings not listed take any number; rules across settings are in check_together.
RANGES: dict[str, Range] = {
    "data.eval_fraction": Range(0, 1, high_open=True, means="0 = no split"),
    "data.max_length": Range(1),
    "data.rag.top_k": Range(0, means="0 = rag.top_k"),
    "data.rag.distractors": Range(-1, means="-1 = all of the top_k others"),
    "data.rag.withheld": Range(0, 1),
    "train.max_steps": Range(-1, means="-1 or 0 = train for train.epochs"),
    "train.learning_rate": Range(0, low_open=True),
    # below 1: transformers reads a warmup of 1.0 as one step, not the whole run
    "train.warmup_ratio": Range(0, 1, high_open=True),
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
    # 8: the chunker's floor (retrieval/chunking.py)
    "chunk.size": Range(8, also=0, means=f"0 = the index's own, {ChunkConfig.NEW_SIZE} for a new index"),
    # at most half of chunk.size (check_together; set alone, judged at ingest against the index's size)
    "chunk.overlap": Range(-1, means=f"-1 = the index's own, {ChunkConfig.NEW_OVERLAP} for a new index"),
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
    "serve.prefill_chunk": Range(0, means="0 = no cap: llama.cpp's batch of 512 tokens, a whole prompt on transformers"),
    "serve.max_file_bytes": Range(1),
    "eval.max_new_tokens": Range(1),
    "eval.bootstrap": Range(1),
    "eval.seed": Range(0, 2**32 - 1),
    "eval.concurrency": Range(1),
}


def in_range(value: int | float, key: str, where: str, problems: list[str]) -> bool:
    """Whether a number may be `key`'s value; when not, `problems` gets a line naming the key and its range."""
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: key '{key}': must be a finite number, got {value!r}")
        return False
    rule = RANGES.get(key)
    if isinstance(value, int) and abs(value) >= 2**63 and (rule is None or rule.high is None):
        rule = dataclasses.replace(rule or Range(-(2**63) + 1), high=2**63 - 1)  # what the libraries below take
    if rule is not None and not rule.allows(value):
        problems.append(f"{where}: key '{key}': must be {rule.describe()}, got {value!r}")
        return False
    return True


def check_together(cfg: Config, given: set[str], where: str, problems: list[str]) -> None:
    """Rules across settings (`given`: the keys the file and overrides set); a setting already refused on
    its own is not judged again."""
    refused = {m[2] for p in problems if (m := PROBLEM_KEY.search(p))}

    def check(keys: tuple[str, ...], ok: bool, message: str) -> None:
        if not ok and not refused & set(keys):
            problems.append(f"{where}: key '{keys[0]}': {message}")

    t = cfg.train
    check(("train.epochs", "train.max_steps"), t.epochs > 0 or (t.epochs == 0 and t.max_steps > 0),
          f"must be more than 0 (0 only when train.max_steps > 0 sets the length), got {t.epochs!r}")
    check(("train.output_dir",), bool(t.output_dir.strip()),
          "is empty (an unset shell variable?): the adapter would be written into the current folder; name the "
          "folder for it, e.g. train.output_dir=runs/adapter")
    targets = t.lora.target_modules
    check(("train.lora.target_modules",), bool(targets) and ("all-linear" not in targets or len(targets) == 1),
          "must name the modules LoRA adapts (q_proj,v_proj) or be all-linear alone (every linear layer but the "
          f"output head), got {list(targets)!r}")
    if cfg.index.text_suffixes:  # (the formats' module only when they are set: config loads on every command)
        from ragtune.retrieval.file_formats import SUPPORTED

        bad = [x for x in cfg.index.text_suffixes
               if not re.fullmatch(r"\.[A-Za-z0-9_+-]{1,16}", x) or x.lower() in SUPPORTED | {".gz"}]
        check(("index.text_suffixes",), not bad,
              f"each must be a suffix with its dot (\".py\", \".log\") that ragtune does not already read as "
              f"its own format ({', '.join(sorted(SUPPORTED))}, .gz), got {bad!r}")
    c = cfg.chunk
    # judged when both are set: an unset overlap (the index's own, or 128) is cut to half of a smaller size, as
    # documented, and an overlap set alone is judged at ingest against the index's size (retrieval/ingest.py)
    check(("chunk.overlap", "chunk.size"), c.size == 0 or c.overlap < 0 or c.overlap <= c.size // 2,
          f"must be at most half of chunk.size {c.size} ({c.size // 2}), got {c.overlap!r}")
    s = cfg.search
    check(("search.dense_weight", "search.sparse_weight", "search.mode"),
          s.mode != "hybrid" or s.dense_weight + s.sparse_weight > 0,
          "must be more than 0 when search.sparse_weight is 0 too: hybrid fusion needs one channel weighted "
          "(or set search.mode to dense or sparse)")
