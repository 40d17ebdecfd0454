"""Atomic writes: nothing half-written, and files get ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ragtune.io import atomic_dir, atomic_write_json, atomic_write_set, atomic_write_text


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


def test_files_left_private_by_temp_writers_become_ordinary(tmp_path: Path) -> None:
    """safetensors' save_file writes 0600 (via a temp file): an adapter must be readable by the
    service account that serves it, like any file the user's umask allows."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "adapter") as d:
            save_file({"w": torch.zeros(2)}, str(d / "adapter_model.safetensors"))
            (d / "sub").mkdir(mode=0o700)
            (d / "sub" / "secret").write_text("s")
            (d / "sub" / "secret").chmod(0o640)  # a deliberate mode is kept
            (d / "run.sh").write_text("#!/bin/sh\n")
            (d / "run.sh").chmod(0o755)
    finally:
        os.umask(old)
    out = tmp_path / "adapter"
    assert _mode(out / "adapter_model.safetensors") == 0o644
    assert _mode(out / "sub") == 0o755
    assert _mode(out / "sub" / "secret") == 0o640
    assert _mode(out / "run.sh") == 0o755


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


def test_a_set_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.md"
    atomic_write_set({a: b"old a", b: b"old b"})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created under it")
    with pytest.raises(OSError):  # the third file cannot be written: the first two stay old
        atomic_write_set({a: b"new a", b: b"new b", blocker / "c.png": b"new c"})
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "blocker"]  # no temp files left
    assert atomic_write_set({a: b"new a", b: b"new b"}) == [a, b]
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")
