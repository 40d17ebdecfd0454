"""`ragtune ask --questions FILE` (one process, one JSON line per input) and `ask --server URL`
against a real uvicorn server on the tiny model: the same output as a local ask, 401 without the key."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from tests.conftest import free_port, start_server
from tests.serve.conftest import QA

KEY = "k-batch"


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    from tests.retrieval.conftest import HR_MD, KOREAN_TXT

    d = tmp_path / "docs"
    d.mkdir()
    (d / "hr.md").write_text(HR_MD, encoding="utf-8")
    (d / "seoul.txt").write_text(KOREAN_TXT, encoding="utf-8")
    return d


def test_ask_questions_keeps_order_and_reports_bad_lines(tiny_llama: Path, tiny_adapter: Path, tmp_path: Path,
                                                         capsys) -> None:
    """A text file mixes plain questions with JSON lines: a bad one is reported in its place."""
    f = tmp_path / "q.txt"
    f.write_text(json.dumps({"question": QA[0][0]}) + "\n" + "{not json\n\n" + json.dumps({"q": "x"}) + "\n"
                 + QA[1][0] + "\n", encoding="utf-8")
    rc = main(["-q", "ask", "--questions", str(f), f"model.path={tiny_llama}", "--adapter", str(tiny_adapter),
               "--no-rag", "--engine", "transformers", "--temperature", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 3
    assert [x["line"] for x in lines] == [1, 2, 4, 5]
    assert lines[0]["question"] == QA[0][0] and lines[0]["answer"] == QA[0][1] and lines[0]["mode"] == "ft"
    assert "not valid JSON" in lines[1]["error"] and '"question"' in lines[2]["error"]
    assert lines[3]["answer"] == QA[1][1]


def test_ask_questions_from_stdin_all_good_exits_0(tiny_llama: Path, tiny_adapter: Path, capsys,
                                                   monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QA[1][0]}\n{QA[0][0]}\n"))
    rc = main(["-q", "ask", "--questions", "-", f"model.path={tiny_llama}", "--adapter", str(tiny_adapter),
               "--no-rag", "--engine", "transformers", "--temperature", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [x["answer"] for x in lines] == [QA[1][1], QA[0][1]]


def test_ask_questions_are_answered_in_batched_waves_with_the_one_by_one_answers(
        tiny_llama: Path, tiny_adapter: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """With a batching engine (serve.max_batch 2: waves of 8 lines) the lines are answered together,
    across two waves, in line order; a bad line in a wave is reported and its neighbours answered."""
    from ragtune.serve.generator import Generator

    waves: list[int] = []
    real = Generator.answer_all

    def answer_all(self: Any, requests: Any, **kw: Any) -> Any:
        waves.append(len(requests))
        return real(self, requests, **kw)

    monkeypatch.setattr(Generator, "answer_all", answer_all)
    f = tmp_path / "q.jsonl"
    rows = [json.dumps({"question": QA[i % 2][0]}) for i in range(10)]
    rows[3] = json.dumps({"question": QA[1][0], "system": 5})
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = ["-q", "ask", "--questions", str(f), f"model.path={tiny_llama}", "--adapter", str(tiny_adapter),
              "--no-rag", "--engine", "transformers", "--temperature", "0"]
    runs = {}
    for slots in (2, 1):  # 1: no batch scheduler, one line after another (the reference)
        rc = main([*common, f"serve.max_batch={slots}"])
        runs[slots] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert rc == 3
    assert waves == [7, 2]  # lines 1-8 less the bad one, then 9-10; none with one slot
    batched = runs[2]
    assert [x["line"] for x in batched] == list(range(1, 11))
    assert batched[3] == {"line": 4, "error": 'line 4: "system" must be a string'}
    assert all(x["answer"] == QA[(x["line"] - 1) % 2][1] for x in batched if "error" not in x)
    assert [(x.get("answer"), x.get("error")) for x in batched] == [(x.get("answer"), x.get("error")) for x in runs[1]]


def test_ask_questions_jsonl_with_a_bad_line_asks_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    """In a .jsonl file a line that is not a {"question": ...} object is an error naming the file and
    the line, before any model loads (a broken line was asked as a literal question)."""
    from ragtune.serve import commands

    monkeypatch.setattr(commands, "_LocalAsk", lambda *a, **k: pytest.fail("a model was loaded"))
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": QA[0][0]}) + "\nnot json {\n\n" + json.dumps({"q": "x"}) + "\n"
                 + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    assert main(["-q", "ask", "--questions", str(f), "--no-rag"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"--questions '{f}': 3 lines are not a JSON object with a \"question\" string; nothing was asked" in err
    assert "line 2: invalid JSON: Expecting value at column 1 (near: 'not json {')" in err
    assert 'line 4: no "question" string' in err and "line 5: invalid JSON: nested too deeply" in err
    assert main(["-q", "ask", "--questions", str(tmp_path), "--no-rag"]) == 2
    assert f"--questions '{tmp_path}' is a folder; give a file" in capsys.readouterr().err


def test_ask_needs_a_question_or_a_file(capsys) -> None:
    assert main(["ask"]) == 2
    assert "--questions FILE" in capsys.readouterr().err


@pytest.fixture
def server(tmp_path: Path, tiny_llama: Path, tiny_adapter: Path, tiny_embedder: Path, docs: Path,
           loaded_gen: Any, capsys) -> Any:
    from ragtune.config import load_config
    from ragtune.serve.server import create_app

    assert main(["-q", "index", "add", str(docs), "--index", "t", "--no-progress", f"embedder.path={tiny_embedder}",
                 "embedder.device=cpu"]) == 0
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
                 f"serve:\n  api_key: {KEY}\n  deployments:\n"
                 f"    - {{name: policies, adapter: {tiny_adapter}}}\n"
                 f"    - {{name: policies+rag, adapter: {tiny_adapter}, index: t}}\n")
    app = create_app(load_config(f), generator=loaded_gen)
    srv, t, port = start_server(app)
    capsys.readouterr()
    yield f"http://127.0.0.1:{port}", f
    srv.should_exit = True
    t.join(10)


def _local(cfg_file: Path, tiny_adapter: Path, *argv: str) -> list[str]:
    return ["-q", "ask", *argv, "--config", str(cfg_file), "--adapter", str(tiny_adapter), "--engine",
            "transformers", "--temperature", "0", "--max-new-tokens", "12"]


def test_ask_server_matches_local_ask(server: Any, tiny_adapter: Path, capsys, monkeypatch) -> None:
    url, cfg_file = server
    assert main(_local(cfg_file, tiny_adapter, QA[0][0], "--no-rag")) == 0
    local_plain = capsys.readouterr().out
    assert main(["-q", "ask", QA[0][0], "--server", url, "--api-key", KEY, "--model", "policies",
                 "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == local_plain == QA[0][1] + "\n"

    assert main(_local(cfg_file, tiny_adapter, QA[1][0], "--index", "t", "--json")) == 0
    local = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("RAGTUNE_SERVER", url)
    monkeypatch.setenv("RAGTUNE_API_KEY", KEY)
    assert main(["-q", "ask", QA[1][0], "--model", "policies+rag", "--json", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert set(remote) == set(local)
    for k in ("answer", "sources", "mode", "prompt_tokens", "completion_tokens", "abstained", "index", "engine"):
        assert remote[k] == local[k], k
    assert local["mode"] == "ft+rag" and local["sources"]


def test_ask_server_batch_and_errors(server: Any, tmp_path: Path, capsys, monkeypatch) -> None:
    url, _ = server
    monkeypatch.delenv("RAGTUNE_API_KEY", raising=False)
    assert main(["ask", QA[0][0], "--server", url]) == 1
    err = capsys.readouterr().err
    assert "401" in err and "--api-key" in err
    f = tmp_path / "q.txt"
    f.write_text(f"{QA[0][0]}\n{{\"question\": 5}}\n{QA[1][0]}\n", encoding="utf-8")
    rc = main(["-q", "ask", "--questions", str(f), "--server", url, "--api-key", KEY, "--model", "policies",
               "--temperature", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 3 and [x["line"] for x in lines] == [1, 2, 3]
    assert lines[0]["answer"] == QA[0][1] and "error" in lines[1] and lines[2]["answer"] == QA[1][1]
    assert main(["ask", "hi", "--server", url, "--api-key", KEY, "--no-rag"]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert main(["ask", "hi", "--server", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "no ragtune server answers" in capsys.readouterr().err


def test_search_server_matches_local_search(server: Any, tiny_embedder: Path, tmp_path: Path, capsys) -> None:
    url, _ = server
    emb = [f"embedder.path={tiny_embedder}", "embedder.device=cpu"]
    assert main(["-q", "search", "remote work days", "--index", "t", "--json", *emb]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["-q", "search", "remote work days", "--index", "t", "--json", "--server", url,
                 "--api-key", KEY]) == 0
    remote = json.loads(capsys.readouterr().out)
    keys = ("n", "source", "title", "page", "heading", "text")  # the server's score is its own (not asserted)
    assert [{k: h[k] for k in keys} for h in remote] == [{k: h[k] for k in keys} for h in local]
    assert main(["search", "remote", "--index", "t", "--server", url]) == 1
    assert "401" in capsys.readouterr().err
    f = tmp_path / "q.jsonl"
    f.write_text('{"query": "remote work days"}\n{"query": "x", "mode": "fuzzy"}\nexpense reports\n')
    rc = main(["-q", "search", "--queries", str(f), "--index", "t", "--server", url, "--api-key", KEY])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 3 and [x["line"] for x in lines] == [1, 2, 3]
    assert lines[0]["hits"] and "error" in lines[1] and lines[2]["query"] == "expense reports"


# what a script's `ask/search --server` call must not import: the config, the model and logging
# modules, the other commands' parsers, urllib.request (a socket is enough), the idna codec
NOT_ON_THE_SERVER_PATH = ("ragtune.config", "ragtune.modeling", "ragtune.serve.jobs_cli", "ragtune.retrieval.search",
                          "yaml", "logging", "urllib.request", "encodings.idna", "torch", "transformers",
                          "sentence_transformers", "onnxruntime", "llama_cpp")


def _light(*argv: str) -> tuple[int, list[str], str]:
    """main(argv) in a fresh interpreter: (exit code, which NOT_ON_THE_SERVER_PATH modules it imported, stdout)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from ragtune.cli import main; rc = main(sys.argv[1:]); sys.stdout.flush(); "
            f"print(rc, [m for m in {NOT_ON_THE_SERVER_PATH!r} if m in sys.modules], file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAGTUNE_SERVER", "RAGTUNE_API_KEY")}
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                       env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    rc, _, loaded = p.stderr.strip().splitlines()[-1].partition(" ")
    return int(rc), json.loads(loaded.replace("'", '"')), p.stdout


