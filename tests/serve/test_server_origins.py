"""Browser origins on a real server: the chat page (same origin) works, pages on serve.allowed_origins get
CORS (preflights, streamed answers), and cross-site or DNS-rebound requests are refused before they act."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragtune.config import load_config
from ragtune.errors import UsageError
from ragtune.serve.origins import Allowed, host_allowed, normalize_origin, same_origin, split_host
from ragtune.serve.server import create_app
from tests.conftest import start_server
from tests.serve.test_server import ask, assert_error

APP = "http://app.example:3000"
EVIL = "http://evil.example"
RECORD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"


def serve(tmp_path: Path, tiny_llama: Path, loaded_gen: Any, serve_yaml: str) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  fine_tuning: true\n{serve_yaml}"
                 "  deployments:\n    - {name: base}\n")
    srv, t, port = start_server(create_app(load_config(f), generator=loaded_gen))
    return srv, t, f"http://127.0.0.1:{port}"


@pytest.fixture
def url(tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> Any:
    """No API key (the default on 127.0.0.1), Files and fine-tuning jobs on, one allowed origin."""
    srv, t, base = serve(tmp_path, tiny_llama, loaded_gen, f"  allowed_origins: ['{APP}']\n")
    yield base
    srv.should_exit = True
    t.join(10)


@pytest.fixture
def calls(loaded_gen: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every generation the server starts."""
    seen: list[Any] = []
    real = loaded_gen.stream

    def stream(*a: Any, **kw: Any) -> Any:
        seen.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(loaded_gen, "stream", stream)
    return seen


def chat_body(**kw: Any) -> str:
    return json.dumps(ask("base", "hi", max_tokens=2, temperature=0, **kw))


def test_a_cross_site_simple_post_is_refused_before_it_acts(url: str, calls: list[Any]) -> None:
    """What a page on another site can make a browser send without a preflight (text/plain, a form)."""
    # the same body without an Origin (curl, SDKs) is answered: the refusal is the origin's, not the body's
    assert httpx.post(url + "/v1/chat/completions", content=chat_body(),
                      headers={"Content-Type": "text/plain"}).status_code == 200
    assert len(calls) == 1
    r = httpx.post(url + "/v1/chat/completions", content=chat_body(),
                   headers={"Content-Type": "text/plain", "Origin": EVIL})
    e = assert_error(r, 403, "origin_not_allowed")
    assert f"'{EVIL}'" in e["message"] and f"serve.allowed_origins={EVIL}" in e["message"]
    assert "\n" not in e["message"] and "access-control-allow-origin" not in r.headers
    assert len(calls) == 1  # no generation started

    r = httpx.post(url + "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", RECORD)},
                   headers={"Origin": EVIL})  # multipart/form-data: a form can send it
    assert_error(r, 403, "origin_not_allowed")
    r = httpx.post(url + "/v1/fine_tuning/jobs", content=json.dumps({"model": "base", "training_file": "file-x"}),
                   headers={"Content-Type": "text/plain", "Origin": EVIL})
    assert_error(r, 403, "origin_not_allowed")
    assert httpx.get(url + "/v1/files").json()["data"] == []
    assert httpx.get(url + "/v1/fine_tuning/jobs").json()["data"] == []
    # a read from another site is refused too (its CORS answer would hide it; the server need not make it)
    assert_error(httpx.get(url + "/v1/files", headers={"Origin": EVIL}), 403, "origin_not_allowed")
    e = assert_error(httpx.post(url + "/v1/chat/completions", content=chat_body(), headers={"Origin": "null"}), 403,
                     "origin_not_allowed")  # a page opened from a file, or a sandboxed frame
    assert "lists \"null\"" in e["message"] and len(calls) == 1


