"""The pinned llama.cpp converter: llama-cpp-python's source distribution, sha256-checked.

The installed llama-cpp-python wheel does not ship `convert_hf_to_gguf.py`, so set-up
(./scripts/setup.sh or `ragtune export setup`) keeps the pinned sdist in $RAGTUNE_HOME/llama.cpp/ and
the converter scripts are unpacked from it once. scripts/setup.sh and pyproject.toml's `llamacpp`
extra pin the same version (tests/export/test_export.py checks that they agree).

    from ragtune.export.pin import converter_dir
    conv = converter_dir()          # .../converter-0.3.36/convert_hf_to_gguf.py, or a UsageError with the fix
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("gguf-py/", "conversion/")


def llama_cpp_dir() -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "llama.cpp"


def sdist_path() -> Path:
    return llama_cpp_dir() / SDIST_NAME


def fetch_command(dest: Path | None = None) -> str:
    return (f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            f"-d {dest or llama_cpp_dir()}")


def _missing_sdist_hint() -> str:
    return (f"run 'ragtune export setup' (or ./scripts/setup.sh) on a machine with PyPI access, or copy "
            f"{SDIST_NAME} (sha256 {SDIST_SHA256[:16]}...) into {llama_cpp_dir()}/; it is fetched with: "
            f"{fetch_command()}")


def verify_sdist(path: Path | None = None) -> Path:
    """The pinned sdist, or an error naming what is wrong and how to get the right one."""
    from ragtune.modeling import cached_file_sha256

    p = path or sdist_path()
    if not p.is_file():
        raise UsageError(f"llama.cpp's GGUF converter is not set up: {p} is missing; {_missing_sdist_hint()}")
    digest = cached_file_sha256(p)
    if digest != SDIST_SHA256:
        raise UsageError(
            f"{p} has sha256 {digest[:16]}... but ragtune pins {SDIST_SHA256[:16]}... (llama-cpp-python "
            f"{LLAMA_CPP_PYTHON_VERSION}); delete it and {_missing_sdist_hint()}"
        )
    return p


def fetch_sdist() -> Path:
    """Download the pinned sdist with pip (needs PyPI) and verify it; a no-op when present and valid."""
    p = sdist_path()
    if p.is_file():
        try:
            return verify_sdist(p)
        except UsageError:
            p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=p.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if res.returncode != 0 or not got.is_file():
            raise RagtuneError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist ({res.stderr.strip()[-400:]}); "
                f"on an offline machine copy {SDIST_NAME} into {p.parent}/"
            )
        os.replace(got, p)
    return verify_sdist(p)


def converter_dir() -> Path:
    """llama.cpp's converter scripts, unpacked once from the verified sdist."""
    from ragtune.io import atomic_dir

    sdist = verify_sdist()
    out = llama_cpp_dir() / f"converter-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = out / ".sdist-sha256"
    whole = all((out / f).is_file() for f in CONVERTER_FILES)  # a script removed since: unpack again
    if whole and stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256:
        return out
    log.info("unpacking llama.cpp's converter from %s", sdist)
    with atomic_dir(out) as tmp, tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            rel = _converter_member(m)
            if rel is None:
                continue
            dest = tmp / rel
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(dest, "wb") as f:  # type: ignore[union-attr]
                shutil.copyfileobj(src, f)
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise RagtuneError(f"{sdist} has no {VENDOR}convert_hf_to_gguf.py; the file is not the pinned sdist")
        (tmp / ".sdist-sha256").write_text(SDIST_SHA256 + "\n")
    return out


def _converter_member(m: tarfile.TarInfo) -> str | None:
    """The member's path inside the converter folder, or None when it is not part of the converter."""
    if not m.name.startswith(VENDOR) or not (m.isfile() or m.isdir()):
        return None
    rel = m.name[len(VENDOR):]
    if ".." in Path(rel).parts:
        return None
    if rel in CONVERTER_FILES or any(rel.startswith(d) for d in CONVERTER_DIRS):
        return rel
    return None


def converter_version() -> str:
    return f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"


def converter_record() -> dict[str, str]:
    """What an export card records of the converter (a different one means: export again)."""
    return {"name": converter_version(), "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist_sha256": SDIST_SHA256}
