"""Writing a bundle: check every input, copy models, adapters, index snapshots and configs, add the
wheelhouse, the installer and bundle.json, all in one folder written at once (temp + rename).

    from ragtune.bundle_create import create_bundle

    out = create_bundle("OUT", models=["/m/x"], adapters=["runs/lora"], indexes=["policies"],
                        configs=["ragtune.yaml"], platform="cpu", deps="all", tar=True)   # OUT and OUT.tar

`ragtune bundle create` calls it; `ragtune.bundle` verifies, restores and installs what it writes.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune import __version__
from ragtune.bundle_layout import INSTALL_SH, MANIFEST, SCHEMA_VERSION, UNHASHED, VERIFY_PY
from ragtune.bundle_wheels import _project_root, build_wheelhouse, check_index_reachable, torch_index_url
from ragtune.errors import RagtuneError, UsageError
from ragtune.io import atomic_write_json
from ragtune.modeling import file_sha256

log = logging.getLogger(__name__)


def _installed_versions() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out[name] = dist.version
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def _copytree(src: Path, dst: Path, sparse: bool = False) -> None:
    """`sparse`: keep the holes of an index's preallocated files (ragtune.retrieval.store.copy_sparse)."""
    from ragtune.retrieval.store import copy_sparse

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", ".lock", ".readers", "checkpoints", "__pycache__"),
                    copy_function=copy_sparse if sparse else shutil.copy2)


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
    if tar and out.with_suffix(".tar").exists() and not force:  # said now, not after the bundle is written
        raise UsageError(f"'{out.with_suffix('.tar')}' already exists; pass --force to replace it with the new "
                         "bundle's .tar, or name another bundle dir")
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
    adapter_dirs = _unique_names([check_adapter_dir(Path(a).expanduser(), "--adapter") for a in adapters], "--adapter",
                                 "adapters", "ragtune ask --adapter NAME")
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
    config_files = _unique_names(config_files, "--config", "configs", "$RAGTUNE_HOME/configs/NAME")
    wheel_files = [Path(w).expanduser().resolve() for w in extra_wheels]
    for w in wheel_files:
        if not w.is_file() or w.suffix != ".whl":
            raise UsageError(f"--wheel '{w}' is not a wheel file")
        _check_wheel(w)
    return BundleInputs(model_dirs, adapter_dirs, index_dirs, config_files, wheel_files)


def _check_wheel(w: Path) -> None:
    """A --wheel pip will take on the far side: NAME-VERSION(-BUILD)-PY-ABI-PLATFORM.whl, a zip with a
    .dist-info folder (a renamed or cut-short file is found here, not by pip on the air-gapped machine)."""
    import zipfile

    fix = "build it with 'pip wheel --no-deps -w DIR PROJECT' and pass the file pip wrote"
    if len(w.stem.split("-")) not in (5, 6):
        raise UsageError(f"--wheel '{w}': '{w.name}' is not a wheel's file name (NAME-VERSION-PY-ABI-PLATFORM.whl), "
                         f"so pip will not install it; {fix}")
    try:
        with zipfile.ZipFile(w) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UsageError(f"--wheel '{w}' is not a whole wheel ({exc}); {fix}") from exc
    if bad is not None or not any(n.split("/")[0].endswith(".dist-info") for n in names):
        what = f"its member '{bad}' is damaged" if bad else "it has no .dist-info folder"
        raise UsageError(f"--wheel '{w}' is not a whole wheel ({what}); {fix}")


def _unique_names(paths: list[Path], flag: str, kind: str, used_as: str) -> list[Path]:
    """The same folder or file given twice is carried once; two different ones with the same name are refused
    (the bundle holds and restores them by name: one would replace the other)."""
    out: dict[str, Path] = {}
    for p in paths:
        other = out.get(p.name)
        if other is None:
            out[p.name] = p
        elif other.resolve() != p.resolve():
            raise UsageError(f"{flag} '{other}' and {flag} '{p}' are both named '{p.name}'; a bundle carries and "
                             f"restores {kind} by name ({used_as}), so one would replace the other: rename one")
    return list(out.values())


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
    try:
        with tarfile.open(tmp_tar, "w") as tf:
            tf.add(out, arcname=out.name)
        os.replace(tmp_tar, tar_path)
    except BaseException:  # interrupted or the disk filled: no half-written .tar left behind
        tmp_tar.unlink(missing_ok=True)
        raise
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
