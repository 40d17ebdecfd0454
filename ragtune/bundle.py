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

The parts: `ragtune.bundle_create` (checking inputs and writing the folder, bundle.json, the .tar),
`ragtune.bundle_wheels` (the wheelhouse: dependency wheels, CPU torch, llama-cpp-python) and
`ragtune.bundle_layout` (the manifest's name, verify.py and install.sh). This module verifies, restores
and installs a bundle; every name above can be imported from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ragtune.bundle_create import (
    BundleInputs,
    check_inputs,
    copy_contents,
    create_bundle,
    write_installer,
    write_manifest,
    write_tar,
)
from ragtune.bundle_layout import INSTALL_SH, MANIFEST, SCHEMA_VERSION, UNHASHED, VERIFY_PY
from ragtune.bundle_wheels import (
    CPU_TORCH_INDEX,
    build_wheelhouse,
    check_index_reachable,
    llama_cpp_wheel,
    optional_deps,
    torch_index_url,
)
from ragtune.errors import CheckFailed, UsageError
from ragtune.runcard import repoint_adapter

__all__ = [
    "CPU_TORCH_INDEX", "INSTALL_SH", "MANIFEST", "SCHEMA_VERSION", "UNHASHED", "VERIFY_PY", "BundleInputs",
    "build_wheelhouse", "check_index_reachable", "check_inputs", "copy_contents", "create_bundle", "install_bundle",
    "llama_cpp_wheel", "optional_deps", "restore_bundle", "torch_index_url", "verify_bundle", "write_installer",
    "write_manifest", "write_tar",
]

log = logging.getLogger(__name__)


def _unpack_if_tar(bundle: Path) -> Path:
    """A bundle .tar unpacked beside itself (the folder it holds), or the bundle folder as given."""
    if not bundle.is_file():
        return bundle
    if not tarfile.is_tarfile(bundle):
        raise UsageError(f"'{bundle}' is a file but not a bundle .tar; give the bundle folder or the .tar "
                         "'ragtune bundle create --tar' wrote")
    try:
        with tarfile.open(bundle) as tf:
            members = tf.getmembers()  # reads every header: a .tar cut short fails here, before anything is written
            tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
            if len(tops) != 1 or f"{next(iter(tops))}/{MANIFEST}" not in tf.getnames():
                raise UsageError(f"'{bundle}' does not hold one bundle folder with {MANIFEST}; it was not written by "
                                 "'ragtune bundle create --tar'")
            dest = bundle.parent / next(iter(tops))
            for m in members:  # a member that would land outside the folder is refused before any is unpacked
                tarfile.data_filter(m, str(bundle.parent))
            log.info("unpacking %s into %s", bundle, dest)
            tf.extractall(bundle.parent, members=members, filter="data")
    except tarfile.TarError as exc:
        raise CheckFailed(f"'{bundle}' is damaged or was edited ({exc}); nothing was unpacked: copy the .tar "
                          "again") from exc
    return dest


def _verifier() -> dict[str, Any]:
    """verify.py's functions, run here too: one check on both sides of the air gap."""
    ns: dict[str, Any] = {"__name__": "ragtune_bundle_verify"}
    exec(compile(VERIFY_PY, "verify.py", "exec"), ns)  # noqa: S102 - our own constant, not the bundle's file
    return ns


def verify_bundle(bundle: str | Path) -> tuple[list[str], int]:
    """Problems (missing, wrong size, sha256 mismatch, a path outside the bundle, a file bundle.json does not
    list, bundle.json itself damaged, a damaged .tar) and the number of files checked."""
    try:
        root = _unpack_if_tar(Path(bundle).expanduser())
    except CheckFailed as exc:
        return [str(exc)], 0
    mf = root / MANIFEST
    if not mf.is_file():
        raise UsageError(f"'{root}' is not a ragtune bundle (no {MANIFEST})")
    try:
        return _verifier()["check"](str(root))
    except ValueError as exc:  # a problem like any other: `bundle verify --json` still prints its report
        return [f"{exc}; copy the bundle again"], 0


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
    _check_contents(manifest, root)
    for i in manifest["contents"]["indexes"]:  # said before anything is restored, not after the models
        with _index_free(check_index_name(i["name"])):
            pass
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
            else:
                _warn_base_not_here(a["name"], tmp)
        done["adapters"].append(str(dest))
    for item in manifest["contents"].get("llama_cpp", []):
        dest = home / "llama.cpp" / item["name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / item["path"], dest)
        done.setdefault("llama.cpp", []).append(str(dest))
    for i in manifest["contents"]["indexes"]:
        dest = index_dir(check_index_name(i["name"]))
        with _index_free(i["name"]), atomic_dir(dest) as tmp:
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


@contextmanager
def _index_free(name: str) -> Iterator[None]:
    """The index's writer lock, held while its folder is replaced: refused while another process writes it
    or a running server or chat reads a copy of it (the folder would change under them)."""
    from ragtune.retrieval.store import IndexBusy, IndexLock, index_dir, live_readers

    if not index_dir(name).is_dir():
        yield
        return
    with IndexLock(name, "ragtune bundle restore"):
        pids = live_readers(name)
        if pids:
            raise IndexBusy(f"index '{name}' is open in running process {', '.join(map(str, pids))} (a 'ragtune "
                            "serve' or 'ragtune chat' reading it); stop it and run 'ragtune bundle restore' again")
        yield


def _warn_base_not_here(name: str, adapter: Path) -> None:
    """An adapter whose base model the bundle does not carry works only where that model already is."""
    try:
        base = json.loads((adapter / "ragtune.json").read_text(encoding="utf-8")).get("base_model") or {}
    except (OSError, ValueError):
        base = {}
    path = str(base.get("path") or "")
    if path and Path(path).is_dir():
        return
    log.warning("adapter '%s': its base model (%s, hash %s) is not in this bundle and not at that path here; bring "
                "it (ragtune bundle create --model DIR) or give it with model.path=DIR when you use the adapter",
                name, path or "not recorded", str(base.get("hash") or "?")[:12])


def _check_contents(manifest: dict[str, Any], root: Path) -> None:
    """What restore copies where, checked before anything is copied: bundle.json is not covered by its own
    sha256s, so an edited one must not name a folder outside $RAGTUNE_HOME ('../..') or outside the bundle."""
    contents = manifest.get("contents")
    problems = []
    if not isinstance(contents, dict):
        problems.append("it has no 'contents' object")
        contents = {}
    inside = _verifier()["inside"]
    for kind in ("models", "adapters", "indexes", "configs", "llama_cpp"):
        items = contents.get(kind, [])
        if not isinstance(items, list):
            problems.append(f"contents.{kind} is not a list")
            continue
        for i, item in enumerate(items):
            where = f"contents.{kind}[{i}]"
            name = item.get("name") if isinstance(item, dict) else None
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(name, str) or not inside(name) or "/" in name:
                problems.append(f"{where}: name {name!r} is not a plain file or folder name")
            if not isinstance(path, str) or not inside(path) or not (root / path).exists():
                problems.append(f"{where}: path {path!r} is not a file or folder of the bundle")
            trimmed = item.get("trimmed") or {} if isinstance(item, dict) else {}
            if not isinstance(trimmed, dict) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in trimmed.values()):
                problems.append(f"{where}: trimmed {trimmed!r} is not {{file: size in bytes}}")
    if problems:
        raise CheckFailed(f"{root / MANIFEST} is damaged or was edited, nothing was restored:\n  "
                          + "\n  ".join(problems) + "\ncopy the bundle again")


def install_bundle(bundle: str | Path, venv: str | None = None) -> int:
    root = _unpack_if_tar(Path(bundle).expanduser().resolve())
    problems, n = verify_bundle(root)
    if problems:
        raise CheckFailed("bundle check failed, nothing was installed:\n" + "\n".join(problems))
    cmd = ["bash", str(root / "install.sh")] + (["--venv", venv] if venv else [])
    return subprocess.call(cmd)
