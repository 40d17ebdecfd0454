"""The remote engine (`engine: openai`) against a real OpenAI-compatible server: llama-cpp-python's own
`llama_cpp.server` on the tiny GGUF export, started and stopped here. ragtune retrieves, builds the
prompt and cites; the remote server only generates: in a deployment, in `ragtune ask --engine openai`,
and with `response_format` / `tools` forwarded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.config import load_config
from ragtune.errors import RagtuneError, UsageError
from tests.conftest import free_port, llama_server, start_server
from tests.export.conftest import NEEDS_LLAMA_CPP
from tests.serve.conftest import FakeRetriever

pytestmark = NEEDS_LLAMA_CPP
QUESTION = "How many days can I work remotely?"
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "days": {"type": "boolean"}},
          "required": ["answer", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Seoul", "Paris"]}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def remote(tiny_f16: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """llama_cpp.server on the tiny GGUF; yields its /v1 base URL."""
    with llama_server(tiny_f16["path"], tmp_path_factory.mktemp("remote") / "llama_cpp_server.log") as url:
        yield url


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


def test_answer_async_gives_answers_answer_on_one_kept_alive_connection(gen: Any) -> None:
    """The server's path for a whole answer (one non-streaming remote request awaited on its event loop)
    answers as `answer` does, sources included, and reuses one kept-alive connection."""
    import anyio

    msgs = [{"role": "user", "content": QUESTION}]
    want = gen.answer(msgs, retriever=FakeRetriever(), max_new_tokens=8, temperature=0.0)

    async def run() -> None:
        got = await gen.answer_async(msgs, retriever=FakeRetriever(), max_new_tokens=8, temperature=0.0)
        assert (got.text, got.mode, got.sources, got.completion_tokens) == (want.text, "rag", want.sources,
                                                                            want.completion_tokens)
        again = await gen.answer_async(msgs, max_new_tokens=4, temperature=0.0)
        assert again.mode == "base" and again.sources == [] and 0 < again.completion_tokens <= 4
        assert len(gen._async_client()._transport._pool.connections) == 1  # the first one, kept alive
        with pytest.raises(UsageError, match="adapter 'policies' cannot be applied"):
            await gen.answer_async(msgs, adapter="policies")
        await gen.aclose()

    anyio.run(run)


class Hanging:
    """A remote that accepts a request and never answers; `closed` is set when the caller drops the
    connection (the remote side sees EOF)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.got_request, self.closed = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.sock.close()  # one request is all it takes
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.got_request.set()
            while conn.recv(65536):  # a body, then nothing until the caller hangs up
                pass
            self.closed.set()


def test_a_client_that_hangs_up_closes_the_remote_request(tiny_smol: Path, tmp_path: Path) -> None:
    """A non-streaming request on a remote deployment whose client gives up: the server cancels the remote
    request, and the remote sees its connection closed (a remote that watches it, e.g. vLLM, stops)."""
    import httpx

    from ragtune.serve.server import create_app

    remote = Hanging()
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n"
                 f"    - {{name: prod, engine: openai, url: '{remote.url}', model: tiny}}\n")
    server, thread, port = start_server(create_app(load_config(f)))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=2.0,
                       json={"model": "prod", "messages": [{"role": "user", "content": QUESTION}]})
        assert remote.got_request.is_set()
        assert remote.closed.wait(10), "the remote connection stayed open after the client hung up"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_streaming_client_that_hangs_up_closes_the_remote_stream_and_frees_its_place(tiny_smol: Path,
                                                                                       tmp_path: Path) -> None:
    """A streamed request on a remote deployment whose client leaves after the first chunk, while the remote
    has sent nothing yet: the remote connection is closed and the request leaves the server's queue."""
    import httpx

    from ragtune.serve.server import create_app

    remote = Hanging()
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n"
                 f"    - {{name: prod, engine: openai, url: '{remote.url}', model: tiny}}\n")
    server, thread, port = start_server(create_app(load_config(f)))
    base = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "prod", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data:") and json.loads(first[5:])["choices"][0]["delta"]["role"] == "assistant"
            assert remote.got_request.wait(10)
            assert httpx.get(base + "/health").json()["queued"] == 1
        assert remote.closed.wait(10), "the remote connection stayed open after the client hung up"
        deadline = time.time() + 10
        while httpx.get(base + "/health").json()["queued"] and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(base + "/health").json()["queued"] == 0
    finally:
        server.should_exit = True
        thread.join(10)


