"""The lexical channel's index statistics: stored with the index, kept up to date on add, sync
and remove, used to weigh every chunk, and an older sparse format refused with the re-index command."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval.ingest import REWEIGH_DRIFT, ingest, remove
from ragtune.retrieval.search import Retriever
from ragtune.retrieval.sparse import SPARSE_VERSION, SparseEncoder
from ragtune.retrieval.store import open_for_reading, open_store


def _chunks(cfg: Config) -> tuple[dict, list[tuple[str, dict, dict]]]:
    with open_for_reading(cfg, cfg.index.name) as store:
        meta = store.read_meta()
        rows = [(pid, p, {"idx": list(v["sparse"].indices), "val": list(v["sparse"].values)})
                for pid, p, v in store.scroll({"kind": "chunk"}, ["text", "n_terms", "sparse"], with_vectors=True)]
    return meta, rows


def _assert_weighed_with_stored_stats(cfg: Config) -> dict:
    meta, rows = _chunks(cfg)
    sp = meta["sparse"]
    assert sp["version"] == SPARSE_VERSION and sp["stemmer"] == "english"
    assert sp["n_chunks"] == len(rows) and sp["n_terms"] == sum(p["n_terms"] for _, p, _ in rows)
    true_avg = sp["n_terms"] / sp["n_chunks"]
    assert abs(sp["avg_len"] - true_avg) <= REWEIGH_DRIFT * sp["avg_len"]
    enc = SparseEncoder(avg_len=sp["avg_len"], stemmer="english")
    for _pid, p, vec in rows:  # every stored vector is BM25 under the stored average
        idx, val = enc.document(p["text"])
        assert vec["idx"] == idx and vec["val"] == pytest.approx(val, rel=1e-5)
    return sp


def test_statistics_are_stored_and_survive_sync(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    first = _assert_weighed_with_stored_stats(cfg)
    # a much longer document moves the average length far past the drift bound: sync re-weighs
    (docs / "long.md").write_text("# Long\n\n" + "Continents drift slowly across the mantle. " * 60, encoding="utf-8")
    ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    second = _assert_weighed_with_stored_stats(cfg)
    assert second["avg_len"] > first["avg_len"] * (1 + REWEIGH_DRIFT) and second["n_chunks"] > first["n_chunks"]
    (docs / "long.md").unlink()
    ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    third = _assert_weighed_with_stored_stats(cfg)
    assert third["n_chunks"] == first["n_chunks"] and third["n_terms"] == first["n_terms"]
    remove(cfg, ["hr.md"])
    assert _assert_weighed_with_stored_stats(cfg)["n_chunks"] < first["n_chunks"]
    with Retriever(cfg) as r:  # a query term in another form still finds the stemmed chunk
        assert r.search("passwords rotate", mode="sparse", top_k=1)[0]["source"] == "security.html"


def test_older_sparse_format_is_refused_with_the_reindex_command(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    from qdrant_edge import UpdateOperation

    store = open_store(cfg, cfg.index.name)
    store.open()
    try:  # what an index built by the previous ragtune holds: format 1, no statistics
        meta = store.read_meta()
        meta["sparse"] = {"version": 1, "tokenizer": "kiwi+unicode", "weights": "bm25 tf, idf in store"}
        store.write_meta(meta)
        ids = [pid for pid, _, _ in store.scroll({"kind": "chunk"}, False, with_vectors=False)]
        store.shard.update(UpdateOperation.set_payload(ids, {"sparse": 1}))
    finally:
        store.close()
    root = str(docs.resolve())
    with Retriever(cfg) as r:
        for mode in ("hybrid", "sparse"):
            with pytest.raises(UsageError, match=f"sparse format 1.*'ragtune index sync {root} --index default'"):
                r.search("remote work", mode=mode)
        assert r.search("remote work", mode="dense", top_k=1)  # dense scoring is unaffected
    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)  # the command the message names
    assert res.chunks_written > 0
    _assert_weighed_with_stored_stats(cfg)
    with Retriever(cfg) as r:  # the lexical channel is back (the tiny embedder's dense channel is random)
        assert r.search("remote work", mode="sparse", top_k=1)[0]["source"] == "hr.md"
        assert any(h["source"] == "hr.md" and h["sparse_rank"] == 1 for h in r.search("remote work", top_k=5))
