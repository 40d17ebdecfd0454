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
