"""Eval's default engine on a CPU with the llama.cpp extra: every mode, two adapters included, answers
through llama.cpp from the f16 export, with the ids transformers' greedy decoding gives, and the report
records the engine. Fails (does not skip) when llama-cpp-python is missing: set-up installs it.

Uses tests/conftest.py's tiny SmolLM2-tokenizer Llama (llama.cpp's converter accepts its tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.export.conftest import make_adapter

QUESTIONS = ["What is the capital of France?", "How many remote days do I get?"]


@pytest.mark.slow
def test_eval_answers_through_llama_cpp_by_default(tiny_smol: Path, converter_home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.config import load_config
    from ragtune.eval.run import run_eval
    from ragtune.serve.generator import Generator
    from tests.tinymodels import torch_threads

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))  # the session's converter, and a GGUF cache
    a = make_adapter(tiny_smol, tmp_path / "a", seed=1)
    b = make_adapter(tiny_smol, tmp_path / "b", seed=2)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": f"q{i}", "question": x, "answer": "Paris"}) + "\n"
                         for i, x in enumerate(QUESTIONS)))
    cfg = load_config(None, [f"model.path={tiny_smol}", "model.device=cpu", "generation.threads=1",
                             "eval.max_new_tokens=6", "eval.bootstrap=50"])
    assert cfg.eval.engine == "auto"
    used: list[str] = []
    real = Generator._run_llama_cpp
    monkeypatch.setattr(Generator, "_run_llama_cpp", lambda self, job, *r: used.append(job.adapter or "") or
                        real(self, job, *r))
    res = run_eval(cfg, questions=q, adapter=[f"a={a}", f"b={b}"], modes="base,ft", out_dir=tmp_path / "cpp",
                   progress=False)
    rep = res.report
    assert rep["meta"]["engine"] == "llama.cpp (f16 GGUF)" and rep["modes"] == ["base", "a", "b"]
    # every answer ran on llama.cpp, each mode with its own adapter (after one warm-up per model)
    assert used == ["", "a", "b"] + [""] * 2 + ["a"] * 2 + ["b"] * 2
    with torch_threads(1):
        ref = run_eval(cfg, questions=q, adapter=[f"a={a}", f"b={b}"], modes="base,ft", out_dir=tmp_path / "tf",
                       progress=False, engine="transformers").report
    assert ref["meta"]["engine"] == "transformers (cpu)"

    def texts(r: dict[str, Any]) -> dict[str, list[str]]:
        return {m: [qq["answers"][m]["answer"] for qq in r["questions"]] for m in r["modes"]}

    # the f16 export's greedy answers are transformers' (the tiny model's wide weights keep margins clear;
    # tests/export checks the margins token by token)
    assert texts(rep) == texts(ref)
    assert texts(rep)["a"] != texts(rep)["b"]  # the adapters were switched, not one applied twice
