"""`ragtune ask --server URL` streams the answer from the server's server-sent events, against a real uvicorn
server on the tiny model: the same text as the whole answer, Ctrl-C that hangs up (and so stops the
server's decode), errors before and during the stream, and a response cut into small pieces on the wire.

Faults are injected on the server's side where a real model would not fail on cue: its decode slowed or
made to raise after N tokens (the Generator's `_run`, wrapped), a TCP proxy that hands the answer on in
small pieces or drops the connection after N events."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from tests.conftest import free_port, start_server
from tests.serve.conftest import QA, FakeRetriever
from tests.serve.test_ask import _Stdout

KEY = "k-stream"
ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Tell me a long story about the sea"
# --schema makes the tiny models talk: LONG is ~700 tokens of JSON, ODD a string of glued-together tokens
LONG = {"type": "array", "items": {"enum": ["sea", "wave", "ship", "바다"]}, "minItems": 100, "maxItems": 100}
ODD = {"type": "string", "pattern": "^[a-z ]{60,80}$"}


@pytest.fixture
def server(tmp_path: Path, tiny_llama: Path, tiny_adapter: Path, loaded_gen: Any, capsys) -> Any:
    """(url, app): deployments `policies` (the adapter that answers QA), `base`, and `policies+rag` over a
    fake index whose passages are partly Korean."""
    from ragtune.config import load_config
    from ragtune.serve.server import create_app

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  api_key: {KEY}\n  deployments:\n"
                 f"    - {{name: policies, adapter: {tiny_adapter}}}\n    - {{name: base}}\n"
                 f"    - {{name: policies+rag, adapter: {tiny_adapter}, index: t}}\n")
    hits = [{**h, "text": "재택근무는 주 3일까지 가능합니다 ✓ " + h["text"]} for h in FakeRetriever().hits]
    app = create_app(load_config(f), generator=loaded_gen, retrievers={"t": FakeRetriever(hits)})
    srv, t, port = start_server(app)
    capsys.readouterr()
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    t.join(10)


def _ask(url: str, *argv: str) -> list[str]:
    return ["-q", "ask", *argv, "--server", url, "--api-key", KEY, "--temperature", "0"]


def _run(argv: list[str], tty: bool, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> tuple[int, _Stdout, str]:
    out = _Stdout(tty)
    with monkeypatch.context() as m:
        m.setattr("sys.stdout", out)
        rc = main(argv)
    return rc, out, capsys.readouterr().err


def _schema(tmp_path: Path, schema: Any) -> list[str]:
    if schema is None:
        return []
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema), encoding="utf-8")
    return ["--schema", str(f)]


def _streamed(out: _Stdout) -> bool:
    return len([w for w in out.writes if w.strip()]) > 2


def _wrap_decode(gen: Any, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0, fail_after: int | None = None) -> list:
    """The server's decode with `delay` s per token, raising after `fail_after` tokens; the list gets each
    run's stats (tokens, finish_reason) when it ends."""
    runs: list[dict[str, Any]] = []
    real = gen._run

    def run(job: Any, on_token: Any, cancel: Any) -> dict[str, Any]:
        n = [0]

        def put(tid: int) -> None:
            n[0] += 1
            if fail_after is not None and n[0] > fail_after:
                raise RuntimeError("injected fault: the decode broke")
            time.sleep(delay)
            on_token(tid)

        stats = real(job, put, cancel)
        runs.append(stats)
        return stats

    monkeypatch.setattr(gen, "_run", run)
    return runs


@pytest.mark.parametrize("flags, tty, streamed", [
    (["--stream"], False, True),   # forced on a pipe
    (["--no-stream"], True, False),
    ([], False, False),            # default on a pipe: the whole answer at once
    ([], True, True),              # default on a terminal: as the server decodes it
])
def test_ask_server_streams_the_same_answer_on_a_terminal_or_when_asked(server: Any, flags: list[str], tty: bool,
                                                                        streamed: bool, capsys, monkeypatch) -> None:
    """`ask --server` refused --stream and printed nothing on a terminal until the server's answer was whole;
    now it streams by local ask's rule, the same text byte for byte."""
    url, _ = server
    rc, out, err = _run(_ask(url, QA[0][0], "--model", "policies", *flags), tty, monkeypatch, capsys)
    assert rc == 0, err
    assert out.getvalue() == QA[0][1] + "\n"
    assert _streamed(out) == streamed, out.writes


