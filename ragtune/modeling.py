"""Load tokenizers, models and adapters from LOCAL paths only; choose device and dtype.

Nothing here reaches a hub: every load passes local_files_only=True, safetensors only,
trust_remote_code off unless the user turns it on. Models are identified by content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ragtune.errors import ModelPathError, UsageError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
HASHED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
FIX_HINT = (
    "run 'ragtune models prepare' for the default model, 'ragtune models import FILE.gguf --out DIR' "
    "for a GGUF file, or point model.path at a transformers model directory"
)


def set_offline_env() -> None:
    """Make every Hugging Face library refuse the network. Call before importing any of them."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ragtune_home() -> Path:
    """$RAGTUNE_HOME, else ~/.cache/ragtune."""
    env = os.environ.get("RAGTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ragtune"


def adapter_dir(path: str | Path) -> Path:
    """An adapter folder; a bare name that is no folder here means $RAGTUNE_HOME/adapters/NAME, where
    `ragtune bundle restore` puts carried adapters."""
    p = Path(path).expanduser()
    if not p.exists() and len(p.parts) == 1:
        restored = ragtune_home() / "adapters" / p.name
        if restored.is_dir():
            return restored
    return p


def check_adapter_dir(path: str | Path, what: str = "adapter") -> Path:
    """The resolved adapter folder (a bare name may be a restored one, see adapter_dir), or UsageError
    naming the file that is missing: peft's adapter_config.json, or the safetensors weights (ragtune
    never loads a pickled adapter_model.bin)."""
    p = adapter_dir(path)
    if not p.exists():
        raise UsageError(f"{what} '{p}' does not exist; give the train.output_dir of a 'ragtune train' run")
    if not p.is_dir():
        raise UsageError(f"{what} '{p}' is a file; give the folder that holds adapter_config.json and "
                         "adapter_model.safetensors (a 'ragtune train' output_dir)")
    if not (p / "adapter_config.json").is_file():
        model = (p / "config.json").is_file() and bool(weight_files(p))
        hint = (f": it holds a whole model (config.json and weights), which is given as model.path={p}, not as an "
                "adapter") if model else "; point it at a folder written by 'ragtune train'"
        raise UsageError(f"{what} '{p}' has no adapter_config.json{hint}")
    if not (p / "adapter_model.safetensors").is_file():
        raise UsageError(f"{what} '{p}' has no adapter_model.safetensors (ragtune never loads pickle weights); "
                         "point it at a folder written by 'ragtune train'")
    config = check_json_file(p / "adapter_config.json", what)
    header = check_safetensors(p / "adapter_model.safetensors", what)
    r = config.get("r")
    if isinstance(r, int) and not config.get("rank_pattern"):  # a LoRA's A matrices are r rows
        wrong = [(k, v.get("shape")) for k, v in header.items()
                 if k != "__metadata__" and ".lora_A." in k and (v.get("shape") or [r])[0] != r]
        if wrong:
            raise UsageError(f"{what} '{p}': adapter_config.json says r={r} but {wrong[0][0]} has shape {wrong[0][1]} "
                             f"({len(wrong)} such tensors); the config and the weights do not belong together (an "
                             "edited config, or files from two runs): copy the folder again or train again")
    return p.resolve()


def adapter_mismatch(exc: BaseException, adapter: Path, base: Any) -> UsageError | None:
    """peft's "size mismatch" RuntimeError, when loading an adapter onto a base it was not trained on,
    as one line; None for any other error."""
    text = str(exc)
    if "size mismatch" not in text:
        return None
    first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), "")
    return UsageError(f"adapter '{adapter}' does not fit the base model '{base}': {first[:300]}; it was trained on "
                      "another base (see its ragtune.json), or its files were mixed: use the base it was trained on")


