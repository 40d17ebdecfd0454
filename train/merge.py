"""Merge a LoRA adapter into its base model: a plain safetensors model dir (transformers, vLLM).

    ragtune merge runs/adapter --out runs/merged
    ragtune merge runs/adapter --out runs/merged --base /models/smollm2   # the base has moved since training

The base comes from the adapter's run card and must still hash the same; the merged folder
carries the tokenizer (with the pad token used in training, the base's tokenizer.model, which
llama.cpp's converter needs for Gemma and Phi-3, and the added tokens' types in tokenizer_config.json,
which it reads there: ragtune/tokenizer_files.py) and the chat template trained with,
and the export is recorded in the run card's "exports".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError

log = logging.getLogger(__name__)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, force: bool = False,
                  dtype: str = "auto", base_dir: str | Path = "") -> Path:
    """Merge the adapter into its base (`base_dir`, else the folder its run card names; either way checked
    by content hash) and write the merged model folder whole."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.io import atomic_dir, check_output_dir
    from ragtune.modeling import check_adapter_dir, check_memory, text_sha256
    from ragtune.runcard import update_runcard
    from ragtune.tokenizer_files import write_token_types

    adapter = check_adapter_dir(Path(adapter_dir).expanduser())
    card, base = _base_of(adapter, base_dir)
    out = check_output_dir(out_dir, "--out", force, {"adapter": adapter, "base model": base})
    template = card["chat_template"]["template"]
    src_dtype = json.loads((base / "config.json").read_text()).get("dtype") or "float32"
    torch_dtype = getattr(torch, src_dtype if dtype == "auto" else dtype, torch.float32)

    check_memory(base, "cpu", torch_dtype, purpose="merge")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype, local_files_only=True,
                                                 use_safetensors=True)
    from ragtune.modeling import adapter_mismatch

    try:
        model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True)
    except RuntimeError as exc:
        raise adapter_mismatch(exc, adapter, base) or exc
    merged = model.merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
    tok.chat_template = template
    merged.config.pad_token_id = tok.pad_token_id
    if merged.generation_config is not None:
        merged.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        _copy_vocab_files(base, tmp)
        write_token_types(tmp)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        (tmp / "ragtune-model.json").write_text(json.dumps({
            "merged_from": {"adapter": str(adapter), "base": str(base), "base_hash": card["base_model"]["hash"]},
            "chat_template_hash": text_sha256(template),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2) + "\n")
    exports: list[Any] = list(card.get("exports") or [])
    exports.append({"kind": "merged", "path": str(out), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    update_runcard(adapter, exports=exports)
    log.info("merged %s into %s -> %s in %.1fs", adapter, base, out, time.time() - t0)
    return out


# Tokenizer files save_pretrained does not write back (transformers 5 writes tokenizer.json only), which
# llama.cpp's converter reads: Gemma, Gemma 2 and Phi-3 take their vocabulary from tokenizer.model alone.
VOCAB_FILES = ("tokenizer.model",)


def _copy_vocab_files(base: Path, out: Path) -> None:
    """The base's sentencepiece model beside the merged tokenizer (training adds no token to the vocabulary)."""
    import shutil

    for name in VOCAB_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copyfile(base / name, out / name)


def _base_of(adapter: Path, base_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The adapter's run card and base model folder: `base_dir` (--base) when given, else the one the card
    names; a base that has moved since training is asked for by --base, never guessed."""
    from ragtune.errors import ModelPathError
    from ragtune.modeling import check_model_dir, model_hash
    from ragtune.runcard import adapter_base, check_compatible, read_runcard

    if base_dir:
        card = read_runcard(adapter)
        base = check_model_dir(base_dir, what="--base")
        check_compatible(card, model_hash(base), str(base))
        return card, base
    try:
        return adapter_base(adapter)
    except ModelPathError:
        recorded = read_runcard(adapter)["base_model"]
        if Path(recorded["path"]).expanduser().exists():
            raise
        raise ModelPathError(
            f"the adapter's base model '{recorded['path']}' (named in {adapter / 'ragtune.json'}) is not there any "
            f"more; pass --base DIR with that model where it is now (checked by content hash, "
            f"{str(recorded.get('hash', ''))[:12]})") from None
