"""Readers and writers of an embedded (Edge) index: a server keeps answering while `index sync` runs
and then sees the new documents; a second reader reads a copy; a writer waits for short readers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ragtune.config import Config
from ragtune.retrieval.ingest import ingest, list_documents, stats
from ragtune.retrieval.search import Retriever
from ragtune.retrieval.store import EdgeStore, IndexBusy, IndexLock, generation, index_dir

REPO = Path(__file__).resolve().parents[2]


def sources_of(hits: list[dict]) -> set[str]:
    return {h["source"] for h in hits}


def test_long_lived_reader_never_blocks_a_writer_and_sees_its_changes(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    server = Retriever(cfg, read_copy=True).load()
    server.REFRESH_EVERY_S = 0.0
    try:
        assert sources_of(server.search("security badges", top_k=10)) == {"hr.md"}
        gen = generation("default")
        res = ingest(cfg, [str(docs / "hr.md"), str(docs / "security.html")], progress=False)  # not IndexBusy
        assert res.chunks_written > 0 and generation("default") != gen
        assert "security.html" in sources_of(server.search("security badges", top_k=10))
        # the copy it read before is gone; only the current one is on disk
        assert len(list((index_dir("default") / ".readers").iterdir())) == 1
    finally:
        server.close()
    assert not (index_dir("default") / ".readers").exists()


def test_a_copy_is_not_refreshed_while_a_writer_is_at_work(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with Retriever(cfg, read_copy=True) as server:
        (index_dir("default") / "generation").write_text("changed\n")
        with IndexLock("default", "ragtune index sync docs"):
            assert server.refresh() is False  # keeps answering from the copy it has
            assert sources_of(server.search("remote work", top_k=5)) == {"hr.md"}
            with pytest.raises(IndexBusy, match=r"being written by another process \(pid \d+: ragtune index sync docs\)"):
                Retriever(cfg, read_copy=True).load()
        assert server.refresh() is True


def test_short_reader_reads_a_copy_when_another_reader_has_the_index_open(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    code = ("from ragtune.retrieval.store import EdgeStore; import time; s = EdgeStore('default').open(); "
            "print('open', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ))
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(IndexBusy):
            EdgeStore("default").open()  # Edge itself allows one process per folder
        with Retriever(cfg) as r:
            assert r.store.copy_dir is not None
            assert "hr.md" in sources_of(r.search("remote work days", top_k=3))
        assert "hr.md" in {d["source"] for d in list_documents(cfg)}  # `index list` / `stats` too
        assert stats(cfg)["documents"] == 5  # faq.jsonl holds two
    finally:
        proc.kill()
        proc.wait()


def test_writer_waits_for_short_readers_but_not_for_a_writer(ragtune_home: Path) -> None:
    reader = IndexLock("default", shared=True).__enter__()
    threading.Timer(0.5, reader.__exit__).start()
    t0 = time.monotonic()
    with IndexLock("default", "ragtune index sync docs", wait=10):
        waited = time.monotonic() - t0
    assert 0.3 < waited < 10
    reader = IndexLock("default", shared=True).__enter__()
    try:
        with pytest.raises(IndexBusy, match=r"in use by another process \(a reader\)"):
            IndexLock("default", "ragtune index sync docs", wait=0.2).__enter__()
    finally:
        reader.__exit__()


def test_copies_left_by_killed_readers_are_removed(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs / "hr.md")], progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = index_dir("default") / ".readers" / f"{dead.stdout.strip()}-deadbeef"
    (leftover / "shard").mkdir(parents=True)
    with Retriever(cfg, read_copy=True):
        assert not leftover.exists()
