"""`ragtune eval --engine openai`: the held-out questions answered by a real OpenAI-compatible server
(llama-cpp-python's `llama_cpp.server` on the tiny GGUF export, started here) in the base and rag
modes, retrieval here; modes that need an adapter are refused and the report says so; the remote's
key never reaches the report. Fails (does not skip) when llama-cpp-python is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from tests.conftest import free_port, llama_server
from tests.export.conftest import NEEDS_LLAMA_CPP

pytestmark = NEEDS_LLAMA_CPP
QUESTIONS = [("How many days can I work remotely?", "three days per week", "hr.md"),
             ("How much annual leave do I get?", "twenty days per year", "hr.md"),
             ("When do unused leave days expire?", "at the end of March", "hr.md")]
SECRET = "sk-remote-secret-19"


@pytest.fixture(scope="module")
def remote(tiny_f16: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    with llama_server(tiny_f16["path"], tmp_path_factory.mktemp("remote") / "llama_cpp_server.log") as url:
        yield url


@pytest.fixture
def setup(tiny_embedder: Path, tiny_smol: Path, tmp_path: Path, capsys) -> list[str]:
    """Three questions, an index 't' over the handbook, and the settings eval needs (no adapter)."""
    from tests.retrieval.conftest import HR_MD

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hr.md").write_text(HR_MD, encoding="utf-8")
    emb = [f"embedder.path={tiny_embedder}", "embedder.device=cpu", "rag.min_score=-1"]
    assert main(["-q", "index", "add", str(docs), "--index", "t", "--no-progress", *emb]) == 0
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": f"q{i}", "question": x, "answer": a, "sources": [s]}) + "\n"
                         for i, (x, a, s) in enumerate(QUESTIONS)), encoding="utf-8")
    capsys.readouterr()
    return ["--questions", str(q), "--index", "t", "--no-progress", f"model.path={tiny_smol}",
            "eval.max_new_tokens=6", "eval.bootstrap=50", *emb]


def test_eval_engine_openai_scores_the_remote_in_base_and_rag(remote: str, setup: list[str], tmp_path: Path,
                                                               capsys) -> None:
    import httpx

    out = tmp_path / "ev"
    rc = main(["eval", *setup, "--out", str(out), "--engine", "openai", "--url", remote, "--model", "tiny",
               "--api-key", SECRET])  # default modes base,ft,rag,ft+rag: ft and ft+rag need an adapter
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "modes refused: ft, ft+rag" in printed and "engine: openai" in printed
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["modes"] == ["base", "rag"]
    meta = rep["meta"]
    assert meta["engine"] == f"openai (remote: model 'tiny' at {remote})"
    assert meta["remote model"] == "tiny" and meta["remote url"] == remote and meta["index"] == "t"
    assert meta["modes refused"].startswith("ft, ft+rag")
    assert any("modes ft, ft+rag were refused" in n for n in rep["notes"])
    for q in rep["questions"]:
        base, rag = q["answers"]["base"], q["answers"]["rag"]
        assert base["sources"] == [] and [s["source"] for s in rag["sources"]] == ["hr.md"] * len(rag["sources"])
        assert rag["sources"] and 0 < base["completion_tokens"] <= 6 and 0 < rag["completion_tokens"] <= 6
    # the base answers are the remote's own greedy answers to the bare question
    direct = httpx.post(remote + "/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[0][0]}], "max_tokens": 6,
        "temperature": 0.0, "seed": 0}).json()
    assert rep["questions"][0]["answers"]["base"]["answer"] == direct["choices"][0]["message"]["content"]
    for f in ("report.json", "report.md"):  # the remote's key is never written
        assert SECRET not in (out / f).read_text(encoding="utf-8")


@pytest.mark.parametrize("argv, names", [
    (["--engine", "openai", "--model", "tiny"], "generation.url is empty"),
    (["--engine", "openai", "--url", "http://127.0.0.1:9/v1"], "generation.model is empty"),
    (["--url", "http://127.0.0.1:9/v1"], "--url name a remote server: add --engine openai"),
    (["--engine", "openai", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--modes", "ft,ft+rag"],
     "engine openai cannot run mode(s) ft, ft+rag"),
])
def test_eval_engine_openai_misconfigured_exits_2_naming_the_key(tiny_smol: Path, tmp_path: Path, argv: list[str],
                                                                 names: str, capsys) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": QUESTIONS[0][0], "answer": QUESTIONS[0][1]}) + "\n", encoding="utf-8")
    rc = main(["eval", "--questions", str(q), "--out", str(tmp_path / "ev"), f"model.path={tiny_smol}", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and names in err and "Traceback" not in err, err
    assert not (tmp_path / "ev").exists()


def test_eval_engine_openai_with_nothing_at_the_url_fails_naming_it(setup: list[str], tmp_path: Path, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    rc = main(["eval", *setup, "--out", str(tmp_path / "ev"), "--engine", "openai", "--url", url, "--model", "tiny",
               "--modes", "base"])
    err = capsys.readouterr().err
    assert rc == 1 and f"remote engine {url} could not be reached" in err and "Traceback" not in err, err
    assert not (tmp_path / "ev").exists()
