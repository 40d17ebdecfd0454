"""/v1/embeddings with inputs over the embedder's maximum: refused as OpenAI does (400,
context_length_exceeded, naming the input), or cut on request (truncate_prompt_tokens), on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import start_server
from tests.serve.test_server import assert_error

WORDS = "employees may work remotely up to three days per week with manager approval "  # 13 tokens


def cfg_for(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nembedder:\n  path: {tiny_embedder}\n  device: cpu\n"
                 "serve:\n  deployments:\n    - {name: base}\n")
    return load_config(f)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_embedder: Path, loaded_gen: Any) -> Any:
    tmp = tmp_path_factory.mktemp("emb-limits")
    app = create_app(cfg_for(tmp, tiny_llama, tiny_embedder), generator=loaded_gen)
    srv, t, port = start_server(app)
    from ragtune.serve.server import Embeddings

    emb = Embeddings(app.state.runtime).get()  # the embedder the route uses: its tokenizer and maximum
    yield f"http://127.0.0.1:{port}/v1/embeddings", emb
    srv.should_exit = True
    t.join(10)


def tokens(emb: Any, text: str) -> list[int]:
    return emb.tokenizer(text, add_special_tokens=False)["input_ids"]


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url, json={"model": "any", **body}, timeout=60)


def long_text(emb: Any) -> str:
    text = WORDS * (emb.max_tokens // 13 + 3)
    assert len(tokens(emb, text)) > emb.max_tokens
    return text


def test_an_input_over_the_maximum_is_a_400_naming_it(served: Any) -> None:
    url, emb = served
    text = long_text(emb)
    n, limit = len(tokens(emb, text)), emb.max_tokens
    e = assert_error(post(url, input=text), 400, "context_length_exceeded")
    assert e["param"] == "input" and f"input is {n} tokens" in e["message"] and f"at most {limit}" in e["message"]
    assert "truncate_prompt_tokens=-1" in e["message"] and "\n" not in e["message"]

    e = assert_error(post(url, input=["short", "fine too", text, text + "more"]), 400, "context_length_exceeded")
    assert e["param"] == "input.2" and f"input.2 is {n} tokens" in e["message"] and "input.3" in e["message"], e


def test_an_input_of_exactly_the_maximum_is_embedded(served: Any) -> None:
    url, emb = served
    ids = tokens(emb, long_text(emb))[: emb.max_tokens]
    text = emb.tokenizer.decode(ids)
    assert len(tokens(emb, text)) == emb.max_tokens
    r = post(url, input=[text, "short"])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == emb.max_tokens + len(tokens(emb, "short"))


def test_truncate_prompt_tokens_cuts_on_request(served: Any) -> None:
    url, emb = served
    text = long_text(emb)
    # -1: the embedder's own cut (what the route did unasked before): the vector of the first max_tokens tokens
    r = post(url, input=[text, "short"], truncate_prompt_tokens=-1)
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["data"][0]["embedding"], emb.embed([text])[0], rtol=1e-5, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == emb.max_tokens + len(tokens(emb, "short"))
    # N: the first N tokens of each longer input; shorter ones as they are
    r = post(url, input=[text, "short"], truncate_prompt_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    first5 = " ".join(WORDS.split()[:5])
    np.testing.assert_allclose(body["data"][0]["embedding"], emb.embed([first5])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["data"][1]["embedding"], emb.embed(["short"])[0], rtol=1e-5, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == 5 + len(tokens(emb, "short"))


@pytest.mark.parametrize("value", [0, -2, 10_000, "5"])
def test_a_bad_truncate_prompt_tokens_is_a_400_naming_it(served: Any, value: Any) -> None:
    url, emb = served
    e = assert_error(post(url, input="hello", truncate_prompt_tokens=value), 400, "invalid_request")
    assert e["param"] == "truncate_prompt_tokens", e
    if isinstance(value, int):
        assert f"from 1 to {emb.max_tokens}" in e["message"]


@pytest.mark.parametrize("ids", [[101, 2023, 102], [[101, 2023], [7592]]])
def test_token_id_inputs_are_refused_saying_to_send_text(served: Any, ids: Any) -> None:
    """What LangChain's OpenAIEmbeddings sends unless check_embedding_ctx_length=False (tiktoken ids)."""
    url, _ = served
    e = assert_error(post(url, input=ids), 400, "unsupported")
    assert e["param"] == "input" and "token ids" in e["message"] and "check_embedding_ctx_length=False" in e["message"]