def test_preflight_for_an_allowed_origin_and_a_refused_one(url: str) -> None:
    asked = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": APP, **asked})
    assert r.status_code == 204 and r.content == b"", r.text
    h = r.headers
    assert h["access-control-allow-origin"] == APP and "Origin" in h.get_list("vary")
    assert {"GET", "POST", "DELETE"} <= {m.strip() for m in h["access-control-allow-methods"].split(",")}
    assert h["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert int(h["access-control-max-age"]) > 0
    r = httpx.options(url + "/v1/files/file-1", headers={"Origin": APP, "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 204 and "Authorization" in r.headers["access-control-allow-headers"]

    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": EVIL, **asked})
    e = assert_error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers and "serve.allowed_origins" in e["message"]


def test_an_allowed_origin_gets_cors_headers_on_a_streamed_answer(url: str) -> None:
    headers = {"Origin": APP, "Content-Type": "application/json"}
    with httpx.stream("POST", url + "/v1/chat/completions", content=chat_body(stream=True), headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == APP and "Retry-After" in r.headers[
            "access-control-expose-headers"]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    r = httpx.post(url + "/v1/chat/completions", content=chat_body(), headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    r = httpx.post(url + "/v1/chat/completions", content=b"{", headers=headers)  # errors are readable too
    assert_error(r, 400, "invalid_json")
    assert r.headers["access-control-allow-origin"] == APP


def test_the_chat_page_calls_its_own_server(url: str) -> None:
    port = url.rsplit(":", 1)[1]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'fetch("/v1/chat/completions"' in page.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):  # as a browser sends a same-origin fetch
        headers = {"Host": host, "Origin": f"http://{host}", "Content-Type": "application/json"}
        r = httpx.post(url + "/v1/chat/completions", content=chat_body(), headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert "access-control-allow-origin" not in r.headers  # same origin: no CORS needed
    # the same server on another port is another origin
    other = {"Origin": f"http://127.0.0.1:{int(port) + 1}", "Content-Type": "application/json"}
    assert_error(httpx.post(url + "/v1/chat/completions", content=chat_body(), headers=other), 403,
                 "origin_not_allowed")


def test_a_dns_rebound_name_is_refused_on_loopback(url: str, calls: list[Any]) -> None:
    """evil.example resolved to 127.0.0.1: the page's requests are same-origin for the browser, so they carry
    Host evil.example (and an Origin to match on a POST) or no Origin at all on a GET."""
    port = url.rsplit(":", 1)[1]
    rebound = f"evil.example:{port}"
    e = assert_error(httpx.get(url + "/v1/models", headers={"Host": rebound}), 403, "host_not_allowed")
    assert f"'{rebound}'" in e["message"] and f"http://127.0.0.1:{port}/" in e["message"]
    r = httpx.post(url + "/v1/chat/completions", content=chat_body(),
                   headers={"Host": rebound, "Origin": f"http://{rebound}", "Content-Type": "text/plain"})
    assert_error(r, 403, "host_not_allowed")
    assert_error(httpx.get(url + "/v1/files", headers={"Host": rebound}), 403, "host_not_allowed")
    assert calls == []
    for host in (f"localhost:{port}", f"[::1]:{port}", f"chat.localhost:{port}", "app.example:3000"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
    assert_error(httpx.get(url + "/v1/models", headers={"Host": f":{port}"}), 403, "host_not_allowed")


def test_star_allows_any_origin_and_a_key_is_still_needed(tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> None:
    srv, t, url = serve(tmp_path, tiny_llama, loaded_gen, "  api_key: k-origins\n  allowed_origins: ['*']\n")
    try:
        asked = {"Origin": EVIL, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
        r = httpx.options(url + "/v1/chat/completions", headers=asked)  # a preflight carries no key
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        r = httpx.post(url + "/v1/chat/completions", content=chat_body(), headers={"Origin": EVIL})
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["access-control-allow-origin"] == "*"  # the page can read why
        auth = {"Origin": EVIL, "Authorization": "Bearer k-origins", "Content-Type": "application/json"}
        r = httpx.post(url + "/v1/chat/completions", content=chat_body(), headers=auth)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    finally:
        srv.should_exit = True
        t.join(10)


def test_a_bad_allowed_origin_is_refused_at_start_naming_each(tmp_path: Path, tiny_llama: Path,
                                                              loaded_gen: Any) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  allowed_origins: ['https://ok.example', "
                 "'https://app.example/chat', 'app.example:3000', 'http://x:99999']\n")
    with pytest.raises(UsageError) as e:
        create_app(load_config(f), generator=loaded_gen)
    lines = str(e.value).splitlines()
    assert [x.split(" ", 1)[0] for x in lines] == [f"serve.allowed_origins[{i}]" for i in (1, 2, 3)], lines
    assert all("scheme://host[:port]" in x for x in lines)


@pytest.mark.parametrize("text,norm", [("HTTP://App.Example:80", "http://app.example"), ("https://a:443/", "https://a"),
                                       ("http://[::1]:8000", "http://[::1]:8000"), ("null", "null"),
                                       ("http://a/b", None), ("http://u@a", None), ("a.example", None)])
def test_normalize_origin(text: str, norm: str | None) -> None:
    assert normalize_origin(text) == norm


def test_same_origin_compares_host_and_port() -> None:
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("https://chat.example", "chat.example")  # 443 on both sides, as a TLS proxy forwards it
    assert same_origin("http://[::1]:8000", "[::1]:8000")
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not same_origin("null", "127.0.0.1:8000") and not same_origin("http://a", "")
    assert split_host("[::1]:80") == ("::1", 80) and split_host("A.example") == ("a.example", None)


def test_a_fully_qualified_local_name_with_its_trailing_dot_is_allowed() -> None:
    """http://localhost.:8000/ is localhost (the root's trailing dot); a rebound name stays refused with it."""
    allowed = Allowed(hosts=frozenset({"app.example"}))
    for host in ("localhost.:8000", "LOCALHOST.", "chat.localhost.:8000", "app.example.:3000", "127.0.0.1:8000"):
        assert host_allowed(host, allowed), host
    for host in ("evil.example.:8000", ".:8000", "localhost..:8000"):
        assert not host_allowed(host, allowed), host
