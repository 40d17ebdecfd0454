"""The suite fails, never skips, where the README's set-up was supposed to install something, and it
looks for it in the user's own RAGTUNE_HOME (not a hard-coded ~/.cache/ragtune)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_converter_sdist_fails_the_tests_that_need_it(tmp_path: Path) -> None:
    empty_home = tmp_path / "home"  # a user whose RAGTUNE_HOME has no converter sdist
    empty_home.mkdir()
    env = dict(os.environ, RAGTUNE_HOME=str(empty_home))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
         "tests/test_bundle.py::test_bundle_carries_the_llama_cpp_converter"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "1 failed" in out and "skipped" not in out, out[-3000:]
    assert f"the pinned converter sdist is not at {empty_home}" in out and "./scripts/setup.sh" in out
