"""Fusion: a weak lexical ranking must not pull a right dense answer down (real MiniLM), and the
fusion settings reach the store (weighted RRF, DBSF)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.retrieval.ingest import ingest
from ragtune.retrieval.search import Retriever
from tests.retrieval.conftest import make_cfg

# the answer shares only "work" and "days" with the question; the trap repeats its other words without
# answering it: the lexical channel ranks the trap first, the dense channel the answer, by a clear margin
DOCS = {
    "remote.md": "# Remote work\n\nEmployees may work remotely up to three days per week with manager approval.\n",
    "trap.md": "# Home games\n\nHow many home games? The home team plays many days of the season at home.\n",
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
        hybrid = r.search(QUESTION, top_k=2)  # the default: dbsf, dense 3 : lexical 1
        assert [h["source"] for h in hybrid] == ["remote.md", "trap.md"]
        assert hybrid[0]["dense_score"] > hybrid[1]["dense_score"]
        assert all(0.0 <= h["fused_score"] <= 3.0 + 1.0 for h in hybrid)  # each channel in [0, 1] times its weight
    # equal weights let the wrong lexical channel win: what the 3:1 default prevents
    with Retriever(make_cfg(minilm_dir, "search.dense_weight=1")) as r:
        assert r.search(QUESTION, top_k=1)[0]["source"] == "trap.md"
    with Retriever(make_cfg(minilm_dir, "search.fusion=rrf", "search.dense_weight=1", "search.sparse_weight=3")) as r:
        assert r.search(QUESTION, top_k=1)[0]["source"] == "trap.md"  # the weights decide, in rrf too
    with Retriever(make_cfg(minilm_dir, "search.fusion=rrf")) as r:
        assert r.search(QUESTION, top_k=1)[0]["source"] == "remote.md"


def test_score_fusion_follows_a_strong_lexical_match_over_a_dense_near_tie(minilm_dir: Path, tmp_path: Path) -> None:
    """The documented limit of score fusion: a keyword-stuffed page that the dense channel ranks a
    close second (cosine 0.52 vs 0.57) wins under dbsf 3:1; rank fusion (rrf) keeps the dense answer."""
    d = tmp_path / "stuffed"
    d.mkdir()
    stuffed = {**DOCS, "trap.md": "# Home team\n\nHow many days? The home team plays many home days; days at home "
                                  "are many.\n"}
    for name, text in stuffed.items():
        (d / name).write_text(text, encoding="utf-8")
    cfg = make_cfg(minilm_dir)
    ingest(cfg, [str(d)], progress=False)
    with Retriever(cfg) as r:
        dense = r.search(QUESTION, mode="dense", top_k=2)
        assert [h["source"] for h in dense] == ["remote.md", "trap.md"]
        assert dense[0]["dense_score"] - dense[1]["dense_score"] < 0.1
        assert r.search(QUESTION, top_k=1)[0]["source"] == "trap.md"
    with Retriever(make_cfg(minilm_dir, "search.fusion=rrf")) as r:
        assert r.search(QUESTION, top_k=1)[0]["source"] == "remote.md"


def test_fusion_setting_is_validated(minilm_dir: Path) -> None:
    from ragtune.errors import ConfigError

    with pytest.raises(ConfigError, match="search.fusion"):
        make_cfg(minilm_dir, "search.fusion=sum")
