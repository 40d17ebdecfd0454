"""Reader versions: `index sync`/`add` re-read the unchanged documents whose format's reader was
updated (loaders.READER_VERSIONS) and only those; an index made before versions were stored
re-reads the formats whose reader moved past version 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.retrieval import loaders
from ragtune.retrieval.embedder import Embedder
from ragtune.retrieval.ingest import ingest, stats
from ragtune.retrieval.store import EdgeStore, PointData
from tests.retrieval.conftest import HR_MD, make_pdf

PAGES = ["Expenses are paid monthly.", "Travel needs prior approval.", "Receipts are kept for five years."]


def points(name: str = "default") -> dict[str, dict[str, Any]]:
    """chunk id -> payload of every chunk in an Edge index."""
    with EdgeStore(name).open() as s:
        return {pid: p for pid, p, _ in s.scroll({"kind": "chunk"}, True, False)}


def by_source(pts: dict[str, dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    return {pid: p for pid, p in pts.items() if p["source"] == source}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "hr.md").write_text(HR_MD, encoding="utf-8")
    make_pdf(d / "manual.pdf", PAGES)
    return d


def first_page_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'newer PDF reader' that reads fewer chunks than the old one (its first page only)."""
    real = loaders.load_pdf

    def reader(data: bytes, source: str, title: str) -> loaders.Document:
        doc = real(data, source, title)
        doc.blocks = [b for b in doc.blocks if b.page == 1]
        return doc

    monkeypatch.setattr(loaders, "load_pdf", reader)


def no_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Embedder) -> Embedder:
        raise AssertionError("a sync with nothing to re-read loaded the embedding model")

    monkeypatch.setattr(Embedder, "load", refuse)


def test_bumped_pdf_reader_rereads_only_the_pdf(cfg: Config, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ingest(cfg, [str(folder)], delete_missing=True, progress=False)
    assert sorted(first.added) == ["hr.md", "manual.pdf"] and not first.reread
    before = points()
    pdf_before = by_source(before, "manual.pdf")
    assert len(pdf_before) == 3  # a chunk never crosses a page
    assert {(p["reader"], p["reader_version"]) for p in before.values()} == {
        ("markdown", loaders.READER_VERSIONS["markdown"]), ("pdf", loaders.READER_VERSIONS["pdf"])}

    bumped = loaders.READER_VERSIONS["pdf"] + 1
    monkeypatch.setitem(loaders.READER_VERSIONS, "pdf", bumped)
    first_page_only(monkeypatch)
    assert stats(cfg)["reread_pending"] == {"PDF reader updated": 1}
    res = ingest(cfg, [str(folder)], delete_missing=True, progress=False)
    assert res.reread == [("manual.pdf", "PDF reader updated")]
    assert not res.added and not res.replaced and not res.deleted and res.unchanged == 1
    assert res.chunks_written == 1 and res.chunks_deleted == 2

    after = points()
    assert by_source(after, "hr.md") == by_source(before, "hr.md")  # same ids, same payloads
    pdf_after = by_source(after, "manual.pdf")
    assert len(pdf_after) == 1 and set(pdf_after) < set(pdf_before)  # same doc id: chunk 0 keeps its id
    (p,) = pdf_after.values()
    assert p["text"] == PAGES[0] and p["n_chunks"] == 1 and p["reader_version"] == bumped
    assert stats(cfg)["reread_pending"] == {} and stats(cfg)["incomplete"] == 0

    no_embedder(monkeypatch)
    again = ingest(cfg, [str(folder)], delete_missing=True, progress=False)
    assert not again.reread and again.chunks_written == 0 and again.chunks_deleted == 0 and again.unchanged == 2
    assert points() == after


def test_add_of_one_file_rereads_it_too(cfg: Config, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingest(cfg, [str(folder)], progress=False)
    monkeypatch.setitem(loaders.READER_VERSIONS, "pdf", loaders.READER_VERSIONS["pdf"] + 1)
    dry = ingest(cfg, [str(folder / "manual.pdf")], dry_run=True, progress=False)
    assert dry.reread == [("manual.pdf", "PDF reader updated")] and not dry.added
    res = ingest(cfg, [str(folder / "manual.pdf")], progress=False)
    assert res.reread == [("manual.pdf", "PDF reader updated")] and res.chunks_written == 3
    assert res.chunks_deleted == 0  # the same text read again: its 3 points overwritten in place
    assert len(by_source(points(), "manual.pdf")) == 3


def strip_reader_fields(name: str = "default") -> None:
    """Make the index look like one written before reader versions were stored."""
    with EdgeStore(name).open() as s:
        old = []
        for pid, payload, vec in s.scroll({"kind": "chunk"}, True, with_vectors=True):
            sp = vec.get("sparse")
            payload = {k: v for k, v in payload.items() if k not in ("reader", "reader_version")}
            old.append(PointData(pid, vec["dense"], (list(sp.indices), list(sp.values)) if sp else None, payload))
        s.upsert(old)
        s.flush()


def test_index_made_before_reader_versions_rereads_once_and_keeps_vectors(
        cfg: Config, docs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_pdf(docs / "manual.pdf", PAGES)
    ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    strip_reader_fields()
    before = points()
    assert not any("reader" in p for p in before.values())

    embedded: list[str] = []
    real = Embedder.embed_documents
    monkeypatch.setattr(Embedder, "embed_documents",
                        lambda self, texts, *a, **kw: embedded.extend(texts) or real(self, texts, *a, **kw))
    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert sorted(res.reread) == [
        ("faq.jsonl#L2", "JSONL reader updated"), ("faq.jsonl#expenses", "JSONL reader updated"),
        ("hr.md", "Markdown reader updated"), ("ko/seoul.txt", "plain text reader updated"),
        ("manual.pdf", "PDF reader updated"), ("security.html", "HTML reader updated")]
    assert not res.added and not res.replaced and res.unchanged == 0
    assert embedded == [] and res.chunks_reused == res.chunks_written  # the same text: every vector kept
    after = points()
    assert set(after) == set(before)  # same text, same ids
    assert all(p["reader_version"] == loaders.READER_VERSIONS[p["reader"]] for p in after.values())

    no_embedder(monkeypatch)
    again = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert not again.reread and again.chunks_written == 0 and again.unchanged == 6


def test_cli_reports_reread_documents(cfg: Config, folder: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress"]
    assert main(["index", "sync", str(folder), *args]) == 0
    capsys.readouterr()
    monkeypatch.setitem(loaders.READER_VERSIONS, "pdf", loaders.READER_VERSIONS["pdf"] + 1)
    assert main(["index", "stats", f"embedder.path={cfg.embedder.path}"]) == 0
    assert "re-read    1 documents on the next 'ragtune index sync' (PDF reader updated)" in capsys.readouterr().out
    assert main(["index", "sync", str(folder), "--dry-run", *args]) == 0
    assert "re-read manual.pdf (PDF reader updated)" in capsys.readouterr().out
    assert main(["index", "sync", str(folder), "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reread"] == [{"source": "manual.pdf", "reason": "PDF reader updated"}]
    assert out["added"] == [] and out["replaced"] == [] and out["unchanged"] == 1

    monkeypatch.setitem(loaders.READER_VERSIONS, "pdf", loaders.READER_VERSIONS["pdf"] + 1)
    assert main(["index", "sync", str(folder), *args]) == 0
    out_text = capsys.readouterr().out
    assert "re-read 1, deleted 0, unchanged 1 documents" in out_text
    assert "re-read unchanged files: PDF reader updated (1)" in out_text