@pytest.mark.parametrize("model, schema, tokens", [
    ("base", None, "40"),                # the untrained base model: newlines only (whitespace held, then dropped)
    ("policies", ODD, "60"),             # odd tokens glued together: '" secthree days per weekveve...'
    ("base", LONG, "40"),                # cut by --max-new-tokens inside the JSON
])
def test_ask_server_stream_is_the_whole_answer_byte_for_byte(server: Any, tmp_path: Path, model: str, schema: Any,
                                                             tokens: str, capsys, monkeypatch) -> None:
    """Streamed and whole, the same bytes on stdout and the same stderr: a cut answer's note names the token
    count (from the stream's usage chunk)."""
    url, _ = server
    argv = _ask(url, QUESTION, "--model", model, "--max-new-tokens", tokens, *_schema(tmp_path, schema))
    rc, whole, err_whole = _run([*argv, "--no-stream"], False, monkeypatch, capsys)
    assert rc == 0, err_whole
    rc, streamed, err = _run([*argv, "--stream"], False, monkeypatch, capsys)
    assert rc == 0, err
    assert streamed.getvalue() == whole.getvalue() and len(whole.writes) == 1
    assert err == err_whole
    if schema is not None:
        assert _streamed(streamed) and len(whole.getvalue()) > 30, whole.getvalue()
    if model == "base":
        assert err == f"note: the answer was cut off at {tokens} tokens; --max-new-tokens N allows a longer one\n"


