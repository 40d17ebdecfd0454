"""The remote engine (`engine: openai`) against a real OpenAI-compatible server: llama-cpp-python's own
`llama_cpp.server` on the tiny GGUF export, started and stopped here. ragtune retrieves, builds the
prompt and cites; the remote server only generates.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.errors import RagtuneError, UsageError
from tests.conftest import free_port
from tests.export.conftest import (  # noqa: F401 - fixtures reused from tests/export
    NEEDS_LLAMA_CPP,
    converter_home,
    real_sdist,
    smol_tokenizer_dir,
    tiny_f16,
    tiny_smol,
)
from tests.serve.conftest import FakeRetriever

pytestmark = NEEDS_LLAMA_CPP
QUESTION = "How many days can I work remotely?"


@pytest.fixture(scope="module")
def remote(tiny_f16: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """llama_cpp.server on the tiny GGUF; yields its /v1 base URL and the path of its log."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("remote") / "llama_cpp_server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_f16["path"]), "--host", "127.0.0.1",
         "--port", str(port), "--model_alias", "tiny", "--n_ctx", "2048", "--n_threads", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"llama_cpp.server did not start: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def gen(remote: str, tiny_smol: Path) -> Any:
    from ragtune.serve.remote import RemoteGenerator

    g = RemoteGenerator(load_config(None, [f"model.path={tiny_smol}"]), remote, "tiny")
    yield g
    g.close()


def test_remote_engine_answers_with_sources_from_ragtunes_retrieval(gen: Any) -> None:
    r = FakeRetriever()
    ans = gen.answer([{"role": "user", "content": QUESTION}], retriever=r, max_new_tokens=8, temperature=0.0)
    assert r.queries == [QUESTION]
    assert ans.mode == "rag" and not ans.abstained
    assert [s["n"] for s in ans.sources] == [1, 2] and ans.sources[0]["source"] == "policies/remote.md"
    assert 0 < ans.completion_tokens <= 8
    assert ans.prompt_tokens > 60  # the remote got the numbered sources in its prompt, not the bare question
    plain = gen.answer([{"role": "user", "content": QUESTION}], max_new_tokens=8, temperature=0.0)
    assert plain.mode == "base" and plain.sources == [] and plain.prompt_tokens < ans.prompt_tokens

    s = gen.stream([{"role": "user", "content": QUESTION}], retriever=r, max_new_tokens=8, temperature=0.0)
    assert [x["n"] for x in s.sources] == [1, 2]
    text = "".join(s)
    assert text == ans.text and s.answer.completion_tokens == ans.completion_tokens  # greedy: same answer


def test_remote_engine_abstains_without_calling_the_remote(tiny_smol: Path) -> None:
    from ragtune.serve.remote import RemoteGenerator

    weak = FakeRetriever([{**FakeRetriever().hits[0], "dense_score": 0.05}])
    g = RemoteGenerator(load_config(None, [f"model.path={tiny_smol}"]), f"http://127.0.0.1:{free_port()}/v1", "x")
    try:
        ans = g.answer([{"role": "user", "content": QUESTION}], retriever=weak)
        assert ans.abstained and ans.text == g.cfg.rag.not_found_message and ans.sources == []
        with pytest.raises(RagtuneError, match="could not be reached"):  # nothing listens there
            g.answer([{"role": "user", "content": QUESTION}])
        with pytest.raises(UsageError, match="adapter"):
            g.answer([{"role": "user", "content": QUESTION}], adapter="policies")
        assert g.load() is g and g.engine == "openai"  # takes a local Generator's place (eval)
        with pytest.raises(UsageError, match=r"adapters \(policies\) cannot be applied"):
            g.load(adapters={"policies": "runs/adapter"})
    finally:
        g.close()


def test_openai_client_through_a_remote_deployment(remote: str, tiny_smol: Path, tmp_path: Path) -> None:
    import openai
    import uvicorn

    from ragtune.serve.server import create_app

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n"
                 f"    - {{name: prod, engine: openai, url: '{remote}', model: tiny}}\n"
                 f"    - {{name: prod+rag, engine: openai, url: '{remote}', model: tiny, index: docs}}\n")
    app = create_app(load_config(f), retrievers={"docs": FakeRetriever()})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["prod", "prod+rag"]
        resp = client.chat.completions.create(model="prod+rag", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=6, temperature=0)
        assert [s["n"] for s in resp.model_extra["sources"]] == [1, 2]
        assert resp.usage.completion_tokens > 0 and resp.model == "prod+rag"
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="prod+rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
            stream=True) if c.choices]
        assert "".join(parts) == resp.choices[0].message.content
    finally:
        server.should_exit = True
        t.join(10)


def test_remote_deployment_without_url_or_model_is_a_config_error(tiny_smol: Path, tmp_path: Path) -> None:
    from ragtune.serve.server import plan_deployments

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n    - {{name: prod, engine: openai}}\n")
    with pytest.raises(UsageError, match=r"engine openai needs `url`.*and `model`"):
        plan_deployments(load_config(f))
