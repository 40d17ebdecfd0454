"""What llama.cpp's converter reads from a model folder's tokenizer files that transformers 5 stops writing.

    from ragtune.tokenizer_files import with_token_types, write_token_types
    write_token_types(merged_dir)                  # a folder ragtune writes (a merge): filled in place
    with with_token_types(model_dir, tmp) as d:    # a user's folder: a folder of links beside, the original untouched
        convert(d)

The converter gives a SentencePiece vocabulary (Gemma, Gemma 2, Phi-3, Llama 2) its token types from
tokenizer.model, where chat markers such as `<start_of_turn>` are plain pieces, and then marks the
tokenizer's added tokens control (special) or user-defined from tokenizer_config.json's
"added_tokens_decoder" alone. transformers 5's `save_pretrained` writes that map into tokenizer.json
("added_tokens") only, so a folder it saved converted to a GGUF whose `<start_of_turn>` is an ordinary
token: llama.cpp then spells the marker out of pieces when it tokenizes a chat prompt, and the model
reads turns it was never trained on. The map is rebuilt from tokenizer.json's "added_tokens".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def added_tokens_decoder(model_dir: Path) -> dict[str, dict[str, Any]]:
    """tokenizer.json's added tokens as tokenizer_config.json writes them ({"id": {"content": ..., ...}})."""
    try:
        added = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens")
    except (OSError, ValueError, AttributeError):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for tok in added if isinstance(added, list) else []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int) and isinstance(tok.get("content"), str):
            out[str(tok["id"])] = {k: tok[k] for k in TOKEN_FIELDS if k in tok}
    return out


def missing_token_types(model_dir: Path) -> dict[str, Any] | None:
    """tokenizer_config.json with the map filled in, where it lacks one that tokenizer.json can give; else None."""
    cfg_file = Path(model_dir) / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("added_tokens_decoder"):
        return None
    decoder = added_tokens_decoder(model_dir)
    return {**cfg, "added_tokens_decoder": decoder} if decoder else None


def write_token_types(model_dir: Path) -> bool:
    """Fill the map into a folder ragtune is writing (a merge's temporary folder); True when it did."""
    from ragtune.io import atomic_write_text

    cfg = missing_token_types(model_dir)
    if cfg is None:
        return False
    atomic_write_text(Path(model_dir) / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return True


@contextlib.contextmanager
def with_token_types(model_dir: Path, scratch: Path) -> Iterator[Path]:
    """`model_dir` itself when it has the map (or nothing to give it), else a folder in `scratch` of links to its
    files with a filled tokenizer_config.json, removed afterwards: a user's folder is never written."""
    cfg = missing_token_types(model_dir)
    if cfg is None:
        yield Path(model_dir)
        return
    linked = Path(scratch) / "converter-input"
    linked.mkdir(parents=True)
    try:
        for f in Path(model_dir).iterdir():
            if f.name != "tokenizer_config.json":
                os.symlink(f.resolve(), linked / f.name)
        (linked / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        yield linked
    finally:
        shutil.rmtree(linked, ignore_errors=True)
