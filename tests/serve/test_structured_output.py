"""response_format through grammar-constrained decoding: every answer parses and validates against its
schema on both engines (tiny random models: garbage unless constrained), malformed ones are 400s."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import start_server
from tests.export.conftest import NEEDS_LLAMA_CPP

SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string", "maxLength": 8},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "status"],
               "properties": {
                   "user": {"type": "object", "additionalProperties": False, "required": ["id", "tags"],
                            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                           "tags": {"type": "array", "maxItems": 3,
                                                    "items": {"type": "string", "maxLength": 5}}}},
                   "status": {"enum": ["ok", "fail", "unknown"]}}},
    "refs": {"type": "object", "additionalProperties": False, "required": ["p", "note", "flags"],
             "$defs": {"pt": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                              "properties": {"x": {"type": "integer", "minimum": -10, "maximum": 10},
                                             "y": {"type": "boolean"}}}},
             "properties": {"p": {"$ref": "#/$defs/pt"},
                            "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
                            "flags": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"const": "on"}}}},
}
SETTINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.5, "seed": 7}]


def serve(app: Any) -> Any:
    server, t, port = start_server(app)
    return server, t, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def tf_url(tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> Any:
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  deployments:\n    - {{name: base}}\n")
    server, t, url = serve(create_app(load_config(f), generator=loaded_gen))
    yield url
    server.should_exit = True
    t.join(10)


def fmt(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def check_all(url: str, model: str) -> None:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    for name, schema in SCHEMAS.items():
        for s in SETTINGS:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"A {name}?"}],
                                               response_format=fmt(name), max_tokens=300, **s)
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", (name, s, text)
            jsonschema.validate(json.loads(text), schema)
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A person?"}],
                                           max_tokens=20, temperature=0)
    with pytest.raises(ValueError):  # unconstrained, the random model's answer is not JSON: the mask is the proof
        json.loads(plain.choices[0].message.content)


def test_every_json_schema_answer_validates_on_the_transformers_engine(tf_url: str) -> None:
    check_all(tf_url, "base")


def test_json_object_and_streamed_json_schema(tf_url: str) -> None:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=tf_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=400, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: a prefix of an object, as OpenAI's
        assert r.choices[0].message.content.startswith("{")
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "nested"}], response_format=fmt("nested"),
        max_tokens=300, temperature=0, stream=True) if c.choices]
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS["nested"])


@pytest.mark.parametrize("rf, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema"),
])
def test_malformed_response_format_is_a_400(tf_url: str, rf: Any, param: str) -> None:
    import httpx

    r = httpx.post(tf_url + "/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "q"}],
                                                       "response_format": rf}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("keyword, schema", [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
])
def test_an_unsupported_schema_feature_is_named_in_the_400(tf_url: str, keyword: str, schema: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=tf_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "q"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "s", "schema": schema}})
    assert f'"{keyword}"' in e.value.body["message"] and e.value.body["param"] == "response_format.json_schema.schema"


LOOP = {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("schema, chain", [
    ({"$ref": "#"}, "# -> #"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": LOOP}, "#/$defs/a -> #/$defs/b -> #/$defs/a"),
    ({"anyOf": [{"$ref": "#"}]}, "# -> #"),
])
def test_a_ref_cycle_without_a_value_is_a_400_up_front(tf_url: str, schema: Any, chain: str, stream: bool) -> None:
    """llguidance accepted these and gave up on the first token: a 400 blaming "repetition counts in
    `pattern`", and for a stream a 200 with the error in-band. Recursion through a value still answers."""
    import httpx

    def post(body: dict[str, Any]) -> Any:
        return httpx.post(tf_url + "/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "q"}], "max_tokens": 8, "stream": stream,
            **body}, timeout=60)

    r = post({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and err["code"] == "invalid_response_format"
    assert f"({chain})" in err["message"] and "base case" in err["message"], err
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": LOOP,
                                                                           "properties": {"x": {"$ref": "#/$defs/a"}}}}}]
    r = post({"tools": tools, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function.parameters", r.text
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
            "$defs": LOOP}  # recursion through an array, and an unused cycle in $defs
    r = post({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": tree}}})
    assert r.status_code == 200 and "error" not in r.text, r.text


@NEEDS_LLAMA_CPP
def test_every_json_schema_answer_validates_on_the_batched_llama_cpp_engine(
        tiny_smol: Path, converter_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jsonschema
    import openai

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\ngeneration:\n  threads: 1\n  engine: llama.cpp\n"
                 "serve:\n  max_batch: 4\n  deployments:\n    - {name: cpp}\n")
    app = create_app(load_config(f))
    sched = next(iter(app.state.runtime.generators.values())).engine_impl.scheduler
    server, t, url = serve(app)
    try:
        check_all(url, "cpp")
        # concurrent: constrained and plain sequences in one batch, each with its own grammar
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        names = list(SCHEMAS) + [None]
        out: dict[Any, Any] = {}

        def one(name: Any) -> None:
            extra = {"response_format": fmt(name)} if name else {}
            out[name] = client.chat.completions.create(
                model="cpp", messages=[{"role": "user", "content": f"Give {name}"}], max_tokens=120,
                temperature=0, **extra)

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert sched.max_seen_batch >= 2
        for name in SCHEMAS:
            jsonschema.validate(json.loads(out[name].choices[0].message.content), SCHEMAS[name])
        assert out[None].choices[0].message.content
    finally:
        server.should_exit = True
        t.join(10)


def test_ask_schema_prints_json_that_validates(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    import jsonschema

    from ragtune.cli import main

    f = tmp_path / "person.json"
    f.write_text(json.dumps(SCHEMAS["person"]))
    rc = main(["-q", "ask", "Who?", "--no-rag", "--engine", "transformers", "--schema", str(f),
               "--max-new-tokens", "200", "--temperature", "0", f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    jsonschema.validate(json.loads(out), SCHEMAS["person"])


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "is not valid JSON"),
    ('{"type": "array", "uniqueItems": true}', '"uniqueItems"'),
])
def test_ask_schema_errors_name_the_file(tiny_llama: Path, tmp_path: Path, capsys, content: Any, message: str) -> None:
    from ragtune.cli import main

    f = tmp_path / "bad-schema.json"
    if content is not None:
        f.write_text(content)
    rc = main(["ask", "q", "--no-rag", "--schema", str(f), f"model.path={tiny_llama}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and str(f) in err and message in err and "Traceback" not in err
