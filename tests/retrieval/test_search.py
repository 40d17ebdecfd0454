"""Search: Korean through sparse, meaning through dense (real MiniLM), pages, filters, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval.ingest import ingest
from ragtune.retrieval.search import Retriever, parse_filters
from tests.retrieval.conftest import make_cfg, make_pdf


def test_korean_query_finds_korean_document_through_sparse(cfg: Config, docs: Path, minilm_dir: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    with Retriever(cfg) as r:
        hits = r.search("서울", mode="sparse", top_k=3)  # the document says "서울은"
        assert hits[0]["source"] == "ko/seoul.txt" and "서울은" in hits[0]["text"]
        assert all(h["dense_score"] is not None for h in hits)  # abstention needs the cosine
    # hybrid with the real default embedder (MiniLM is weak on Korean; the lexical channel carries it)
    mcfg = make_cfg(minilm_dir, "index.name=ko-minilm")
    ingest(mcfg, [str(docs)], progress=False)
    with Retriever(mcfg) as r:
        hybrid = r.search("재택근무", top_k=3)
        assert hybrid[0]["source"] == "ko/seoul.txt"
        assert set(hybrid[0]) >= {"n", "source", "title", "page", "heading", "score", "text", "dense_score", "chunk_id"}
        assert [h["n"] for h in hybrid] == list(range(1, len(hybrid) + 1))


def test_dense_meaning_pages_and_filters_with_minilm(minilm_dir: Path, docs: Path, tmp_path: Path) -> None:
    cfg = make_cfg(minilm_dir)
    make_pdf(docs / "manual.pdf", ["Welcome to the machine manual.",
                                   "Safety: always wear protective gloves when handling the blade.",
                                   "Warranty lasts two years."])
    ingest(cfg, [str(docs)], progress=False)
    with Retriever(cfg) as r:
        hits = r.search("How many days can I work from home?", mode="dense", top_k=2)
        assert hits[0]["source"] == "hr.md" and hits[0]["heading"] == "HR Handbook > Remote work"
        assert hits[0]["dense_score"] == hits[0]["score"] > 0.3
        pdf = r.search("what protection do I need for my hands", top_k=1, filters={"source": "manual.pdf"})
        assert pdf[0]["page"] == 2 and "gloves" in pdf[0]["text"]
        unrelated = r.search("the capital of Mongolia and its history", mode="dense", top_k=1)
        assert r.best_dense_score(unrelated) < r.best_dense_score(hits)
        meta = r.search("expenses", top_k=5, filters={"meta.dept": "finance"})
        assert [h["source"] for h in meta] == ["faq.jsonl#expenses"]


def test_search_errors(cfg: Config, docs: Path, minilm_dir: Path) -> None:
    with pytest.raises(UsageError, match="index 'default' does not exist; create it with 'ragtune index add PATH --index default'"):
        Retriever(cfg).load()
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with Retriever(make_cfg(minilm_dir)) as r:  # another embedder configured: the index's own searches it
        assert r.embedder.identity()["path"] == str(Path(cfg.embedder.path).resolve())
    with pytest.raises(UsageError) as exc:  # a wrong name is answered with the names there are
        Retriever(make_cfg(minilm_dir, "index.name=defualt")).load()
    assert str(exc.value).endswith("; the indexes here are default (pick one with --index NAME)")
    from ragtune.retrieval.sources import open_retriever

    with pytest.raises(UsageError, match=r"--index defualt., or answer without retrieval \(--no-rag\); the indexes here are default"):
        open_retriever(cfg, "defualt")  # what ask/chat/serve open
    with pytest.raises(UsageError, match="cannot filter on 'colour'"):
        parse_filters(["colour=red"])
    from ragtune.retrieval.filters import FilterError

    with Retriever(cfg) as r:  # what the server's /v1/search passes on as sent: refused before the store sees it
        for bad, why in [({"source": ["hr.md", 5]}, "not a mix"), ({"source": []}, "non-empty list"),
                         ({"page": "abc"}, "page numbers"), ({"page": [1, "2"]}, "not a mix"),
                         ({"source": True}, "a string, an integer")]:
            with pytest.raises(FilterError, match=why) as err:
                r.search("leave", filters=bad)
            assert err.value.param == f"filters.{next(iter(bad))}"
        assert r.search("leave", top_k=1, filters={"source": ["hr.md", "x.md"], "page": [1, 2]}) == []  # no pages in .md
    assert parse_filters(["source=a.md", "source=b.md", "page=3"]) == {"source": ["a.md", "b.md"], "page": 3}


def test_cli_search_json(cfg: Config, docs: Path, capsys: pytest.CaptureFixture) -> None:
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["search", "anything", *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", "add", str(docs), "--no-progress", *args]) == 0
    capsys.readouterr()
    assert main(["search", "passwords", "--top-k", "2", "--mode", "sparse", "--filter", "source=security.html",
                 "--json", *args]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 1 and hits[0]["heading"] == "Security > Passwords"
    assert main(["search", "passwords", *args]) == 0
    assert "security.html > Security > Passwords" in capsys.readouterr().out
    # no hits asked for is a mistake, not "the default number": named on the command line and per batch line
    assert main(["search", "passwords", "--top-k", "0", *args]) == 2
    assert "--top-k 0: give the number of hits to return, 1 or more" in capsys.readouterr().err
    batch = docs.parent / "queries.jsonl"
    batch.write_text('{"query": "passwords", "top_k": 0}\n{"query": "passwords", "top_k": 1}\n', encoding="utf-8")
    assert main(["search", "--queries", str(batch), *args]) != 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"line": 1, "error": "top_k must be an integer of 1 or more, got 0"}
    assert len(lines[1]["hits"]) == 1
    batch.write_text('{"query": ' + "[" * 50_000 + '\n{"query": "passwords"}\n', encoding="utf-8")
    assert main(["search", "--queries", str(batch), *args]) == 3  # the bad line said, the good one answered
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"line": 1, "error": "line 1 is JSON nested too deeply to read"} and lines[1]["hits"]
    assert main(["search", "--queries", str(docs), *args]) == 2
    assert f"--queries '{docs}' is a folder" in capsys.readouterr().err


def test_reranker_reorders_candidates_and_drives_abstention(cfg: Config, docs: Path, tiny_embedder: Path,
                                                            tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    from tests.tinymodels import build_tiny_cross_encoder

    ce_dir = build_tiny_cross_encoder(tiny_embedder, tmp_path / "tiny-ce")
    ingest(cfg, [str(docs)], progress=False)
    query = "remote work days per week"
    with Retriever(cfg) as plain:
        candidates = plain.search(query, top_k=20)
    assert len(candidates) >= 4
    rcfg = make_cfg(tiny_embedder, f"search.rerank_model={ce_dir}", "search.rerank_candidates=20")
    with Retriever(rcfg) as r:
        hits = r.search(query, top_k=3)
        # the top 3 of all candidates by the cross-encoder's own scores, computed independently here
        ce = CrossEncoder(str(ce_dir), device="cpu")
        expected = sorted(((float(s), c["chunk_id"]) for s, c in
                           zip(ce.predict([(query, c["text"]) for c in candidates]), candidates)), reverse=True)[:3]
        assert [h["chunk_id"] for h in hits] == [cid for _, cid in expected]
        assert [h["chunk_id"] for h in hits] != [c["chunk_id"] for c in candidates[:3]]  # it did reorder
        assert [h["rerank_score"] for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)
        assert [h["n"] for h in hits] == [1, 2, 3]
        assert r.best_dense_score(hits) == pytest.approx(expected[0][0], abs=1e-5)


def test_reranker_path_errors(cfg: Config, docs: Path, tiny_embedder: Path, tmp_path: Path) -> None:
    from ragtune.errors import ModelPathError

    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with pytest.raises(ModelPathError, match="is not a model directory .no config.json."):
        Retriever(make_cfg(tiny_embedder, f"search.rerank_model={tmp_path}")).load()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="has no safetensors weights"):
        Retriever(make_cfg(tiny_embedder, f"search.rerank_model={tmp_path}")).load()


def test_hybrid_fuses_both_channels_with_weights_and_explains(cfg: Config, docs: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Hybrid asks the store for each channel's candidates and fuses them with search.dense_weight /
    sparse_weight; each hit says its rank and score in each channel. Hand-computed RRF (k=60, 3:1)."""
    from ragtune.retrieval.store import Hit

    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with Retriever(cfg) as r:
        q = r.embedder.embed_query("remote work")
        dense = [Hit("a", 0.9, {"source": "a.md", "text": "a"}), Hit("b", 0.8, {"source": "b.md", "text": "b"})]
        sparse = [Hit("b", 7.0, {"source": "b.md", "text": "b"}), Hit("c", 5.0, {"source": "c.md", "text": "c"})]
        vectors = {"c": list(map(float, q * 0.1))}
        asked: list[tuple[str, int]] = []
        fetched: list[list[str]] = []

        def query(**kw):  # noqa: ANN003, ANN202
            asked.append((kw["mode"], kw["limit"]))
            return dense if kw["mode"] == "dense" else sparse

        def retrieve(ids, with_vector=False):  # noqa: ANN001, ANN202
            fetched.append(list(ids))
            return [Hit(i, 0.0, {"source": f"{i}.md", "text": i}, vectors[i] if with_vector else None) for i in ids]

        monkeypatch.setattr(r.store, "query", query)
        monkeypatch.setattr(r.store, "retrieve", retrieve)
        # the default, dbsf 3:1: dense [0.9, 0.8] -> mean 0.85, sd 0.05 -> [0.667, 0.333];
        # sparse [7, 5] -> mean 6, sd 1 -> [0.667, 0.333]
        hits = r.search("remote work", top_k=3)
        assert asked == [("dense", 50), ("sparse", 50)]  # search.candidates from each channel
        assert [h["chunk_id"] for h in hits] == ["a", "b", "c"]
        assert [h["score"] for h in hits] == pytest.approx([3 * 2 / 3, 3 / 3 + 2 / 3, 1 / 3])
        assert fetched == [["c"]]  # only the lexical-only hit's vector is fetched, for its cosine
    with Retriever(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, fusion="rrf"))) as r:
        monkeypatch.setattr(r.store, "query", query)
        monkeypatch.setattr(r.store, "retrieve", retrieve)
        hits = r.search("remote work", top_k=3)
        assert [h["chunk_id"] for h in hits] == ["b", "a", "c"]  # in both channels beats first in one
        assert [h["score"] for h in hits] == pytest.approx([3 / 62 + 1 / 61, 3 / 61, 1 / 62])
        assert hits[0]["fused_score"] == hits[0]["score"]
        assert (hits[0]["dense_rank"], hits[0]["dense_score"], hits[0]["sparse_rank"], hits[0]["sparse_score"]) == (
            2, 0.8, 1, 7.0)
        assert (hits[1]["sparse_rank"], hits[1]["sparse_score"]) == (None, None)
        assert hits[2]["dense_rank"] is None and hits[2]["dense_score"] == pytest.approx(0.1, abs=1e-5)
        assert [h["n"] for h in hits] == [1, 2, 3]


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_equal_scores_rank_by_source_wherever_the_folder_lies(cfg: Config, tmp_path: Path, mode: str) -> None:
    """Chunk ids hash the folder's absolute path; exact ties must not follow them. Six copies of one text in
    two folders: every channel scores them alike, and both indexes return them in the order of their names
    (a store-id order would agree with that one time in 720)."""
    names = ["f.md", "c.md", "a.md", "e.md", "b.md", "d.md"]
    text = "Visitors sign in at the front desk and wear a badge.\n"
    orders = []
    for i, where in enumerate(("one/deep/folder", "two")):
        root = tmp_path / where
        root.mkdir(parents=True)
        for n in names:
            (root / n).write_text(text, encoding="utf-8")
        c = make_cfg(cfg.embedder.path, f"index.name=tie{i}", "search.dedupe=false")
        ingest(c, [str(root)], progress=False)
        with Retriever(c) as r:
            orders.append([Path(h["source"]).name for h in r.search("where do visitors sign in", top_k=6, mode=mode)])
    assert orders[0] == orders[1] == sorted(names)


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_copies_of_one_text_take_one_place_and_name_the_others(cfg: Config, tmp_path: Path, mode: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A page kept twice (Node.js's readline.html and all.html, a file copied to two folders) filled two of the
    top places with one text, and two of a RAG prompt's sources; now one stands for all and names the others,
    and the next distinct text takes the place. The one shown is the most specific document (fewest chunks:
    the page, not the all-in-one page that sorts first). `search.dedupe=false` keeps every copy."""
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    badge = "Visitors sign in at the front desk and wear a badge."
    for where in ("a.md", "b/a.md", "c.md"):
        (root / where).write_text(badge + "\n", encoding="utf-8")
    (root / "0-all.md").write_text(f"# Visitors\n\n{badge}\n\n# Expenses\n\nReports are due monthly.\n",
                                   encoding="utf-8")
    (root / "other.md").write_text("Visitors park in the north lot and sign in at the gate.\n", encoding="utf-8")
    (root / "far.md").write_text("Expense reports are due on the fifth working day.\n", encoding="utf-8")
    c = make_cfg(cfg.embedder.path, "index.name=dups")
    ingest(c, [str(root)], progress=False)
    query = "where do visitors sign in and wear a badge"
    with Retriever(c) as r:
        hits = r.search(query, top_k=3, mode=mode)
    texts = [h["text"] for h in hits]
    assert len(set(texts)) == len(texts) == (2 if mode == "sparse" else 3)  # sparse: nothing else shares a word
    assert [h["n"] for h in hits] == list(range(1, len(hits) + 1))
    (first,) = [h for h in hits if h["text"] == badge]
    assert first["source"] == "a.md"  # of the four copies: one of the 1-chunk files, not 0-all.md (2 chunks)
    assert [d["source"] for d in first["duplicates"]] == ["0-all.md", "b/a.md", "c.md"]
    assert first["duplicates"][0]["heading"] == "Visitors"
    assert not any("duplicates" in h for h in hits if h is not first)
    with Retriever(make_cfg(cfg.embedder.path, "index.name=dups", "search.dedupe=false")) as r:
        every = [h["source"] for h in r.search(query, top_k=8, mode=mode)]
    at = every.index("0-all.md")
    assert every[at:at + 4] == ["0-all.md", "a.md", "b/a.md", "c.md"]
    assert main(["search", query, "--index", "dups", "--top-k", "3", "--mode", mode,
                 f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]) == 0
    assert "    the same text in: 0-all.md, b/a.md, c.md\n" in capsys.readouterr().out


def test_a_query_that_is_not_utf8_is_refused_not_a_tokenizer_traceback(cfg: Config, docs: Path, capsys) -> None:
    import os

    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["index", "add", str(docs), "--no-progress", *args]) == 0
    capsys.readouterr()
    query = os.fsdecode(b"caf\xe9 opening hours")  # what Python makes of a Latin-1 argument on a UTF-8 system
    assert main(["search", query, *args]) == 2
    assert "the search query is not valid UTF-8 text (an undecodable byte at character 4)" in capsys.readouterr().err


def test_a_filter_with_an_empty_value_is_refused_not_an_empty_answer(cfg: Config, docs: Path, capsys) -> None:
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["index", "add", str(docs), "--no-progress", *args]) == 0
    capsys.readouterr()
    assert main(["search", "badges", "--filter", "source=", *args]) == 2  # --filter source=$DOC, DOC unset
    assert "--filter 'source=': the value is empty (an unset shell variable?)" in capsys.readouterr().err
    assert parse_filters(["meta.dept="]) == {"meta.dept": ""}  # metadata may hold an empty string


def test_search_over_documents_an_interrupted_add_left_incomplete_warns_once_naming_them_and_the_fix(
        cfg: Config, tmp_path: Path, ragtune_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An add killed midway leaves a document with fewer chunks than it was cut into: `ragtune search`
    says so once on stderr, naming it and the sync that finishes it; --json output keeps its shape (a list
    of hits). After that sync, no warning."""
    import logging
    import os
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "my docs"
    root.mkdir()
    for i in range(6):
        (root / f"page{i}.md").write_text(f"# Page {i}\n\n" + f"Paragraph {i} about topic {i}. " * 60,
                                          encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import os, signal
        from ragtune.cli import main
        from ragtune.retrieval import ingest_write
        from ragtune.retrieval.store import EdgeStore
        ingest_write.EMBED_GROUP = 3  # several embedding groups a document: the kill lands inside one
        calls, real = [0], EdgeStore.upsert
        def upsert(self, points):
            real(self, points)
            if points and points[0].dense is not None:
                calls[0] += 1
                if calls[0] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        EdgeStore.upsert = upsert
        main(["index", "add", {str(root)!r}, "embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress"])
    """)
    env = dict(os.environ, RAGTUNE_HOME=str(ragtune_home))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    from ragtune.retrieval.ingest import list_documents

    cut = sorted(d["source"] for d in list_documents(cfg) if not d["complete"])
    assert cut, list_documents(cfg)

    search = [sys.executable, "-m", "ragtune", "search", "topic", "--json", f"embedder.path={cfg.embedder.path}",
              "embedder.device=cpu"]
    proc = subprocess.run(search, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert isinstance(json.loads(proc.stdout), list)  # the --json shape is unchanged
    warned = [line for line in proc.stderr.splitlines() if "incomplete" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING "), proc.stderr
    assert f"index 'default' holds {len(cut)} incomplete document" in warned[0]
    assert f"({', '.join(cut)})" in warned[0]
    assert f"run 'ragtune index sync '{root}' --index default'" in warned[0]  # quoted: the folder has a space

    assert main(["-q", "index", "sync", str(root), f"embedder.path={cfg.embedder.path}", "embedder.device=cpu",
                 "--no-progress"]) == 0
    with caplog.at_level(logging.WARNING, logger="ragtune.retrieval"):
        with Retriever(cfg) as r:
            assert r.search("topic")
    assert "incomplete" not in caplog.text


def test_cli_metadata_filter_written_as_the_help_says(cfg: Config, docs: Path, capsys: pytest.CaptureFixture) -> None:
    """`--filter=meta.dept=finance`, the form `search --help` gives for a metadata filter, filters on JSONL
    metadata; so does `--filter meta.dept=finance` (before: its value was taken for a config override and
    argparse said '--filter: expected one argument')."""
    ingest(cfg, [str(docs)], progress=False)
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--json"]
    for form in (["--filter=meta.dept=finance"], ["--filter", "meta.dept=finance"]):
        assert main(["-q", "search", "expense reports", *form, *args]) == 0, capsys.readouterr().err
        hits = json.loads(capsys.readouterr().out)
        assert [h["source"] for h in hits] == ["faq.jsonl#expenses"]
