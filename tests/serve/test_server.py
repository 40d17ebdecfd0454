"""Every route through FastAPI's TestClient: answers, the exact SSE chunk format, error shapes, auth, limits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.serve.conftest import QA, QA_OTHER, FakeRetriever

SOURCE_KEYS = {"n", "source", "title", "page", "heading", "score", "text"}
ERROR_KEYS = {"message", "type", "param", "code"}


def serve_cfg(tmp_path: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, *extra: str) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(
        f"model:\n  path: {tiny_llama}\n"
        "rag:\n  min_score: 0.3\n  not_found_message: Not in the documents.\n"
        "serve:\n  max_messages: 4\n  max_tokens_limit: 64\n  max_body_bytes: 4000\n  deployments:\n"
        "    - {name: base}\n"
        f"    - {{name: policies, adapter: {tiny_adapter}}}\n"
        f"    - {{name: policies+rag, adapter: {tiny_adapter}, index: docs}}\n"
        f"    - {{name: other, adapter: {other_adapter}}}\n"
        "    - {name: empty+rag, index: nothing}\n"
        "    - {name: cpp, engine: llama.cpp}\n"
    )
    return load_config(f, list(extra))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


def make_app(module_tmp: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, loaded_gen: Any, *extra: str) -> Any:
    """The app, loaded as if llama-cpp-python were not installed: the 'cpp' deployment is listed but
    unavailable (tests/serve/test_llamacpp_engine.py serves one that works)."""
    import ragtune.serve.llamacpp as llamacpp

    cfg = serve_cfg(module_tmp, tiny_llama, tiny_adapter, other_adapter, *extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llamacpp, "llama_cpp_available", lambda: False)
        return create_app(cfg, generator=loaded_gen, retrievers={"docs": FakeRetriever(), "nothing": FakeRetriever([])})


@pytest.fixture(scope="module")
def client(module_tmp: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, loaded_gen: Any) -> Any:
    with TestClient(make_app(module_tmp, tiny_llama, tiny_adapter, other_adapter, loaded_gen)) as c:
        yield c


def ask(model: str, q: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": q}], **kw}


def assert_error(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_health_page_and_models(client: Any) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["deployments"] == ["base", "policies", "policies+rag", "other", "empty+rag", "cpp"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/chat/completions" in page.text
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == h["deployments"]
    assert all(m["object"] == "model" and m["owned_by"] == "ragtune" for m in models["data"])
    assert client.get("/v1/models/policies+rag").json()["ragtune"]["rag"] is True
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_completion_gives_trained_answers_per_deployment(client: Any) -> None:
    r = client.post("/v1/chat/completions", json=ask("policies", QA[0][0]))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "policies" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": QA[0][1], "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert body["sources"] == [] and body["ragtune"]["mode"] == "ft"
    assert client.post("/v1/chat/completions", json=ask("other", QA[0][0])).json()["choices"][0]["message"]["content"] == QA_OTHER[0][1]
    base = client.post("/v1/chat/completions", json=ask("base", QA[0][0], max_tokens=5)).json()
    assert base["choices"][0]["finish_reason"] == "length" and base["usage"]["completion_tokens"] == 5
    rag = client.post("/v1/chat/completions", json=ask("policies+rag", QA[0][0], max_tokens=8)).json()
    assert rag["ragtune"]["mode"] == "ft+rag" and [s["n"] for s in rag["sources"]] == [1, 2]
    assert all(set(s) == SOURCE_KEYS for s in rag["sources"]) and rag["sources"][0]["source"] == "policies/remote.md"


def test_abstains_when_retrieval_finds_nothing(client: Any) -> None:
    body = client.post("/v1/chat/completions", json=ask("empty+rag", QA[0][0])).json()
    assert body["choices"][0]["message"]["content"] == "Not in the documents."
    assert body["ragtune"]["abstained"] is True and body["sources"] == [] and body["usage"]["completion_tokens"] == 0


def sse(text: str) -> list[Any]:
    """Parse an SSE body strictly: only `data: ` events separated by blank lines."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    out = []
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
        data = e[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_stream_chunk_format(client: Any) -> None:
    with client.stream("POST", "/v1/chat/completions", json=ask("policies+rag", QA[1][0], stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "policies+rag" and isinstance(c["created"], int)
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 and "usage" not in c
    first, *middle, last = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["choices"][0]["finish_reason"] is None
    assert [s["n"] for s in first["sources"]] == [1, 2] and all(set(s) == SOURCE_KEYS for s in first["sources"])
    assert middle and all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None for c in middle)
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert last["ragtune"]["mode"] == "ft+rag"
    plain = client.post("/v1/chat/completions", json=ask("policies+rag", QA[1][0])).json()
    assert text == plain["choices"][0]["message"]["content"]


def test_stream_with_usage_gives_the_trained_answer(client: Any) -> None:
    body = ask("policies", QA[0][0], stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse(r.read().decode())
    *chunks, usage_chunk, done = events
    assert done == "[DONE]" and all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == QA[0][1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]


def test_abstention_streams_the_not_found_message(client: Any) -> None:
    with client.stream("POST", "/v1/chat/completions", json=ask("empty+rag", "x", stream=True)) as r:
        events = sse(r.read().decode())
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == "Not in the documents."


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": []}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": "hello"}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": [{"role": "wizard", "content": "q"}]}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": [{"content": "q"}]}).encode(), 400, "invalid_request"),
    (json.dumps(ask("base", "q", temperature="hot")).encode(), 400, "invalid_request"),
    (json.dumps(ask("base", "q", temperature=-1)).encode(), 400, "invalid_request"),
    (json.dumps(ask("base", "q", max_tokens=0)).encode(), 400, "invalid_request"),
    (json.dumps(ask("base", "q", max_tokens=65)).encode(), 400, "max_tokens_too_large"),
    (json.dumps(ask("base", "q", max_completion_tokens=10_000)).encode(), 400, "max_tokens_too_large"),
    (json.dumps(ask("base", "q", n=2)).encode(), 400, "unsupported"),
    (json.dumps(ask("base", "q", logprobs=True)).encode(), 400, "unsupported"),
    (json.dumps(ask("base", "q", top_logprobs=3)).encode(), 400, "unsupported"),
    (json.dumps(ask("base", "q", stop=[""])).encode(), 400, "invalid_request"),
    (json.dumps(ask("base", "q", stop=["a", "b", "c", "d", "e"])).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": [{"role": "user", "content": "q"}] * 5}).encode(), 400, "too_many_messages"),
    (json.dumps({"model": "base", "messages": [{"role": "system", "content": "only system"}]}).encode(), 400, "invalid_request"),
    (json.dumps({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400, "unsupported"),
    (json.dumps(ask("nope", "q")).encode(), 404, "model_not_found"),
    (json.dumps(ask("cpp", "q")).encode(), 400, "engine_unavailable"),
    (json.dumps(ask("base", "q" * 5000)).encode(), 413, "body_too_large"),
])
def test_malformed_requests_get_openai_errors_never_500(client: Any, body: bytes, status: int, code: str) -> None:
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    e = assert_error(r, status, code)
    if code == "engine_unavailable":
        assert "pip install 'ragtune[llamacpp]'" in e["message"] and "deployment 'cpp'" in e["message"]


def test_content_parts_and_developer_role_are_accepted(client: Any) -> None:
    body = {"model": "policies", "user": "someone", "messages": [
        {"role": "user", "content": [{"type": "text", "text": QA[1][0]}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == QA[1][1]
    body = {"model": "base", "max_tokens": 2, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "q"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_routes_and_methods_use_the_error_shape(client: Any) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_api_key_guards_every_v1_route(module_tmp: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, loaded_gen: Any) -> None:
    app = make_app(module_tmp, tiny_llama, tiny_adapter, other_adapter, loaded_gen, "serve.api_key=s3cret")
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/base"), ("POST", "/v1/chat/completions")):
            e = assert_error(c.request(method, path, json=ask("base", "q")), 401, "invalid_api_key")
            assert "Authorization: Bearer" in e["message"]
            assert_error(c.request(method, path, json=ask("base", "q"), headers={"Authorization": "Bearer wrong"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/chat/completions", json=ask("policies", QA[0][0]), headers=ok)
        assert r.json()["choices"][0]["message"]["content"] == QA[0][1]


def test_api_key_from_environment(module_tmp: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, loaded_gen: Any, monkeypatch) -> None:
    monkeypatch.setenv("RAGTUNE_API_KEY", "envkey")
    with TestClient(make_app(module_tmp, tiny_llama, tiny_adapter, other_adapter, loaded_gen)) as c:
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer envkey"}).status_code == 200


def test_concurrent_requests_queue_and_overflow_answers_429(module_tmp: Path, tiny_llama: Path, tiny_adapter: Path, other_adapter: Path, loaded_gen: Any) -> None:
    app = make_app(module_tmp, tiny_llama, tiny_adapter, other_adapter, loaded_gen, "serve.max_queue=2")
    results: list[Any] = []
    with TestClient(app) as c:
        loaded_gen.lock.acquire()  # the model is busy: requests must wait, not fail
        try:
            threads = [threading.Thread(target=lambda q=q: results.append(
                c.post("/v1/chat/completions", json=ask("policies", q)))) for q, _ in QA]
            for t in threads:
                t.start()
            deadline = time.time() + 20
            while app.state.runtime.pending < 2 and time.time() < deadline:
                time.sleep(0.02)
            assert app.state.runtime.pending == 2
            assert_error(c.post("/v1/chat/completions", json=ask("policies", "q")), 429, "server_busy")
        finally:
            loaded_gen.lock.release()
        for t in threads:
            t.join(30)
    answers = sorted(r.json()["choices"][0]["message"]["content"] for r in results)
    assert [r.status_code for r in results] == [200, 200] and answers == sorted(a for _, a in QA)
    assert app.state.runtime.pending == 0


def test_stop_sequences_end_the_answer(client: Any) -> None:
    body = ask("policies", QA[0][0], stop=" per")
    got = client.post("/v1/chat/completions", json=body).json()
    assert got["choices"][0]["message"]["content"] == "Three days" and got["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={**body, "stop": [" per", "zzz"], "stream": True}) as r:
        events = sse(r.read().decode())
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == "Three days"


def test_index_sync_while_serving_reaches_the_server_without_a_restart(tmp_path: Path, tiny_llama: Path,
                                                                       tiny_embedder: Path, loaded_gen: Any) -> None:
    from ragtune.retrieval.ingest import ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hr.md").write_text("# HR\n\nEmployees may work remotely three days per week.\n")
    f = tmp_path / "serve.yaml"
    f.write_text(
        f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
        "rag:\n  min_score: -1.0\n  top_k: 10\nserve:\n  max_tokens_limit: 8\n"
        "  deployments:\n    - {name: base+rag, index: live}\n"
    )
    cfg = load_config(f, [])
    ingest(cfg, [str(docs)], index="live", progress=False)
    with TestClient(create_app(cfg, generator=loaded_gen)) as c:
        first = c.post("/v1/chat/completions", json=ask("base+rag", "security badges", max_tokens=4)).json()
        assert {s["source"] for s in first["sources"]} == {"hr.md"}
        (docs / "security.md").write_text("# Security\n\nBadges must be worn visibly inside the building.\n")
        ingest(cfg, [str(docs)], index="live", progress=False)  # the running server does not block it
        time.sleep(1.1)  # the server looks for a newer index at most once a second
        after = c.post("/v1/chat/completions", json=ask("base+rag", "security badges", max_tokens=4)).json()
        assert {s["source"] for s in after["sources"]} == {"hr.md", "security.md"}


def test_default_deployments_take_the_adapters_base_without_model_path(tiny_llama: Path, tiny_adapter: Path) -> None:
    """`serve model.adapter=X` with no model.path: both "base" and the adapter's deployment run on
    the base X was trained on (so base vs fine-tuned compare the same model), not the default model."""
    from ragtune.serve.server import plan_deployments

    deps = plan_deployments(load_config(None, [f"model.adapter={tiny_adapter}", "rag.enabled=false"]))
    assert [(d.name, Path(d.base).resolve(), d.adapter) for d in deps] == [
        ("base", tiny_llama.resolve(), ""), (tiny_adapter.name, tiny_llama.resolve(), str(tiny_adapter))]
    deps = plan_deployments(load_config(None, [f"model.adapter={tiny_adapter}", "rag.enabled=false",
                                               "model.path=/elsewhere"]))
    assert [d.base for d in deps] == ["", ""]  # an explicit model.path wins (and the hash check judges it)
