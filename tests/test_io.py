"""Atomic writes: nothing half-written, and files get ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ragtune.io import atomic_dir, atomic_write_json, atomic_write_text


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_new_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "card.json", {"a": 1})
        d_parent = tmp_path / "out"
        with atomic_dir(d_parent) as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert _mode(p) == 0o644
    assert _mode(d_parent) == 0o755
    assert p.read_text() == '{\n  "a": 1\n}\n'


def test_replacing_keeps_the_old_files_mode(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("old")
    p.chmod(0o640)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "keep.json"
    p.write_text("precious")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(p, {"new": 1})
    assert p.read_text() == "precious"
    assert [q.name for q in tmp_path.iterdir()] == ["keep.json"]
