"""/v1/embeddings through the official openai client (vectors equal the retriever's query vectors)
and /v1/search in the sources shape, both behind the API key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import start_server
from tests.serve.conftest import FakeRetriever
from tests.serve.test_server import SOURCE_KEYS, assert_error


def cfg_for(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
                 "serve:\n  api_key: k-test\n  deployments:\n    - {name: base}\n    - {name: base+rag, index: docs}\n")
    return load_config(f)


@pytest.fixture
def server(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path, loaded_gen: Any) -> Any:
    app = create_app(cfg_for(tmp_path, tiny_llama, tiny_embedder), generator=loaded_gen,
                     retrievers={"docs": FakeRetriever()})
    srv, t, port = start_server(app)
    yield f"http://127.0.0.1:{port}/v1", app
    srv.should_exit = True
    t.join(10)


def test_openai_embeddings_equal_the_query_vectors(server: Any, tmp_path: Path, tiny_llama: Path,
                                                   tiny_embedder: Path) -> None:
    import numpy as np
    import openai

    from ragtune.retrieval.embedder import Embedder

    url, _ = server
    client = openai.OpenAI(base_url=url, api_key="k-test", max_retries=0)
    texts = ["How many remote days?", "expense reports"]
    want = Embedder(cfg_for(tmp_path, tiny_llama, tiny_embedder).embedder).load()
    got = client.embeddings.create(model="any", input=texts)  # the client asks for base64 by default
    assert [d.index for d in got.data] == [0, 1]
    for d, t in zip(got.data, texts):
        np.testing.assert_allclose(np.asarray(d.embedding), want.embed_query(t), rtol=1e-5, atol=1e-6)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    one = client.embeddings.create(model="any", input=texts[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == want.dim
    np.testing.assert_allclose(one.data[0].embedding, got.data[0].embedding, rtol=1e-6)
    same = client.embeddings.create(model="any", input=texts[0], dimensions=want.dim)
    assert len(same.data[0].embedding) == want.dim
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="any", input=texts[0], dimensions=want.dim - 1)
    assert e.value.body["code"] == "unsupported" and "dimensions" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="any", input=["ok", " "])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).embeddings.create(model="any", input="x")


def test_search_route_gives_sources(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path, loaded_gen: Any) -> None:
    fake = FakeRetriever()
    app = create_app(cfg_for(tmp_path, tiny_llama, tiny_embedder), generator=loaded_gen, retrievers={"docs": fake})
    auth = {"Authorization": "Bearer k-test"}
    with TestClient(app) as c:
        assert_error(c.post("/v1/search", json={"query": "remote days"}), 401, "invalid_api_key")
        r = c.post("/v1/search", json={"query": "remote days", "top_k": 1, "mode": "dense"}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"] == "docs" and len(body["sources"]) == 1
        (s,) = body["sources"]
        assert set(s) == SOURCE_KEYS and s["n"] == 1 and s["source"] == "policies/remote.md"
        assert fake.queries == ["remote days"]
        assert_error(c.post("/v1/search", json={"query": "x", "index": "nope"}, headers=auth), 404, "index_not_found")
        assert_error(c.post("/v1/search", json={"query": "x", "mode": "fuzzy"}, headers=auth), 400)
        assert_error(c.post("/v1/search", json={"query": "x", "top_k": 0}, headers=auth), 400)
        assert assert_error(c.post("/v1/search", json={"query": "  "}, headers=auth), 400)["param"] == "query"
        assert_error(c.post("/v1/search", json={"q": "x"}, headers=auth), 400)


def test_search_route_without_any_index_says_how_to_serve_one(tmp_path: Path, tiny_llama: Path,
                                                              tiny_embedder: Path, loaded_gen: Any) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
                 "serve:\n  api_key: k-test\n  deployments:\n    - {name: base}\n")
    app = create_app(load_config(f), generator=loaded_gen, retrievers={})
    with TestClient(app) as c:
        r = c.post("/v1/search", json={"query": "remote days"}, headers={"Authorization": "Bearer k-test"})
    assert_error(r, 404, "index_not_found")
    msg = r.json()["error"]["message"]
    assert "no index to search" in msg and "index.name=NAME" in msg and "''" not in msg
