"""A light client for a running `ragtune serve` (stdlib only, so `--server` calls import nothing heavy).

    body = post_json("http://127.0.0.1:8000", "/v1/search", {"query": "remote days"}, key="")
    events = EventStream(url, "/v1/chat/completions", {..., "stream": True}, key)   # server-sent events
    for event in events: ...                            # each `data:` JSON object as it arrives, to [DONE]
    events.close()                                      # hang up (a ragtune server stops generating)
    rows = read_batch("queries.txt", "query")           # [(line, {"query": ...} or None, error or "")]
    rows = read_batch("q.jsonl", "question", jsonl=True) # a .jsonl file: any bad line is a UsageError

The URL comes from `--server` or RAGTUNE_SERVER, the key from `--api-key` or RAGTUNE_API_KEY.
HTTP errors become RagtuneError/UsageError with the server's own message: 401 says how to pass the
key, 4xx are usage errors (exit 2), anything else (5xx, no server) exit 1. A stream's in-band error
event and a connection that ends before `data: [DONE]` are errors naming the server too.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator

from ragtune.errors import RagtuneError, UsageError

SERVER_ENV = "RAGTUNE_SERVER"
API_KEY_ENV = "RAGTUNE_API_KEY"
TIMEOUT_S = 600.0


def server_url(flag: str | None) -> str:
    url = (flag if flag is not None else os.environ.get(SERVER_ENV, "")).strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise UsageError(f"--server '{url}' is not an http(s) URL; e.g. --server http://127.0.0.1:8000")
    return url


def api_key(flag: str | None) -> str:
    return flag if flag is not None else os.environ.get(API_KEY_ENV, "")


def _request(url: str, path: str, body: dict[str, Any] | None, key: str) -> Any:
    data, headers = _encode(body, key, "application/json")
    try:
        status, reason, raw = _send(url + path, data, headers)
    except OSError as exc:
        raise _unreachable(url, exc) from None
    if status >= 400:
        raise _http_error(url, path, status, reason, raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise RagtuneError(f"the server at {url} answered {path} with something that is not JSON ({exc})") from None


def _encode(body: dict[str, Any] | None, key: str, accept: str) -> tuple[bytes | None, dict[str, str]]:
    headers = {"Accept": accept}
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return data, headers


def _unreachable(url: str, exc: OSError) -> RagtuneError:
    return RagtuneError(f"no ragtune server answers at {url} ({getattr(exc, 'reason', exc)}); start one with "
                        f"'ragtune serve' or fix --server / {SERVER_ENV}")


def _http_error(url: str, path: str, status: int, reason: str, raw: bytes) -> RagtuneError:
    text = raw.decode("utf-8", "replace")
    try:
        msg = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = text.strip()[:300] or reason
    if status == 401:
        return RagtuneError(f"the server at {url} refused the request (401: {msg}); pass its key with "
                            f"--api-key KEY or {API_KEY_ENV}")
    cls = UsageError if 400 <= status < 500 else RagtuneError
    return cls(f"the server at {url} answered {path} with {status}: {msg}")


class EventStream:
    """POST `body` to a route that answers with server-sent events (OpenAI's `"stream": true`): iterate
    for each event's `data:` JSON object as it arrives, up to `data: [DONE]`.

    An HTTP error before the stream raises as post_json does (when the object is made). During it, an
    event `{"error": {...}}` (how an OpenAI-compatible server reports a failure once its headers are
    sent), a stream that ends before [DONE], a broken connection or a malformed event raise RagtuneError
    naming the server (UsageError for an `invalid_request_error`: the request's fault, as a 4xx is).
    close() hangs up, which makes a ragtune server stop generating."""

    def __init__(self, url: str, path: str, body: dict[str, Any], key: str = "") -> None:
        self.url, self.path = url, path
        data, headers = _encode(body, key, "text/event-stream")
        try:
            self._resp = _open(url + path, data, headers)
        except OSError as exc:
            raise _unreachable(url, exc) from None
        if self._resp.status >= 400:
            try:
                raw = self._resp.read_all()
            except OSError:
                raw = b""
            finally:
                self._resp.close()
            raise _http_error(url, path, self._resp.status, self._resp.reason, raw)
        kind = self._resp.content_type
        if not kind.startswith("text/event-stream"):
            self._resp.close()
            raise RagtuneError(f"the server at {url} answered {path} with {kind or 'no Content-Type'}, not a stream "
                               "of server-sent events; is it a ragtune server ('ragtune serve')?")

    def __iter__(self) -> Iterator[Any]:
        return self._events()

    def _events(self) -> Iterator[Any]:
        data: list[str] = []  # the `data:` lines of the event being read (a blank line ends an event)
        pending = b""  # a line not yet ended: a read can stop anywhere, inside a UTF-8 character too
        while True:
            try:
                block = self._resp.read()
            except _EndedEarly:  # the connection closed inside a chunk: as if between events
                block = b""
            except OSError as exc:
                raise RagtuneError(f"the connection to the server at {self.url} broke before the answer was "
                                   f"complete ({exc}); the text so far is only part of the answer") from None
            if not block:
                raise RagtuneError(f"the server at {self.url} closed the connection before the answer was complete "
                                   "(no 'data: [DONE]': did it stop or restart?); the text so far is only part of "
                                   "the answer")
            *lines, pending = (pending + block).split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if line:
                    field, _, value = line.partition(":")  # comments (":...") and other fields are skipped
                    if field == "data":
                        data.append(value[1:] if value.startswith(" ") else value)
                    continue
                if not data:
                    continue
                text, data = "\n".join(data), []
                if text == "[DONE]":
                    return
                yield self._parse(text)

    def _parse(self, text: str) -> Any:
        try:
            event = json.loads(text)
        except ValueError:
            raise RagtuneError(f"the server at {self.url} sent an event on {self.path} that is not JSON: "
                               f"{text[:200]!r}") from None
        err = event.get("error") if isinstance(event, dict) else None
        if err is not None:
            msg = (err.get("message") if isinstance(err, dict) else None) or str(err)
            kind = err.get("type") if isinstance(err, dict) else None
            cls = UsageError if kind == "invalid_request_error" else RagtuneError
            raise cls(f"the server at {self.url} ended the answer with an error: {msg}")
        return event

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_PROXY_ENV = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_BLOCK = 1 << 16


def _send(full_url: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """(status, reason, body), read whole."""
    resp = _open(full_url, data, headers)
    try:
        return resp.status, resp.reason, resp.read_all()
    finally:
        resp.close()


def _open(full_url: str, data: bytes | None, headers: dict[str, str]) -> Any:
    """The response, its status and headers read, its body not yet (`read()` a block at a time, b"" at the
    end; `read_all()`). Plain http without a proxy goes over a socket (urllib.request's import, ~35 ms, is
    most of what a script pays per call to a local server); https and proxies through urllib."""
    from urllib.parse import urlsplit

    parts = urlsplit(full_url)
    if parts.scheme == "http" and (parts.hostname in _LOOPBACK or not any(os.environ.get(v) for v in _PROXY_ENV)):
        return _SocketResponse(parts, data, headers)
    import urllib.error
    import urllib.request

    req = urllib.request.Request(full_url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        return _UrllibResponse(urllib.request.urlopen(req, timeout=TIMEOUT_S))
    except urllib.error.HTTPError as exc:
        return _UrllibResponse(exc, int(exc.code), str(exc.reason))
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


class _UrllibResponse:
    def __init__(self, resp: Any, status: int | None = None, reason: str | None = None) -> None:
        self._resp = resp
        self.status = int(resp.status) if status is None else status
        self.reason = str(resp.reason) if reason is None else reason
        self.content_type = str(resp.headers.get("Content-Type") or "").lower()

    def read(self) -> bytes:
        read1 = getattr(self._resp, "read1", None)  # what has arrived, without waiting for a full block
        try:
            return read1(_BLOCK) if read1 is not None else self._resp.read(_BLOCK)
        except OSError:
            raise
        except Exception as exc:  # http.client.IncompleteRead: the connection closed inside a chunk
            raise _EndedEarly(f"{type(exc).__name__}: {exc}") from None

    def read_all(self) -> bytes:
        return self._resp.read()

    def close(self) -> None:
        self._resp.close()


class _SocketResponse:
    """One HTTP/1.1 request on its own connection (Connection: close); the body by Content-Length, chunked
    transfer coding, or the end of the stream, read as it arrives."""

    def __init__(self, parts: Any, data: bytes | None, headers: dict[str, str]) -> None:
        import socket

        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{'POST' if data is not None else 'GET'} {target} HTTP/1.1", f"Host: {parts.netloc}",
                 "Connection: close", "User-Agent: ragtune", *(f"{k}: {v}" for k, v in headers.items())]
        if data is not None:
            lines.append(f"Content-Length: {len(data)}")
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise UsageError("the API key has characters an HTTP header cannot carry; use an ASCII key") from None
        host = parts.hostname or ""
        # an ASCII host as bytes: getaddrinfo would otherwise import the idna codec (~1 ms) to encode it
        self.sock = socket.create_connection((host.encode("ascii") if host.isascii() else host, parts.port or 80),
                                             timeout=TIMEOUT_S)
        try:
            self.sock.sendall(head + (data or b""))
            self._start()
        except BaseException:
            self.sock.close()
            raise

    def _start(self) -> None:
        raw = b""
        while b"\r\n\r\n" not in raw:
            block = self.sock.recv(_BLOCK)
            if not block:
                break
            raw += block
        header, sep, rest = raw.partition(b"\r\n\r\n")
        status_line, *fields = header.decode("latin-1").split("\r\n")
        words = status_line.split(" ", 2)
        if not sep or len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
            raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
        self.status, self.reason = int(words[1]), words[2] if len(words) > 2 else ""
        meta = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        self.content_type = meta.get("content-type", "").lower()
        blocks = self._received(rest)
        if "chunked" in meta.get("transfer-encoding", "").lower():
            blocks = _dechunked(blocks)
        elif meta.get("content-length", "").isdigit():
            blocks = _first(blocks, int(meta["content-length"]))
        self._blocks = blocks

    def _received(self, first: bytes) -> Iterator[bytes]:
        if first:
            yield first
        while block := self.sock.recv(_BLOCK):
            yield block

    def read(self) -> bytes:
        return next(self._blocks, b"")

    def read_all(self) -> bytes:
        return b"".join(self._blocks)

    def close(self) -> None:
        self.sock.close()


def _first(blocks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first n bytes of `blocks` (a Content-Length body; what follows is not the answer's)."""
    if n <= 0:
        return
    for block in blocks:
        yield block[:n]
        n -= len(block)
        if n <= 0:
            return


class _EndedEarly(OSError):
    """The connection closed inside a chunked body."""


def _dechunked(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The body of a chunked HTTP answer as its data arrives, whatever the reads' boundaries."""
    buf = b""

    def more() -> bytes:
        block = next(blocks, b"")
        if not block:
            raise _EndedEarly("a chunked HTTP answer ended early")
        return block

    while True:
        while b"\r\n" not in buf:
            buf += more()
        line, _, buf = buf.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            raise OSError(f"a chunked HTTP answer has a bad chunk size {line[:20]!r}") from None
        if size == 0:
            return
        while size > 0:
            if not buf:
                buf = more()
            part, buf = buf[:size], buf[size:]
            size -= len(part)
            yield part
        while len(buf) < 2:  # the CRLF after the chunk's data
            buf += more()
        buf = buf[2:]


def post_json(url: str, path: str, body: dict[str, Any], key: str = "") -> Any:
    return _request(url, path, body, key)


def get_json(url: str, path: str, key: str = "") -> Any:
    return _request(url, path, None, key)


def read_batch(source: str, field: str, *, jsonl: bool = False) -> list[tuple[int, dict[str, Any] | None, str]]:
    """Lines of FILE (or stdin for '-'): a JSON object with `field`, or the text itself. Blank lines
    are skipped; a bad line gives (line, None, why) so the caller reports it and goes on.

    With jsonl=True a FILE named *.jsonl is JSON Lines throughout: a line that is not a JSON object
    with a `field` string would be asked as literal text or dropped, so every such line is named in one
    UsageError and no row is returned (stdin and other files are read as above)."""
    flag = f"--{field.replace('question', 'questions').replace('query', 'queries')}"
    text = _read_source(source, flag, field)
    if jsonl and source != "-" and source.lower().endswith(".jsonl"):
        return _strict_jsonl(text, source, flag, field)
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except RecursionError:
                rows.append((n, None, f"line {n} is JSON nested too deeply to read"))
                continue
            except ValueError as exc:
                rows.append((n, None, f"line {n} is not valid JSON ({exc})"))
                continue
            val = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(val, str) or not val.strip():
                rows.append((n, None, f'line {n} has no "{field}" string'))
                continue
            rows.append((n, obj, ""))
        else:
            rows.append((n, {field: s}, ""))
    return rows


def _read_source(source: str, flag: str, field: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        with open(os.path.expanduser(source), encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{flag} file '{source}' does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} '{source}' is a folder; give a file with one {field} per line") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} '{source}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from None


def _strict_jsonl(text: str, source: str, flag: str, field: str) -> list[tuple[int, dict[str, Any] | None, str]]:
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    bad: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        why = ""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            why = f"invalid JSON: {exc.msg} at column {exc.colno} (near: {line[max(0, exc.pos - 20):exc.pos + 20]!r})"
        except RecursionError:
            why = "invalid JSON: nested too deeply"
        else:
            val = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(obj, dict):
                why = f"a JSON {type(obj).__name__}, not an object {{\"{field}\": ...}}"
            elif not isinstance(val, str) or not val.strip():
                why = f"no \"{field}\" string" if field not in obj else f"\"{field}\" is not a non-empty string"
        if why:
            bad.append(f"  line {n}: {why}")
        else:
            rows.append((n, obj, ""))
    if bad:
        plural = flag[2:]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UsageError(f"{flag} '{source}': {len(bad)} line{'s are' if len(bad) > 1 else ' is'} not a JSON object "
                         f"with a \"{field}\" string; nothing was asked:\n" + "\n".join(bad[:10]) + more
                         + f"\nfix those lines (one {{\"{field}\": \"...\", ...}} object per line), or put plain "
                         f"{plural} one a line in a .txt file")
    return rows
