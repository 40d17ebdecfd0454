"""A changed or re-read document keeps the dense vectors of the chunks whose text did not change:
only new text is embedded again (chunks never cross a heading or a page)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.retrieval import loaders
from ragtune.retrieval.embedder import Embedder
from ragtune.retrieval.ingest import ingest
from ragtune.retrieval.store import EdgeStore
from tests.retrieval.conftest import HR_MD, make_pdf

NEW_LEAVE = "Annual leave is twenty-five days per year; unused days expire at the end of June."


def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the embedder is asked to embed as a document."""
    seen: list[str] = []
    real = Embedder.embed_documents

    def embed_documents(self: Embedder, texts: list[str], *a: Any, **kw: Any) -> Any:
        seen.extend(texts)
        return real(self, texts, *a, **kw)

    monkeypatch.setattr(Embedder, "embed_documents", embed_documents)
    return seen


def vectors(name: str = "default") -> dict[str, list[float]]:
    """chunk text -> stored dense vector."""
    with EdgeStore(name).open() as s:
        return {p["text"]: v["dense"] for _pid, p, v in s.scroll({"kind": "chunk"}, ["text"], True)}


def test_editing_one_section_embeds_that_section_only(cfg: Config, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "hr.md").write_text(HR_MD, encoding="utf-8")
    first = ingest(cfg, [str(d)], delete_missing=True, progress=False)
    assert first.chunks_written == 2 and first.chunks_reused == 0
    before = vectors()
    remote = next(t for t in before if "remotely" in t)

    old_leave = next(t for t in before if "Annual leave" in t)
    (d / "hr.md").write_text(HR_MD.replace(old_leave, NEW_LEAVE), encoding="utf-8")
    seen = spy(monkeypatch)
    res = ingest(cfg, [str(d)], delete_missing=True, progress=False)
    assert res.replaced == ["hr.md"]
    assert res.chunks_written == 2 and res.chunks_reused == 1 and res.chunks_deleted == 2
    assert seen == [NEW_LEAVE]  # the unchanged section was not embedded again
    after = vectors()
    assert set(after) == {remote, NEW_LEAVE}
    assert after[remote] == before[remote]  # kept as stored
    emb = Embedder(cfg.embedder).load()
    fresh = np.asarray(emb.embed_documents([remote])[0], dtype=np.float32)
    assert float(np.dot(fresh, np.asarray(after[remote])) / np.linalg.norm(fresh)) > 0.999  # what it would embed to


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_a_reread_with_the_same_text_embeds_nothing(cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    backend: str) -> None:
    if backend == "server":  # qdrant-client's local mode: the server store's code path
        cfg = replace(cfg, store=replace(cfg.store, url=f"local:{tmp_path / 'qdrant'}"))
    d = tmp_path / "docs"
    d.mkdir()
    make_pdf(d / "manual.pdf", ["Expenses are paid monthly.", "Travel needs prior approval."])
    ingest(cfg, [str(d)], delete_missing=True, progress=False)
    monkeypatch.setitem(loaders.READER_VERSIONS, "pdf", loaders.READER_VERSIONS["pdf"] + 1)
    seen = spy(monkeypatch)
    res = ingest(cfg, [str(d)], delete_missing=True, progress=False)
    assert [s for s, _ in res.reread] == ["manual.pdf"]
    assert res.chunks_written == 2 and res.chunks_reused == 2 and seen == []


def test_new_text_is_embedded_and_reported(cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "hr.md").write_text(HR_MD, encoding="utf-8")
    (d / "notes.txt").write_text("The canteen opens at noon.", encoding="utf-8")
    overrides = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["index", "sync", str(d), *overrides]) == 0
    (d / "notes.txt").write_text("The canteen opens at one o'clock.", encoding="utf-8")
    (d / "hr.md").write_text(HR_MD.replace("three days", "four days"), encoding="utf-8")
    capsys.readouterr()
    assert main(["index", "sync", str(d), "--json", *overrides]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["replaced"]) == ["hr.md", "notes.txt"]
    assert out["chunks_written"] == 3 and out["chunks_reused"] == 1  # hr.md's Leave section
    (d / "notes.txt").write_text("The canteen opens at two o'clock.", encoding="utf-8")
    assert main(["index", "sync", str(d), *overrides]) == 0
    assert "1 chunks written, " in capsys.readouterr().out  # nothing kept: no note


def test_a_moved_file_keeps_its_vectors(cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "docs"
    (d / "old").mkdir(parents=True)
    (d / "old" / "hr.md").write_text(HR_MD, encoding="utf-8")
    ingest(cfg, [str(d)], delete_missing=True, progress=False)
    before = vectors()
    (d / "new").mkdir()
    (d / "old" / "hr.md").rename(d / "new" / "handbook.md")
    seen = spy(monkeypatch)
    res = ingest(cfg, [str(d)], delete_missing=True, progress=False)
    assert res.added == ["new/handbook.md"] and res.deleted == ["old/hr.md"]
    assert res.chunks_reused == res.chunks_written == 2 and seen == []
    assert vectors() == before
