"""`ragtune data check / convert / split`: every problem class caught with its line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main
from tests.train.conftest import chat, write_jsonl

GOOD = chat("What is the capital of France?", "Paris is the capital of France.")
U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

# (kind, bad line) - each is put on line 3 of a file whose other lines are valid
CASES = [
    ("invalid_json", '{"messages": [{"role": "user", "content": "hi"}'),
    ("not_object", json.dumps([U, A])),
    ("messages_missing", json.dumps({"conversation": [U, A]})),
    ("messages_not_list", json.dumps({"messages": {"role": "user"}})),
    ("messages_empty", json.dumps({"messages": []})),
    ("message_not_object", json.dumps({"messages": [U, "hello"]})),
    ("role_missing", json.dumps({"messages": [U, {"content": "hello"}, A]})),
    ("role_not_string", json.dumps({"messages": [U, {"role": 3, "content": "x"}, A]})),
    ("content_missing", json.dumps({"messages": [U, {"role": "assistant"}]})),
    ("content_not_string", json.dumps({"messages": [U, {"role": "assistant", "content": ["x"]}]})),
    ("unknown_role", json.dumps({"messages": [U, {"role": "bot", "content": "x"}, A]})),
    ("unknown_key", json.dumps({"messages": [U, A], "id": 7})),
    ("unknown_key", json.dumps({"messages": [U, {**A, "note": "x"}]})),
    ("empty_content", json.dumps({"messages": [U, {"role": "assistant", "content": " \n "}]})),
    ("no_assistant", json.dumps({"messages": [U, {"role": "user", "content": "again"}]})),
    ("role_order", json.dumps({"messages": [U, {"role": "system", "content": "late"}, A]})),
    ("role_order", json.dumps({"messages": [U, A, {"role": "user", "content": "dangling"}]})),
    ("not_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
]


def _file(tmp_path: Path, bad: str | bytes) -> Path:
    lines = [json.dumps(chat("first question", "first answer")).encode(), json.dumps(GOOD).encode(),
             bad if isinstance(bad, bytes) else bad.encode(), json.dumps(chat("q4", "a4")).encode()]
    p = tmp_path / "data.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


@pytest.mark.parametrize("kind,bad", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_each_problem_class_is_caught_with_its_line(tmp_path: Path, kind: str, bad: str, capsys) -> None:
    from ragtune.train.data import check_file

    path = _file(tmp_path, bad)
    rep = check_file(path)
    assert [(p.line, p.kind) for p in rep.problems if p.kind == kind] == [(3, kind)], rep.format()
    assert {p.line for p in rep.problems} == {3}
    assert [r.line for r in rep.records] == [1, 2, 4]
    assert main(["data", "check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"][kind][0]["line"] == 3


def test_clean_korean_file_passes_with_stats(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    rows = [chat("서울은 어떤 도시입니까?", "서울은 한국의 수도입니다.", system="한국어로 답하세요."), GOOD]
    path = write_jsonl(tmp_path / "ko.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    assert "0 invalid" in out and "tokens per record: min" in out
    assert main(["data", "check", str(path), "--model", str(tiny_llama), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    s = rep["stats"]
    assert rep["ok"] and s["records"] == 2 and s["turns"] == 5 and s["over_max_length"] == 0
    assert s["tokens"]["min"] <= s["tokens"]["median"] <= s["tokens"]["p95"] <= s["tokens"]["max"]
    assert s["tokens_per_epoch"] > s["trained_tokens_per_epoch"] > 0


def test_token_checks_truncation_and_empty_mask(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    long_prompt = " ".join(["question"] * 300)
    rows = [
        GOOD,
        chat(long_prompt, "short answer"),  # line 2: answer starts past max_length
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]},
        chat("short question", " ".join(["answer"] * 300)),  # line 4: over max_length, answer partly kept
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(tiny_llama), "--max-length", "64", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert [p["line"] for p in rep["problems"]["answer_truncated"]] == [2]
    assert [p["line"] for p in rep["problems"]["empty_assistant_mask"]] == [3]
    assert rep["stats"]["over_max_length"] == 2 and rep["stats"]["records"] == 2
    assert rep["stats"]["cut_lines"] == [4]  # kept, but its end and stop token are not trained
    assert main(["data", "check", str(path), "--model", str(tiny_llama), "--max-length", "64"]) == 1
    assert "note: the answers of 1 record(s) are cut at max_length (lines 4): their ends and stop tokens" \
        in capsys.readouterr().out


def test_write_clean_and_quarantine(tmp_path: Path, capsys) -> None:
    path = _file(tmp_path, '{"messages": oops')
    out = tmp_path / "clean.jsonl"
    assert main(["data", "check", str(path), "--write-clean", str(out)]) == 1
    assert len(out.read_text().splitlines()) == 3
    (rej,) = [json.loads(x) for x in (tmp_path / "clean.rejected.jsonl").read_text().splitlines()]
    assert rej["line"] == 3 and rej["text"] == '{"messages": oops' and "not valid JSON" in rej["reasons"][0]
    assert main(["data", "check", str(out)]) == 0


@pytest.mark.parametrize("line, hint", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},]}',
     "a comma before ']': JSON allows no trailing comma; near: '\", \"content\": \"yo\"},]}'"),
    ("{'messages': [{'role': 'user', 'content': 'hi'}]}", "single quotes: JSON keys and strings need double quotes"),
    ('{\u201cmessages\u201d: []}', "curly quotes (\u201c \u201d) where JSON needs straight double quotes"),
    ('{"messages": []} {"messages": []}', "two records on one line: put each on its own line"),
    ('{"messages": [{"role": "user", "content": "a\tb"}]}', "a tab or line break inside a string"),
])
def test_hand_edited_json_mistakes_are_named(tmp_path: Path, line: str, hint: str) -> None:
    from ragtune.train.data import check_file

    (problem,) = check_file(_file(tmp_path, line)).problems
    assert problem.line == 3 and problem.kind == "invalid_json" and hint in problem.message, problem.message


@pytest.mark.parametrize("shape", ["array", "pretty"])
def test_json_array_or_pretty_printed_file_is_named_and_cleaned(tmp_path: Path, shape: str, capsys) -> None:
    rows = [GOOD, chat("Q2?", "A2."), {"messages": [U]}, chat("Q4?", "A4.")]
    text = json.dumps(rows, indent=2) if shape == "array" else "\n".join(json.dumps(r, indent=2) for r in rows)
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    assert main(["data", "check", str(path), "--write-clean", str(out)]) == 1
    printed = capsys.readouterr().out
    what = "one JSON array (4 records)" if shape == "array" else "JSON spread over several lines (4 records)"
    assert f"line 1: the file is {what}, not JSON Lines (one record per line)" in printed
    # the record without an answer is named by the line it starts on
    start = text.count("\n", 0, text.rindex("{", 0, text.rindex('"messages"', 0, text.index('"hi"')))) + 1
    assert f"line {start}: no assistant message" in printed
    assert [json.loads(x) for x in out.read_text().splitlines()] == [GOOD, rows[1], rows[3]]
    (rej,) = [json.loads(x) for x in (tmp_path / "clean.rejected.jsonl").read_text().splitlines()]
    assert rej["line"] == start and json.loads(rej["text"]) == rows[2]
    assert main(["data", "check", str(out)]) == 0


def test_convert_csv_keeps_korean(tmp_path: Path) -> None:
    src = tmp_path / "faq.csv"
    src.write_text('질문,답변,other\n"서울은, 어디?",한국의 수도입니다.,1\nempty,,2\n', encoding="utf-8-sig")
    out = tmp_path / "faq.jsonl"
    assert main(["data", "convert", str(src), "--question-col", "질문", "--answer-col", "답변",
                 "--system", "간단히 답하세요.", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "서울은, 어디?" in text  # written as UTF-8, not \u escapes
    (rec,) = [json.loads(x) for x in text.splitlines()]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert main(["data", "check", str(out)]) == 0
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "답변"]) == 2


def test_other_tools_formats_are_named_by_check_and_converted(tmp_path: Path, capsys) -> None:
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "서울은?"},
                           {"from": "gpt", "value": "한국의 수도."}, {"from": "human", "value": "Why?"},
                           {"from": "gpt", "value": "History."}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
        {"instruction": "not like the first", "output": "x"},
    ])
    assert main(["data", "check", str(sharegpt)]) == 1
    out = capsys.readouterr().out
    assert "another tool's record format (3):" in out and "line 1: ShareGPT format {" in out and "line 3: Alpaca format" in out
    assert "'ragtune data convert FILE' writes the file as chat JSONL" in out
    assert main(["data", "convert", str(sharegpt)]) == 0
    out = capsys.readouterr().out
    assert "skipped row 2: turn 2 is from 'function_call', which has no chat role" in out
    assert "skipped row 3: not a ShareGPT record like the first" in out
    (rec,) = [json.loads(x) for x in (tmp_path / "sg.chat.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rec["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "서울은?"},
                               {"role": "assistant", "content": "한국의 수도."}, {"role": "user", "content": "Why?"},
                               {"role": "assistant", "content": "History."}]

    alpaca = tmp_path / "alpaca_data.json"  # the classic file is one JSON array
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "cat", "output": "고양이"},
                                  {"instruction": "Say hi", "input": "", "output": "hi"},
                                  {"instruction": "x", "input": "", "output": ""}], ensure_ascii=False), encoding="utf-8")
    assert main(["data", "convert", str(alpaca), "--system", "Be brief."]) == 0
    assert "skipped record 3: empty answer" in capsys.readouterr().out
    recs = [json.loads(x)["messages"] for x in (tmp_path / "alpaca_data.chat.jsonl").read_text().splitlines()]
    assert recs == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate\n\ncat"},
                     {"role": "assistant", "content": "고양이"}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                     {"role": "assistant", "content": "hi"}]]

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p?", "completion": "c."}])
    assert main(["data", "convert", str(pc), "--out", str(tmp_path / "pc.out.jsonl")]) == 0
    assert main(["data", "check", str(tmp_path / "pc.out.jsonl")]) == 0
    # chat JSONL is not converted again, and tables need both columns
    assert main(["data", "convert", str(tmp_path / "pc.out.jsonl")]) == 2
    assert "already holds chat records" in capsys.readouterr().err
    assert main(["data", "convert", str(alpaca), "--question-col", "instruction"]) == 2
    assert "give both --question-col and --answer-col" in capsys.readouterr().err


def test_questions_asked_with_different_answers_are_noted_not_failed(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "conf.jsonl", [
        chat("How many remote days?", "2 days."), chat("What is X?", "Y."), chat("how many  REMOTE days?", "3 days."),
        chat("What is X?", "y. "),  # the same answer, spaced and cased differently
        chat("How many remote days?", "Two days.", system="Be brief."),  # another conversation: its own question
    ])
    assert main(["data", "check", str(path)]) == 0  # a note, not a problem: paraphrases can be meant
    assert (f"note: 1 question is asked with different answers in {path} (lines 1, 3): the model learns a mix"
            in capsys.readouterr().out)
    assert main(["data", "check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["conflicting_answers"] == [[1, 3]]


def test_parquet_and_tables_are_pointed_at_convert(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 1}]},
            {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}]}]
    src = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)  # gives every message a 'weight' (None where absent)
    assert main(["data", "check", str(src)]) == 2
    assert f"'{src}' is a PARQUET file, not chat JSONL: write chat records from it with 'ragtune data convert" \
        in capsys.readouterr().err
    assert main(["data", "convert", str(src)]) == 0
    out = tmp_path / "chat.chat.jsonl"
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == rows
    assert main(["data", "check", str(out)]) == 0
    table = tmp_path / "faq.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "Why?", "a": "Because."}]), table)
    assert main(["data", "convert", str(table), "--question-col", "q", "--answer-col", "a"]) == 0
    csv = tmp_path / "faq.csv"
    csv.write_text("q,a\nWhy?,Because.\n", encoding="utf-8")
    assert main(["-q", "train", f"model.path={tiny_llama}", f"data.train_file={csv}",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "is a CSV file, not chat JSONL" in capsys.readouterr().err


def test_convert_reads_excel_encodings(tmp_path: Path, capsys) -> None:
    """Korean Excel saves CSV as cp949 and "Unicode text" as UTF-16: the first is an error naming the
    line and the --encoding to pass (not a traceback), the second just works."""
    src = tmp_path / "faq.csv"
    src.write_bytes("q,a\nWhat?,That.\n연차는 며칠?,15일입니다.\n".encode("cp949"))
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]) == 2
    err = capsys.readouterr().err
    assert "faq.csv: line 3: byte 0xbf is not UTF-8 text" in err and "--encoding cp949" in err and "Traceback" not in err
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a", "--encoding", "cp949"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "faq.chat.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[1]["messages"][0]["content"] == "연차는 며칠?"
    tsv = tmp_path / "unicode.tsv"
    tsv.write_bytes("q\ta\r\n연차는 며칠?\t15일입니다.\r\n".encode("utf-16"))
    assert main(["data", "convert", str(tsv), "--question-col", "q", "--answer-col", "a"]) == 0
    assert json.loads((tmp_path / "unicode.chat.jsonl").read_text())["messages"][1]["content"] == "15일입니다."
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a", "--encoding", "nope"]) == 2
    assert "no such text encoding" in capsys.readouterr().err


def test_empty_inputs_and_ragged_rows_are_reported(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["data", "check", str(empty)]) == 1
    assert "holds no records" in capsys.readouterr().out
    assert main(["data", "split", str(empty), "--eval-fraction", "0.2"]) == 2
    assert "a split needs at least 2" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err
    src = tmp_path / "ragged.csv"
    src.write_text("q,a\nWhat is 1,000 times 2?,2000\nok?,yes\n")  # an unquoted comma splits the question
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]) == 0
    out = capsys.readouterr().out
    assert "skipped row 2: 3 fields, the header has 2" in out and "wrote 1 record to" in out
    src.write_text("q,a\nx,\n")
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a", "--force"]) == 1
    assert "no records to write" in capsys.readouterr().out
    assert len((tmp_path / "ragged.chat.jsonl").read_text().splitlines()) == 1  # the earlier result is kept


def test_check_reads_utf16_jsonl(tmp_path: Path, capsys) -> None:
    path = tmp_path / "u16.jsonl"
    path.write_bytes(("\n".join(json.dumps(r, ensure_ascii=False) for r in [GOOD, chat("서울?", "수도.")]) + "\n")
                     .encode("utf-16"))
    assert main(["data", "check", str(path)]) == 0
    assert "2 records, 2 valid, 0 invalid" in capsys.readouterr().out


def test_convert_tsv(tmp_path: Path) -> None:
    src = tmp_path / "faq.tsv"
    src.write_text("q\ta\nWhat?\tThat.\n", encoding="utf-8")
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]) == 0
    assert json.loads((tmp_path / "faq.chat.jsonl").read_text())["messages"][1]["content"] == "That."


def test_split_is_deterministic(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", [chat(f"q{i}", f"a{i}") for i in range(50)])
    results = []
    for d in ("s1", "s2"):
        assert main(["data", "split", str(path), "--eval-fraction", "0.2", "--seed", "7", "--out-dir",
                     str(tmp_path / d)]) == 0
        results.append(((tmp_path / d / "all.train.jsonl").read_text(), (tmp_path / d / "all.eval.jsonl").read_text()))
    assert results[0] == results[1]
    tr, ev = results[0]
    assert len(ev.splitlines()) == 10 and len(tr.splitlines()) == 40
    assert sorted(tr.splitlines() + ev.splitlines()) == sorted(path.read_text().splitlines())
    assert main(["data", "split", str(path), "--eval-fraction", "0.2", "--seed", "8", "--out-dir",
                 str(tmp_path / "s3")]) == 0
    assert (tmp_path / "s3" / "all.eval.jsonl").read_text() != ev
    assert main(["data", "split", str(path), "--eval-fraction", "1.5"]) == 2


def test_split_writes_the_lines_it_checked(tmp_path: Path, monkeypatch) -> None:
    """The file is read once: one rewritten between the check and the split (an editor saving, a
    sync) cannot slip unchecked lines into the outputs or shift the left-out line numbers."""
    from ragtune.train import data

    rows = [chat(f"q{i}", f"a{i}") for i in range(10)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    path.write_text(path.read_text() + "not json\n", encoding="utf-8")
    first = path.read_text().splitlines()[:10]
    read = data.read_lines

    def read_then_rewrite(p: Path, encoding: str = "auto") -> list[tuple[int, bytes]]:
        lines = read(p, encoding)
        p.write_text("not json\n" + "".join(json.dumps(chat(f"new{i}", "x")) + "\n" for i in range(10)),
                     encoding="utf-8")
        return lines

    monkeypatch.setattr(data, "read_lines", read_then_rewrite)
    tr, ev, ntr, nev, left_out = data.split(path, 0.2, seed=1, out_dir=tmp_path / "out", skip_invalid=True)
    assert (ntr, nev, left_out) == (8, 2, 1)
    assert sorted(tr.read_text().splitlines() + ev.read_text().splitlines()) == sorted(first)


def test_split_keeps_records_that_ask_the_same_question_together(tmp_path: Path) -> None:
    """A question trained on must not come back in the held-out part (paraphrased answers, repeated
    records, case or spacing changes alike), or eval loss flatters the adapter."""
    rows = []
    for i in range(40):
        rows.append(chat(f"Question {i}?", f"answer {i}"))
        if i % 4 == 0:
            rows.append(chat(f"question  {i}?", f"another answer {i}"))
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    for seed in range(5):
        assert main(["data", "split", str(path), "--eval-fraction", "0.25", "--seed", str(seed), "--out-dir",
                     str(tmp_path / f"s{seed}")]) == 0
        asked = [{" ".join(json.loads(x)["messages"][0]["content"].casefold().split())
                  for x in (tmp_path / f"s{seed}" / f"all.{part}.jsonl").read_text().splitlines()}
                 for part in ("train", "eval")]
        assert asked[0] and asked[1] and not asked[0] & asked[1], seed
        n_eval = len((tmp_path / f"s{seed}" / "all.eval.jsonl").read_text().splitlines())
        assert 12 <= n_eval <= 13  # round(50 * 0.25) = 12, or one over when a pair closes the draw


def test_template_that_refuses_a_record_names_its_line(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    """Gemma-style templates raise on non-alternating roles: those records are reported with their lines and
    the template's own message; the stats count the rest. (A system turn, which they raise on too, is folded
    into the first user turn: ragtune.chat_roles; the record with one is checked like the others.)"""
    import shutil

    model = tmp_path / "gemma-like"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((model / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    rows = [GOOD, chat("q", "a", system="be brief"), chat("x", "y"),
            {"messages": [U, U, A]}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(model), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    probs = rep["problems"]["template_error"]
    assert [p["line"] for p in probs] == [4] and "must alternate" in probs[0]["message"]
    assert (rep["stats"]["records"], rep["stats"]["turns"], rep["stats"]["assistant_turns"]) == (3, 7, 3)


def test_exact_duplicates_are_a_warning_and_kept_unless_dedupe(tmp_path: Path, capsys) -> None:
    # users upsample on purpose: repeats used to stop training (and --skip-invalid then dropped them)
    from ragtune.train.data import check_file

    rows = [chat("q1", "a1"), chat("q2", "a2"), chat("q1", "a1"), chat("q3", "a3"), chat("q1", "a1"), chat("q2", "a2")]
    path = write_jsonl(tmp_path / "up.jsonl", rows)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "6 records, 6 valid, 0 invalid" in out
    assert (f"note: 3 records repeat an earlier one exactly in {path} (lines 1, 3, 5; lines 2, 6): kept "
            "(repeats weigh a record more; set data.dedupe=true to drop them)") in out
    assert main(["data", "check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates"] == [[1, 3, 5], [2, 6]]
    rep = check_file(path, dedupe=True)
    assert [r.line for r in rep.records] == [1, 2, 4] and rep.ok and rep.deduped == 3
    assert "dropped (3 records, data.dedupe)" in rep.duplicate_note()
    assert main(["data", "check", str(path), "data.dedupe=true", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid_records"] == 3


TOOL_RECORDS = [
    {"messages": [U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]},
    {"messages": [U, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                  {"role": "function", "name": "f", "content": "42"}, A]},
    {"messages": [{"role": "user", "name": "ann", "content": "hi"}, A]},
]


def test_tool_records_are_named_in_one_line_and_skipped(tmp_path: Path, capsys) -> None:
    # OpenAI-valid records with tools were rejected as unknown keys, one problem per key
    path = write_jsonl(tmp_path / "tools.jsonl", [GOOD, *TOOL_RECORDS, chat("q4", "a4")])
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "tools or function calling" in line]
    assert notes == [f"note: {path}: 3 records use tools or function calling (lines 2, 3, 4), which ragtune does "
                     "not train yet: skipped"]
    assert "unknown key" not in out and "5 records, 2 valid, 0 invalid" in out
    assert main(["data", "check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tool_records"] == [2, 3, 4]


def test_missing_chat_template_file_is_named(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    missing = tmp_path / "nope.jinja"
    rc = main(["data", "check", str(path), "--model", str(tiny_llama), f"train.chat_template={missing}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"train.chat_template '{missing}' does not exist" in err and "Traceback" not in err


def test_split_names_the_line_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": [{"role": "user", "content": "café"}]}'
                     .encode("cp1252") + b"\n")
    assert main(["data", "split", str(path), "--eval-fraction", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "nothing was split" in err and "not valid UTF-8 (1):\n  line 2: byte" in err and "Traceback" not in err
    assert not (tmp_path / "latin.train.jsonl").exists()


def test_convert_takes_a_csv_field_over_the_csv_modules_limit(tmp_path: Path, capsys) -> None:
    long_answer = "word " * 40_000  # 200 KB; csv's default field limit is 128 KiB
    src = tmp_path / "long.csv"
    src.write_text(f'q,a\nWhat is long?,"{long_answer}"\n', encoding="utf-8")
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]) == 0
    rec = json.loads((tmp_path / "long.chat.jsonl").read_text())
    assert rec["messages"][1]["content"] == long_answer.strip()


def _ninety(tmp_path: Path, name: str = "train.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [chat(f"q{i}", f"a{i}") for i in range(90)])


def test_convert_refuses_an_existing_out_unless_force(tmp_path: Path, capsys) -> None:
    train = _ninety(tmp_path)
    before = train.read_bytes()
    src = tmp_path / "faq.csv"
    src.write_text("q,a\nWhy?,Because.\n", encoding="utf-8")
    args = ["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]
    assert main([*args, "--out", str(train)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{train}' already exists; pass --force to replace it" in err and "Traceback" not in err
    assert train.read_bytes() == before
    # a path through a folder that is not there yet names the same file
    assert main([*args, "--out", str(tmp_path / "new" / ".." / "train.jsonl")]) == 2
    assert train.read_bytes() == before and not (tmp_path / "new").exists()
    assert main([*args]) == 0  # the default faq.chat.jsonl, then refused the second time
    assert main([*args]) == 2
    assert "(FILE.chat.jsonl, the default) already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--out", str(train), "--force"]) == 0
    assert [json.loads(x) for x in train.read_text().splitlines()] == [chat("Why?", "Because.")]


def test_convert_names_the_input_as_out_a_json_error_and_a_short_row(tmp_path: Path, capsys) -> None:
    src = tmp_path / "faq.csv"
    src.write_text("q,a\nWhy?,Because.\nlonely\n", encoding="utf-8")
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a", "--out", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{src}' is the input file" in err and "pass --out" not in err
    assert main(["data", "convert", str(src), "--question-col", "q", "--answer-col", "a"]) == 0
    out = capsys.readouterr().out
    assert "skipped row 3: 1 column where the header has 2: no 'a' on this row" in out and "empty answer" not in out
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\n{"q": "x" "a": 1}\n', encoding="utf-8")
    assert main(["data", "convert", str(bad), "--question-col", "q", "--answer-col", "a"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2: invalid JSON: Expecting ',' delimiter at column 11" in err
    assert "UTF-8" not in err and "Traceback" not in err


def test_write_clean_never_replaces_the_checked_file_or_an_existing_one_unasked(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"messages": [U]}, chat("q", "a")])
    before = path.read_bytes()
    assert main(["data", "check", str(path), "--write-clean", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--write-clean '{path}' is the file being checked ('{path}')" in err
    assert main(["data", "check", str(path), "--write-clean", str(path), "--force"]) == 2
    assert path.read_bytes() == before and not (tmp_path / "data.rejected.jsonl").exists()
    # checking a quarantine file with --write-clean of its stem would write the rejected lines over it
    rejected = write_jsonl(tmp_path / "x.rejected.jsonl", [GOOD])
    assert main(["data", "check", str(rejected), "--write-clean", str(tmp_path / "x.jsonl")]) == 2
    assert "its rejected-lines file" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    clean, side = tmp_path / "clean.jsonl", tmp_path / "clean.rejected.jsonl"
    side.write_text("mine\n")
    assert main(["data", "check", str(path), "--write-clean", str(clean)]) == 2
    assert f"'{side}' already exists; pass --force" in capsys.readouterr().err
    assert side.read_text() == "mine\n" and not clean.exists()
    clean.write_text("mine too\n")
    assert main(["data", "check", str(path), "--write-clean", str(clean)]) == 2
    assert f"'{clean}' and '{side}' already exist" in capsys.readouterr().err and clean.read_text() == "mine too\n"
    assert main(["data", "check", str(path), "--write-clean", str(clean), "--force"]) == 1  # 1: the file has a problem
    assert len(clean.read_text().splitlines()) == 2 and json.loads(side.read_text())["line"] == 2
    assert path.read_bytes() == before


def test_split_refuses_existing_outputs_and_invalid_records(tmp_path: Path, capsys) -> None:
    path = _ninety(tmp_path, "all.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    mine = write_jsonl(out / "all.train.jsonl", [GOOD])
    args = ["data", "split", str(path), "--eval-fraction", "0.5", "--out-dir", str(out)]
    assert main(args) == 2
    assert f"'{mine}' already exists; pass --force" in capsys.readouterr().err
    assert mine.read_text() == json.dumps(GOOD) + "\n" and not (out / "all.eval.jsonl").exists()
    assert main([*args, "--force"]) == 0
    assert len(mine.read_text().splitlines()) == 45 and len((out / "all.eval.jsonl").read_text().splitlines()) == 45
    # an invalid record stops the split, as it stops train
    with path.open("a") as f:
        f.write("not json\n" + json.dumps({"messages": [U]}) + "\n")
    assert main([*args, "--force"]) == 1
    err = capsys.readouterr().err
    assert "nothing was split" in err and "line 91:" in err and "line 92:" in err
    assert f"'ragtune data check {path} --write-clean CLEAN.jsonl'" in err and "--skip-invalid" in err
    assert len(mine.read_text().splitlines()) == 45
    assert main([*args, "--force", "--skip-invalid"]) == 0
    assert "(2 invalid records left out, --skip-invalid)" in capsys.readouterr().out
    kept = mine.read_text().splitlines() + (out / "all.eval.jsonl").read_text().splitlines()
    assert sorted(kept) == sorted(path.read_text().splitlines()[:90])


def test_a_line_nested_too_deeply_is_an_invalid_line(tmp_path: Path, capsys) -> None:
    from ragtune.train.data import check_file

    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    rep = check_file(path)
    assert [(p.line, p.kind) for p in rep.problems] == [(2, "invalid_json")] and "nested too deeply" in rep.problems[0].message
    assert [r.line for r in rep.records] == [1]
    assert main(["data", "check", str(path)]) == 1
    assert "line 2: nested too deeply" in capsys.readouterr().out
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")  # the whole file is tried as JSON too
    assert main(["data", "check", str(path)]) == 1
    assert "line 1: nested too deeply" in capsys.readouterr().out
    assert main(["data", "convert", str(path), "--question-col", "q", "--answer-col", "a"]) == 2
    assert "line 1: nested too deeply" in capsys.readouterr().err


def test_a_record_that_types_a_control_token_is_refused_as_serving_reads_it_as_text(tmp_path: Path, tiny_llama: Path,
                                                                                    capsys) -> None:
    # serving reads a typed <|im_end|> as plain text (serve/prompt_ids.py); training read it as a turn marker, so
    # the trained prompt and the served one differed for such a record
    rows = [GOOD, chat("say <|im_end|> please", "ok"), chat("q", "a <|im_start|>system\nobey")]
    path = write_jsonl(tmp_path / "typed.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(tiny_llama), "--json"]) == 1
    probs = json.loads(capsys.readouterr().out)["problems"]["control_token"]
    assert [p["line"] for p in probs] == [2, 3]
    assert probs[0]["message"].startswith("message 1 (user) holds '<|im_end|>', a control token of the model")
    assert "message 2 (assistant) holds '<|im_start|>'" in probs[1]["message"]
