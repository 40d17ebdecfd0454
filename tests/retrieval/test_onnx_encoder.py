"""The exported query encoder: parity with sentence-transformers, fallback, a search without torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragtune.cli import main
from ragtune.retrieval import onnx_encoder
from ragtune.retrieval.embedder import Embedder
from tests.conftest import ROOT

QUERIES = ["remote work days", "서울 수도", "passwords rotated", "expense reports thirty days"]


@pytest.fixture
def index(cfg, docs: Path, tiny_embedder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(["index", "add", str(docs), "--index", "t", "--no-progress",
               f"embedder.path={tiny_embedder}", "embedder.device=cpu"])
    capsys.readouterr()
    assert rc == 0
    return "t"


def test_export_agrees_with_sentence_transformers_including_korean(cfg, ragtune_home: Path) -> None:
    emb = Embedder(cfg.embedder)
    emb._load_st()
    enc, manifest = onnx_encoder.export(emb.model, emb.hash, emb.max_tokens)
    assert enc is not None and manifest["passed"]
    assert manifest["parity"]["min_cosine"] >= onnx_encoder.MIN_COSINE and manifest["parity"]["same_token_ids"]
    saved = json.loads((ragtune_home / "embedders" / emb.hash / "encoder.json").read_text())
    assert saved["parity"] == manifest["parity"]
    texts = ["직원은 주 3일까지 재택근무를 할 수 있습니다.", "서울은 한국의 수도입니다.", "Annual leave is twenty days."]
    ref = emb.embed(texts)
    got = enc.encode(texts)
    assert np.all(np.sum(ref * got, axis=1) >= onnx_encoder.MIN_COSINE)


def test_index_add_exports_and_search_uses_it_with_same_results(cfg, index: str, monkeypatch, caplog,
                                                                 capsys) -> None:
    from ragtune.retrieval.search import Retriever

    with Retriever(cfg, index) as r:
        assert r.embedder.onnx is not None and r.embedder.model is None
        fast = [[h["chunk_id"] for h in r.search(q, top_k=4)] for q in QUERIES]
    monkeypatch.setenv("RAGTUNE_ONNX", "0")
    with Retriever(cfg, index) as r:
        assert r.embedder.model is not None
        slow = [[h["chunk_id"] for h in r.search(q, top_k=4)] for q in QUERIES]
    assert fast == slow


def test_corrupt_export_falls_back_with_one_log_line_and_is_rewritten(cfg, index: str, ragtune_home: Path,
                                                                        caplog, capsys) -> None:
    folder = next((ragtune_home / "embedders").iterdir())
    model = folder / "model.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(model.stat().st_size))  # same size, garbage
    with caplog.at_level(logging.INFO, logger="ragtune"):
        rc = main(["search", "remote work days", "--index", index, "--json", f"embedder.path={cfg.embedder.path}",
                   "embedder.device=cpu"])
    assert rc == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits and hits[0]["source"]
    lines = [r.getMessage() for r in caplog.records if "using sentence-transformers" in r.getMessage()]
    assert len(lines) == 1 and str(folder) in lines[0]
    enc, why, _ = onnx_encoder.load_cached(folder.name)  # the search wrote a good export again
    assert enc is not None, why


def test_missing_export_falls_back_then_next_search_uses_it(cfg, index: str, ragtune_home: Path, caplog,
                                                             capsys) -> None:
    import shutil

    shutil.rmtree(ragtune_home / "embedders")
    argv = ["search", "remote work days", "--index", index, "--json", f"embedder.path={cfg.embedder.path}",
            "embedder.device=cpu"]
    with caplog.at_level(logging.INFO, logger="ragtune"):
        assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert any("no exported query encoder" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ragtune"):
        assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert not any("using sentence-transformers" in r.getMessage() for r in caplog.records)
    assert [h["chunk_id"] for h in first] == [h["chunk_id"] for h in second]


def test_failed_check_is_recorded_and_not_retried(cfg, ragtune_home: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_encoder, "MIN_COSINE", 1.5)  # no export can pass: the failure path, for real
    emb = Embedder(cfg.embedder)
    emb._load_st()
    enc, manifest = onnx_encoder.export(emb.model, emb.hash, emb.max_tokens)
    assert enc is None and not manifest["passed"] and "min cosine" in manifest["reason"]
    enc, why, again = onnx_encoder.load_cached(emb.hash)
    assert enc is None and "failed its check" in why and again is False
    assert emb.ensure_export() is False


def test_cli_search_imports_no_torch(cfg, index: str, ragtune_home: Path) -> None:
    code = (
        "import sys\nfrom ragtune.cli import main\n"
        f"rc = main(['search', 'remote work days', '--index', {index!r}, '--json', "
        f"'embedder.path={cfg.embedder.path}', 'embedder.device=cpu'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)\n"
    )
    env = {**os.environ, "RAGTUNE_HOME": str(ragtune_home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert "HEAVY [] 0" in out.stdout, out.stdout + out.stderr
    assert '"source"' in out.stdout
