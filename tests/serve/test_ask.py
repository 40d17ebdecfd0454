"""`ragtune ask` as a shell script uses it: main(argv), stdout, stderr, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from ragtune.cli import main
from tests.serve.conftest import QA


def test_ask_prints_the_trained_answer_only(tiny_llama: Path, tiny_adapter: Path, capsys) -> None:
    rc = main(["-q", "ask", QA[0][0], f"model.path={tiny_llama}", "--adapter", str(tiny_adapter)])
    out, err = capsys.readouterr()
    assert rc == 0 and out == QA[0][1] + "\n", err


def test_ask_with_an_adapter_loads_the_base_it_was_trained_on(tiny_adapter: Path, capsys, caplog) -> None:
    """No model.path (and no default model prepared in this RAGTUNE_HOME): the run card names the base."""
    rc = main(["ask", QA[0][0], "--adapter", str(tiny_adapter)])
    out, err = capsys.readouterr()
    assert rc == 0 and out == QA[0][1] + "\n", err
    assert "using the adapter's base model" in caplog.text


def test_ask_reads_stdin_and_gives_json(tiny_llama: Path, tiny_adapter: Path, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(QA[1][0] + "\n"))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model:\n  path: {tiny_llama}\n  adapter: {tiny_adapter}\n")
    rc = main(["-q", "ask", "-", "--json", "--no-rag", "--max-new-tokens", "12", "--temperature", "0",
               "--config", str(cfg)])
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert rc == 0 and data["answer"] == QA[1][1] and data["mode"] == "ft" and data["sources"] == []
    assert data["prompt_tokens"] > 0 and 0 < data["completion_tokens"] <= 12 and data["abstained"] is False
    assert {"ttft_s", "decode_s", "total_s", "retrieval_s"} <= set(data["timings"])


@pytest.mark.parametrize("argv, message", [
    (["ask", ""], "question is empty"),
    (["ask", "q", "--adapter", "/nonexistent/adapter"], "does not exist; give the train.output_dir"),
    (["ask", "q", "--index", "nosuch"], "nosuch"),
    (["ask", "q", "--engine", "vllm"], "invalid choice"),
    (["ask", "q", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["ask", "--questions", "q.jsonl", "--stream"], "--questions prints whole JSON objects: drop --stream"),
])
def test_ask_errors_exit_2_with_the_reason_on_stderr(tiny_llama: Path, argv, message, capsys) -> None:
    rc = main([*argv, f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and message in err and "Traceback" not in err


def test_ask_engine_llama_cpp_without_the_package_says_how_to_install(tiny_llama: Path, capsys, monkeypatch) -> None:
    import ragtune.serve.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    rc = main(["ask", "q", "--no-rag", "--engine", "llama.cpp", f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "pip install 'ragtune[llamacpp]'" in err and "Traceback" not in err


def test_ask_without_a_prepared_model_says_how_to_prepare(capsys) -> None:
    rc = main(["ask", "q", "--no-rag"])
    assert rc == 2 and "ragtune models prepare" in capsys.readouterr().err


def test_eval_engine_llama_cpp_without_the_package_says_how_to_install(tiny_llama: Path, tmp_path: Path, capsys,
                                                                      monkeypatch) -> None:
    import ragtune.serve.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    rc = main(["eval", "--engine", "llama.cpp", "--modes", "base", "--out", str(tmp_path / "ev"),
               f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 2 and "pip install 'ragtune[llamacpp]'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, stdin, message", [
    (["ask", "caf\udce9?"], "", "the question is not valid text: byte 0xe9 at character 3 is not UTF-8"),
    (["ask", "-"], "caf\udce9?\n", "the question is not valid text: byte 0xe9 at character 3 is not UTF-8"),
    (["ask", "a\ud800b"], "", "character 1 is a lone surrogate"),
    (["ask", "hi", "--system", "\udcff"], "", "--system is not valid text: byte 0xff at character 0"),
])
def test_ask_text_that_is_not_unicode_exits_2_before_loading(tiny_llama: Path, argv, stdin, message, capsys,
                                                             monkeypatch) -> None:
    """Bytes that are not UTF-8 reach argv and stdin as surrogates (a Latin-1 terminal): they ended in a
    UnicodeEncodeError traceback from the tokenizer or the --server client."""
    from ragtune.serve import commands

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setattr(commands, "_LocalAsk", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = main([*argv, "--no-rag", f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and message in err and "Traceback" not in err, err


def test_ask_says_on_stderr_when_the_answer_was_cut_off(tiny_llama: Path, capsys) -> None:
    """Plain output of an answer cut by --max-new-tokens looked like a whole answer; now stderr says so (stdout
    stays the answer alone)."""
    rc = main(["-q", "ask", "hello", f"model.path={tiny_llama}", "--no-rag", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0 and "cut off at 3 tokens; --max-new-tokens N allows" in err, err
    assert "cut off" not in out


class _Stdout(io.StringIO):
    """stdout that keeps each write apart, is a terminal or a pipe, and can take Ctrl-C at its Nth write."""

    def __init__(self, tty: bool, interrupt_at: int = 0) -> None:
        super().__init__()
        self.tty, self.interrupt_at, self.writes = tty, interrupt_at, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        n = super().write(s)
        self.writes.append(s)
        if len(self.writes) == self.interrupt_at:
            raise KeyboardInterrupt
        return n


@pytest.mark.parametrize("flags, tty, streamed", [
    (["--stream"], False, True),   # forced on a pipe
    (["--no-stream"], True, False),
    ([], False, False),            # default on a pipe: the whole answer at once
    ([], True, True),              # default on a terminal: token by token
])
def test_ask_streams_the_same_answer_on_a_terminal_or_when_asked(tiny_llama: Path, tiny_adapter: Path, flags, tty,
                                                                 streamed, capsys, monkeypatch) -> None:
    """Plain ask printed nothing until the whole answer was decoded; now it streams where someone watches,
    and the streamed text is the whole answer's, byte for byte."""
    out = _Stdout(tty)
    monkeypatch.setattr("sys.stdout", out)
    rc = main(["-q", "ask", QA[0][0], f"model.path={tiny_llama}", "--adapter", str(tiny_adapter), *flags])
    assert rc == 0, capsys.readouterr().err
    assert out.getvalue() == QA[0][1] + "\n"
    assert (len([w for w in out.writes if w.strip()]) > 2) == streamed, out.writes


def test_ask_stream_interrupted_keeps_what_was_printed_and_exits_130(tiny_llama: Path, tiny_adapter: Path, capsys,
                                                                    monkeypatch) -> None:
    out = _Stdout(tty=True, interrupt_at=2)
    monkeypatch.setattr("sys.stdout", out)
    rc = main(["-q", "ask", QA[0][0], f"model.path={tiny_llama}", "--adapter", str(tiny_adapter)])
    printed = out.getvalue()
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert printed.endswith("\n") and QA[0][1].startswith(printed[:-1]) and len(printed) < len(QA[0][1]), printed
