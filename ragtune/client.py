"""A light client for a running `ragtune serve` (stdlib only, so `--server` calls import nothing heavy).

    body = post_json("http://127.0.0.1:8000", "/v1/search", {"query": "remote days"}, api_key="")
    rows = read_batch("questions.jsonl", "question")     # [(line number, text or None, error or "")]

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
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode("utf-8", "replace")
        try:
            msg = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = raw.strip()[:300] or exc.reason
        if exc.code == 401:
            raise RagtuneError(f"the server at {url} refused the request (401: {msg}); pass its key with "
                               f"--api-key KEY or {API_KEY_ENV}") from None
        cls = UsageError if 400 <= exc.code < 500 else RagtuneError
        raise cls(f"the server at {url} answered {path} with {exc.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RagtuneError(f"no ragtune server answers at {url} ({reason}); start one with 'ragtune serve' "
                           f"or fix --server / {SERVER_ENV}") from None
    except ValueError as exc:
        raise RagtuneError(f"the server at {url} answered {path} with something that is not JSON ({exc})") from None


def post_json(url: str, path: str, body: dict[str, Any], key: str = "") -> Any:
    return _request(url, path, body, key)


def get_json(url: str, path: str, key: str = "") -> Any:
    return _request(url, path, None, key)


def read_batch(source: str, field: str) -> list[tuple[int, dict[str, Any] | None, str]]:
    """Lines of FILE (or stdin for '-'): a JSON object with `field`, or the text itself. Blank lines
    are skipped; a bad line gives (line, None, why) so the caller reports it and goes on."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"--{field.replace('question', 'questions').replace('query', 'queries')} file "
                             f"'{source}' does not exist") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"'{source}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            try:
                obj = json.loads(s)
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
