"""The wheel holds only ragtune/...: nothing bare named train, export, serve, retrieval or eval."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_only_the_ragtune_namespace(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheels = list(tmp_path.glob("ragtune-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ragtune", next(t for t in tops if t.endswith(".dist-info"))}
    for pkg in ("train", "export", "serve", "retrieval", "eval"):
        assert f"ragtune/{pkg}/__init__.py" in names
        assert f"ragtune/{pkg}/cli.py" in names
    meta = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "ragtune = ragtune.cli:main" in meta


def test_constraints_pin_cpu_torch() -> None:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
