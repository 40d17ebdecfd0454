"""The same store tests on both backends: Qdrant Edge, and qdrant-client's local mode (server API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragtune.config import Config
from ragtune.retrieval.store import EdgeStore, PointData, ServerStore, Store


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    s: Store = EdgeStore("t") if request.param == "edge" else ServerStore("t", f"local:{tmp_path / 'qdrant'}")
    s.open(create_dim=4)
    yield s
    s.close()


def _points(doc: str, n: int, seed: int) -> list[PointData]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = rng.normal(size=4)
        out.append(PointData(f"00000000-0000-0000-0000-{seed:06d}{i:06d}", v / np.linalg.norm(v), ([seed, 100 + i], [1.0, 0.5]),
                             {"kind": "chunk", "doc_id": doc, "source": f"{doc}.md", "chunk_index": i, "n_chunks": n,
                              "root": "/r", "file": f"{doc}.md", "text": f"{doc} {i}", "page": i + 1}))
    return out


def test_store_roundtrip(store: Store) -> None:
    store.write_meta({"schema_version": 1, "embedder": {"dim": 4}})
    store.upsert(_points("a", 3, 1) + _points("b", 2, 2))
    assert store.count() == 5
    assert store.read_meta()["embedder"] == {"dim": 4}
    states = store.doc_states()
    assert {d: (s["count"], s["n_chunks"], s["source"]) for d, s in states.items()} == {"a": (3, 3, "a.md"), "b": (2, 2, "b.md")}

    q = _points("a", 1, 1)[0].dense
    dense = store.query(dense=q, mode="dense", limit=2, with_vector=True)
    assert dense[0].payload["text"] == "a 0" and dense[0].score == pytest.approx(1.0, abs=1e-5)
    assert np.dot(dense[0].vector, q) == pytest.approx(1.0, abs=1e-5)
    sparse = store.query(sparse=([2], [1.0]), mode="sparse", limit=5)
    assert {h.payload["doc_id"] for h in sparse} == {"b"}
    hybrid = store.query(dense=q, sparse=([2], [1.0]), mode="hybrid", limit=5, with_vector=True)
    assert len(hybrid) == 5 and all(h.vector is not None for h in hybrid)
    assert {h.payload["doc_id"] for h in hybrid[:3]} >= {"a", "b"}  # both arms contribute
    flt = store.query(dense=q, mode="dense", limit=5, filters={"source": "b.md", "page": 2})
    assert [h.payload["text"] for h in flt] == ["b 1"]

    store.delete_points([_points("a", 3, 1)[2].id, "00000000-0000-0000-0000-999999999999"])  # unknown id: ignored
    assert store.count() == 4 and store.doc_states()["a"]["count"] == 2
    store.delete_docs(["a"])
    assert store.count() == 2 and set(store.doc_states()) == {"b"}
    rows = list(store.scroll(None, True, with_vectors=True, batch=1))
    assert len(rows) == 3  # 2 chunks + meta; paging with batch=1 works
    chunk = next(r for r in rows if r[1].get("kind") == "chunk")
    assert len(chunk[2]["dense"]) == 4 and list(chunk[2]["sparse"].indices) in ([2, 100], [2, 101])


def test_ingest_and_search_through_server_backend_and_migrate(cfg: Config, docs: Path, tmp_path: Path) -> None:
    from ragtune.config import replace
    from ragtune.retrieval.ingest import ingest, migrate
    from ragtune.retrieval.search import Retriever

    url = f"local:{tmp_path / 'qdrant'}"
    server_cfg = replace(cfg, store=replace(cfg.store, url=url))
    first = ingest(server_cfg, [str(docs)], delete_missing=True, progress=False)
    assert ingest(server_cfg, [str(docs)], delete_missing=True, progress=False).chunks_written == 0
    with Retriever(server_cfg) as r:
        assert r.search("서울", mode="sparse", top_k=1)[0]["source"] == "ko/seoul.txt"

    # edge -> server copy, then search the copy with identical results
    ingest(cfg, [str(docs)], index="e", progress=False)
    out = migrate(cfg, url, index="e")
    assert out["chunks"] == first.chunks_written
    with Retriever(cfg, "e") as a:
        want = [(h["chunk_id"], round(h["dense_score"], 4)) for h in a.search("security badges", top_k=3)]
    with Retriever(server_cfg, "e") as b:
        got = [(h["chunk_id"], round(h["dense_score"], 4)) for h in b.search("security badges", top_k=3)]
    assert got == want
    with pytest.raises(Exception, match="already holds"):
        migrate(cfg, url, index="e")


def _on_disk(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def test_a_readers_copy_keeps_the_holes_of_edge_s_preallocated_files(tmp_path: Path) -> None:
    """Qdrant Edge preallocates 32 MB pages and WAL segments that stay mostly unwritten: a reader's
    private copy (serve, chat) used to write every byte of them (220 MB for a 1 MB index)."""
    from ragtune.retrieval.store import copy_sparse

    f = tmp_path / "holey"
    with f.open("wb") as out:
        out.write(b"head")
        out.seek(20 << 20)
        out.write(b"middle")
        out.truncate(40 << 20)  # ends in a hole
    copy_sparse(f, tmp_path / "copy")
    got = tmp_path / "copy"
    assert got.read_bytes() == f.read_bytes() and got.stat().st_size == 40 << 20
    assert got.stat().st_blocks * 512 <= f.stat().st_blocks * 512 + (1 << 20)

    s = EdgeStore("t")
    s.open(create_dim=4)
    s.upsert(_points("a", 5, 1))
    s.close()
    reader = EdgeStore("t").open_copy()
    try:
        assert reader.copy_dir is not None and reader.count() == 5
        assert _on_disk(reader.copy_dir) <= _on_disk(s.shard_dir) + (1 << 20)
    finally:
        reader.close()


def test_migrate_names_a_bad_or_unreachable_to(cfg: Config, docs: Path, capsys) -> None:
    from ragtune.cli import main
    from ragtune.retrieval.ingest import ingest

    ingest(cfg, [str(docs)], progress=False)
    emb = f"embedder.path={cfg.embedder.path}"
    assert main(["-q", "index", "migrate", "--to", "qdrant.local", emb]) == 2
    assert "--to 'qdrant.local' is not a place to migrate to; give a Qdrant server's URL (http://HOST:6333" \
        in capsys.readouterr().err
    assert main(["-q", "index", "migrate", "--to", "http://127.0.0.1:1", emb]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the Qdrant server at --to 'http://127.0.0.1:1'" in err and "fix --to" in err


def test_an_index_whose_segments_were_deleted_is_reported_damaged_not_a_traceback(cfg: Config, docs: Path,
                                                                                    capsys) -> None:
    import json
    import shutil

    from ragtune.cli import main
    from ragtune.retrieval.index_dirs import index_dir
    from ragtune.retrieval.ingest import ingest

    ingest(cfg, [str(docs)], progress=False)
    shutil.rmtree(index_dir("default") / "shard" / "segments")  # a copy that left them out, say
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    emb = f"embedder.path={cfg.embedder.path}"
    assert main(["-q", "index", "list", emb]) == 1
    err = capsys.readouterr().err
    assert "cannot read the documents of index 'default'" in err and "ragtune index drop default" in err
    assert main(["-q", "index", "list", "--all", "--json", emb]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["index"] == "default" and "The index is damaged" in row["error"]


def test_an_index_whose_config_file_is_damaged_names_the_rebuild(cfg: Config, docs: Path, capsys) -> None:
    from ragtune.cli import main
    from ragtune.retrieval.index_dirs import index_dir
    from ragtune.retrieval.ingest import ingest

    ingest(cfg, [str(docs)], progress=False)
    (index_dir("default") / "shard" / "edge_config.json").write_text("{trunc", encoding="utf-8")
    assert main(["-q", "search", "badges", f"embedder.path={cfg.embedder.path}"]) == 1
    err = capsys.readouterr().err
    assert "cannot open index 'default'" in err and "rebuild it with 'ragtune index drop default'" in err