def _deployments(remote: str, tiny_smol: Path, tmp_path: Path) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n"
                 f"    - {{name: prod, engine: openai, url: '{remote}', model: tiny}}\n"
                 f"    - {{name: prod+rag, engine: openai, url: '{remote}', model: tiny, index: docs}}\n")
    return load_config(f)


@pytest.fixture
def deployed(remote: str, tiny_smol: Path, tmp_path: Path) -> Any:
    """A ragtune server whose deployments generate on the remote; yields an openai client for it."""
    import openai

    from ragtune.serve.server import create_app

    app = create_app(_deployments(remote, tiny_smol, tmp_path), retrievers={"docs": FakeRetriever()})
    server, thread, port = start_server(app)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    finally:
        server.should_exit = True
        thread.join(10)


def test_openai_client_through_a_remote_deployment(deployed: Any) -> None:
    client = deployed
    assert [m.id for m in client.models.list()] == ["prod", "prod+rag"]
    resp = client.chat.completions.create(model="prod+rag", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, temperature=0)
    assert [s["n"] for s in resp.model_extra["sources"]] == [1, 2]
    assert resp.usage.completion_tokens > 0 and resp.model == "prod+rag"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="prod+rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
        stream=True) if c.choices]
    assert "".join(parts) == resp.choices[0].message.content


