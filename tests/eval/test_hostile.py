"""`ragtune eval` given what a careless or hostile user gives it: typos, the wrong file, odd shapes.
Each case ends in a clear message (exit 2), never a traceback or a report of something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main


def _questions(path: Path) -> Path:
    path.write_text(json.dumps({"id": "a", "question": "How many remote days?", "answer": "2 days"}) + "\n",
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("modes, bad", [("bsae,rag", "bsae"), ("base,RAG", "RAG"), ("rag,ft+rga", "ft+rga")])
def test_a_mode_typo_against_a_remote_is_an_unknown_mode(modes: str, bad: str, tmp_path: Path, tiny_llama: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # with --engine openai a typo was taken for an adapter's mode: refused "as it needs an adapter" with a
    # warning, and the run went on with the other modes (a report without the mode the user asked for)
    q = _questions(tmp_path / "q.jsonl")
    rc = main(["eval", "--questions", str(q), "--out", str(tmp_path / "ev"), f"model.path={tiny_llama}",
               "--engine", "openai", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--modes", modes])
    err = capsys.readouterr().err
    assert rc == 2 and f"--modes: unknown mode(s) {bad}; choose from base,rag,ft,ft+rag" in err, err
    assert "need an adapter" not in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()


def test_a_file_that_is_not_jsonl_gets_a_short_message(tmp_path: Path, tiny_llama: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # a log or CSV passed as --questions: every line was a problem and every one was printed (5000 lines,
    # 370 kB of message); now the first 20 and how many more
    q = tmp_path / "questions.csv"
    q.write_text("".join(f"q{i},How many days?,{i} days\n" for i in range(5000)), encoding="utf-8")
    rc = main(["eval", "--questions", str(q), "--modes", "base", "--out", str(tmp_path / "ev"), "--json",
               f"model.path={tiny_llama}", "--engine", "transformers"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    msg = json.loads(out)["error"]
    assert msg.startswith(f"5000 problem(s) in questions file {q}:\n  {q}:1: not valid JSON")
    assert msg.count("not valid JSON") == 20 and msg.endswith("\n  ... and 4980 more")
    assert len(msg) < 21 * (len(str(q)) + 120)  # 21 lines, each the file's path and a short reason


@pytest.mark.parametrize("name, value, fix", [
    ("q.json", [{"question": "How many remote days?", "answer": "2 days"}] * 2, "jq -c '.[]' {q} > {d}/q.jsonl"),
    ("q.jsonl", {"questions": [{"question": "How many remote days?", "answer": "2 days"}]},
     "jq -c '.questions[]' {q} > {d}/q-lines.jsonl"),
    ("chat.json", {"messages": [{"role": "user", "content": "How many remote days?"},
                                {"role": "assistant", "content": "2 days"}]}, "jq -c '.' {q} > {d}/chat.jsonl"),
])
def test_a_json_file_is_named_as_one_with_the_conversion(name: str, value: object, fix: str, tmp_path: Path,
                                                         tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an indented .json file given for the JSONL: each line was called invalid JSON ('[', '{', ...)
    q = tmp_path / name
    q.write_text(json.dumps(value, indent=2), encoding="utf-8")
    rc = main(["eval", "--questions", str(q), "--modes", "base", "--out", str(tmp_path / "ev"),
               f"model.path={tiny_llama}", "--engine", "transformers"])
    err = capsys.readouterr().err
    what = "one JSON array" if isinstance(value, list) else "one JSON object over several lines"
    assert rc == 2 and f"questions file {q} is {what}, not JSON Lines: write one question object a line " \
                       f"(e.g. {fix.format(q=q, d=tmp_path)})" in err, err
    assert "not valid JSON" not in err


def test_nan_in_a_question_is_refused_not_copied_into_report_json(tmp_path: Path, tiny_llama: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Python's json reads NaN; it went into the question's meta and report.json then held NaN, which
    # jq, JavaScript and strict parsers reject
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "a", "question": "How many remote days?", "answer": "2 days", "weight": NaN}\n',
                 encoding="utf-8")
    rc = main(["eval", "--questions", str(q), "--modes", "base", "--out", str(tmp_path / "ev"), "--no-progress",
               f"model.path={tiny_llama}", "model.device=cpu", "eval.engine=transformers", "eval.max_new_tokens=2",
               "eval.bootstrap=10"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{q}:1: not valid JSON (NaN is not JSON (write null or a number))" in err, err
    assert not (tmp_path / "ev").exists()


def test_questions_from_a_pipe_are_read(tmp_path: Path, tiny_llama: Path) -> None:
    # `--questions <(jq -c '.[]' q.json)` gives a /dev/fd path, which is no regular file: it was refused as
    # "not found"; it is read like a file now
    import os
    import subprocess
    import sys

    line = json.dumps({"id": "a", "question": "How many remote days?", "answer": "2 days"})
    out = tmp_path / "ev"
    p = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m ragtune eval --questions <(echo '{line}') --modes base --out {out} "
                       f"--no-progress --json model.path={tiny_llama} model.device=cpu eval.engine=transformers "
                       "eval.max_new_tokens=2 eval.bootstrap=10"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [q["id"] for q in rep["questions"]] == ["a"] and rep["meta"]["questions"].startswith("/dev/fd/")