def check_json_file(f: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a model or adapter folder, or UsageError saying the folder is damaged."""

    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what}: '{f}' is not UTF-8 text ({exc.reason} at byte {exc.start}); the folder is damaged: "
                         "copy it again or write it again") from None
    except ValueError as exc:
        raise UsageError(f"{what}: '{f}' is not valid JSON ({exc}); the folder is damaged (an interrupted copy?): "
                         "copy it again or write it again") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: '{f}' holds a JSON {type(data).__name__}, not an object; the folder is damaged")
    return data


def check_safetensors(f: Path, what: str) -> dict[str, Any]:
    """The safetensors header of `f` (tensor name -> dtype, shape, offsets), checked whole and with every
    tensor it lists inside the file (a cut copy fails here with its size, not inside the loader)."""
    import struct

    size = f.stat().st_size
    why, header = "", {}
    with f.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            why = f"it is {size} bytes"
        else:
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                why = f"its header says {n} bytes of metadata but the file is {size} bytes"
            else:
                try:
                    header = json.loads(fh.read(n))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    why = "its header is not valid"
                else:
                    if 8 + n + end > size:
                        why = f"its tensors need {8 + n + end} bytes but the file is {size}"
    if why:
        raise UsageError(f"{what}: '{f}' is not a whole safetensors file ({why}); the folder is damaged (an interrupted "
                         "copy or download?): copy it again or write it again")
    return header


def check_model_dir(path: str | Path, what: str = "model.path") -> Path:
    """Return the resolved dir, or raise ModelPathError naming what is missing and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelPathError(f"{what} '{p}' does not exist; {FIX_HINT}")
    if not p.is_dir():
        hint = (
            f"; it is a GGUF file: run 'ragtune models import {p} --out DIR' first"
            if p.suffix == ".gguf"
            else ""
        )
        raise ModelPathError(f"{what} '{p}' is not a directory{hint}; {FIX_HINT}")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = ""
        try:
            base = str(json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
        except (ValueError, AttributeError, OSError):
            pass
        raise ModelPathError(
            f"{what} '{p}' is a LoRA adapter, not a model" + (f" (its base model: {base})" if base else "")
            + "; give the base model here and the adapter as model.adapter (ask, serve, eval), or merge them "
            f"into one model with 'ragtune merge {p} --out DIR' and give DIR")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab files)")
    if not weight_files(p):
        pickles = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        if pickles:
            missing.append(
                f"safetensors weights (found only pickle files {', '.join(pickles)}, which ragtune "
                "never loads; convert them to safetensors on a trusted machine)"
            )
        else:
            missing.append("weights (*.safetensors)")
    if missing:
        raise ModelPathError(f"{what} '{p}' has no {' and no '.join(missing)}; {FIX_HINT}")
    check_json_file(p / "config.json", what)
    for f in weight_files(p):
        check_safetensors(f, what)
    return p.resolve()


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def default_chat_model_dir() -> Path:
    return ragtune_home() / "models" / "SmolLM2-135M-Instruct"


def resolve_model_path(path: str = "", what: str = "model.path") -> Path:
    """"" means the prepared default chat model."""
    if not path:
        d = default_chat_model_dir()
        if not d.exists():
            raise ModelPathError(
                f"the default chat model is not prepared yet (expected at '{d}'); "
                "run 'ragtune models prepare' or set model.path to a local transformers model directory"
            )
        return check_model_dir(d, what)
    return check_model_dir(path, what)


# --- device / dtype ---------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No progress bars on stderr from loading or saving weights, no library deprecation notes:
    stdout/stderr belong to the command."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def accelerator_possible() -> bool:
    """Could torch see a GPU here? False only where it certainly cannot: Linux with no NVIDIA, Jetson,
    AMD (ROCm) or WSL GPU device in /dev. `engine: auto` then picks llama.cpp without importing torch
    (~2 s of a cold answer) only to hear "cpu"; anywhere else pick_device asks torch."""
    import sys

    if not sys.platform.startswith("linux"):
        return True  # macOS (mps), Windows: only torch knows
    try:
        names = os.listdir("/dev")
    except OSError:
        return True
    return any(n.startswith(("nvidia", "nvhost", "nvgpu")) or n in ("kfd", "dxg") for n in names)


def pick_device(pref: str = "auto") -> str:
    import torch

    if pref != "auto":
        kind, _, index = pref.partition(":")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ModelPathError(f"device '{pref}' was asked for but torch sees no CUDA GPU; use device=auto or cpu")
        if kind == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
            raise ModelPathError(f"device '{pref}' was asked for but torch sees {torch.cuda.device_count()} CUDA "
                                 f"GPU(s), numbered from 0; use device=cuda or cuda:0")
        mps = getattr(torch.backends, "mps", None)
        if kind == "mps" and not (mps is not None and mps.is_available()):
            raise ModelPathError(f"device '{pref}' was asked for but torch sees no Apple GPU (MPS) here; use "
                                 "device=auto or cpu")
        return pref
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (avx512_bf16 or AMX)? Emulated bf16 is slower than fp32."""
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # a private torch probe: its absence or failure means "no"
            continue
    return False


def pick_dtype(device: str, pref: str = "auto") -> Any:
    import torch

    if pref != "auto":
        return getattr(torch, pref)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --- loading ----------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    p = check_model_dir(path)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=trust_remote_code)


def load_model(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Any:
    """A causal LM on its device, in eval mode, from safetensors in a local dir."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    dev = pick_device(device)
    check_memory(p, dev, pick_dtype(dev, dtype), purpose="load the model")
    model = AutoModelForCausalLM.from_pretrained(
        str(p),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=pick_dtype(dev, dtype),
        **kwargs,
    )
    model.to(dev)
    model.eval()
    return model


def _available_memory(device: str) -> int | None:
    """Bytes free for a model on `device` (None where unknown)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def check_memory(base: str | Path, device: str, dtype: Any, qlora: bool = False, purpose: str = "train") -> None:
    """Refuse, before loading, a model whose weights alone do not fit in free memory (the kernel's OOM
    killer says only 'Killed'); warn when they take more than 80% of it."""
    import torch

    free = _available_memory(device)
    if free is None:
        return
    n = count_parameters(base)
    per_param = 0.56 if qlora else torch.finfo(dtype).bits / 8  # nf4 with double quantisation ~ 4.5 bits
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1  # CPU processes share the RAM
    need = n * per_param * procs
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
    what = "nf4 4-bit" if qlora else str(dtype).replace("torch.", "")
    say = (f"the model's {n / 1e9:.2f}B parameters take {gb(need)} in {what}"
           + (f" in {procs} processes" if procs > 1 else "")
           + f", and {'the GPU has' if device == 'cuda' else 'this machine has'} {gb(free)} free")
    if need <= 0.8 * free:
        return
    if need > free:
        fixes = []
        if device == "cpu" and per_param == 4:
            flag = "--dtype bfloat16" if purpose == "merge" else "model.dtype=bfloat16"
            fixes.append(f"{flag} ({gb(need / 2)})")
        if device == "cuda" and not qlora and purpose == "train":
            fixes.append(f"train.qlora=true (about {gb(n * 0.56)})")
        if device == "cpu" and purpose == "load the model":
            fixes.append("the llama.cpp engine with a quantised GGUF (generation.engine=llama.cpp "
                         "generation.gguf_type=q4_k_m)")
        if procs > 1:
            fixes.append("fewer processes")
        fixes.append("a machine with more memory" if purpose == "merge" else "a smaller model.path")
        raise UsageError(f"not enough memory to {purpose}: {say}; use " + " or ".join(fixes))
    log.warning("%s: %s may run out of memory", say, "training" if purpose == "train" else "it")


# --- identity ---------------------------------------------------------------------------------


def _hash_cache_path() -> Path:
    return ragtune_home() / "hash-cache.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def cached_file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (absolute path, size, mtime) so a 7B model is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = file_sha256(p)
    prefix = f"{p}|"
    cache = {k: v for k, v in cache.items() if not k.startswith(prefix)}  # this file's older versions
    cache[key] = digest
    try:
        from ragtune.io import atomic_write_text

        atomic_write_text(cache_file, json.dumps(cache, indent=0))
    except OSError:  # a read-only home must not stop anything
        pass
    return digest


def model_hash(path: str | Path) -> str:
    """Content hash of a model dir: config, tokenizer files and weights (not the path)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p / n for n in HASHED_FILES if (p / n).is_file()] + weight_files(p)
    for f in files:
        h.update(f.name.encode())
        h.update(cached_file_sha256(f).encode())
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_parameters(path: str | Path) -> int:
    """Parameter count from safetensors headers, without loading weights."""
    total = 0
    for f in weight_files(Path(path)):
        for name, meta in check_safetensors(f, "model").items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


def eos_token_ids(tokenizer: Any, eos: Any = None, model_dir: str | Path | None = None) -> list[int]:
    """The ids that end an answer: the generation config's eos (`eos`, else read from `model_dir`'s
    generation_config.json) plus the tokenizer's own eos token."""
    if eos is None and model_dir is not None:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_template_of(path: str | Path) -> str | None:
    """The chat template of a model dir without loading the tokenizer."""
    p = Path(path)
    jinja = p / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
        if isinstance(tpl, list):  # named templates
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        return tpl
    return None
