"""Gold sources that match no document of the index: said in the report and as a warning, since their
questions score recall 0 whatever is retrieved (a typo, or a path not relative to the indexed folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ragtune.cli import main

EX = Path(__file__).resolve().parents[2] / "examples" / "policies"


def test_gold_sources_missing_from_the_index_are_named(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import torch

    torch.set_num_threads(1)
    overrides = [f"model.path={tiny_llama}", "model.device=cpu", f"embedder.path={tiny_embedder}",
                 "embedder.device=cpu", "rag.top_k=2", "rag.min_score=-1.0", "eval.max_new_tokens=4",
                 "eval.bootstrap=20", "eval.engine=transformers"]
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("remote_work.md", "travel.md"):
        shutil.copyfile(EX / "docs_v1" / name, docs / name)
    assert main(["index", "add", str(docs), "--index", "policies", *overrides]) == 0
    qfile = tmp_path / "q.jsonl"
    rows = [{"id": "remote", "question": "How many remote days a week?", "answer": "2 days",
             "sources": ["docs/remote_work.md"]},  # a path ending in an indexed one matches it
            {"id": "meals", "question": "What is the meal limit?", "answer": "$60", "sources": ["travell.md"]},
            {"id": "laptop", "question": "Which laptop do I get?", "answer": "a ThinkPad",
             "sources": ["equipment.md", "travel.md"]}]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["eval", "--questions", str(qfile), "--index", "policies", "--modes", "rag", "--out", str(out),
                 "--no-progress", *overrides]) == 0
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    note = (f"2 gold source(s) in {qfile} match no document of index 'policies': 'travell.md' (meals); "
            "'equipment.md' (laptop). Their questions score recall 0 whatever is retrieved: give sources relative "
            "to the folder that was indexed ('ragtune index list --index policies' shows them)")
    assert [n for n in rep["notes"] if "gold source" in n][0].startswith(note)
    assert note in (out / "report.md").read_text(encoding="utf-8") and note in caplog.text