class _Proxy:
    """A TCP proxy in front of the server: the response goes on in `piece`-byte writes (each its own TCP
    segment, a pause between them), and with `cut_after` the connection is dropped once that many SSE
    events (blank-line ends) have gone through."""

    def __init__(self, port: int, piece: int = 0, cut_after: int = 0) -> None:
        self.upstream, self.piece, self.cut_after = port, piece, cut_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.cut = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(down,), daemon=True).start()

    def _one(self, down: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def requests() -> None:
            try:
                while block := down.recv(65536):
                    up.sendall(block)
            except OSError:
                pass

        threading.Thread(target=requests, daemon=True).start()
        events = 0
        tail = b""
        try:
            while block := up.recv(65536):
                for i in range(0, len(block), self.piece or len(block)):
                    part = block[i:i + (self.piece or len(block))]
                    if self.cut_after:
                        seen = tail + part
                        ends = [j for j in range(len(seen)) if seen.startswith(b"\n\n", j) and j + 2 > len(tail)]
                        if events + len(ends) >= self.cut_after:
                            stop = ends[self.cut_after - events - 1] + 2 - len(tail)
                            down.sendall(part[:stop])
                            self.cut.set()
                            return
                        events += len(ends)
                        tail = seen[-1:]
                    down.sendall(part)
                    if self.piece:
                        time.sleep(0.0005)
        except OSError:
            pass
        finally:
            for s in (down, up):  # shut down first: the request thread is blocked in recv on `down`
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


def test_ask_server_stream_read_in_small_pieces_is_the_same(server: Any, capsys, monkeypatch) -> None:
    """Chunk sizes, SSE lines and UTF-8 characters split across reads: the answer (and, in its dict, the
    sources with Korean text from the first and last chunks) come out whole."""
    from ragtune.serve.cli import remote_ask_args
    from ragtune.serve.commands import _RemoteAsk

    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    proxy = _Proxy(port, piece=4)
    try:
        rc, out, err = _run(_ask(proxy.url, QA[0][0], "--model", "policies", "--stream"), False, monkeypatch, capsys)
        assert rc == 0, err
        assert out.getvalue() == QA[0][1] + "\n" and _streamed(out)

        asker = _RemoteAsk(remote_ask_args(["ask", "q", "--server", proxy.url, "--api-key", KEY, "--model",
                                            "policies+rag", "--temperature", "0", "--max-new-tokens", "12"]), proxy.url)
        whole = asker.ask(QA[0][0], "")
        got = asker.ask_streamed(QA[0][0], "", io.StringIO())
    finally:
        proxy.close()
    assert "재택근무" in json.dumps(whole["sources"], ensure_ascii=False) and whole["mode"] == "ft+rag", whole
    for k in ("answer", "sources", "mode", "prompt_tokens", "completion_tokens", "finish_reason", "model"):
        assert got[k] == whole[k], k


def test_ask_server_connection_dropped_mid_answer_keeps_the_text_and_says_so(server: Any, capsys,
                                                                               monkeypatch) -> None:
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    for cut, printed in ((4, True), (1, False)):  # after 3 content deltas; after the first (role) chunk only
        proxy = _Proxy(port, cut_after=cut)
        try:
            rc, out, err = _run(_ask(proxy.url, QA[0][0], "--model", "policies", "--stream"), False, monkeypatch,
                                capsys)
        finally:
            proxy.close()
        assert proxy.cut.is_set() and rc == 1, (rc, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: the server at {proxy.url} closed the connection before the answer was "
                              "complete"), err
        text = out.getvalue()
        if printed:
            assert text.endswith("\n") and QA[0][1].startswith(text[:-1]) and len(text) > 3, text
        else:
            assert text == "", text


def test_ask_server_errors_before_the_stream_name_the_server(server: Any, capsys, monkeypatch) -> None:
    url, _ = server
    rc, out, err = _run(_ask(url, "hi", "--model", "nope", "--stream"), False, monkeypatch, capsys)
    assert rc == 2 and out.getvalue() == "" and "Traceback" not in err
    assert err.startswith(f"error: the server at {url} answered /v1/chat/completions with 404: ") and "nope" in err, err
    argv = ["-q", "ask", "hi", "--server", url, "--api-key", "wrong", "--model", "policies", "--stream"]
    rc, out, err = _run(argv, True, monkeypatch, capsys)
    assert rc == 1 and out.getvalue() == "" and f"the server at {url} refused the request (401" in err, err
    rc, out, err = _run(_ask(f"http://127.0.0.1:{free_port()}", "hi", "--model", "x", "--stream"), True, monkeypatch,
                        capsys)
    assert rc == 1 and out.getvalue() == "" and "no ragtune server answers at" in err and "Traceback" not in err


def test_ask_server_error_event_mid_answer_keeps_the_text_and_exits_1(server: Any, loaded_gen: Any, tmp_path: Path,
                                                                        capsys, monkeypatch) -> None:
    """The server's decode fails after 30 tokens: its headers are sent, so the error comes in-band (an SSE
    error event); what was printed stays, its line ended, and the error names the server in one line."""
    url, _ = server
    _wrap_decode(loaded_gen, monkeypatch, fail_after=30)
    rc, out, err = _run(_ask(url, QUESTION, "--model", "base", "--max-new-tokens", "300", "--stream",
                             *_schema(tmp_path, LONG)), False, monkeypatch, capsys)
    text = out.getvalue()
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, (rc, err)
    assert err.startswith(f"error: the server at {url} ended the answer with an error: ") and "injected fault" in err
    assert text.endswith("\n") and text.startswith('["') and _streamed(out), out.writes


def test_ask_server_grammar_given_up_on_is_an_in_band_400_exit_2(server: Any, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """A --schema that passes the up-front check but whose grammar the server gives up on at the first token:
    the error event of an invalid_request_error is the request's fault (exit 2), nothing printed."""
    url, _ = server
    schema = tmp_path / "huge.json"
    schema.write_text(json.dumps({"type": "string", "pattern": "^(a{1000}){1000}$"}), encoding="utf-8")
    rc, out, err = _run(_ask(url, "hi", "--model", "base", "--max-new-tokens", "8", "--schema", str(schema),
                             "--stream"), False, monkeypatch, capsys)
    assert rc == 2 and out.getvalue() == "" and "Traceback" not in err, (rc, err)
    assert err.startswith(f"error: the server at {url} ended the answer with an error: ") and "too many" in err, err


def test_ask_server_ctrl_c_keeps_the_text_hangs_up_and_exits_130(server: Any, loaded_gen: Any, tmp_path: Path,
                                                                monkeypatch) -> None:
    """SIGINT to a real `ragtune ask --server --stream` process while the server decodes slowly: what was
    printed stays (its line ended), exit 130 with `interrupted`, and the server's decode is cancelled
    long before its 300 tokens."""
    url, app = server
    runs = _wrap_decode(loaded_gen, monkeypatch, delay=0.03)
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # xdist ignores SIGINT
            "from ragtune.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k not in ("RAGTUNE_SERVER", "RAGTUNE_API_KEY")}
    argv = _ask(url, QUESTION, "--model", "base", "--max-new-tokens", "300", "--stream", *_schema(tmp_path, LONG))
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "PYTHONPATH": str(ROOT)})
    try:
        first = b""
        while len(first) < 12 and proc.poll() is None:  # the first items, printed as they came
            first += proc.stdout.read1(1 << 16)
        os.kill(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (first + rest).decode(), err.decode()
    assert proc.returncode == 130 and err == "interrupted\n", (proc.returncode, err)
    assert len(first) >= 12 and out.startswith('["') and out.endswith("\n") and '"]' not in out, out
    deadline = time.time() + 30
    while (not runs or app.state.runtime.pending) and time.time() < deadline:
        time.sleep(0.05)
    assert runs and runs[0]["finish_reason"] == "cancelled" and runs[0]["tokens"] < 300, runs
    assert app.state.runtime.pending == 0  # the request has left the server's queue


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_ask_server_into_a_reader_that_has_gone_ends_quietly_141(server: Any, tmp_path: Path, stream: str) -> None:
    """`ragtune ask --server URL ... | head -c 1`: the pipe's reader leaves early. The fast path printed
    "error: [Errno 32] Broken pipe" and exited 1; it now ends as the full CLI does (and a SIGPIPE'd tool):
    exit 141, nothing on stderr."""
    url, _ = server
    env = {k: v for k, v in os.environ.items() if k not in ("RAGTUNE_SERVER", "RAGTUNE_API_KEY")}
    argv = _ask(url, QUESTION, "--model", "base", "--max-new-tokens", "300", stream, *_schema(tmp_path, LONG))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first word
    try:
        proc = subprocess.run([sys.executable, "-m", "ragtune", *argv], stdout=write, stderr=subprocess.PIPE,
                              env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")
