"""`ragtune chat`: streamed multi-turn answers, commands, retrieval on follow-ups."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ragtune.cli import main
from ragtune.serve.chat_repl import ChatSession
from tests.serve.conftest import QA, FakeRetriever


def test_chat_cli_streams_trained_answers_over_turns(tiny_llama: Path, tiny_adapter: Path, capsys, monkeypatch) -> None:
    script = f"{QA[0][0]}\n/help\n/sources\n/reset\n{QA[1][0]}\n/rag on\n/bogus\n/exit\nnever asked\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc = main(["-q", "chat", f"model.path={tiny_llama}", "--adapter", str(tiny_adapter), "--no-rag"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == QA[0][1] and lines.index(QA[1][1]) > lines.index("(conversation cleared)")
    assert "(no sources for the last answer)" in lines and "(conversation cleared)" in lines
    assert "(retrieval stays off: no index could be opened)" in lines and any("unknown command" in x for x in lines)
    assert "never asked" not in out


def test_chat_session_rag_sources_and_follow_up_queries(loaded_gen: Any) -> None:
    out, r = io.StringIO(), FakeRetriever()
    s = ChatSession(loaded_gen, adapter="policies", retriever=r, out=out, err=io.StringIO())
    s.loop(io.StringIO("remote work?\nhow many days\n/sources\n/rag off\n/reset\n" + QA[0][0] + "\n/rag on\n/exit\n"))
    text = out.getvalue()
    assert r.queries == ["remote work?", "remote work?\nhow many days"]  # follow-ups search with recent turns
    assert "[1] Remote work > Remote > Days - policies/remote.md  relevance 0.82" in text
    assert "[2] Expenses > Deadlines (page 2) - policies/expenses.pdf" in text
    assert "(retrieval off)" in text and "(retrieval on)" in text
    assert len(r.queries) == 2  # nothing searched while retrieval was off
    assert s.last_answer.text == QA[0][1] and s.last_answer.mode == "ft"
    assert [m["role"] for m in s.history] == ["user", "assistant"]


def test_chat_reports_errors_and_keeps_going(loaded_gen: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(loaded_gen, adapter="policies", out=out, err=err)
    s.loop(io.StringIO("word " * 3000 + "\n" + QA[1][0] + "\n"))
    assert "context" in err.getvalue() and QA[1][1] in out.getvalue().splitlines()
    assert len(s.history) == 2
    assert "/reset" not in err.getvalue()  # nothing to reset when the first question is too long
    s.loop(io.StringIO("word " * 3000 + "\n"))  # /reset would not help either: the question alone is too long
    assert err.getvalue().rstrip().endswith("ask a shorter question or use a model with a longer context")
    assert "/reset" not in err.getvalue() and len(s.history) == 2  # the conversation stays


def test_source_labels_do_not_repeat_the_title() -> None:
    from ragtune.serve.answer import source_label, to_source

    assert source_label({"title": "HR Handbook", "heading": "HR Handbook > Leave", "page": None}) == "HR Handbook > Leave"
    assert source_label({"title": "HR Handbook", "heading": "HR Handbook", "page": 3}) == "HR Handbook (page 3)"
    assert source_label({"title": "", "source": "a.txt", "heading": "Intro", "page": None}) == "a.txt > Intro"
    hit = {"source": "a.md", "title": "A", "score": 0.016, "dense_score": 0.61, "text": "t"}
    assert to_source(hit, 1)["score"] == 0.61
    assert to_source({**hit, "rerank_score": 3.5}, 1)["score"] == 3.5
    assert to_source({"source": "a.md", "score": 0.2}, 1)["score"] == 0.2  # nothing better known


def test_chat_takes_any_bytes_and_says_what_a_command_takes(loaded_gen: Any) -> None:
    """A Latin-1 terminal's bytes (surrogateescape on stdin) used to end the session with a tokenizer
    traceback; commands are case-blind, say what they take, and '//' asks a question starting with '/'."""
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(loaded_gen, adapter="policies", out=out, err=err)
    latin1 = b"caf\xe9?".decode("utf-8", "surrogateescape")
    s.loop(io.StringIO(f"{latin1}\nlone \ud800 surrogate\n/rag maybe\n/rag\n/RESET\n/sources now\n"
                       f"//etc/hosts is what?\n{QA[0][0]}\n"))
    text = out.getvalue()
    assert "(/rag takes on or off, got 'maybe')" in text and "(/rag takes on or off: /rag on, /rag off)" in text
    assert "(conversation cleared)" in text and "(/sources takes nothing after it" in text
    assert not err.getvalue(), err.getvalue()
    assert QA[0][1] in text.splitlines() and s.history[-2]["content"] == QA[0][0]
    assert "/etc/hosts is what?" in [m["content"] for m in s.history]
    assert all(m["content"].encode("utf-8") for m in s.history)  # every turn is valid Unicode


def test_chat_takes_a_pasted_paragraph_between_triple_quotes_and_bye_exits(loaded_gen: Any) -> None:
    """A pasted paragraph was asked line by line, one question (and one answer) per line; between \"\"\" lines it
    is one message, as in Ollama. /bye (Ollama's exit) was an unknown command."""
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(loaded_gen, adapter="policies", out=out, err=err)
    s.loop(io.StringIO('"""Summarise this:\nline two\n\nline four"""\n"""\nalone\n"""\n/bye\nnever asked\n'))
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["Summarise this:\nline two\n\nline four",
                                                                       "alone"]
    assert not err.getvalue() and "never asked" not in [m["content"] for m in s.history]


def test_chat_says_when_an_answer_was_cut_off(loaded_gen: Any) -> None:
    out = io.StringIO()
    s = ChatSession(loaded_gen, out=out, err=io.StringIO())
    s.loop(io.StringIO("hello\n"))
    assert s.last_answer.finish_reason == "length"
    assert f"(cut off at {s.last_answer.completion_tokens} tokens; --max-new-tokens N" in out.getvalue()


class _CtrlCAt(io.StringIO):
    """Output that takes Ctrl-C at its Nth flush (the REPL flushes after each streamed delta)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.flushes = at, 0

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes == self.at:
            raise KeyboardInterrupt


def test_chat_ctrl_c_keeps_the_partial_answer_in_the_conversation(loaded_gen: Any) -> None:
    """Ctrl-C mid-answer dropped the question and the words so far, so the next question lost that context
    (the web page's Stop keeps them). Now they stay, marked (stopped), and the session goes on."""
    out = _CtrlCAt(2)
    s = ChatSession(loaded_gen, adapter="policies", out=out, err=io.StringIO())
    s.loop(io.StringIO(f"{QA[0][0]}\n{QA[1][0]}\n"))
    partial = out.getvalue().split("\n(stopped)\n")[0]
    assert partial and QA[0][1].startswith(partial) and partial != QA[0][1], out.getvalue()
    assert s.history == [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": partial},
                         {"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": s.last_answer.text}]
    assert partial in s.last_answer.prompt  # the next question was asked with it


def test_chat_keeps_info_log_lines_out_of_the_conversation(loaded_gen: Any, caplog) -> None:
    """Without -q, retrieval's INFO line ('... abstaining') landed between the question and the answer; in the
    REPL it is now a note of the chat's own, and ragtune's log level is back to INFO once the session ends."""
    import logging

    caplog.set_level(logging.INFO, logger="ragtune")
    r = FakeRetriever([{"source": "pets.md", "title": "Pets", "heading": "", "page": None, "score": 0.01,
                        "dense_score": 0.05, "chunk_id": "p1", "text": "Dogs are allowed on Fridays."}])
    out = io.StringIO()
    s = ChatSession(loaded_gen, adapter="policies", retriever=r, out=out, err=io.StringIO())
    s.loop(io.StringIO("can I bring my dog?\n"))
    assert s.last_answer.abstained and "abstaining" not in caplog.text, caplog.text
    assert "(not found in the documents: the best relevance, 0.05, is below rag.min_score)" in out.getvalue()
    assert logging.getLogger("ragtune").level == logging.INFO


def test_questions_are_kept_for_the_next_session_readable_by_their_owner_only(tmp_path, monkeypatch) -> None:
    import readline
    import stat

    from ragtune.serve.chat_repl import kept_history

    path = tmp_path / "home" / "chat_history"
    with kept_history(path):
        readline.add_history("How many remote days?")
    assert path.read_text().splitlines()[-1] == "How many remote days?"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    readline.clear_history()
    with kept_history(path):  # the next session: the up arrow recalls it
        n = readline.get_current_history_length()
        assert n >= 1 and readline.get_history_item(n) == "How many remote days?"
        readline.add_history("And the office day?")
    assert path.read_text().splitlines()[-2:] == ["How many remote days?", "And the office day?"]
    monkeypatch.setenv("RAGTUNE_CHAT_HISTORY", "0")
    other = tmp_path / "off"
    with kept_history(other):
        readline.add_history("private")
    assert not other.exists()
