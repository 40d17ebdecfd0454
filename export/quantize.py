"""The GGUF types ragtune writes, and llama.cpp's quantize API from an f16 file.

    from ragtune.export.quantize import TYPES, quantize
    quantize(f16_file, out_file, "q4_k_m")       # llama_model_quantize, quiet unless -vv

`TYPES` is the one list of GGUF types (the CLI's choices, the config's `generation.gguf_type`, the
cache), spelled once as `ragtune.config.GgufType`; the module imports nothing heavy so `ragtune --help`
can read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ragtune.config import GGUF_TYPES
from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)

TYPES = GGUF_TYPES  # spelled once, in the config's GgufType
LLAMA_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
UNQUANTIZED_FILE_TYPES = (0, 1)  # general.file_type ALL_F32, MOSTLY_F16


def check_type(type: str, what: str = "--type") -> str:
    if type not in TYPES:
        raise UsageError(f"{what} '{type}' is not one of {', '.join(TYPES)}")
    return type


def require_llama_cpp() -> Any:
    """The llama_cpp module (an error with the install line when the extra is missing)."""
    from ragtune.export.pin import LLAMA_CPP_PYTHON_VERSION
    from ragtune.serve.llamacpp import import_llama_cpp

    lc = import_llama_cpp()
    version = getattr(lc, "__version__", "?")
    if version != LLAMA_CPP_PYTHON_VERSION:
        log.warning("llama-cpp-python %s is installed; ragtune pins %s (the converter's version)", version,
                    LLAMA_CPP_PYTHON_VERSION)
    return lc


def quantize(src: Path, out: Path, type: str, threads: int = 0) -> Path:
    """llama.cpp's quantize API (llama_model_quantize) from an f16 GGUF."""
    lc = require_llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, LLAMA_FTYPES[check_type(type)])
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    # llama.cpp prints a line per tensor (fallback types for odd widths): only at -vv
    with suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG)):
        rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise RagtuneError(f"llama.cpp could not quantize '{src}' to {type} (code {rc})")
    return out
