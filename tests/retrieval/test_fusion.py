"""Fusion: a weak lexical ranking must not pull a right dense answer down (real MiniLM), and the
fusion settings reach the store (weighted RRF, DBSF)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.retrieval.ingest import ingest
from ragtune.retrieval.search import Retriever
from tests.retrieval.conftest import make_cfg

# the answer shares only "work" with the question; the trap repeats its words without answering it
DOCS = {
    "remote.md": "# Remote work\n\nEmployees may work remotely up to three days per week with manager approval.\n",
    "trap.md": "# Home team\n\nHow many days? The home team plays many home days; days at home are many.\n",
    "canteen.md": "# Canteen\n\nThe canteen serves lunch from noon until two in the afternoon.\n",
    "parking.md": "# Parking\n\nParking permits are issued by the facilities desk on the ground floor.\n",
}
QUESTION = "How many days can I work from home?"


@pytest.fixture
def fixture_docs(tmp_path: Path) -> Path:
    d = tmp_path / "fusion-docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_hybrid_keeps_the_dense_answer_first(minilm_dir: Path, fixture_docs: Path) -> None:
    cfg = make_cfg(minilm_dir)
    ingest(cfg, [str(fixture_docs)], progress=False)
    with Retriever(cfg) as r:
        assert r.search(QUESTION, mode="dense", top_k=1)[0]["source"] == "remote.md"
        assert r.search(QUESTION, mode="sparse", top_k=1)[0]["source"] == "trap.md"  # lexical channel wrong
        hybrid = r.search(QUESTION, top_k=2)
        assert [h["source"] for h in hybrid] == ["remote.md", "trap.md"]
        assert hybrid[0]["dense_score"] > hybrid[1]["dense_score"]
    with Retriever(make_cfg(minilm_dir, "search.dense_weight=1", "search.sparse_weight=3")) as r:
        assert r.search(QUESTION, top_k=1)[0]["source"] == "trap.md"  # the weights decide
    with Retriever(make_cfg(minilm_dir, "search.fusion=dbsf")) as r:
        hits = r.search(QUESTION, top_k=4)
        assert {h["source"] for h in hits[:2]} == {"remote.md", "trap.md"}
        assert all(0.0 <= h["fused_score"] <= 3.0 + 1.0 for h in hits)  # each channel in [0, 1] times its weight


def test_fusion_setting_is_validated(minilm_dir: Path) -> None:
    from ragtune.errors import ConfigError

    with pytest.raises(ConfigError, match="search.fusion"):
        make_cfg(minilm_dir, "search.fusion=sum")
