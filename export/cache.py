"""GGUF files for the llama.cpp serving engine: exported once per content hash, then reused.

    from ragtune.export.cache import cached_gguf
    base = cached_gguf(model_dir)                                  # $RAGTUNE_HOME/gguf/<hash>/model-f16.gguf
    lora = cached_gguf(model_dir, adapter_dir="runs/adapter")      # .../lora-f16.gguf, for LlamaCppEngine(lora=)

The key is the content hash of the source (model dir, or adapter + its base); the card beside each
file records the converter, and a different converter exports again. Cache entries are not recorded
in the adapter's run card (they are not the user's exports).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ragtune.errors import UsageError

log = logging.getLogger(__name__)


def cached_gguf(model_dir: str | Path, adapter_dir: str | Path | None = None, type: str = "f16",
                merged: bool = False) -> Path:
    """The cached GGUF of MODEL_DIR (or of ADAPTER_DIR over it: a LoRA GGUF, or merged with `merged`)."""
    from ragtune.export.build import export_gguf
    from ragtune.export.pin import SDIST_SHA256
    from ragtune.export.quantize import check_type
    from ragtune.export.source import classify_source
    from ragtune.modeling import check_model_dir, model_hash, ragtune_home

    check_type(type, what="GGUF type")
    base = check_model_dir(model_dir, what="model dir")
    if adapter_dir is None:
        key, name, source, lora = model_hash(base), f"model-{type}.gguf", base, False
    else:
        src = classify_source(adapter_dir)
        if src.kind != "adapter":
            raise UsageError(f"'{adapter_dir}' is not an adapter folder (no adapter_config.json)")
        if src.base_dir != base:
            raise UsageError(f"adapter '{src.path}' was trained on '{src.base_dir}', not on '{base}'")
        key = src.hash
        name = f"merged-{type}.gguf" if merged else "lora-f16.gguf"
        source, lora = src.path, not merged
        if lora:
            type = "f16"
    folder = ragtune_home() / "gguf" / key[:32]
    path = folder / name
    if _valid_entry(path, SDIST_SHA256):
        return path
    log.info("exporting %s to GGUF once (cached in %s)", source, folder)
    f16 = cached_gguf(base, type="f16") if (lora or (adapter_dir is None and type != "f16")) else None
    export_gguf(source, path, type, lora=lora, force=True, record=False, base_gguf=f16 if lora else None,
                f16_gguf=f16 if not lora else None, modelfile=path.with_suffix(".Modelfile"))
    return path


def _valid_entry(path: Path, sdist_sha256: str) -> bool:
    card = path.with_name(path.name + ".json")
    if not (path.is_file() and card.is_file()):
        return False
    try:
        info = json.loads(card.read_text())
    except ValueError:
        return False
    if not isinstance(info, dict) or info.get("size_bytes") != path.stat().st_size:  # cut short since: made again
        return False
    return (info.get("converter") or {}).get("sdist_sha256") == sdist_sha256
