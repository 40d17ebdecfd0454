"""`ragtune serve` over remote engines that are down or fail: a server error the client may retry (502),
never the client's 400; a remote's refusal of the request stays a 400, its 429 a 429."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import free_port, start_server


def fake_remote() -> Any:
    """An OpenAI-compatible server whose answer is the status its `model` names: s500, s429, s400, s401."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        status = int((await request.json())["model"][1:])
        return JSONResponse({"error": {"message": f"refused with {status}", "type": "x"}}, status_code=status)

    return app


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    remote, rt, rport = start_server(fake_remote())
    f = tmp_path_factory.mktemp("remote-errors") / "serve.yaml"
    up = f"http://127.0.0.1:{rport}/v1"
    f.write_text("serve:\n  deployments:\n"
                 f"    - {{name: down, engine: openai, url: 'http://127.0.0.1:{free_port()}/v1', model: m}}\n"
                 + "".join(f"    - {{name: {s}, engine: openai, url: '{up}', model: {s}}}\n"
                           for s in ("s500", "s401", "s429", "s400")))
    server, t, port = start_server(create_app(load_config(f)))
    yield f"http://127.0.0.1:{port}/v1/chat/completions"
    for s, th in ((server, t), (remote, rt)):
        s.should_exit = True
        th.join(10)


@pytest.mark.parametrize("model, status, kind, code", [
    ("down", 502, "server_error", "engine_unavailable"),
    ("s500", 502, "server_error", "engine_error"),
    ("s401", 502, "server_error", "engine_error"),
    ("s429", 429, "rate_limit_error", "server_busy"),
    ("s400", 400, "invalid_request_error", None),
])
def test_a_remote_that_is_down_or_fails_is_a_502_not_the_clients_400(url: str, model: str, status: int, kind: str,
                                                                      code: Any) -> None:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert (e["type"], e["code"]) == (kind, code) and "remote engine" in e["message"], e
    if status == 429:
        assert int(r.headers["retry-after"]) >= 1
    r = httpx.post(url, json={**body, "stream": True}, timeout=60)
    if r.status_code == 200:  # the headers went first: the error comes in-band, of the same kind
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        e = events[-1]["error"]
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.status_code == status, r.text
        e = r.json()["error"]
    assert (e["type"], e["code"]) == (kind, code), e
