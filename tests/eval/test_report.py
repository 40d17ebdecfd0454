"""Scoring one answer, and the report files from synthetic results of two modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.eval.questions import Question
from ragtune.eval.report import CostRow, summarize, write_report
from ragtune.eval.scoring import score_answer

NOT_FOUND = "I could not find this in the documents."
K = 2


def questions() -> list[Question]:
    return [
        Question("remote", "How many days a week can I work remotely?", "3 days", ("remote.md",),
                 meta={"changed_in_v2": True, "old_answer": "2 days"}),
        Question("leave", "연차는 며칠인가요?", "15일", ("leave_ko.md",), meta={"lang": "ko"}),
        Question("meal", "What is the meal limit?", "60 euros", ("expenses.md",)),
        Question("shoe", "What is the CEO's shoe size?", "", (), answerable=False),
    ]


def src(n: int, path: str) -> dict[str, object]:
    return {"n": n, "source": path, "title": path, "page": None, "heading": "", "score": 0.5, "text": "..."}


def runs() -> dict[str, list]:
    qs = questions()
    base = [
        score_answer(qs[0], "You can work remotely 2 days a week.", not_found_message=NOT_FOUND, k=K,
                     latency_s=1.0, prompt_tokens=30, completion_tokens=10),
        score_answer(qs[1], "연차는 15일입니다.", not_found_message=NOT_FOUND, k=K,
                     latency_s=2.0, prompt_tokens=30, completion_tokens=10),
        score_answer(qs[2], "The meal limit is 50 euros.", not_found_message=NOT_FOUND, k=K,
                     latency_s=3.0, prompt_tokens=30, completion_tokens=10),
        score_answer(qs[3], "It is 42.", not_found_message=NOT_FOUND, k=K,
                     latency_s=4.0, prompt_tokens=30, completion_tokens=10),
    ]
    rag = [
        score_answer(qs[0], "Up to 3 days a week [1].", [src(1, "docs/remote.md"), src(2, "docs/travel.md")],
                     not_found_message=NOT_FOUND, k=K, latency_s=2.0, prompt_tokens=300, completion_tokens=20),
        score_answer(qs[1], "15일입니다 [2].", [src(1, "docs/remote.md"), src(2, "docs/leave_ko.md")],
                     not_found_message=NOT_FOUND, k=K, latency_s=2.0, prompt_tokens=300, completion_tokens=20),
        score_answer(qs[2], "60 euros [1][2].", [src(1, "docs/expenses.md"), src(2, "docs/travel.md")],
                     not_found_message=NOT_FOUND, k=K, latency_s=2.0, prompt_tokens=300, completion_tokens=20),
        score_answer(qs[3], NOT_FOUND, [src(1, "docs/remote.md")], not_found_message=NOT_FOUND, k=K,
                     latency_s=2.0, prompt_tokens=300, completion_tokens=20, abstained=True),
    ]
    return {"base": base, "rag": rag}


def test_score_answer_by_hand() -> None:
    r = runs()
    b0, g0, g1, g2, g3 = r["base"][0], r["rag"][0], r["rag"][1], r["rag"][2], r["rag"][3]
    # base answers the old policy: not correct, and it contains the old answer
    assert b0.scores["correct"] == 0.0 and b0.scores["stale_answer"] == 1.0
    assert b0.scores["recall_at_k"] is None and b0.scores["citation_accuracy"] is None  # no retrieval
    # rag: citation stripped, tokens [up, to, 3, days, week] vs [3, days]: P=2/5 R=1 -> F1 = 4/7
    assert g0.scores["correct"] == 1.0 and g0.scores["stale_answer"] == 0.0
    assert g0.scores["token_f1"] == pytest.approx(4 / 7)
    assert g0.cited == [1] and g0.scores["citation_accuracy"] == 1.0
    assert g0.scores["recall_at_k"] == 1.0 and g0.scores["mrr"] == 1.0 and g0.scores["ndcg_at_k"] == 1.0
    # Korean: [15, 일] vs [15, 일] after dropping the copula and ending -> exact match
    assert g1.scores["exact_match"] == 1.0 and g1.scores["mrr"] == 0.5
    # cites [1] (gold) and [2] (not gold)
    assert g2.scores["citation_accuracy"] == 0.5
    # unanswerable: answer metrics do not apply; abstaining is correct
    assert g3.abstained and g3.scores["correct"] == 1.0 and g3.scores["abstention"] == 1.0
    assert g3.scores["token_f1"] is None and g3.scores["false_abstention"] is None
    assert r["base"][3].scores["abstention"] == 0.0
    # the generator abstained (no sources given) but the retriever had ranked hits: retrieval still scored
    q = questions()[0]
    r = score_answer(q, NOT_FOUND, [], retrieved=[src(1, "docs/travel.md"), src(2, "docs/remote.md")],
                     not_found_message=NOT_FOUND, k=K, abstained=True)
    assert r.scores["mrr"] == 0.5 and r.scores["citation_accuracy"] is None
    assert r.scores["correct"] == 0.0 and r.scores["false_abstention"] == 1.0


def test_a_short_answer_the_question_frames_is_correct_in_every_mode() -> None:
    q = Question("remote", "How many days per week can I work remotely?", "3 days per week", ("remote.md",),
                 meta={"old_answer": "2 days per week"})
    # the same rule whatever the mode: with sources and citations, or a bare answer
    rag = score_answer(q, "3 [1].", [src(1, "docs/remote.md")], not_found_message=NOT_FOUND, k=K)
    base = score_answer(q, "3", not_found_message=NOT_FOUND, k=K)
    for r in (rag, base):
        # key [3] (days, per, week are in the question) is in [3]; exact match still wants every token
        assert r.scores["correct"] == 1.0 and r.scores["contains"] == 1.0 and r.scores["exact_match"] == 0.0
        assert r.scores["stale_answer"] == 0.0
    # the old answer by the same rule: key [2]
    old = score_answer(q, "2.", not_found_message=NOT_FOUND, k=K)
    assert old.scores["correct"] == 0.0 and old.scores["stale_answer"] == 1.0


def test_summary_numbers_by_hand() -> None:
    n = summarize(questions(), runs(), n_boot=200)
    s = n["summary"]
    # base correct: [0, 1, 0, 0] -> 0.25; rag: [1, 1, 1, 1] -> 1.0
    assert s["base"]["correct"]["mean"] == 0.25 and s["rag"]["correct"]["mean"] == 1.0
    assert s["base"]["correct"]["n"] == 4 and s["base"]["token_f1"]["n"] == 3  # the unanswerable one skipped
    assert s["base"]["recall_at_k"] is None and s["rag"]["recall_at_k"]["n"] == 3
    assert s["base"]["stale_answer"]["mean"] == 1.0 and s["rag"]["stale_answer"]["mean"] == 0.0
    assert n["best"]["correct"]["mode"] == "rag"
    assert n["best"]["latency_p50_s"]["mode"] == "rag"  # base p50 = 2.5 s, rag 2.0 s
    sp = n["speed"]["base"]
    assert sp["latency_p50_s"] == 2.5 and sp["tokens_per_s"] == pytest.approx(40 / 10) and sp["prompt_tokens_mean"] == 30
    # paired difference rag − base on correct: diffs [1, 0, 1, 1] -> 0.75; 4 questions are too few to call
    d = next(d for d in n["diffs"] if d["metric"] == "correct")
    assert (d["a"], d["b"], d["mean"], d["clear"]) == ("rag", "base", 0.75, None)
    assert n["best"]["correct"]["clear"] is None and n["best"]["false_abstention"]["ties"] == ["base", "rag"]
    assert n["disagreements"] == ["remote", "meal", "shoe"]
    assert n["groups"]["changed_in_v2"]["True"]["base"]["correct"]["mean"] == 0.0
    assert n["groups"]["lang"]["ko"]["rag"]["correct"]["n"] == 1


def test_write_report_files(tmp_path: Path) -> None:
    cost = [CostRow("train (LoRA, 3 epochs)", 600.0, "run card metrics.wall_seconds"),
            CostRow("absorb a changed document: re-sync the index", 1.5, "ragtune index sync, timed")]
    paths = write_report(tmp_path / "out", questions(), runs(), cost, k=K, meta={"model": "tiny"},
                         notes=["a larger run would change little"], n_boot=200)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["schema_version"] == 1 and data["modes"] == ["base", "rag"]
    assert data["cost"][0] == {"what": "train (LoRA, 3 epochs)", "seconds": 600.0, "detail": "run card metrics.wall_seconds"}
    assert data["questions"][1]["answers"]["rag"]["answer"] == "15일입니다 [2]."
    assert data["metrics"]["recall_at_k"]["label"] == "recall@2"
    md = paths["md"].read_text(encoding="utf-8")
    for heading in ("## Quality", "## Best mode per metric", "## Paired differences", "## Speed",
                    "## Cost (measured on this machine)", "## Questions by `changed_in_v2`",
                    "## Where the modes disagree (3 of 4 questions)", "## Notes"):
        assert heading in md, heading
    assert "| correct (↑) | 4 | 25 [" in md  # base 25% with its interval
    assert "| recall@2 | rag | only rag measures this |" in md  # base has no retrieval
    assert "| correct | rag | too few questions to tell (n < 5) |" in md
    assert "| train (LoRA, 3 epochs) | 10.0 min | run card metrics.wall_seconds |" in md
    # the answer section comes first, from the same numbers
    assert md.index("## Fine-tune or RAG? What these questions say") < md.index("## Quality")
    assert ("- Most correct: **rag**, 100% [100–100]; against the next, base: +75 points [+25, +100]: too few "
            "questions to tell.") in md
    assert "- Old answers on the 1 question whose answer changed: base 100%, rag 0%." in md
    assert "- Keeping current after a document changes: re-sync the index 1.5 s." in md
    assert "✓ Up to 3 days a week [1]." in md and "✗ You can work remotely 2 days a week." in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp"))  # nothing half-written left behind


def test_records_must_follow_questions() -> None:
    r = runs()
    r["rag"] = list(reversed(r["rag"]))
    with pytest.raises(ValueError, match="one to one"):
        summarize(questions(), r)


def test_clear_winner_needs_enough_questions() -> None:
    from ragtune.eval.scoring import AnswerRecord

    qs = [Question(f"q{i}", f"question {i}", "yes") for i in range(6)]

    def recs(correct: list[int]) -> list[AnswerRecord]:
        return [AnswerRecord(q.id, "x", scores={"correct": float(c)}, latency_s=1.0) for q, c in zip(qs, correct)]

    n = summarize(qs, {"base": recs([0, 0, 0, 0, 0, 1]), "rag": recs([1, 1, 1, 1, 1, 1]),
                       "ft": recs([1, 0, 0, 0, 0, 1])}, n_boot=500)
    # rag − base: diffs [1,1,1,1,1,0]: every resample has a positive mean -> clear
    assert n["best"]["correct"] == {"mode": "rag", "ties": ["rag"], "runner_up": "ft", "clear": True}
    d = {(d["a"], d["b"]): d for d in n["diffs"] if d["metric"] == "correct"}
    assert d[("rag", "base")]["clear"] is True and d[("rag", "base")]["mean"] == pytest.approx(5 / 6)
    # ft − base: diffs [1,0,0,0,0,0]: resamples without the first question give 0 -> not clear
    assert d[("ft", "base")]["clear"] is False


def test_the_answer_section_weighs_each_adapter_with_and_without_retrieval() -> None:
    from ragtune.eval.report import CostRow, render_markdown
    from ragtune.eval.scoring import AnswerRecord

    qs = [Question(f"q{i}", f"question {i}", "yes") for i in range(12)]

    def recs(n_correct: int) -> list[AnswerRecord]:
        return [AnswerRecord(q.id, "x", scores={"correct": float(i < n_correct)}, latency_s=1.0)
                for i, q in enumerate(qs)]

    runs = {"base": recs(0), "rag": recs(3), "ft": recs(1), "ft+rag": recs(12)}
    n = summarize(qs, runs, n_boot=300)
    md = render_markdown(qs, runs, n, [CostRow("absorb a changed document: re-train adapter 'ft'", 300.0)], k=2)
    assert "- Most correct: **ft+rag**, 100% [100–100]; against the next, rag: +75 points [" in md
    assert "- Adapter ft on top of retrieval (ft+rag − rag): +75 points [" in md
    assert md.split("- Adapter ft on top of retrieval (ft+rag − rag): ")[1].split("\n")[0].endswith("clearly better.")
    line = md.split("- Adapter ft without sources (ft − base): ")[1].split("\n")[0]
    assert line.startswith("+8 points [") and line.endswith("no clear difference (the interval includes 0).")
    assert "- Keeping current after a document changes: re-train adapter 'ft' 5.0 min." in md


def test_a_failure_between_the_report_files_leaves_the_old_set(tmp_path: Path) -> None:
    """The three files are one report: before, each was replaced on its own, so a failure while writing
    the png (here: the file-size limit, which binds root too, as a full disk would) left the new
    report.json beside the old report.md. Now nothing is replaced until all three are written."""
    import subprocess
    import sys

    out = tmp_path / "out"
    write_report(out, questions(), runs(), k=K, meta={"model": "old"}, n_boot=50)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before["report.png"]) > 32768 > max(len(before["report.json"]), len(before["report.md"]))
    code = (
        "import errno, resource, signal, sys\n"
        "from tests.eval.test_report import K, questions, runs\n"
        "from ragtune.eval.report import write_report\n"
        "import matplotlib.pyplot\n"  # its caches are written before the limit
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        f"    write_report({str(out)!r}, questions(), runs(), k=K, meta={{'model': 'new'}}, n_boot=50)\n"
        "except OSError as exc:\n"
        "    print('FAILED', errno.errorcode[exc.errno])\n"
    )
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "FAILED EFBIG", p.stdout + p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole; no temp files
    assert json.loads(before["report.json"])["meta"]["model"] == "old"
    # and with room, the new set replaces the old one
    write_report(out, questions(), runs(), k=K, meta={"model": "new"}, n_boot=50)
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["meta"]["model"] == "new"
    assert "- model: new" in (out / "report.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]


def test_a_folder_in_place_of_a_report_file_changes_nothing(tmp_path: Path) -> None:
    # before: report.json was renamed in, the rename onto the report.png folder failed, and the md and png
    # temp files stayed behind; now the set is checked before the first rename
    out = tmp_path / "out"
    write_report(out, questions(), runs(), k=K, meta={"model": "old"}, n_boot=50)
    (out / "report.png").unlink()
    (out / "report.png").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(IsADirectoryError, match="a folder is where a file of the set goes"):
        write_report(out, questions(), runs(), k=K, meta={"model": "new"}, n_boot=50)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]


def test_a_gold_document_folded_into_a_hit_as_a_copy_counts_as_retrieved() -> None:
    """search.dedupe shows one document for text several hold (the page, not the all-in-one page that holds it
    too); when the question's gold is one of the copies, retrieval found it: recall and MRR count it at that
    place, as they did before the copies were folded."""
    q = Question("remote", "How many remote days?", "3 days", ("all.md",))
    folded = {**src(1, "remote.md"), "duplicates": [{"source": "docs/all.md", "page": None, "heading": "Remote"}]}
    got = score_answer(q, "3 days [1].", [src(1, "remote.md")], retrieved=[src(1, "travel.md"), folded],
                       not_found_message=NOT_FOUND, k=K)
    assert (got.scores["recall_at_k"], got.scores["mrr"]) == (1.0, 0.5)
    plain = score_answer(q, "3 days [1].", [src(1, "remote.md")], retrieved=[src(1, "travel.md"), src(2, "remote.md")],
                         not_found_message=NOT_FOUND, k=K)
    assert (plain.scores["recall_at_k"], plain.scores["mrr"]) == (0.0, 0.0)
