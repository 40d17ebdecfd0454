"""ragtune/client.py's own HTTP/1.1 over a socket (plain http to a local server), against a real
http.server: Content-Length, chunked transfer coding, errors with the server's message, no server;
EventStream (server-sent events read as they arrive, split anywhere, errors in-band and a stream cut
short); and read_batch, the --questions/--queries file reader."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from ragtune.client import EventStream, _dechunked, _EndedEarly, get_json, post_json, read_batch
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
        if self.path.startswith("/sse"):
            return self._sse(body)
        if body.get("bad"):
            return self._send(422, {"error": {"message": "field 'bad' is not allowed"}})
        if body.get("small"):
            return self._send(200, {"ok": True})
        self._send(200, {"echo": body, "text": "한국어 ✓ " * 500}, chunked=True)


    def _sse(self, body: dict[str, Any]) -> None:
        """SSE_WIRE (or body["wire"]), chunked, written `piece` bytes at a time (each its own TCP segment)."""
        wire = body.get("wire", SSE_WIRE).encode()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in _split(wire, 11))
        framed += b"" if body.get("cut") else b"0\r\n\r\n"
        try:
            for i in range(0, len(framed), body["piece"]):
                self.wfile.write(framed[i:i + body["piece"]])
                self.wfile.flush()
                time.sleep(0.0005)
        except OSError:  # the client hung up (it stops reading at an error event)
            self.close_connection = True


def _split(b: bytes, n: int) -> list[bytes]:
    return [b[i:i + n] for i in range(0, len(b), n)]


# what an OpenAI-compatible server may send: a comment, CRLF line ends, "data:" without its space, an event
# of two data lines, a field that is not data, UTF-8 characters split by any read
EVENTS = [{"n": 1, "text": "재택근무 ✓"}, {"n": 2, "text": "line\nbreak"}, {"n": 3, "text": "a b"}]
SSE_WIRE = (": keep-alive\n\n"
            f"data: {json.dumps(EVENTS[0], ensure_ascii=False)}\r\n\r\n"
            f"event: chunk\ndata:{json.dumps(EVENTS[1])}\n\n"
            'data: {"n": 3,\ndata: "text": "a b"}\n\n'
            "data: [DONE]\n\n")


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


def test_dechunked_whatever_the_reads_boundaries() -> None:
    data = "재택근무 days ✓\n".encode() * 5
    framed = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in _split(data, 7)) + b"0\r\n\r\n"
    for cut in range(len(framed) + 1):
        reads = [r for r in (framed[:cut], framed[cut:]) if r]  # a read is never empty but at the end
        assert b"".join(_dechunked(iter(reads))) == data, cut
    assert b"".join(_dechunked(iter(_split(framed, 1)))) == data
    with pytest.raises(_EndedEarly):
        b"".join(_dechunked(iter([framed[:-7]])))


class _Pieces:
    """A response whose body arrives in the given reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = [r for r in reads if r]  # a read is never empty but at the end

    def read(self) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def close(self) -> None:
        pass


def _events(reads: list[bytes]) -> list[Any]:
    es = EventStream.__new__(EventStream)
    es.url, es.path, es._resp = "http://server", "/sse", _Pieces(reads)
    return list(es)


def test_event_stream_events_split_anywhere() -> None:
    """Every place a read can end (inside a line, a CRLF, a UTF-8 character) gives the same events."""
    wire = SSE_WIRE.encode()
    for cut in range(len(wire) + 1):
        assert _events([wire[:cut], wire[cut:]]) == EVENTS, cut
    assert _events(_split(wire, 1)) == EVENTS


@pytest.mark.parametrize("via", ["socket", "urllib"])
def test_event_stream_in_small_pieces(url: str, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over ragtune's own socket client, and through urllib (its path for https and proxies)."""
    if via == "urllib":  # a proxy that 127.0.0.1 bypasses: urllib's path, straight to the test server
        monkeypatch.setattr("ragtune.client._LOOPBACK", ())
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
    for piece in (1, 3, 64):
        with EventStream(url, "/sse", {"piece": piece}, "k") as events:
            assert list(events) == EVENTS, piece
    with pytest.raises(RagtuneError, match="closed the connection before the answer was complete"):
        list(EventStream(url, "/sse", {"piece": 5, "wire": SSE_WIRE[:-15], "cut": True}))
    with pytest.raises(UsageError, match=r"answered /v1/x with 422: field 'bad' is not allowed"):
        EventStream(url, "/v1/x", {"bad": True}, "k")


def test_event_stream_errors_name_the_server(url: str) -> None:
    """An error event (the request's fault: UsageError; the server's: RagtuneError), a stream cut inside a
    chunk or between events, an event that is not JSON, and an HTTP error before the stream."""
    first = f"data: {json.dumps(EVENTS[0], ensure_ascii=False)}\n\n"
    bad = 'data: {"error": {"message": "grammar too complex", "type": "invalid_request_error"}}\n\ndata: [DONE]\n\n'
    got: list[Any] = []
    with pytest.raises(UsageError, match=f"^the server at {url} ended the answer with an error: grammar too complex$"):
        for event in EventStream(url, "/sse", {"piece": 5, "wire": first + bad}):
            got.append(event)
    assert got == EVENTS[:1]  # what came before the error was read
    with pytest.raises(RagtuneError, match="ended the answer with an error: boom") as exc:
        list(EventStream(url, "/sse", {"piece": 5, "wire": 'data: {"error": {"message": "boom", "type": '
                                                             '"server_error"}}\n\n'}))
    assert not isinstance(exc.value, UsageError)
    cut = f"^the server at {url} closed the connection before the answer was complete .*only part of the answer$"
    for wire, chunked_cut in ((first, False), (first, True), (first + "data: {\"n\"", True)):
        with pytest.raises(RagtuneError, match=cut):
            list(EventStream(url, "/sse", {"piece": 5, "wire": wire, "cut": chunked_cut}))
    with pytest.raises(RagtuneError, match=r"sent an event on /sse that is not JSON: 'oops'"):
        list(EventStream(url, "/sse", {"piece": 5, "wire": "data: oops\n\n"}))
    with pytest.raises(UsageError, match=r"answered /v1/x with 422: field 'bad' is not allowed"):
        EventStream(url, "/v1/x", {"bad": True}, "k")
    with pytest.raises(RagtuneError, match=r"answered /v1/x with application/json, not a stream of server-sent"):
        EventStream(url, "/v1/x", {"small": True}, "k")  # a server that ignored "stream": true
    with pytest.raises(RagtuneError, match="no ragtune server answers at"):
        EventStream(f"http://127.0.0.1:{free_port()}", "/sse", {})
