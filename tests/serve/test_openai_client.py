"""The official `openai` client against a real uvicorn server on a loopback port, streaming included."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import start_server
from tests.serve.conftest import QA, FakeRetriever


@pytest.fixture
def server_url(tmp_path: Path, tiny_llama: Path, tiny_adapter: Path, loaded_gen: Any) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(
        f"model:\n  path: {tiny_llama}\nserve:\n  api_key: k-test\n  deployments:\n"
        f"    - {{name: base}}\n    - {{name: policies, adapter: {tiny_adapter}}}\n"
        f"    - {{name: policies+rag, adapter: {tiny_adapter}, index: docs}}\n"
    )
    app = create_app(load_config(f), generator=loaded_gen, retrievers={"docs": FakeRetriever()})
    server, t, port = start_server(app)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    t.join(10)


def test_openai_client_models_completion_and_stream(server_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=server_url, api_key="k-test", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "policies", "policies+rag"]

    resp = client.chat.completions.create(model="policies", messages=[{"role": "user", "content": QA[0][0]}])
    assert resp.choices[0].message.content == QA[0][1] and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens > 0 and resp.model == "policies"

    rag = client.chat.completions.create(model="policies+rag", messages=[{"role": "user", "content": QA[0][0]}], max_tokens=8)
    assert [s["n"] for s in rag.model_extra["sources"]] == [1, 2]

    stream = client.chat.completions.create(model="policies", messages=[{"role": "user", "content": QA[1][0]}],
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == QA[1][1] and finish == "stop" and usage.completion_tokens > 0

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "q"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server_url, api_key="wrong", max_retries=0).models.list()


def test_a_stream_whose_client_hangs_up_stops_generating(server_url: str, loaded_gen: Any, monkeypatch) -> None:
    import httpx

    finished: list[tuple[str, int]] = []
    real_run = loaded_gen._run

    def spy(job: Any, on_token: Any, cancel: Any) -> Any:
        stats = real_run(job, on_token, cancel)
        finished.append((stats["finish_reason"], stats["tokens"]))
        return stats

    monkeypatch.setattr(loaded_gen, "_run", spy)
    auth = {"Authorization": "Bearer k-test"}
    body = {"model": "base", "max_tokens": 900, "stream": True, "messages": [{"role": "user", "content": "office"}]}
    with httpx.stream("POST", server_url + "/chat/completions", json=body, headers=auth, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"role"' not in line:
                break  # one token arrived: hang up
    deadline = time.time() + 30
    while not finished and time.time() < deadline:
        time.sleep(0.05)
    assert len(finished) == 1 and finished[0][0] == "cancelled" and finished[0][1] < 900
    health = httpx.get(server_url.removesuffix("/v1") + "/health").json()
    assert health["queued"] == 0
