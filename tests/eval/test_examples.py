"""The demo domain holds together: files parse, gold sources exist, answers are in the documents,
and the facts marked as changed really differ between v1 and v2 (and v1's were trained)."""

from __future__ import annotations

import json
from pathlib import Path

from ragtune.config import RagConfig
from ragtune.eval import metrics as M
from ragtune.eval.questions import load_questions

EX = Path(__file__).resolve().parents[2] / "examples" / "policies"
V1, V2 = EX / "docs_v1", EX / "docs_v2"
CHANGED_FILES = {"remote_work.md", "expenses.md", "security.md", "leave_ko.md"}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_documents_v1_v2_differ_only_where_announced() -> None:
    names1 = sorted(p.name for p in V1.glob("*.md"))
    assert names1 == sorted(p.name for p in V2.glob("*.md")) and len(names1) == 8
    changed = {n for n in names1 if read(V1 / n) != read(V2 / n)}
    assert changed == CHANGED_FILES
    for n in changed:  # each changed file: its date line and one fact line
        l1, l2 = read(V1 / n).splitlines(), read(V2 / n).splitlines()
        assert len(l1) == len(l2) and sum(a != b for a, b in zip(l1, l2)) == 2, n
    for n in names1:
        words = len(read(V2 / n).split())
        assert 150 <= words <= 400, (n, words)


def test_training_data_is_valid_chat_drawn_from_v1() -> None:
    rows = [json.loads(line) for line in read(EX / "train_v1.jsonl").splitlines()]
    assert 60 <= len(rows) <= 100
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
    trained_questions = {r["messages"][1]["content"] for r in rows}
    answers = [r["messages"][2]["content"] for r in rows]
    questions = load_questions(EX / "questions.jsonl")
    assert not trained_questions & {q.question for q in questions}, "held-out questions must not be trained on"
    for q in questions:
        if q.meta.get("changed_in_v2"):  # v1's fact was taught, v2's was not
            assert any(M.contains_reference(a, q.meta["old_answer"]) for a in answers), q.id
            assert not any(M.contains_reference(a, q.answer) for a in answers), q.id


def test_questions_are_grounded_in_v2() -> None:
    questions = load_questions(EX / "questions.jsonl")
    assert 120 <= len(questions) <= 140  # enough for a 15-point paired difference to exclude 0
    unanswerable = [q for q in questions if not q.answerable]
    changed = [q for q in questions if q.meta.get("changed_in_v2")]
    assert len(unanswerable) == 16 and len(changed) == 16
    assert sum(q.meta.get("lang") == "ko" for q in questions) >= 30
    assert len({q.id for q in questions}) == len(questions)
    not_found = RagConfig().not_found_message
    for q in unanswerable:
        assert q.answer == not_found and not q.sources, q.id
    for q in questions:
        if not q.answerable:
            continue
        assert q.sources, q.id
        for s in q.sources:
            assert (V2 / s).is_file(), f"{q.id}: gold source {s} not in docs_v2"
        text = " ".join(read(V2 / s) for s in q.sources)
        assert M.contains_reference(text, q.answer), f"{q.id}: reference {q.answer!r} not in {q.sources}"


def test_changed_facts_really_differ() -> None:
    for q in load_questions(EX / "questions.jsonl"):
        if not q.meta.get("changed_in_v2"):
            continue
        (src,) = q.sources
        l1, l2 = read(V1 / src).splitlines(), read(V2 / src).splitlines()
        new = [line for line in l2 if line not in l1]
        old = [line for line in l1 if line not in l2]
        # the new answer is on a line that v2 changed, the old answer on the line it replaced
        assert any(M.contains_reference(line, q.answer) for line in new), q.id
        assert any(M.contains_reference(line, q.meta["old_answer"]) for line in old), q.id
        assert not any(M.contains_reference(line, q.meta["old_answer"]) for line in new), q.id
