"""An existing index keeps its own chunking unless the user chooses another, as it keeps its embedder:
chunk.size / chunk.overlap unset cut new and re-read documents with the chunking in the index's meta,
a new index gets 256 / 128 (cut to what the embedder reads), and a chosen other chunking re-chunks the
whole index or is refused with both chunkings named."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval import chunking, loaders
from ragtune.retrieval.chunking import CHUNKER_VERSION, chunker_signature
from ragtune.retrieval.ingest import _index_chunking, ingest
from ragtune.retrieval.store import EdgeStore
from tests.retrieval.conftest import make_cfg


def long_text(topic: str, n: int = 40) -> str:
    """One section of short sentences: chunks fill up to the size they are cut at."""
    return f"# {topic.title()}\n\n" + " ".join(f"Rule {i} of the {topic} policy applies to every team." for i in range(n))


def cut(name: str = "default") -> dict[str, tuple[set[str], int]]:
    """source -> (the chunker signatures of its chunks, its largest chunk in tokens)."""
    out: dict[str, tuple[set[str], int]] = {}
    with EdgeStore(name).open() as s:
        for _pid, p, _ in s.scroll({"kind": "chunk"}, ["source", "chunker", "tokens"], False):
            sigs, most = out.get(p["source"], (set(), 0))
            out[p["source"]] = (sigs | {p["chunker"]}, max(most, p["tokens"]))
    return out


def meta(name: str = "default") -> dict[str, Any]:
    with EdgeStore(name).open() as s:
        return s.read_meta()


@pytest.fixture
def roots(docs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The `docs` folder with a long page, and a second folder: an index built from both has a folder a
    sync of the first leaves alone."""
    (docs / "leave.md").write_text(long_text("leave"), encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "travel.md").write_text(long_text("travel"), encoding="utf-8")
    return docs, other


def build(cfg: Config, roots: tuple[Path, Path], *chunk: str) -> str:
    ingest(make_cfg(Path(cfg.embedder.path), *chunk), [str(r) for r in roots], progress=False)
    return meta()["chunker"]


def test_a_sync_without_chunk_settings_cuts_with_the_index_chunking(cfg: Config, roots: tuple[Path, Path]) -> None:
    docs, other = roots
    sig = build(cfg, roots, "chunk.size=64")
    assert sig == chunker_signature(64, 32)
    (docs / "parking.md").write_text(long_text("parking"), encoding="utf-8")
    (docs / "leave.md").write_text(long_text("annual leave", 30), encoding="utf-8")

    dry = ingest(cfg, [str(docs)], delete_missing=True, dry_run=True, progress=False)
    assert dry.added == ["parking.md"] and dry.replaced == ["leave.md"] and dry.unchanged == 5
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]  # no chunk settings, as anyone syncs
    assert main(["index", "sync", str(docs), "--no-progress", *args]) == 0
    got = cut()
    for source in ("parking.md", "leave.md"):
        sigs, most = got[source]
        assert sigs == {sig} and 48 < most <= 64, (source, got[source])  # cut at 64, not at the tiny model's 126
    assert {s for sigs, _ in got.values() for s in sigs} == {sig} and meta()["chunker"] == sig


