"""ragtune/client.py's own HTTP/1.1 over a socket (plain http to a local server), against a real
http.server: Content-Length, chunked transfer coding, errors with the server's message, no server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from ragtune.client import get_json, post_json
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