def test_json_schema_through_a_remote_deployment_validates(deployed: Any) -> None:
    """llama_cpp.server refuses OpenAI's json_schema form (422): the schema goes again as its json_object
    form, and the grammar-constrained answer validates, whole and streamed, with ragtune's sources."""
    import jsonschema

    client = deployed
    rf = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    for model in ("prod", "prod+rag"):
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=60, temperature=0, response_format=rf)
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)
        assert len(resp.model_extra["sources"]) == (2 if model == "prod+rag" else 0)
    chunks = list(client.chat.completions.create(model="prod+rag", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=60, temperature=0, response_format=rf, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)
    assert [s["n"] for s in chunks[0].model_extra["sources"]] == [1, 2]

    with pytest.raises(Exception) as err:  # checked here as for a local engine: never reaches the remote
        client.chat.completions.create(model="prod", messages=[{"role": "user", "content": QUESTION}],
                                       response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert err.value.status_code == 400 and err.value.body["param"] == "response_format.json_schema.name"


def test_named_tool_call_through_a_remote_deployment(deployed: Any) -> None:
    """tools and a named tool_choice go to the remote, whose call comes back in OpenAI's tool_calls,
    whole and as stream deltas, with ragtune's sources; the call's result round-trips."""
    import jsonschema

    client = deployed
    choice = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "What is the weather in Seoul?"}]
    resp = client.chat.completions.create(model="prod+rag", messages=msgs, max_tokens=40, temperature=0,
                                          tools=[WEATHER], tool_choice=choice)
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert [s["n"] for s in resp.model_extra["sources"]] == [1, 2]
    assert resp.model_extra["ragtune"]["tool_rendering"] == "remote"

    chunks = list(client.chat.completions.create(model="prod+rag", messages=msgs, max_tokens=40, temperature=0,
                                                 tools=[WEATHER], tool_choice=choice, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == calls[0].function.arguments  # greedy: same
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                     {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model="prod", messages=follow, max_tokens=6, temperature=0)
    assert again.choices[0].message.content and again.usage.completion_tokens > 0  # the remote took both turns


def test_remote_deployment_without_url_or_model_is_a_config_error(tiny_smol: Path, tmp_path: Path) -> None:
    from ragtune.serve.server import plan_deployments

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\nserve:\n  deployments:\n    - {{name: prod, engine: openai}}\n")
    with pytest.raises(UsageError, match=r"engine openai needs `url`.*and `model`"):
        plan_deployments(load_config(f))
    # generation.url/model are the deployments' defaults (and make the default deployments remote)
    d = plan_deployments(load_config(f, ["generation.url=http://h:1/v1", "generation.model=m"]))[0]
    assert d.engine == "openai" and d.remote == {"url": "http://h:1/v1", "model": "m", "api_key": ""}
    g = tmp_path / "plain.yaml"
    g.write_text(f"model:\n  path: {tiny_smol}\ngeneration:\n  engine: openai\n")
    with pytest.raises(UsageError, match=r"generation.engine is openai: set generation.url"):
        plan_deployments(load_config(g))


# --- ragtune ask --engine openai --------------------------------------------------------------------


@pytest.fixture
def indexed(tiny_embedder: Path, tmp_path: Path, capsys) -> list[str]:
    """An index 't' over two small documents; the settings ask needs to search it."""
    from tests.retrieval.conftest import HR_MD, KOREAN_TXT

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hr.md").write_text(HR_MD, encoding="utf-8")
    (docs / "seoul.txt").write_text(KOREAN_TXT, encoding="utf-8")
    emb = [f"embedder.path={tiny_embedder}", "embedder.device=cpu", "rag.min_score=-1"]
    assert main(["-q", "index", "add", str(docs), "--index", "t", "--no-progress", *emb]) == 0
    capsys.readouterr()
    return ["--index", "t", *emb]


def test_ask_engine_openai_prints_the_same_sources_as_a_local_ask(remote: str, tiny_smol: Path, indexed: list[str],
                                                                  tmp_path: Path, capsys) -> None:
    common = ["-q", "ask", "How many vacation days do I get?", "--json", "--temperature", "0",
              "--max-new-tokens", "8", f"model.path={tiny_smol}", *indexed]
    assert main([*common, "--engine", "transformers"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*common, "--engine", "openai", "--url", remote, "--model", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert local["mode"] == out["mode"] == "rag" and local["sources"] and out["sources"] == local["sources"]
    assert out["engine"] == "openai" and out["model"] == "tiny" and out["index"] == "t"
    assert 0 < out["completion_tokens"] <= 8 and out["answer"]

    # config keys instead of flags, and --schema enforced by the remote
    f = tmp_path / "reply.schema.json"
    f.write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert main(["-q", "ask", QUESTION, "--no-rag", "--schema", str(f), "--max-new-tokens", "60",
                 "generation.engine=openai", f"generation.url={remote}", "generation.model=tiny"]) == 0
    import jsonschema

    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)


@pytest.mark.parametrize("argv, names", [
    (["--engine", "openai", "--model", "tiny"], "generation.url is empty"),
    (["--engine", "openai", "--url", "http://127.0.0.1:9/v1"], "generation.model is empty"),
    (["--engine", "openai", "--url", "gpu-box:8000", "--model", "m"], "generation.url 'gpu-box:8000' is not an http"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "m"], "--url, --model name a remote server: add --engine openai"),
    (["--engine", "openai", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--adapter", "runs/a"],
     "--adapter 'runs/a' cannot be applied"),
])
def test_ask_engine_openai_misconfigured_exits_2_naming_the_key(tiny_smol: Path, argv: list[str], names: str,
                                                                capsys) -> None:
    rc = main(["ask", QUESTION, "--no-rag", f"model.path={tiny_smol}", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and names in err and "Traceback" not in err


def test_chat_engine_openai_streams_from_the_remote_with_local_sources(remote: str, tiny_smol: Path,
                                                                      indexed: list[str], capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("How many vacation days do I get?\n/sources\n/exit\n"))
    rc = main(["-q", "chat", f"model.path={tiny_smol}", "--engine", "openai", "--url", remote, "--model", "tiny",
               "--max-new-tokens", "4", "--temperature", "0", *indexed])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "hr.md" in out and "(no sources for the last answer)" not in out
