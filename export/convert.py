"""llama.cpp's own converters, run as a subprocess from the pinned converter folder, offline.

    from ragtune.export.convert import convert_model, convert_lora
    convert_model(model_dir, tmp / "f16.gguf")                     # a transformers model dir -> f16 GGUF
    convert_lora(adapter_dir, base_dir, tmp / "lora.gguf")         # a peft adapter -> llama.cpp LoRA GGUF
    require_convertible(model_dir)                                 # refuses an architecture it lacks, at once

A subprocess because the converter imports its own `gguf-py`, which must not shadow the installed
`gguf` package in this process; its last lines of output become the error when it fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)


# families users bring most, named (when the converter has them) in the refusal of one it lacks
FAMILIAR = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM")


def converter_architectures() -> set[str]:
    """The config.json architectures the pinned converter registers (`@ModelBase.register(...)`), read from
    its source without importing it."""
    import re

    from ragtune.export.pin import converter_dir

    conv = converter_dir()
    names: set[str] = set()
    for f in [conv / "convert_hf_to_gguf.py", *sorted((conv / "conversion").glob("*.py"))]:
        if f.is_file():
            for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", f.read_text(encoding="utf-8")):
                names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return names


def architecture_of(model_dir: Path) -> str | None:
    """The architecture the converter picks from config.json: its text_config's, else its own first."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for arches in (text.get("architectures"), cfg.get("architectures")):
        if isinstance(arches, list) and arches and isinstance(arches[0], str):
            return arches[0]
    return None


def require_convertible(model_dir: Path, what: str = "") -> None:
    """Refuse, before any merge or conversion, a model whose architecture the converter does not register
    (`what` names the model: "the adapter's base ")."""
    from ragtune.export.pin import converter_version

    arch = architecture_of(model_dir)
    known = converter_architectures()
    if arch is None or not known or arch in known:  # no list to go by: the converter itself decides
        return
    some = ", ".join(a for a in FAMILIAR if a in known)
    raise UsageError(
        f"{what}'{model_dir}' has the architecture {arch} (config.json \"architectures\"), which llama.cpp's converter "
        f"({converter_version()}) cannot convert to GGUF; it converts {len(known)} others, among them {some}. "
        "Answer with this model on the transformers engine (generation.engine=transformers), or merge an adapter "
        "into it for vLLM with 'ragtune merge'")


def _run_converter(args: list[str], what: str) -> None:
    from ragtune.export.pin import converter_version

    env = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[var] = "1"
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    cmd = [sys.executable, *args]
    log.info("converting %s: %s", what, " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-12:])
        raise RagtuneError(
            f"llama.cpp's converter failed on {what}:\n{tail}\nThe architecture and tokenizer must be ones "
            f"llama.cpp supports ({converter_version()})"
        )


def convert_model(model_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """A model folder saved by transformers 5 is converted through a folder of links to its files with the added
    tokens' types written back (ragtune/tokenizer_files.py), so that its chat markers stay control tokens."""
    from ragtune.export.pin import converter_dir
    from ragtune.tokenizer_files import with_token_types

    conv = converter_dir()
    with with_token_types(model_dir, out_file.parent) as src:
        _run_converter([str(conv / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out_file),
                        "--outtype", outtype], f"model '{model_dir}'")
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    from ragtune.export.pin import converter_dir

    conv = converter_dir()
    _run_converter([str(conv / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
                    "--outfile", str(out_file), "--outtype", outtype], f"adapter '{adapter_dir}'")
    return out_file
