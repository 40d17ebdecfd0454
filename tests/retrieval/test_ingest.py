"""add / sync / remove on the embedded store: idempotent, local changes, recovery after kill -9."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval.ingest import ingest, list_documents, list_indexes, remove
from ragtune.retrieval.store import EdgeStore, IndexBusy, IndexLock

REPO = Path(__file__).resolve().parents[2]


def snapshot(name: str = "default") -> dict[str, tuple[str, str]]:
    """chunk id -> (source, doc_id) for every chunk in an Edge index."""
    with EdgeStore(name).open() as s:
        return {pid: (p["source"], p["doc_id"]) for pid, p, _ in s.scroll({"kind": "chunk"}, ["source", "doc_id"], False)}


def sources(snap: dict[str, tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for src, _ in snap.values():
        out[src] = out.get(src, 0) + 1
    return out


def test_sync_is_idempotent_and_local(cfg: Config, docs: Path) -> None:
    first = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert sorted(first.added) == ["faq.jsonl#L2", "faq.jsonl#expenses", "hr.md", "ko/seoul.txt", "security.html"]
    snap = snapshot()
    assert len(snap) == first.chunks_written > 0

    again = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert again.chunks_written == 0 and again.unchanged == 5 and not again.deleted
    assert snapshot() == snap  # same ids, nothing duplicated

    # change one file: only its chunks are replaced
    (docs / "hr.md").write_text("# HR Handbook\n\nRemote work is allowed four days per week.\n", encoding="utf-8")
    changed = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert changed.replaced == ["hr.md"] and changed.unchanged == 4
    after = snapshot()
    untouched = {k: v for k, v in snap.items() if v[0] != "hr.md"}
    assert {k: v for k, v in after.items() if v[0] != "hr.md"} == untouched
    assert sources(after)["hr.md"] == changed.chunks_written
    assert not set(k for k, v in snap.items() if v[0] == "hr.md") & set(after)  # old hr.md chunks gone

    # change one JSONL line: only that line's document is replaced
    (docs / "faq.jsonl").write_text(
        (docs / "faq.jsonl").read_text(encoding="utf-8").replace("eight", "nine"), encoding="utf-8"
    )
    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert res.replaced == ["faq.jsonl#L2"] and res.unchanged == 4

    # delete a file: its chunks go, the rest stay
    (docs / "security.html").unlink()
    gone = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert gone.deleted == ["security.html"] and gone.chunks_written == 0
    final = snapshot()
    assert "security.html" not in sources(final)
    assert {k: v for k, v in final.items() if v[0] in ("ko/seoul.txt", "faq.jsonl#expenses")} == {
        k: v for k, v in snap.items() if v[0] in ("ko/seoul.txt", "faq.jsonl#expenses")
    }


def test_sync_touches_only_its_root_and_add_never_deletes(cfg: Config, docs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.txt").write_text("Parking is free on weekends.", encoding="utf-8")
    ingest(cfg, [str(docs), str(other)], progress=False)
    (docs / "hr.md").unlink()
    res = ingest(cfg, [str(other)], delete_missing=True, progress=False)  # sync 'other' only
    assert not res.deleted and "hr.md" in sources(snapshot())
    res = ingest(cfg, [str(docs)], progress=False)  # add: never deletes
    assert not res.deleted and "hr.md" in sources(snapshot())
    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert res.deleted == ["hr.md"] and "note.txt" in sources(snapshot())


def test_dry_run_changes_nothing(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    before = snapshot()
    (docs / "hr.md").write_text("# HR\n\nNew text.\n", encoding="utf-8")
    (docs / "new.md").write_text("# New\n\nA new page.\n", encoding="utf-8")
    (docs / "security.html").unlink()
    plan = ingest(cfg, [str(docs)], delete_missing=True, dry_run=True, progress=False)
    assert (plan.added, plan.replaced, plan.deleted) == (["new.md"], ["hr.md"], ["security.html"])
    assert snapshot() == before


def test_remove_by_source_and_folder(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    out = remove(cfg, ["hr.md"])
    assert out["removed"] == ["hr.md"] and out["chunks_deleted"] > 0
    remove(cfg, [str(docs / "ko")])
    assert {r["source"] for r in list_documents(cfg)} == {"faq.jsonl#L2", "faq.jsonl#expenses", "security.html"}
    with pytest.raises(Exception, match="no document in index 'default' matches 'nope.md'"):
        remove(cfg, ["nope.md"])


def test_second_writer_gets_a_clear_error(cfg: Config, docs: Path) -> None:
    with IndexLock("default", "ragtune index sync elsewhere"):
        with pytest.raises(IndexBusy, match=r"in use by another process \(pid \d+: ragtune index sync elsewhere\)"):
            ingest(cfg, [str(docs)], progress=False)


def test_edge_reader_while_open_elsewhere_gets_clear_error(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    code = "from ragtune.retrieval.store import EdgeStore; import time; s = EdgeStore('default').open(); print('open', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(IndexBusy, match="in use by another process"):
            EdgeStore("default").open()
    finally:
        proc.kill()
        proc.wait()


def test_embedder_mismatch_is_refused(cfg: Config, docs: Path, minilm_dir: Path) -> None:
    from tests.retrieval.conftest import make_cfg

    ingest(cfg, [str(docs / "hr.md")], progress=False)
    with pytest.raises(Exception, match="was built with the embedder at"):
        ingest(make_cfg(minilm_dir), [str(docs / "hr.md")], progress=False)


def test_chunks_fit_the_model_with_its_special_tokens(cfg: Config, tmp_path: Path) -> None:
    """chunk.size counts text tokens; the model's limit counts [CLS] and [SEP] too: a chunk cut at the
    model's limit would lose its last tokens to truncation, so the size is capped at the limit less them."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(cfg.embedder.path), device="cpu")
    limit = model.max_seq_length
    assert cfg.chunk.resolve()[0] > limit  # a new index's size is over the model's limit: the cap must act
    words = " ".join(f"word{i} alpha beta" for i in range(400))  # one paragraph, no sentence ends: token windows
    (tmp_path / "long.txt").write_text(words + "\n\nA short closing paragraph.\n", encoding="utf-8")
    ingest(cfg, [str(tmp_path / "long.txt")], progress=False)
    with EdgeStore("default").open() as s:
        texts = [p["text"] for _pid, p, _ in s.scroll({"kind": "chunk"}, ["text"], False)]
    sizes = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    assert len(texts) > 3 and max(sizes) == limit  # full chunks, none over


