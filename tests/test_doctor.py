"""`ragtune doctor` on a machine set up wrongly: each problem is a failed check that names the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_cache_folder_that_is_a_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, below: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # RAGTUNE_HOME naming a file (or a folder under one) passed the cache check: nothing could be written there
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path / "notes.txt" / below))
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    cache = next(c for c in report["checks"] if c["name"] == "cache")
    assert cache["status"] == "fail" and not report["ok"]
    assert "is a file, not a folder" in cache["detail"]
    assert cache["fix"] == f"set RAGTUNE_HOME to a folder, or move the file '{tmp_path / 'notes.txt'}' out of the way"


@pytest.mark.usefixtures("llama_cpp_installed")  # doctor checks the converter where llama-cpp-python is installed
def test_the_llama_cpp_converter_is_checked(ragtune_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # doctor said nothing of the converter sdist, and 'ragtune export' then failed on a machine it had passed
    from ragtune.export.pin import SDIST_NAME

    def check() -> dict:
        main(["doctor", "--json"])
        return next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "llama.cpp converter")

    got = check()
    assert got["status"] == "warn" and "is missing" in got["detail"] and got["fix"].startswith("ragtune export setup")
    sdist = ragtune_home / "llama.cpp" / SDIST_NAME
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"not the pinned sdist")
    got = check()
    assert got["status"] == "warn" and "but ragtune pins" in got["detail"]
    assert got["fix"].startswith(f"delete {sdist}, then ragtune export setup")
