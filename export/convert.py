"""llama.cpp's own converters, run as a subprocess from the pinned converter folder, offline.

    from ragtune.export.convert import convert_model, convert_lora
    convert_model(model_dir, tmp / "f16.gguf")                     # a transformers model dir -> f16 GGUF
    convert_lora(adapter_dir, base_dir, tmp / "lora.gguf")         # a peft adapter -> llama.cpp LoRA GGUF

A subprocess because the converter imports its own `gguf-py`, which must not shadow the installed
`gguf` package in this process; its last lines of output become the error when it fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)


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
    from ragtune.export.pin import converter_dir

    conv = converter_dir()
    _run_converter([str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file),
                    "--outtype", outtype], f"model '{model_dir}'")
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    from ragtune.export.pin import converter_dir

    conv = converter_dir()
    _run_converter([str(conv / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
                    "--outfile", str(out_file), "--outtype", outtype], f"adapter '{adapter_dir}'")
    return out_file
