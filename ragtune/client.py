"""A light client for a running `ragtune serve` (stdlib only, so `--server` calls import nothing heavy).

    body = post_json("http://127.0.0.1:8000", "/v1/search", {"query": "remote days"}, key="")
    rows = read_batch("queries.txt", "query")           # [(line, {"query": ...} or None, error or "")]
    rows = read_batch("q.jsonl", "question", jsonl=True) # a .jsonl file: any bad line is a UsageError

The URL comes from `--server` or RAGTUNE_SERVER, the key from `--api-key` or RAGTUNE_API_KEY.
HTTP errors become RagtuneError/UsageError with the server's own message: 401 says how to pass the
key, 4xx are usage errors (exit 2), anything else (5xx, no server) exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

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
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        status, reason, raw = _send(url + path, data, headers)
    except OSError as exc:
        raise RagtuneError(f"no ragtune server answers at {url} ({getattr(exc, 'reason', exc)}); start one with "
                           f"'ragtune serve' or fix --server / {SERVER_ENV}") from None
    if status >= 400:
        text = raw.decode("utf-8", "replace")
        try:
            msg = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = text.strip()[:300] or reason
        if status == 401:
            raise RagtuneError(f"the server at {url} refused the request (401: {msg}); pass its key with "
                               f"--api-key KEY or {API_KEY_ENV}")
        cls = UsageError if 400 <= status < 500 else RagtuneError
        raise cls(f"the server at {url} answered {path} with {status}: {msg}")
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise RagtuneError(f"the server at {url} answered {path} with something that is not JSON ({exc})") from None


_PROXY_ENV = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _send(full_url: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """(status, reason, body). Plain http without a proxy goes over a socket (urllib.request's import,
    ~35 ms, is most of what a script pays per call to a local server); https and proxies through urllib."""
    from urllib.parse import urlsplit

    parts = urlsplit(full_url)
    if parts.scheme == "http" and (parts.hostname in _LOOPBACK or not any(os.environ.get(v) for v in _PROXY_ENV)):
        return _socket_send(parts, data, headers)
    import urllib.error
    import urllib.request

    req = urllib.request.Request(full_url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return int(resp.status), str(resp.reason), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.reason), exc.read()
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def _socket_send(parts: Any, data: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request on its own connection (Connection: close); the body by Content-Length, chunked
    transfer coding, or the end of the stream."""
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
    with socket.create_connection((host.encode("ascii") if host.isascii() else host, parts.port or 80),
                                  timeout=TIMEOUT_S) as sock:
        sock.sendall(head + (data or b""))
        received = []
        while True:
            block = sock.recv(1 << 16)
            if not block:
                break
            received.append(block)
    raw = b"".join(received)
    header, sep, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = header.decode("latin-1").split("\r\n")
    words = status_line.split(" ", 2)
    if not sep or len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    meta = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    if "chunked" in meta.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif meta.get("content-length", "").isdigit():
        body = body[: int(meta["content-length"])]
    return int(words[1]), words[2] if len(words) > 2 else "", body


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise OSError("a chunked HTTP answer ended early")
        size = int(body[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2


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
