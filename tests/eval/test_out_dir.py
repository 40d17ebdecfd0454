"""`ragtune eval --out DIR`: a folder the report cannot be written to is refused before a model loads,
not after every question has been answered; the three report files are replaced as a set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main


def _questions(path: Path) -> Path:
    path.write_text(json.dumps({"id": "a", "question": "How many remote days?", "answer": "2 days"}) + "\n",
                    encoding="utf-8")
    return path


def _overrides(model: Path) -> list[str]:
    return [f"model.path={model}", "model.device=cpu", "eval.engine=transformers", "eval.max_new_tokens=2",
            "eval.bootstrap=10"]


@pytest.mark.parametrize("where", ["proc", "too-long"])
def test_an_unwritable_out_is_refused_before_any_answer(where: str, tmp_path: Path, tiny_llama: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # /proc is a folder (so the "under a file" check passes) in which no file can be created, even by
    # root; a 300-byte name exceeds NAME_MAX. Before, the first loaded the model, answered every question
    # and then failed writing the report (exit 1, an OS message); the second failed with the OS message.
    out = "/proc/ragtune-eval-test/report" if where == "proc" else str(tmp_path / ("x" * 300) / "eval")
    q = _questions(tmp_path / "q.jsonl")
    rc = main(["eval", "--questions", str(q), "--modes", "base", "--out", out, "--no-progress", "--json",
               *_overrides(tiny_llama)])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    err = json.loads(captured.out)["error"]
    assert err.startswith(f"eval.out_dir / --out '{out}'")
    if where == "proc":
        assert "cannot be written: creating a file in '/proc' failed" in err and "name a folder you can write" in err
    else:
        assert "is 300 bytes, longer than the 255 this file system allows; name a shorter folder" in err
    assert "question" not in captured.err  # nothing was answered


def test_a_folder_where_a_report_file_goes_is_refused_before_any_answer(tmp_path: Path, tiny_llama: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # before: every question was answered, then the rename onto report.png failed (exit 1) and the new
    # report.json, already renamed in, sat beside no png; the temp files stayed behind
    out = tmp_path / "ev"
    (out / "report.png").mkdir(parents=True)
    q = _questions(tmp_path / "q.jsonl")
    rc = main(["eval", "--questions", str(q), "--modes", "base", "--out", str(out), "--no-progress",
               *_overrides(tiny_llama)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out '{out}' holds a folder named report.png, where the report writes that file" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["report.png"]
