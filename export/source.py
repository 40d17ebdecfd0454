"""What is being exported: an adapter folder (with its run card and base) or a model directory.

    from ragtune.export.source import classify_source
    src = classify_source("runs/adapter")       # src.kind == "adapter", src.base_dir, src.hash, src.card

The hash is of content, not paths (config, weights, the base's and template's hashes), so a cached
export is found again after the folder moves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError


def adapter_hash(adapter_dir: Path, card: dict[str, Any]) -> str:
    from ragtune.modeling import cached_file_sha256

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(name.encode())
        h.update(cached_file_sha256(adapter_dir / name).encode())
    h.update(str(card.get("base_model", {}).get("hash", "")).encode())
    h.update(str(card.get("chat_template", {}).get("hash", "")).encode())
    return h.hexdigest()


@dataclass
class Source:
    kind: str  # "model" | "adapter"
    path: Path
    hash: str
    model_dir: Path | None = None  # the model dir to convert (a merged temp dir for adapters)
    base_dir: Path | None = None  # an adapter's base model
    card: dict[str, Any] = field(default_factory=dict)


def classify_source(source: str | Path) -> Source:
    from ragtune.errors import ModelPathError
    from ragtune.modeling import check_adapter_dir, check_model_dir, model_hash
    from ragtune.runcard import adapter_base

    p = Path(source).expanduser()
    if not p.exists():
        raise UsageError(f"export source '{p}' does not exist; give an adapter folder (from 'ragtune train'), a "
                         "merged model or a transformers model directory")
    if p.is_file() and p.suffix == ".gguf":
        raise UsageError(f"export source '{p}' is already a GGUF file; give the transformers model directory or "
                         "adapter folder it came from")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        p = check_adapter_dir(p)
        card, base = adapter_base(p)
        return Source("adapter", p, adapter_hash(p, card), base_dir=base, card=card)
    try:
        d = check_model_dir(p, what="export source")
    except ModelPathError as exc:
        raise UsageError(f"{exc}. An export source is an adapter folder (with adapter_config.json), a merged "
                         "model or a transformers model directory") from exc
    return Source("model", d, model_hash(d), model_dir=d)