def test_a_reread_after_a_reader_update_keeps_the_index_chunking(cfg: Config, roots: tuple[Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    docs, _ = roots
    sig = build(cfg, roots, "chunk.size=64", "chunk.overlap=8")
    monkeypatch.setitem(loaders.READER_VERSIONS, "html", loaders.READER_VERSIONS["html"] + 1)
    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert [s for s, _ in res.reread] == ["security.html"] and res.chunks_written > 0
    assert cut()["security.html"][0] == {sig} and meta()["chunker"] == sig


def test_a_chosen_other_size_on_a_partial_sync_is_refused_naming_both(cfg: Config, roots: tuple[Path, Path],
                                                                      capsys: pytest.CaptureFixture) -> None:
    docs, other = roots
    build(cfg, roots, "chunk.size=64")
    (docs / "parking.md").write_text(long_text("parking"), encoding="utf-8")
    before = cut()
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "chunk.size=32"]
    assert main(["index", "sync", str(docs), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert f"cut with chunk.size 64 / chunk.overlap 32 (chunker version {CHUNKER_VERSION})" in err
    assert f"new ones with chunk.size 32 / chunk.overlap 16 (chunker version {CHUNKER_VERSION})" in err
    assert "leaving chunk.size and chunk.overlap unset" in err and "'chunk.size=64 chunk.overlap=32'" in err
    assert f"'ragtune index sync {docs.resolve()} {other.resolve()} --index default chunk.size=32'" in err
    assert cut() == before  # refused before anything was written


def test_a_chosen_other_size_over_every_document_rechunks_and_stays(cfg: Config, roots: tuple[Path, Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    both = [str(r) for r in roots]
    build(cfg, roots, "chunk.size=64")
    with caplog.at_level(logging.WARNING, logger="ragtune.retrieval.ingest"):
        res = ingest(make_cfg(Path(cfg.embedder.path), "chunk.size=32"), both, delete_missing=True, progress=False)
    assert "re-chunking (and re-embedding)" in caplog.text and res.unchanged == 0
    new = chunker_signature(32, 16)
    got = cut()
    assert {s for sigs, _ in got.values() for s in sigs} == {new} and max(m for _, m in got.values()) <= 32
    assert meta()["chunker"] == new
    again = ingest(cfg, both, delete_missing=True, progress=False)  # unset now keeps the new chunking
    assert again.chunks_written == 0 and again.unchanged == len(got)


def test_one_setting_alone_takes_the_other_from_the_index(cfg: Config, roots: tuple[Path, Path]) -> None:
    both = [str(r) for r in roots]
    build(cfg, roots, "chunk.size=64", "chunk.overlap=8")
    emb = Path(cfg.embedder.path)
    ingest(make_cfg(emb, "chunk.overlap=16"), both, delete_missing=True, progress=False)
    assert meta()["chunker"] == chunker_signature(64, 16)
    ingest(make_cfg(emb, "chunk.size=48"), both, delete_missing=True, progress=False)
    assert meta()["chunker"] == chunker_signature(48, 16)
    # an overlap alone is judged against the size the index keeps, as the config check judges a pair
    with pytest.raises(UsageError, match=r"chunk.overlap 30 is more than half of index 'default''s chunk.size 48 "
                                         r"\(24\), which it keeps while chunk.size is unset"):
        ingest(make_cfg(emb, "chunk.overlap=30"), both, delete_missing=True, progress=False)


def test_a_newer_chunker_recuts_with_the_index_size_and_overlap(cfg: Config, roots: tuple[Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    docs, other = roots
    build(cfg, roots, "chunk.size=64")
    monkeypatch.setattr(chunking, "CHUNKER_VERSION", CHUNKER_VERSION + 1)
    with pytest.raises(UsageError) as exc:  # one folder of two: the index would hold two chunker versions
        ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert "leaving chunk.size" not in str(exc.value)  # nothing was chosen: only the whole re-chunk helps
    assert f"'ragtune index sync {docs.resolve()} {other.resolve()} --index default'" in str(exc.value)
    ingest(cfg, [str(docs), str(other)], delete_missing=True, progress=False)
    assert meta()["chunker"] == f"v{CHUNKER_VERSION + 1}-s64-o32"


def test_a_new_index_without_settings_is_cut_at_256_and_128_fitted_to_the_embedder(cfg: Config, docs: Path) -> None:
    assert (cfg.chunk.size, cfg.chunk.overlap) == (0, -1) and cfg.chunk.resolve() == (256, 128)
    dry = ingest(cfg, [str(docs)], dry_run=True, progress=False)
    assert len(dry.added) == 5 and not EdgeStore("default").exists()
    ingest(cfg, [str(docs)], progress=False)
    most = meta()["embedder"]["max_tokens"]
    assert most < 256 and meta()["chunker"] == f"v{CHUNKER_VERSION}-s{most}-o{most // 2}"
    with pytest.raises(UsageError, match=r"chunk.overlap 200 is more than half of chunk.size 256 \(128\), a new "):
        ingest(make_cfg(Path(cfg.embedder.path), "chunk.overlap=200"), [str(docs)], index="other", progress=False)
    # the index's size is the embedder's maximum (cut from 256): an overlap alone is cut with it, as at the build
    again = ingest(make_cfg(Path(cfg.embedder.path), "chunk.overlap=128"), [str(docs)], progress=False)
    assert again.chunks_written == 0 and again.unchanged == 5


def test_an_index_whose_meta_names_a_chunking_no_document_holds_keeps_its_documents() -> None:
    """Meta written before it followed the chunks may name the first chunking: the documents' one wins."""
    states = {d: {"doc_id": d, "chunker": c} for d, c in
              [("a", "v1-s64-o32"), ("b", "v1-s64-o32"), ("c", "v1-s100-o10"), ("d", None)]}
    assert _index_chunking({"chunker": "v1-s254-o127"}, states) == (64, 32)
    assert _index_chunking({"chunker": "v1-s100-o10"}, states) == (100, 10)  # one the index holds: meta's
    assert _index_chunking({"chunker": "v1-s254-o127"}, {}) == (254, 127)
    assert _index_chunking({}, {}) is None
