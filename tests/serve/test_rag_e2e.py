"""End to end with the real retrieval stack: index a folder, then ask / serve with sources and abstention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ragtune.cli import main
from ragtune.config import load_config
from tests.serve.conftest import QA

HR_MD = """# HR Handbook

## Remote work

Employees may work remotely up to three days per week with manager approval.

## Expenses

Expense reports must be submitted within thirty days of purchase.
"""


@pytest.fixture(scope="module")
def index_home(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> tuple[Path, list[str]]:
    """A RAGTUNE_HOME whose index `docs` holds HR_MD, embedded by MiniLM once for the module (the tests only
    read it), and the settings that use it."""
    tmp = tmp_path_factory.mktemp("rag-e2e")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "hr.md").write_text(HR_MD, encoding="utf-8")
    emb = [f"embedder.path={minilm_dir}", "embedder.device=cpu", "index.name=docs"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(tmp / "home"))
        assert main(["-q", "index", "add", str(docs), "--no-progress", *emb]) == 0
    return tmp / "home", emb


@pytest.fixture
def indexed(index_home: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("RAGTUNE_HOME", str(index_home[0]))
    return index_home[1]


def test_ask_with_a_real_index_cites_sources_and_abstains(indexed: list[str], tiny_llama: Path, tiny_adapter: Path, capsys) -> None:
    common = [f"model.path={tiny_llama}", "--adapter", str(tiny_adapter), "--json", *indexed]
    assert main(["-q", "ask", QA[0][0], "--max-new-tokens", "8", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "ft+rag" and data["index"] == "docs" and not data["abstained"]
    top = data["sources"][0]
    assert top["n"] == 1 and top["source"] == "hr.md" and top["heading"] == "HR Handbook > Remote work"
    assert set(top) == {"n", "source", "title", "page", "heading", "score", "text"} and data["best_score"] > 0.3
    assert main(["-q", "ask", "What is the capital of Mongolia?", "rag.min_score=0.6",
                 "rag.not_found_message=Not in the documents.", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["abstained"] and data["answer"] == "Not in the documents." and data["sources"] == []
    assert main(["-q", "ask", QA[0][0], "--no-rag", *common]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == QA[0][1]


def test_serve_defaults_offer_rag_twins_when_the_index_exists(indexed: list[str], tiny_llama: Path, tiny_adapter: Path) -> None:
    from ragtune.serve.server import create_app

    cfg = load_config(None, [f"model.path={tiny_llama}", f"model.adapter={tiny_adapter}", *indexed])
    app = create_app(cfg)
    with TestClient(app) as c:
        names = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert names == ["base", "policies", "base+rag", "policies+rag"]
        body = c.post("/v1/chat/completions", json={"model": "policies+rag", "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": QA[1][0]}]}).json()
        assert body["sources"][0]["source"] == "hr.md" and body["ragtune"]["mode"] == "ft+rag"
