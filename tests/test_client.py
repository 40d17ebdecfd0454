"""ragtune/client.py's own HTTP/1.1 over a socket (plain http to a local server), against a real
http.server: Content-Length, chunked transfer coding, errors with the server's message, no server;
and read_batch, the --questions/--queries file reader."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from ragtune.client import get_json, post_json, read_batch
from ragtune.errors import RagtuneError, UsageError
from tests.conftest import free_port


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, obj: Any, chunked: bool = False) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(raw), 7):
                part = raw[i:i + 7]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("Authorization") != "Bearer k":
            return self._send(401, {"error": {"message": "missing or wrong API key"}})
        self._send(200, {"path": self.path, "chunked": self.path.endswith("chunked")},
                   chunked=self.path.endswith("chunked"))

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("bad"):
            return self._send(422, {"error": {"message": "field 'bad' is not allowed"}})
        self._send(200, {"echo": body, "text": "한국어 ✓ " * 500}, chunked=True)


@pytest.fixture
def url() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    srv.protocol_version = "HTTP/1.1"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_json_by_length_and_by_chunks(url: str) -> None:
    assert get_json(url, "/v1/models?x=1", "k") == {"path": "/v1/models?x=1", "chunked": False}
    assert get_json(url, "/v1/chunked", "k") == {"path": "/v1/chunked", "chunked": True}
    got = post_json(url, "/v1/search", {"query": "재택근무 days"}, "k")
    assert got["echo"] == {"query": "재택근무 days"} and got["text"] == "한국어 ✓ " * 500


def test_errors_carry_the_servers_message_and_the_fix(url: str) -> None:
    with pytest.raises(RagtuneError, match=r"401: missing or wrong API key\); pass its key with --api-key"):
        get_json(url, "/v1/models", "")
    with pytest.raises(UsageError, match=r"answered /v1/x with 422: field 'bad' is not allowed"):
        post_json(url, "/v1/x", {"bad": True}, "k")
    with pytest.raises(RagtuneError, match="no ragtune server answers at"):
        get_json(f"http://127.0.0.1:{free_port()}", "/v1/models", "k")


def test_read_batch_lenient_and_jsonl_modes(tmp_path: Path) -> None:
    """Lenient: a bad line is a row with its reason and the rest go on. jsonl=True on a .jsonl file:
    every bad line is named in one error; the same lines elsewhere (a .txt) stay lenient."""
    lines = '\ufeff{"question": "a"}\nplain text\n\n{"q": 1}\n[1]\n'
    txt, jl = tmp_path / "q.txt", tmp_path / "q.jsonl"
    txt.write_text(lines, encoding="utf-8")
    jl.write_text(lines, encoding="utf-8")
    want = [(1, {"question": "a"}, ""), (2, {"question": "plain text"}, ""),
            (4, None, 'line 4 has no "question" string'), (5, {"question": "[1]"}, "")]
    assert read_batch(str(txt), "question") == want  # the byte-order mark is not part of line 1
    assert read_batch(str(txt), "question", jsonl=True) == want
    assert read_batch(str(jl), "question") == want
    with pytest.raises(UsageError) as exc:
        read_batch(str(jl), "question", jsonl=True)
    msg = str(exc.value)
    assert msg.startswith(f"--questions '{jl}': 3 lines are not a JSON object with a \"question\" string; nothing was asked")
    assert "line 2: invalid JSON: Expecting value at column 1 (near: 'plain text')" in msg
    assert 'line 4: no "question" string' in msg and "line 5: a JSON list, not an object" in msg
    jl.write_text('{"query": "ok"}\n{"query": " "}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"--queries '.*': 1 line is not .*\n  line 2: \"query\" is not a non-empty"):
        read_batch(str(jl), "query", jsonl=True)
    (tmp_path / "bad.jsonl").write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(UsageError, match=r"--questions '.*bad.jsonl' is not UTF-8 text .*; save it as UTF-8"):
        read_batch(str(tmp_path / "bad.jsonl"), "question", jsonl=True)
    with pytest.raises(UsageError, match="--questions file '.*nope.jsonl' does not exist"):
        read_batch(str(tmp_path / "nope.jsonl"), "question", jsonl=True)