def test_ask_server_skips_the_full_cli_and_prints_the_same(server: Any, capsys) -> None:
    """`ask --server` is parsed by ask's parser alone, without the config, logging or urllib (a script pays
    less per call); with -v it goes through the full CLI: the same answer either way, and the same usage errors."""
    url, _ = server
    argv = ["ask", QA[0][0], "--server", url, "--api-key", KEY, "--model", "policies", "--temperature", "0",
            "--max-new-tokens", "12", "--json"]
    assert main(argv) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(["-v", *argv]) == 0
    full = json.loads(capsys.readouterr().out)
    for k in ("answer", "mode", "prompt_tokens", "completion_tokens", "model", "sources"):
        assert fast[k] == full[k], k
    assert fast["answer"] == QA[0][1]
    assert main(["ask", "q", "--server", url, "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    rc, loaded, out = _light("-q", *argv)
    assert (rc, loaded) == (0, []) and json.loads(out)["answer"] == QA[0][1]
    rc, loaded, out = _light("ask", QA[0][0], "--server", url, "--model", "policies")  # no key: 401, still light
    assert (rc, loaded, out) == (1, [], "")


def test_search_server_skips_the_full_cli_and_prints_the_same(server: Any, capsys) -> None:
    """`search --server` likewise: its own parser, no config or index modules, the full CLI's exact output."""
    url, _ = server
    for fmt in ([], ["--json"]):
        argv = ["search", "remote work days", "--index", "t", "--top-k", "2", "--server", url, "--api-key", KEY, *fmt]
        assert main(["-v", *argv]) == 0
        full = capsys.readouterr().out
        rc, loaded, out = _light(*argv)
        assert (rc, loaded) == (0, []) and out == full and "remote" in out.lower()
    rc, loaded, out = _light("search", "x", "--server", url, "--api-key", KEY, "--filter", "colour=red")
    assert (rc, loaded, out) == (2, [], "")
    assert main(["search", "x", "--server", url, "--api-key", KEY, "--filter", "colour=red"]) == 2
    assert "cannot filter on 'colour'" in capsys.readouterr().err


def test_ask_questions_line_that_is_not_unicode_is_reported_in_its_place(tiny_llama: Path, tiny_adapter: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """A JSON escape of a lone surrogate is valid JSON: that line ended the whole run in a tokenizer
    TypeError (a UnicodeEncodeError with --server) instead of an error line beside the others' answers."""
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": QA[0][0]}) + "\n" + '{"question": "a\\ud800b"}\n'
                 + json.dumps({"question": QA[1][0], "system": "x\udbff"}) + "\n"
                 + json.dumps({"question": QA[1][0]}) + "\n", encoding="utf-8")
    rc = main(["-q", "ask", "--questions", str(f), f"model.path={tiny_llama}", "--adapter", str(tiny_adapter),
               "--no-rag", "--engine", "transformers", "--temperature", "0"])
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 3 and "Traceback" not in err
    assert [x["line"] for x in lines] == [1, 2, 3, 4]
    assert lines[0]["answer"] == QA[0][1] and lines[3]["answer"] == QA[1][1]
    assert lines[1]["error"].startswith('line 2: "question" is not valid text: character 1 is a lone surrogate')
    assert lines[2]["error"].startswith('line 3: "system" is not valid text: character 1 is a lone surrogate')


def test_ask_engine_openai_streams_the_remote_answer(server: Any, capsys, monkeypatch) -> None:
    """With --engine openai the answer streams from the remote's SSE chunks, the same text as unstreamed
    (`ask --server --stream`: tests/serve/test_ask_server_stream.py)."""
    from tests.serve.test_ask import _Stdout

    url, _ = server
    argv = ["-q", "ask", QA[0][0], "--engine", "openai", "--url", f"{url}/v1", "--model", "policies", "--api-key",
            KEY, "--no-rag", "--temperature", "0", "--max-new-tokens", "12"]
    outs = {}
    for flag in ("--stream", "--no-stream"):
        monkeypatch.setattr("sys.stdout", _Stdout(tty=False))
        assert main([*argv, flag]) == 0, capsys.readouterr().err
        outs[flag] = sys.stdout
    assert outs["--stream"].getvalue() == outs["--no-stream"].getvalue() == QA[0][1] + "\n"
    assert len(outs["--no-stream"].writes) == 1 and len([w for w in outs["--stream"].writes if w.strip()]) > 1
