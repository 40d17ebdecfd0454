from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.errors import UsageError
from ragtune.eval.questions import load_questions


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_both_formats_and_meta(tmp_path: Path) -> None:
    f = write(tmp_path / "q.jsonl", [
        {"question": "How many remote days?", "answer": "Three days a week.", "sources": ["remote.md"],
         "changed_in_v2": True, "old_answer": "Two days"},
        "",
        {"messages": [
            {"role": "system", "content": "You answer policy questions."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "연차는 며칠인가요?"},
            {"role": "assistant", "content": "연 15일입니다."},
        ], "sources": "leave_ko.md", "id": "ko-1"},
        {"question": "What is the CEO's shoe size?", "answerable": False},
    ])
    q1, q2, q3 = load_questions(f)
    assert (q1.id, q1.question, q1.answer, q1.sources, q1.answerable) == (
        "q1", "How many remote days?", "Three days a week.", ("remote.md",), True)
    assert q1.meta == {"changed_in_v2": True, "old_answer": "Two days"}
    assert q1.messages() == [{"role": "user", "content": "How many remote days?"}]
    # chat: last user turn is the question, last assistant turn the reference, the rest history
    assert (q2.id, q2.question, q2.answer, q2.sources, q2.line) == ("ko-1", "연차는 며칠인가요?", "연 15일입니다.", ("leave_ko.md",), 3)  # line 2 is blank
    assert [m["role"] for m in q2.messages()] == ["system", "user", "assistant", "user"]
    # unanswerable without an answer: the reference is the not-found message
    assert (q3.id, q3.answerable, q3.answer) == ("q4", False, "")
    assert q3.reference("I could not find this.") == "I could not find this."
    assert q1.reference("I could not find this.") == "Three days a week."


def test_every_problem_named_with_file_line_and_key(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "fine", "id": "a"},
        "{not json",
        {"answer": "no question"},
        {"question": "no answer"},
        {"question": "q", "answer": "a", "sources": [1], "answerable": "no"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "bot", "content": "x"}]},
        {"question": "dup", "answer": "x", "id": "a"},
        [1, 2],
    ])
    with pytest.raises(UsageError) as err:
        load_questions(f)
    msg = str(err.value)
    assert msg.startswith(f"9 problem(s) in questions file {f}")
    for expected in [
        f"{f}:2: not valid JSON",
        f"{f}:3: missing key 'question'",
        f"{f}:4: missing key 'answer'",
        f"{f}:5: key 'answerable': expected true or false, got 'no'",
        f"{f}:5: key 'sources': expected a list of source paths",
        f"{f}:6: key 'messages': no assistant turn",
        f"{f}:7: key 'messages[0].role': expected one of system, user, assistant, got 'bot'",
        f"{f}:8: key 'id': 'a' already used on line 1",
        f"{f}:9: expected a JSON object, got list",
    ]:
        assert expected in msg, expected


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found; pass --questions FILE.jsonl"):
        load_questions(tmp_path / "nope.jsonl")
    (tmp_path / "qs").mkdir()  # a folder was "not found"
    (tmp_path / "qs" / "held_out.jsonl").write_text("")
    with pytest.raises(UsageError, match=f"'{tmp_path / 'qs'}' is a folder; pass the JSONL file itself, e.g. "
                                         f"--questions {tmp_path / 'qs' / 'held_out.jsonl'}"):
        load_questions(tmp_path / "qs")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no questions"):
        load_questions(tmp_path / "empty.jsonl")


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    # a file saved by a Windows editor starts with a BOM; line 1 was "not valid JSON (Unexpected UTF-8 BOM)"
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "Q?", "answer": "A"}).encode() + b"\n")
    assert [q.question for q in load_questions(f)] == ["Q?"]


def test_an_old_answer_that_is_not_text_is_named(tmp_path: Path) -> None:
    # "old_answer": 2 was kept silently, and "gives the old answer" then left the question out
    f = write(tmp_path / "q.jsonl", [{"question": "Remote days?", "answer": "3", "old_answer": 2},
                                     {"question": "Meals?", "answer": "$60", "old_answer": "$50"}])
    with pytest.raises(UsageError, match=f"{f}:1: key 'old_answer': expected the answer the documents used to give "
                                         r"\(a non-empty string\), got 2"):
        load_questions(f)
    f = write(tmp_path / "q.jsonl", [{"question": "Meals?", "answer": "$60", "old_answer": "$50"}])
    assert load_questions(f)[0].meta == {"old_answer": "$50"}
