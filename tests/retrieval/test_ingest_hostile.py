"""Hostile inputs to ingest: links out of the folder, JSONL with bad lines, legacy encodings, tricky Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import Config
from ragtune.retrieval.ingest import collect, ingest
from ragtune.retrieval.loaders import Skip, load_file
from tests.retrieval.test_ingest import snapshot, sources


def _tree_with_links(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("Inside the folder: the expense limit is 50 euros.", encoding="utf-8")
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "passwd.txt").write_text("root:x:0:0:the secret outside the folder", encoding="utf-8")
    (root / "passwd.txt").symlink_to(secret / "passwd.txt")  # a file link out of the root
    (root / "elsewhere").symlink_to(secret, target_is_directory=True)  # a folder link out of the root
    (root / "again.txt").symlink_to(root / "sub" / "a.txt")  # a link that stays inside
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link back to the root itself
    (root / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    return root


def test_links_out_of_the_folder_are_not_followed_and_are_reported(tmp_path: Path) -> None:
    root = _tree_with_links(tmp_path)
    files, skipped = collect([root])
    rel = sorted(f.relative_to(r).as_posix() for r, f in files)
    assert rel == ["again.txt", "sub/a.txt"]
    reasons = dict(skipped)
    assert set(reasons) == {"passwd.txt", "elsewhere", "dangling.txt"}
    assert "outside" in reasons["passwd.txt"] and "--follow-links" in reasons["passwd.txt"]
    assert "broken symbolic link" in reasons["dangling.txt"]

    files, skipped = collect([root], follow_links=True)
    rel = sorted(f.relative_to(r).as_posix() for r, f in files)
    assert rel == ["again.txt", "elsewhere/passwd.txt", "passwd.txt", "sub/a.txt"]  # the loop is walked once
    assert [p for p, _ in skipped] == ["dangling.txt"]


def test_cli_index_add_skips_links_and_follow_links_indexes_them(cfg: Config, tmp_path: Path, capsys) -> None:
    root = _tree_with_links(tmp_path)
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--json", "--no-progress"]
    rc = main(["-q", "index", "add", str(root), *args])
    out = json.loads(capsys.readouterr().out)
    assert rc == 3, out  # partial: some paths were skipped
    assert {"passwd.txt", "elsewhere", "dangling.txt"} <= {s["path"] for s in out["skipped"]}
    assert set(sources(snapshot())) == {"again.txt", "sub/a.txt"}
    main(["-q", "index", "add", str(root), "--follow-links", *args])
    capsys.readouterr()
    assert {"passwd.txt", "elsewhere/passwd.txt"} <= set(sources(snapshot()))


def test_jsonl_bad_lines_cost_only_themselves_and_each_is_reported(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "faq.jsonl").write_bytes(
        b'{"id": "a", "text": "Lunch is served at noon in the canteen."}\n'
        b'{oops\n'
        b'{"id": "b", "text": "Parking permits are issued by reception."}\n'
        b'{"title": "no text"}\n'
        b'{"id": "a", "text": "a repeated id"}\n'
        b'{"id": "c", "text": "The library opens at nine."}\n')
    res = ingest(cfg, [str(root)], progress=False)
    assert sorted(res.added) == ["faq.jsonl#a", "faq.jsonl#b", "faq.jsonl#c"]
    reasons = [r for p, r in res.skipped if p == "faq.jsonl"]
    assert [r.split(":")[0] for r in reasons] == ["line 2", "line 4", "line 5"]
    assert "not valid JSON" in reasons[0] and '"text"' in reasons[1] and "duplicate id 'a' (first on line 1)" in reasons[2]


def test_a_jsonl_file_with_no_good_line_is_skipped_naming_every_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{oops\n[1, 2]\n')
    with pytest.raises(Skip, match=r"line 1: not valid JSON.*; line 2: expected an object"):
        load_file(p, p.name)


@pytest.mark.parametrize(("encoding", "text"), [
    ("cp1252", "Café policy: staff may expense coffee, up to 5 euros a day. Naïve résumés are welcome."),
    ("cp949", "직원은 주 3일까지 재택근무를 할 수 있습니다. 휴가는 2주 전에 신청합니다."),
    ("shift_jis", "会議は午後三時に始まります。資料は前日までに共有してください。"),
    ("cp1251", "Сотрудники могут работать удаленно три дня в неделю."),
    # shaped like /usr/share/doc/ed/AUTHORS (Latin-1): English with one accented name, which was read as
    # Shift-JIS ("Fran輟is")
    ("cp1252", "The original info page and the first port of the code were kindly provided\nby François Pinard.\n\n"
               "The editor has also benefitted from the contributions of numerous people\nwho reported problems, "
               "suggested various improvements or submitted actual\ncode.  Among these are the following:\n\n"
               + "".join(f"Name{i} Surname{i}\t\t<user{i}@example.org>\n" for i in range(6))
               + "François Pinard\t\t<pinard@example.org>"),
    ("shift_jis", "AとB\nCとD\nEとF"),  # wedged between ASCII letters, but と's second byte is not ASCII
])
def test_legacy_encodings_are_detected_not_forced_into_korean(tmp_path: Path, encoding: str, text: str) -> None:
    p = tmp_path / "legacy.txt"
    p.write_bytes(text.encode(encoding))
    (doc,) = load_file(p, p.name)
    assert doc.text == text


def test_text_whose_encoding_cannot_be_told_is_refused_with_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "noise.txt"
    p.write_bytes(bytes(range(0x80, 0x100)) * 4)
    with pytest.raises(Skip, match="not UTF-8 and its encoding cannot be told.*save it as UTF-8"):
        load_file(p, p.name)


def test_markdown_setext_headings_and_indented_code(tmp_path: Path) -> None:
    p = tmp_path / "guide.md"
    p.write_text(
        "Travel guide\n============\n\nBook trains for trips under four hours.\n\n"
        "Hotels\n------\n\nThe nightly limit is 120 euros.\n\n"
        "    # this is indented code, not a heading\n    print('hi')\n\n"
        "After the code, still under Hotels.\n", encoding="utf-8")
    (doc,) = load_file(p, p.name)
    assert doc.title == "Travel guide"
    by_text = {b.text: b.heading for b in doc.blocks}
    assert by_text["Book trains for trips under four hours."] == ("Travel guide",)
    assert by_text["The nightly limit is 120 euros."] == ("Travel guide", "Hotels")
    code = next(b for b in doc.blocks if "indented code" in b.text)
    assert code.heading == ("Travel guide", "Hotels")
    assert by_text["After the code, still under Hotels."] == ("Travel guide", "Hotels")
    for b in doc.blocks:
        assert doc.text[b.start:b.start + len(b.text)] == b.text


def test_training_data_in_a_legacy_encoding_names_the_encoding_to_pass(tmp_path: Path) -> None:
    from ragtune.errors import UsageError
    from ragtune.train.data import decode_text

    data = '{"messages": [{"role": "user", "content": "직원은 주 3일까지 재택근무를 할 수 있습니다."}]}\n'.encode("cp949")
    with pytest.raises(UsageError, match="line 1: .*it reads as cp949: --encoding cp949"):
        decode_text(tmp_path / "t.jsonl", data)


def test_link_loops_and_named_pipes_are_reported_not_crashed_on_or_waited_for(cfg: Config, tmp_path: Path,
                                                                               capsys) -> None:
    import os

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("The canteen serves lunch from noon to two.", encoding="utf-8")
    (root / "loop1.txt").symlink_to(root / "loop2.txt")  # loop1 -> loop2 -> loop1
    (root / "loop2.txt").symlink_to(root / "loop1.txt")
    os.mkfifo(root / "pipe.txt")  # reading it would block until something writes to it
    files, skipped = collect([root])
    assert [f.name for _, f in files] == ["a.txt"]
    reasons = dict(skipped)
    assert set(reasons) == {"loop1.txt", "loop2.txt", "pipe.txt"}
    assert "symbolic link loop" in reasons["loop1.txt"] and "named pipe" in reasons["pipe.txt"]

    rc = main(["-q", "index", "add", str(root), f"embedder.path={cfg.embedder.path}", "embedder.device=cpu",
               "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 3 and out["added"] == ["a.txt"], out
    assert {s["path"] for s in out["skipped"]} == {"loop1.txt", "loop2.txt", "pipe.txt"}
    for given, why in ((root / "loop1.txt", "is a symbolic link loop"), (root / "pipe.txt", "is a named pipe")):
        assert main(["-q", "index", "add", str(given), f"embedder.path={cfg.embedder.path}"]) == 2
        assert why in capsys.readouterr().err


def _without_root_read(argv: list[str]) -> list[str]:
    """`argv` run without the power to read any folder (root's CAP_DAC_*): chmod 000 then works as for a user."""
    import os
    import shutil

    if os.geteuid() != 0:
        return argv
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: an unreadable folder cannot be made")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]


def test_sync_reports_a_folder_it_cannot_list_and_keeps_its_documents(cfg: Config, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "docs"
    (root / "private").mkdir(parents=True)
    (root / "a.txt").write_text("The canteen serves lunch from noon to two.", encoding="utf-8")
    (root / "private" / "b.txt").write_text("Parking permits are issued by reception.", encoding="utf-8")
    ingest(cfg, [str(root)], progress=False)
    assert set(sources(snapshot())) == {"a.txt", "private/b.txt"}
    code = ("import json, sys; from pathlib import Path; from tests.retrieval.conftest import make_cfg; "
            "from ragtune.retrieval.ingest import ingest; "
            "r = ingest(make_cfg(Path(sys.argv[1])), [sys.argv[2]], delete_missing=True, progress=False); "
            "print(json.dumps(r.to_dict()))")
    (root / "private").chmod(0)
    try:
        proc = subprocess.run(_without_root_read([sys.executable, "-c", code, str(cfg.embedder.path), str(root)]),
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    finally:
        (root / "private").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deleted"] == [], out  # not read is not gone
    (skip,) = out["skipped"]
    assert skip["path"] == "private/" and "cannot list this folder" in skip["reason"] and "chmod" in skip["reason"]
    assert set(sources(snapshot())) == {"a.txt", "private/b.txt"}


def test_a_jsonl_line_with_empty_text_is_reported_not_counted_as_added_on_every_run(cfg: Config,
                                                                                   tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "faq.jsonl").write_bytes(b'{"id": "a", "text": "Lunch is served at noon in the canteen."}\n'
                                     b'{"id": "b", "text": "  \\n "}\n')
    first = ingest(cfg, [str(root)], progress=False)
    assert first.added == ["faq.jsonl#a"]
    assert first.skipped == [("faq.jsonl", 'line 2: "text" is empty (nothing to index); give the line its text '
                                           "or delete it")]
    again = ingest(cfg, [str(root)], progress=False)
    assert again.added == [] and again.unchanged == 1


@pytest.mark.parametrize("html", [
    # a heading never closed, to the end of the page: its text and all after it went into the heading
    b"<html><body><h1>Bonus rules <p>The yearly bonus is paid in <b>March</b>.<div><table><tr><td>Ten percent",
    # one never closed before the next heading: what it gathered was dropped with it
    b"<h1>Bonus rules<p>The yearly bonus is paid in March.</p><p>Ten percent</p><h2>Other</h2><p>Rest.</p>",
])
def test_html_text_after_a_heading_that_is_never_closed_is_kept(tmp_path: Path, html: bytes) -> None:
    p = tmp_path / "broken.html"
    p.write_bytes(html)
    (doc,) = load_file(p, p.name)
    text = " ".join(doc.text.split())
    assert "The yearly bonus is paid in March." in text and "Ten percent" in text


def test_an_interrupted_index_add_says_what_it_left_and_the_rerun_finishes(cfg: Config, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    from ragtune.retrieval import ingest_write
    from ragtune.retrieval.embedder import Embedder

    root = tmp_path / "d"
    root.mkdir()
    (root / "long.txt").write_text("\n\n".join(f"Paragraph {i} on the travel policy: rule number {i} applies."
                                             for i in range(40)), encoding="utf-8")
    monkeypatch.setattr(ingest_write, "EMBED_GROUP", 4)
    real, calls = Embedder.embed_documents, []

    def ctrl_c_on_the_second_group(self: Embedder, texts: list[str], batch_size: int | None = None):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of embedding
        return real(self, texts, batch_size)

    monkeypatch.setattr(Embedder, "embed_documents", ctrl_c_on_the_second_group)
    args = ["-q", "index", "add", str(root), f"embedder.path={cfg.embedder.path}", "embedder.device=cpu",
            "chunk.size=16", "chunk.overlap=0", "--no-progress"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "index 'default' keeps the documents written before the interruption" in err
    assert "run the same command again to finish" in err
    assert main(["-q", "index", "list", "--json", f"embedder.path={cfg.embedder.path}"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["complete"] is False
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == ["long.txt"] and out["chunks_reused"] == 4


@pytest.mark.parametrize("blank", ["", "  "])
def test_index_remove_of_an_empty_source_removes_nothing(cfg: Config, docs: Path, monkeypatch, capsys,
                                                         blank: str) -> None:
    ingest(cfg, [str(docs)], progress=False)
    before = sources(snapshot())
    monkeypatch.chdir(docs)  # '' is the working folder, under which every document lies
    assert main(["-q", "index", "remove", "hr.md", blank, f"embedder.path={cfg.embedder.path}"]) == 2
    assert "a SOURCE to remove is empty (an unset shell variable?), nothing was removed" in capsys.readouterr().err
    assert sources(snapshot()) == before


@pytest.mark.parametrize("command", ["add", "sync"])
def test_index_add_or_sync_of_an_empty_path_indexes_nothing(cfg: Config, docs: Path, monkeypatch, capsys,
                                                            command: str) -> None:
    monkeypatch.chdir(docs)  # '' is the working folder
    assert main(["-q", "index", command, "", f"embedder.path={cfg.embedder.path}", "--no-progress"]) == 2
    assert "a PATH to index is empty (an unset shell variable?)" in capsys.readouterr().err
    assert main(["-q", "index", "list", f"embedder.path={cfg.embedder.path}"]) == 2  # no index was made


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_fix(cfg: Config, tmp_path: Path, capsys) -> None:
    import os

    root = tmp_path / "d"
    root.mkdir()
    (root / "ok.txt").write_text("The canteen serves lunch from noon to two.", encoding="utf-8")
    with open(os.path.join(os.fsencode(root), b"overtime-\xff.txt"), "wb") as f:  # a Latin-1 name, say
        f.write(b"Overtime is paid at one and a half times the hourly rate.")
    emb = f"embedder.path={cfg.embedder.path}"
    assert main(["-q", "index", "add", str(root), emb, "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "overtime-\ufffd.txt: its name is not valid UTF-8" in out and "rename it" in out
    assert set(sources(snapshot())) == {"ok.txt"}
    bad_root = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(bad_root)
    assert main(["-q", "index", "add", os.fsdecode(bad_root), emb, "--no-progress"]) == 2
    assert "caf\ufffd' is not valid UTF-8" in capsys.readouterr().err


def test_index_remove_takes_the_relative_path_of_a_file_already_deleted(cfg: Config, docs: Path, monkeypatch,
                                                                        capsys) -> None:
    ingest(cfg, [str(docs)], progress=False)
    (docs / "hr.md").unlink()  # the usual reason to remove it
    (docs / "ko" / "seoul.txt").unlink()
    monkeypatch.chdir(docs.parent)
    assert main(["-q", "index", "remove", "docs/hr.md", "./docs/ko", "--json", f"embedder.path={cfg.embedder.path}"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["hr.md", "ko/seoul.txt"]
    assert "hr.md" not in sources(snapshot())
    assert main(["-q", "index", "sync", "docs/hr.md", f"embedder.path={cfg.embedder.path}"]) == 2
    assert "take a deleted file out of an index: 'ragtune index remove docs/hr.md'" in capsys.readouterr().err


def test_index_remove_of_a_source_two_roots_share_asks_which_and_counts_right(cfg: Config, tmp_path: Path,
                                                                               monkeypatch) -> None:
    from ragtune.errors import UsageError
    from ragtune.retrieval.ingest import remove

    for folder, text in (("a", "Folder a's copy: lunch rules."), ("b", "Folder b's copy: parking rules.")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "rules.txt").write_text(text, encoding="utf-8")
        ingest(cfg, [str(tmp_path / folder)], progress=False)
    with pytest.raises(UsageError, match=r"'rules.txt' names documents under 2 roots .*nothing was removed; give "
                                         r"the path of the one to remove \('.*/a/rules.txt' or '.*/b/rules.txt'\)"):
        remove(cfg, ["rules.txt"])
    assert sources(snapshot()) == {"rules.txt": 2}
    monkeypatch.chdir(tmp_path)
    assert remove(cfg, ["a/rules.txt"])["removed"] == ["rules.txt"]
    ingest(cfg, [str(tmp_path / "a")], progress=False)
    out = remove(cfg, [str(tmp_path)])  # a folder above both: both go, each counted
    assert out["removed"] == [f"rules.txt (in {tmp_path.resolve() / 'a'})", f"rules.txt (in {tmp_path.resolve() / 'b'})"]
    assert snapshot() == {}


def test_index_add_of_a_folder_with_no_documents_to_an_existing_index_fails_as_for_a_new_one(
        cfg: Config, docs: Path, tmp_path: Path, capsys) -> None:
    from ragtune.retrieval.ingest import stats

    emb = f"embedder.path={cfg.embedder.path}"
    assert main(["-q", "index", "add", str(docs), emb, "--no-progress"]) == 0
    (tmp_path / "unmounted").mkdir()  # an empty mount point, a mistyped folder
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.py").write_text("print('hi')\n", encoding="utf-8")
    for folder, why in (("unmounted", ""), ("code", " (1 skipped, the first x.py: unsupported file type '.py')")):
        assert main(["-q", "index", "add", str(tmp_path / folder), emb, "--no-progress"]) == 2
        assert (f"no documents to index in {tmp_path / folder}{why}; nothing was added to index 'default'"
                in capsys.readouterr().err)
    assert stats(cfg)["roots"] == [str(docs.resolve())]  # the empty folders were not recorded as roots
    assert main(["-q", "index", "add", str(docs), emb, "--no-progress"]) == 0  # re-adding the same: a no-op


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_text_without_a_byte_order_mark_is_read_not_called_binary(tmp_path: Path, codec: str) -> None:
    text = "Parking permits are issued by reception.\r\n\r\nCafé hours: 8–17, Monday to Friday."
    p = tmp_path / "notes.txt"
    p.write_bytes(text.encode(codec))
    (doc,) = load_file(p, p.name)
    assert "Parking permits are issued by reception." in doc.text and "Café hours: 8–17" in doc.text
    noise = tmp_path / "noise.txt"  # NUL bytes at no such rhythm: still binary
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(Skip, match="binary content"):
        load_file(noise, noise.name)


def test_index_list_of_an_emptied_index_says_so(cfg: Config, docs: Path, capsys) -> None:
    from ragtune.retrieval.ingest import remove

    ingest(cfg, [str(docs)], progress=False)
    remove(cfg, [str(docs)])
    assert main(["-q", "index", "list", f"embedder.path={cfg.embedder.path}"]) == 0
    assert capsys.readouterr().out == ("index 'default' holds no documents; add some with "
                                       "'ragtune index add PATH --index default'\n")


def test_a_document_whose_new_version_cannot_be_read_says_the_old_one_stays(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "policy.html").write_text("<h1>Policy</h1><p>Badges are worn at all times.</p>", encoding="utf-8")
    ingest(cfg, [str(root)], progress=False)
    (root / "policy.html").write_bytes(b"<html><body><script>only a script</script></body></html>")  # no text now
    res = ingest(cfg, [str(root)], delete_missing=True, progress=False)
    assert res.skipped == [("policy.html", "no text found; the index keeps its previous version")]
    assert set(sources(snapshot())) == {"policy.html"}  # as said
    (root / "policy.html").write_bytes(b"  \n")
    res = ingest(cfg, [str(root)], delete_missing=True, progress=False)
    assert res.skipped == [("policy.html", "empty file; the index keeps its previous version")]


def test_a_ragtune_home_that_is_a_file_is_named_with_the_fix(cfg: Config, docs: Path, tmp_path: Path,
                                                            monkeypatch, capsys) -> None:
    home = tmp_path / "home.txt"
    home.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    assert main(["-q", "index", "add", str(docs), f"embedder.path={cfg.embedder.path}", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"indexes live under RAGTUNE_HOME ({home}): set RAGTUNE_HOME to a folder you can write to" in err


def test_a_failed_first_add_leaves_no_index_folder_behind(cfg: Config, tmp_path: Path, capsys) -> None:
    from ragtune.retrieval.index_dirs import index_dir

    (tmp_path / "empty").mkdir()
    assert main(["-q", "index", "add", str(tmp_path / "empty"), "--index", "t1",
                 f"embedder.path={cfg.embedder.path}", "--no-progress"]) == 2
    assert "index 't1' was not created" in capsys.readouterr().err
    assert not index_dir("t1").exists()  # as said: nothing for 'index drop t1' to be unable to find


def test_sync_dry_run_reports_the_files_the_sync_would_skip_not_as_documents_to_add(cfg: Config,
                                                                                     tmp_path: Path) -> None:
    """Every file the real sync skips (its reader refuses it, or it cannot be read at all) is listed by the
    dry run as skipped with the same reason and exit code 3, and is in neither run's `added`."""
    import subprocess
    import sys

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("The canteen serves lunch from noon to two.", encoding="utf-8")
    (root / "bad.pdf").write_bytes(b"this was never a PDF\n")
    (root / "bad.docx").write_bytes(b"nor is this a DOCX\n")
    (root / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 100)
    (root / "empty.html").write_text("<html><body><p> </p></body></html>", encoding="utf-8")
    (root / "locked.md").write_text("# Locked\n\nNobody may read this.\n", encoding="utf-8")
    (root / "gone.md").symlink_to(tmp_path / "nowhere.md")
    refused = {"bad.pdf", "bad.docx", "blob.txt", "empty.html", "locked.md", "gone.md"}

    def sync(*extra: str) -> tuple[int, dict]:
        argv = [sys.executable, "-m", "ragtune", "-q", "index", "sync", str(root), f"embedder.path={cfg.embedder.path}",
                "embedder.device=cpu", "--json", "--no-progress", *extra]
        (root / "locked.md").chmod(0)
        try:
            proc = subprocess.run(_without_root_read(argv), capture_output=True, text=True, timeout=300,
                                  cwd=Path(__file__).resolve().parents[2])
        finally:
            (root / "locked.md").chmod(0o644)
        assert proc.stdout, proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    rc_dry, dry = sync("--dry-run")
    rc, real = sync()
    assert (rc_dry, rc) == (3, 3)
    assert real["added"] == dry["added"] == ["a.txt"], dry
    skipped = {s["path"]: s["reason"] for s in real["skipped"]}
    assert set(skipped) == refused, skipped
    assert {s["path"]: s["reason"] for s in dry["skipped"]} == skipped
    assert "Permission denied" in skipped["locked.md"] and "broken symbolic link" in skipped["gone.md"]
    rc_dry, dry = sync("--dry-run")  # over the index the sync made: still skipped, not "add"
    assert rc_dry == 3 and dry["added"] == [] and dry["unchanged"] == 1
    assert {s["path"]: s["reason"] for s in dry["skipped"]} == skipped


def test_a_folder_given_with_a_folder_inside_it_indexes_each_file_once_and_syncs_to_a_no_op(
        cfg: Config, tmp_path: Path, capsys) -> None:
    """`index add docs/sub docs` (or a path given twice): each file is one document, under the outer
    folder, whatever the order; the same sync again changes nothing, and a file deleted from the inner
    folder is deleted, not refused as an emptied folder."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Lunch is served at noon in the canteen.", encoding="utf-8")
    (root / "sub" / "a.txt").write_text("The parking garage closes at midnight.", encoding="utf-8")
    (root / "sub" / "faq.jsonl").write_text('{"id": "x", "text": "Badges are issued by reception."}\n'
                                             '{"id": "y", "text": "The library opens at nine."}\n', encoding="utf-8")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--json", "--no-progress"]

    def run(cmd: str, *paths: Path, extra: tuple[str, ...] = ()) -> dict:
        rc = main(["-q", "index", cmd, *map(str, paths), *args, *extra])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0, out
        return out

    want = {"b.txt", "sub/a.txt", "sub/faq.jsonl#x", "sub/faq.jsonl#y"}
    dry = run("sync", root / "sub", root, root, extra=("--dry-run",))
    assert sorted(dry["added"]) == sorted(want)  # each once
    first = run("add", root / "sub", root, root / "b.txt")
    assert sorted(first["added"]) == sorted(want)
    assert sorted(sources(snapshot())) == sorted(want) and set(sources(snapshot()).values()) == {1}
    again = run("sync", root, root / "sub")
    assert (again["added"], again["replaced"], again["unchanged"], again["chunks_written"]) == ([], [], 4, 0)
    (root / "sub" / "a.txt").unlink()
    gone = run("sync", root, root / "sub")
    assert gone["deleted"] == ["sub/a.txt"] and gone["unchanged"] == 3
    assert set(sources(snapshot())) == want - {"sub/a.txt"}


def test_a_file_whose_name_has_a_control_character_is_skipped_and_shown_escaped(cfg: Config, tmp_path: Path,
                                                                                 capsys) -> None:
    """A newline or a terminal escape in a file's name would break every listing, citation and prompt
    that names it (and an escape sequence would reach the terminal): skipped, named with \\xNN, asked to
    be renamed. Given by name, too."""
    root = tmp_path / "docs"
    root.mkdir()
    (root / "ok.txt").write_text("Lunch is served at noon in the canteen.", encoding="utf-8")
    (root / "new\nline.txt").write_text("The parking garage closes at midnight.", encoding="utf-8")
    (root / "red\x1b[31m.md").write_text("# Red\n\nBadges are issued by reception.\n", encoding="utf-8")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress"]
    assert main(["-q", "index", "add", str(root), *args]) == 3
    out = capsys.readouterr().out
    assert "\x1b" not in out and "new\nline" not in out
    assert "  new\\x0aline.txt: its name has a control character" in out and "rename it" in out
    assert "  red\\x1b[31m.md: its name has a control character" in out
    assert set(sources(snapshot())) == {"ok.txt"}
    assert main(["-q", "index", "add", str(root / "new\nline.txt"), *args, "--json"]) == 2  # nothing else to add
    assert "new\\x0aline.txt" in capsys.readouterr().err


def test_a_file_changed_while_it_is_indexed_is_skipped_not_stored_under_its_old_identity(
        cfg: Config, tmp_path: Path, monkeypatch, capsys) -> None:
    """A file saved again between the plan (which hashes its bytes) and its write: before, its new text
    was stored under the old bytes' identity, so once the file was back to those bytes a sync kept the
    other text for good. Now it is skipped, said, and the next run indexes what the file holds."""
    from ragtune.retrieval import ingest as ing
    from ragtune.retrieval.store import EdgeStore

    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("The parking garage closes at midnight.", encoding="utf-8")
    (root / "b.txt").write_text("Lunch is served at noon in the canteen.", encoding="utf-8")
    real_plan = ing.plan_ingest

    def plan_then_edit(*a, **kw):  # an editor saves a.txt while the run is under way
        plan = real_plan(*a, **kw)
        (root / "a.txt").write_text("The parking garage closes at ten.", encoding="utf-8")
        return plan

    monkeypatch.setattr(ing, "plan_ingest", plan_then_edit)
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress", "--json"]
    assert main(["-q", "index", "sync", str(root), *args]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == ["b.txt"]
    assert out["skipped"] == [{"path": "a.txt", "reason": "changed while it was being indexed: not written; "
                                                           "run the command again to index it"}]
    monkeypatch.setattr(ing, "plan_ingest", real_plan)
    (root / "a.txt").write_text("The parking garage closes at midnight.", encoding="utf-8")  # saved back
    assert main(["-q", "index", "sync", str(root), *args]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == ["a.txt"]
    with EdgeStore("default").open() as s:
        texts = {p["source"]: p["text"] for _pid, p, _ in s.scroll({"kind": "chunk"}, ["source", "text"], False)}
    assert texts["a.txt"] == "The parking garage closes at midnight."


def test_many_files_of_unsupported_types_are_counted_by_type_so_the_skips_to_fix_stand_out(
        cfg: Config, tmp_path: Path, capsys) -> None:
    """A folder like /usr/share/doc holds thousands of .gz and copyright files: past ten, the summary counts
    them by type after the skips that need a fix (here a broken link) instead of a line each; --json
    still lists every file."""
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("Lunch is served at noon in the canteen.", encoding="utf-8")
    for i in range(7):
        (root / f"changelog{i}.Debian.gz").write_bytes(b"\x1f\x8b")
    for i in range(5):
        (root / f"logo{i}.png").write_bytes(b"\x89PNG")
    (root / "gone.md").symlink_to(tmp_path / "nowhere.md")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress"]
    assert main(["-q", "index", "add", str(root), *args]) == 3
    out = capsys.readouterr().out
    assert "skipped 13 files:\n  gone.md: broken symbolic link" in out
    assert "\n  12 files of types ragtune does not read: .Debian.gz (7), .png (5) (it reads .adoc," in out
    assert "changelog0.Debian.gz" not in out and "logo0.png" not in out
    assert main(["-q", "index", "sync", str(root), *args, "--dry-run"]) == 3
    assert "12 files of types ragtune does not read" in capsys.readouterr().out
    assert main(["-q", "index", "add", str(root), *args, "--json"]) == 3
    assert len(json.loads(capsys.readouterr().out)["skipped"]) == 13


def test_files_without_an_extension_are_read_as_text_and_binaries_among_them_are_not(
        cfg: Config, tmp_path: Path, capsys) -> None:
    """README, LICENSE, NOTES and Debian's copyright files hold plain text under a name without an extension; they
    were skipped as 'unsupported file type', as LlamaIndex's and LangChain's directory loaders do not. Now they are
    read as text (an HTML or PDF one as what its bytes are), while a program without an extension is skipped from
    its first bytes (never read whole, never embedded) and a hidden .env stays out."""
    from ragtune.retrieval.search import Retriever
    from tests.retrieval.conftest import make_cfg

    root = tmp_path / "docs"
    (root / "tool").mkdir(parents=True)
    (root / "README").write_text("Badges are collected at the front desk on your first day.\n", encoding="utf-8")
    (root / "tool" / "copyright").write_text("Files: *\nCopyright: 2024 Northwind Robotics\nLicense: MIT\n",
                                             encoding="utf-8")
    (root / "NOTES").write_text("<!DOCTYPE html><html><body><h1>Parking</h1><p>Park in the north lot.</p>"
                                "</body></html>", encoding="utf-8")
    (root / "tool" / "runner").write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64 + b"Badges front desk" * 4)
    (root / ".env").write_text("API_KEY=secret\n", encoding="utf-8")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress", "--index", "noext"]
    assert main(["-q", "index", "add", str(root), *args]) == 3  # partial: the program was skipped
    out = capsys.readouterr().out
    assert "added 3," in out and ("skipped 1 files:\n  tool/runner: binary content in a file without an extension"
                                  in out), out
    with Retriever(make_cfg(cfg.embedder.path, "index.name=noext")) as r:
        hits = {h["source"]: h for h in r.search("badges, the copyright, and a lot to park in", top_k=5,
                                                  mode="sparse")}
    assert set(hits) == {"README", "tool/copyright", "NOTES"}
    assert hits["NOTES"]["heading"] == "Parking" and "<h1>" not in hits["NOTES"]["text"]  # read as the HTML it is
    assert main(["-q", "index", "sync", str(root), *args]) == 3
    assert "unchanged 3 documents" in capsys.readouterr().out


def test_gzip_compressed_documents_are_read_as_the_file_they_hold(cfg: Config, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """Debian ships /usr/share/doc compressed (README.md.gz, FAQ.gz), and they were all skipped as '.gz': now each
    is read as the file it holds (Markdown headings and all), a corrupt one is skipped saying so, one that would
    decompress past the cap is refused without being held in memory, and a compressed type ragtune does not
    read is counted under its own type (.Debian.gz)."""
    import gzip

    from ragtune.retrieval import file_formats
    from ragtune.retrieval.search import Retriever
    from tests.retrieval.conftest import make_cfg

    root = tmp_path / "doc"
    root.mkdir()
    (root / "README.md.gz").write_bytes(gzip.compress(b"# Badges\n\nCollect your badge at the front desk.\n"))
    (root / "FAQ.gz").write_bytes(gzip.compress(b"Q: Where do I park?\nA: In the north lot.\n"))
    (root / "NEWS.gz").write_bytes(gzip.compress(b"Version 2 adds parking rules.\n" * 50)[:40])  # cut short
    (root / "BIG.txt.gz").write_bytes(gzip.compress(b"a line of text\n" * 400))
    (root / "changelog.Debian.gz").write_bytes(gzip.compress(b"pkg (1.0) unstable; urgency=low\n"))
    monkeypatch.setattr(file_formats, "GZ_MAX", 5000)  # BIG.txt.gz holds 6000 bytes
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress", "--index", "gz"]
    assert main(["-q", "index", "add", str(root), *args]) == 3
    out = capsys.readouterr().out
    assert "added 2," in out, out
    assert "NEWS.gz: a corrupt or cut gzip file" in out and "BIG.txt.gz: decompresses to more than" in out, out
    assert "changelog.Debian.gz: unsupported file type '.Debian.gz'" in out, out
    with Retriever(make_cfg(cfg.embedder.path, "index.name=gz")) as r:
        hits = {h["source"]: h for h in r.search("badge front desk, where to park", top_k=5, mode="sparse")}
    assert set(hits) == {"README.md.gz", "FAQ.gz"}
    assert hits["README.md.gz"]["heading"] == "Badges" and "#" not in hits["README.md.gz"]["text"]
    assert main(["-q", "index", "sync", str(root), *args]) == 3
    assert "unchanged 2 documents" in capsys.readouterr().out


def test_index_text_suffixes_reads_code_and_logs_as_text(cfg: Config, tmp_path: Path, capsys) -> None:
    """Code, config and log files are skipped as types ragtune has no reader for, with no way to index them
    (LlamaIndex reads any file as text); `index.text_suffixes` names the ones to read as plain text. A suffix
    ragtune reads as its own format, or one without its dot, is refused naming the key."""
    from ragtune.retrieval.search import Retriever
    from tests.retrieval.conftest import make_cfg

    root = tmp_path / "repo"
    root.mkdir()
    (root / "deploy.py").write_text("# restart the badge printer service after each deploy\nprint('ok')\n",
                                    encoding="utf-8")
    (root / "settings.yaml").write_text("printer: the badge printer at the front desk\n", encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\nThe badge printer sits at the front desk.\n", encoding="utf-8")
    args = [f"embedder.path={cfg.embedder.path}", "embedder.device=cpu", "--no-progress", "--index", "code"]
    assert main(["-q", "index", "add", str(root), *args]) == 3
    out = capsys.readouterr().out
    assert "deploy.py: unsupported file type '.py'" in out and "settings.yaml: unsupported file type '.yaml'" in out
    assert main(["-q", "index", "add", str(root), *args, "index.text_suffixes=[.py, .YAML]"]) == 0
    assert "added 2," in capsys.readouterr().out
    with Retriever(make_cfg(cfg.embedder.path, "index.name=code")) as r:
        hits = {h["source"]: h["text"] for h in r.search("badge printer", top_k=5, mode="sparse")}
    assert set(hits) == {"deploy.py", "settings.yaml", "notes.md"}
    assert hits["deploy.py"].startswith("# restart the badge printer")  # plain text: no Markdown heading made of it
    for bad in ("[py]", "[.md]", "[.gz]"):
        assert main(["-q", "index", "add", str(root), *args, f"index.text_suffixes={bad}"]) == 2
        assert "key 'index.text_suffixes': each must be a suffix with its dot" in capsys.readouterr().err