def chunkers() -> dict[str, set[str]]:
    """source -> the chunker signatures its chunks were cut with."""
    with EdgeStore("default").open() as s:
        out: dict[str, set[str]] = {}
        for _pid, p, _ in s.scroll({"kind": "chunk"}, ["source", "chunker"], False):
            out.setdefault(p["source"], set()).add(p["chunker"])
        return out


def test_changed_chunk_settings_never_mix_chunkings(cfg: Config, docs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An index cut with one chunk.overlap (say, an older default) and a config with another: adding a
    document is refused with both fixes named, each fix works, and no index ends up with two chunkings."""
    from tests.retrieval.conftest import make_cfg

    other = tmp_path / "other"
    other.mkdir()
    (other / "note.txt").write_text("Parking is free on weekends.", encoding="utf-8")
    old_cfg = make_cfg(Path(cfg.embedder.path), "chunk.overlap=4")
    ingest(old_cfg, [str(docs), str(other)], progress=False)
    (old_sig,) = set().union(*chunkers().values())
    new_cfg = make_cfg(Path(cfg.embedder.path), "chunk.overlap=8")
    (other / "new.txt").write_text("Bicycles go in the basement.", encoding="utf-8")
    before = snapshot()

    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "chunk.overlap=8"]
    assert main(["index", "add", str(other), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert "would mix two chunkings" in err and "Traceback" not in err
    assert f"index sync {docs.resolve()} {other.resolve()}" in err
    with pytest.raises(UsageError, match="would mix two chunkings"):  # the dry run says so too
        ingest(new_cfg, [str(other)], dry_run=True, progress=False)
    assert snapshot() == before  # refused before anything was written

    # fix 1, the settings the message names: the index keeps its chunking
    keep = re.search(r"'(chunk\.size=\d+ chunk\.overlap=\d+)'", err)
    assert keep, err
    res = ingest(make_cfg(Path(cfg.embedder.path), "chunk.overlap=8", *keep[1].split()), [str(other)], progress=False)
    assert res.added == ["new.txt"] and set().union(*chunkers().values()) == {old_sig}

    # fix 2, the sync the message names: every document re-cut with the new settings, the index says so
    with caplog.at_level(logging.WARNING, logger="ragtune.retrieval.ingest"):
        res = ingest(new_cfg, [str(docs), str(other)], delete_missing=True, progress=False)
    assert "re-chunking (and re-embedding)" in caplog.text
    assert res.unchanged == 0 and len(res.replaced) == 0 and res.chunks_written > 0
    (new_sig,) = set().union(*chunkers().values())
    assert new_sig != old_sig and sorted(chunkers()) == sorted([*sources(before), "new.txt"])
    assert len(snapshot()) == res.chunks_written  # the old cut's points are gone, none duplicated
    with EdgeStore("default").open() as s:
        assert s.read_meta()["chunker"] == new_sig
    again = ingest(new_cfg, [str(other)], progress=False)  # and the new settings now add without complaint
    assert again.chunks_written == 0 and again.unchanged == 2


def test_recovery_after_kill_9_midway(cfg: Config, docs: Path, tmp_path: Path, ragtune_home: Path) -> None:
    for i in range(12):  # enough documents for several embedding groups
        (docs / f"page{i:02d}.md").write_text(f"# Page {i}\n\n" + f"Paragraph {i} about topic {i}. " * 30, encoding="utf-8")
    script = textwrap.dedent(f"""
        import os, signal
        from ragtune.config import load_config
        from ragtune.retrieval import ingest as ing
        from ragtune.retrieval.store import EdgeStore
        from ragtune.retrieval import ingest_write
        ingest_write.EMBED_GROUP = 4
        calls = [0]
        real = EdgeStore.upsert
        def upsert(self, points):
            real(self, points)
            if points and points[0].dense is not None:
                calls[0] += 1
                if calls[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
        EdgeStore.upsert = upsert
        cfg = load_config(None, ["embedder.path={cfg.embedder.path}", "embedder.device=cpu"])
        ing.ingest(cfg, [{str(docs)!r}], delete_missing=True, progress=False)
        print("not killed")
    """)
    env = dict(os.environ, RAGTUNE_HOME=str(ragtune_home))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = snapshot()
    assert 0 < len(partial)

    res = ingest(cfg, [str(docs)], delete_missing=True, progress=False)
    assert res.chunks_written > 0
    recovered = snapshot()
    # the same chunks as a clean build in a fresh index, none duplicated, none missing
    clean = ingest(cfg, [str(docs)], index="clean", delete_missing=True, progress=False)
    fresh = snapshot("clean")
    assert len(recovered) == len(fresh) == clean.chunks_written
    assert sorted(recovered.values()) == sorted(fresh.values())
    assert all(d["complete"] for d in list_documents(cfg))


def test_cli_add_reports_skipped_files_and_exits_partial(cfg: Config, docs: Path, capsys: pytest.CaptureFixture) -> None:
    (docs / "empty.txt").write_text("", encoding="utf-8")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (docs / "logo.png").write_bytes(b"\x89PNG....")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["index", "add", str(docs), "--no-progress", *args]) == 3
    out = capsys.readouterr().out
    assert "skipped 3 files" in out
    assert "empty.txt: empty file" in out and "logo.png: unsupported file type '.png'" in out
    assert "broken.pdf: corrupt or unreadable PDF" in out
    assert main(["index", "list", "--json", *args]) == 0
    listed = json.loads(capsys.readouterr().out)
    # the five readable documents, each complete with its chunks; the skipped files are not listed
    assert sorted(r["source"] for r in listed) == ["faq.jsonl#L2", "faq.jsonl#expenses", "hr.md", "ko/seoul.txt",
                                                   "security.html"]
    assert all(r["complete"] and r["chunks"] > 0 and r["root"] == str(docs.resolve()) for r in listed), listed
    assert main(["index", "stats", "--json", *args]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["documents"] == 5 and st["chunks"] == sum(r["chunks"] for r in listed) and st["incomplete"] == 0
    assert main(["index", "stats", *args]) == 0
    assert "documents  5" in capsys.readouterr().out
    assert main(["index", "add", str(docs / "nope"), *args]) == 2
    assert "path" in capsys.readouterr().err


def test_drop_deletes_one_whole_index_and_list_all_names_the_rest(cfg: Config, docs: Path, ragtune_home: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    ingest(cfg, [str(docs / "hr.md")], index="keep", progress=False)
    ingest(cfg, [str(docs)], index="old", progress=False)
    assert main(["index", "list", "--all", "--json", *args]) == 0
    rows = {r["index"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["keep", "old"] and rows["old"]["documents"] == 5 and rows["keep"]["documents"] == 1
    assert rows["old"]["chunks"] > rows["keep"]["chunks"] > 0 and not rows["old"]["error"]

    assert main(["index", "drop", "old", "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dropped"] and out["chunks"] == rows["old"]["chunks"]
    # the whole folder is gone (no lock, generation or half-deleted shard left under the name)
    assert sorted(p.name for p in (ragtune_home / "indexes").iterdir()) == ["keep"]
    assert [r["source"] for r in list_documents(cfg, "keep")] == ["hr.md"] and (docs / "hr.md").is_file()
    assert main(["index", "drop", "old", *args]) == 2
    err = capsys.readouterr().err
    assert "index 'old' does not exist" in err and "nothing to drop; the indexes here are keep (pick" in err
    # the name can be used again at once
    assert ingest(cfg, [str(docs / "hr.md")], index="old", progress=False).added == ["hr.md"]


def test_drop_is_refused_while_the_index_is_written_or_read_by_a_server(cfg: Config, docs: Path) -> None:
    ingest(cfg, [str(docs)], progress=False)
    with IndexLock("default", "ragtune index sync elsewhere"):
        with pytest.raises(IndexBusy, match="ragtune index sync elsewhere"):
            main_drop(cfg)
    # a long-lived reader (serve, chat) reads a private copy: dropping under it is refused, naming its pid
    code = ("from ragtune.retrieval.store import EdgeStore; import time; s = EdgeStore('default').open_copy(); "
            "print('open', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(IndexBusy, match=rf"open in running process {proc.pid} "):
            main_drop(cfg)
    finally:
        proc.kill()
        proc.wait()
    # once that process is gone the drop goes through
    assert main_drop(cfg)["dropped"] and not EdgeStore("default").exists()


def main_drop(cfg: Config) -> dict:
    from ragtune.retrieval.ingest import drop

    return drop(cfg, "default")


def test_server_store_lists_and_drops_its_collections(cfg: Config, docs: Path, tmp_path: Path) -> None:
    from ragtune.config import replace
    from ragtune.retrieval.ingest import drop

    server_cfg = replace(cfg, store=replace(cfg.store, url=f"local:{tmp_path / 'qdrant'}"))
    ingest(server_cfg, [str(docs / "hr.md")], index="a", progress=False)
    ingest(server_cfg, [str(docs)], index="b", progress=False)
    assert [(r["index"], r["documents"]) for r in list_indexes(server_cfg)] == [("a", 1), ("b", 5)]
    assert drop(server_cfg, "a")["dropped"]
    assert [r["index"] for r in list_indexes(server_cfg)] == ["b"]
    with pytest.raises(UsageError, match="index 'a' does not exist .* nothing to drop"):
        drop(server_cfg, "a")


def test_sync_of_a_folder_with_no_documents_deletes_nothing(cfg: Config, docs: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """An unmounted share or a mistyped path looks like an empty folder: sync refuses to empty the index."""
    ingest(cfg, [str(docs)], progress=False)
    before = {d["source"] for d in list_documents(cfg)}
    moved = tmp_path / "moved"
    docs.rename(moved)
    docs.mkdir()
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    assert main(["index", "sync", str(docs), *args]) == 2
    err = capsys.readouterr().err
    assert f"'{docs.resolve()}' holds no documents, so syncing it would delete all {len(before)} documents" in err
    assert {d["source"] for d in list_documents(cfg)} == before
    assert ingest(cfg, [str(docs)], delete_missing=True, dry_run=True, progress=False).deleted  # the dry run lists them
    (docs / "one.md").write_text("# One\n\nStill here.\n")
    assert main(["index", "sync", str(docs), *args]) == 0  # a folder that has documents syncs as before
    assert {d["source"] for d in list_documents(cfg)} == {"one.md"}


def test_index_add_of_a_folder_with_no_documents_says_so_without_loading_the_embedder(
        cfg: Config, tmp_path: Path) -> None:
    """A new index: the folder's documents are checked before the model is loaded (seconds of torch and
    sentence-transformers for nothing); the answer and exit code are those of a run that loads it."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.py").write_text("print('hi')\n", encoding="utf-8")
    (tmp_path / "code" / "blank.md").write_text("  \n", encoding="utf-8")
    code = ("import sys; from ragtune.cli import main; "
            "rc = main(['index', 'add', sys.argv[1], 'embedder.path=' + sys.argv[2], 'embedder.device=cpu']); "
            "print(rc, sorted(m for m in ('torch', 'sentence_transformers') if m in sys.modules))")
    for folder, why in (("empty", ""), ("code", " (2 skipped, the first blank.md: empty file)")):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / folder), str(cfg.embedder.path)],
                              capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=300)
        assert proc.stdout.split("\n")[0] == "2 []", (proc.stdout, proc.stderr)
        assert (f"error: no documents to index in {tmp_path / folder}{why}; index 'default' was not created"
                in proc.stderr)
        assert "query encoder" not in proc.stderr  # the embedder's load said nothing: it was not loaded
    assert list_indexes(cfg) == []


def test_nothing_to_index_creates_no_index_and_an_empty_index_name_is_refused(
        cfg: Config, tmp_path: Path, ragtune_home: Path, capsys: pytest.CaptureFixture) -> None:
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    assert main(["index", "add", str(empty), "--index", "e", *args]) == 2
    assert "no documents to index in" in capsys.readouterr().err
    assert main(["index", "add", str(tmp_path / "pics"), "--index", "p", *args]) == 2
    assert "1 skipped, the first" in capsys.readouterr().err
    assert main(["index", "add", str(tmp_path / "pics"), "--index", "s", "search.stemmer=klingon", *args]) == 2
    capsys.readouterr()
    assert list_indexes(cfg) == []  # no empty shells left behind
    assert main(["index", "add", str(empty), "--index", "", *args]) == 2
    assert "--index is empty" in capsys.readouterr().err
