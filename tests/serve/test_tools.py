"""Tool calls through the official openai client against a real server: forced calls (required, a named
function) are always valid calls (the tiny random model writes garbage unless constrained), streamed
as tool_call deltas, tool results accepted in the next request; malformed tools are 400s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.export.conftest import NEEDS_LLAMA_CPP
from tests.serve.test_structured_output import serve

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> Any:
    import openai

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\nserve:\n  deployments:\n    - {{name: base}}\n")
    server, t, url = serve(create_app(load_config(f), generator=loaded_gen))
    yield openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    server.should_exit = True
    t.join(10)


def valid(calls: Any, names: set[str]) -> None:
    import jsonschema

    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


@pytest.mark.parametrize("settings", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_required_and_named_calls_are_valid_calls(client: Any, settings: dict[str, Any]) -> None:
    r = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=200, **settings)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    valid(ch.message.tool_calls, {"get_weather", "add"})
    assert r.model_extra["ragtune"]["tool_rendering"] == "generic"  # tiny_llama's template has no tools
    r = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, max_tokens=300,
                                       tool_choice={"type": "function", "function": {"name": "add"}}, **settings)
    ch = r.choices[0]
    calls = ch.message.tool_calls
    if ch.finish_reason == "length":  # the tiny model writes calls until cut off: the last one is cut
        calls = calls[:-1]
    else:
        assert ch.finish_reason == "tool_calls"
    valid(calls, {"add"})
    assert 1 <= len(calls) <= 8


def streamed(client: Any, **kw: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """Content, tool calls (id, name, arguments joined from their deltas) and finish_reason of a stream."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += d.id or ""
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
    return content, [calls[k] for k in sorted(calls)], finish


def test_streamed_calls_come_as_tool_call_deltas(client: Any) -> None:
    content, calls, finish = streamed(client, model="base", messages=ASK, tools=TOOLS, tool_choice="required",
                                      max_tokens=300, temperature=0)
    if finish == "length":  # the tiny model writes calls until cut off: the last one is cut
        calls = calls[:-1]
    else:
        assert finish == "tool_calls"
    assert calls and content == ""
    import jsonschema

    for slot in calls:
        assert slot["id"].startswith("call_") and slot["name"] in PARAMS
        jsonschema.validate(json.loads(slot["arguments"]), PARAMS[slot["name"]])


def test_a_tool_result_is_accepted_in_the_next_request(client: Any, loaded_gen: Any) -> None:
    first = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "18 C, sunny"}]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="base", messages=history, tools=TOOLS, tool_choice=choice,
                                           max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    from ragtune.serve.tools import plan_tools

    job = loaded_gen.prepare([*history[:1], {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                        "arguments": json.loads(call.function.arguments)}}]},
        history[2]], tools=plan_tools(TOOLS, "auto"))
    args = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert f'<tool_call>{{"name": "get_weather", "arguments": {args}}}</tool_call>' in job.prompt
    assert f'<tool_response name="get_weather" id="{call.id}">\n18 C, sunny\n</tool_response>' in job.prompt
    assert '"name": "add"' in job.prompt and job.rendering == "generic"


def test_a_tool_result_names_its_call_or_is_refused(client: Any, loaded_gen: Any) -> None:
    """OpenAI's tool messages carry tool_call_id, not the function's name: the generic rendering showed the
    model `<tool_response name="">`, and a result answering no call was taken as if it did."""
    import httpx

    from ragtune.serve.chat_request import ChatRequest, to_messages

    made = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}
    history = ASK + [made, {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"}]
    msgs = to_messages(ChatRequest.model_validate({"model": "base", "messages": history}))
    assert msgs[-1]["name"] == "get_weather"
    job = loaded_gen.prepare(msgs, tools=None)
    assert '<tool_response name="get_weather" id="c1">\n18 C, sunny\n</tool_response>' in job.prompt
    url = str(client.base_url).rstrip("/") + "/chat/completions"
    for wrong, at in ((history[:1] + [{"role": "tool", "tool_call_id": "c1", "content": "r"}], 1),
                      (history[:-1] + [{"role": "tool", "tool_call_id": "c2", "content": "r"}], 2)):
        r = httpx.post(url, json={"model": "base", "messages": wrong, "tools": TOOLS}, timeout=30)
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert e["param"] == f"messages.{at}.tool_call_id" and "answers no call" in e["message"], e
    r = httpx.post(url, json={"model": "base", "messages": history, "tools": TOOLS, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param", [
    ({"tools": "nope"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools.0"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nosuch"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_malformed_tools_are_400s_naming_the_field(client: Any, body: dict[str, Any], param: str) -> None:
    import httpx

    url = str(client.base_url).rstrip("/") + "/chat/completions"
    r = httpx.post(url, json={"model": "base", "messages": [{"role": "user", "content": "q"}], **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


HERMES = ("{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
          "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
          "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_a_template_with_tool_support_renders_them_itself(tiny_llama: Path) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.serve.light_tokenizer import LightTokenizer
    from ragtune.serve.tools import plan_tools, render_with_tools

    plan = plan_tools(TOOLS, "auto")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    outs = []
    for tok in (load_tokenizer(tiny_llama), LightTokenizer(tiny_llama)):
        prompt, how = render_with_tools(tok, msgs, plan, HERMES)
        assert how == "template" and '"name": "get_weather"' in prompt and '<tool_call>{"name": "add", "arguments": {"a": 1' in prompt
        outs.append(prompt)
    assert outs[0] == outs[1]
    assert render_with_tools(load_tokenizer(tiny_llama), msgs, plan)[1] == "generic"


def test_parse_calls_auto_is_best_effort() -> None:
    from ragtune.serve.tools import parse_calls, plan_tools

    plan = plan_tools(TOOLS, "auto")
    calls, content = parse_calls('Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', plan)
    assert [c["function"]["name"] for c in calls] == ["add"] and content == "Sure."
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    text = '<tool_call>{"name": "nosuch", "arguments": {}}</tool_call> <tool_call>{broken</tool_call>'
    assert parse_calls(text, plan) == ([], text)
    assert parse_calls(text, plan_tools(TOOLS, "none")) == ([], text)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_cut_by_max_tokens_is_a_cut_call_never_markup(client: Any, choice: Any) -> None:
    """As OpenAI's API: finish_reason "length" and the call with its arguments as far as they got, whole
    and streamed alike; the raw `<tool_call>{"na...` text was the content, with finish_reason "length"."""
    kw = dict(model="base", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, temperature=0)
    full = client.chat.completions.create(max_tokens=200, **kw)
    assert full.choices[0].finish_reason == "tool_calls"
    (call,) = full.choices[0].message.tool_calls
    args = json.dumps(json.loads(call.function.arguments), separators=(",", ":"), ensure_ascii=False)  # as decoded
    named = set()
    for n in range(1, full.usage.completion_tokens):
        r = client.chat.completions.create(max_tokens=n, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "length" and ch.message.content is None, (n, ch)
        got = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]
        assert got in ([], [(call.function.name, got[0][1] if got else "")]), (n, got)
        if isinstance(choice, dict):
            assert got, n  # a named function's call is there from the first token
        if got:
            named.add(n)
            cut = got[0][1]
            assert args.startswith(cut) or json.loads(cut) == json.loads(call.function.arguments), (n, cut, args)
        content, calls, finish = streamed(client, max_tokens=n, **kw)
        assert finish == "length" and content == "", (n, content)
        assert [(c["name"], c["arguments"]) for c in calls] == got and all(c["id"] for c in calls), n
    assert named and max(named) == full.usage.completion_tokens - 1  # the last cut: whole arguments, no tag end
    assert json.loads(ch.message.tool_calls[0].function.arguments) == json.loads(call.function.arguments)


def test_parse_calls_of_an_answer_cut_by_max_tokens() -> None:
    from ragtune.serve.tools import parse_calls, plan_tools

    auto = plan_tools(TOOLS, "auto")
    calls, content = parse_calls('Let me see. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b"', auto, cut=True)
    assert content == "Let me see." and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] \
        == [("add", '{"a": 1, "b"')]
    text = 'Let me see. <tool_call>{"na'  # auto: not a call yet, stays text as auto's other non-calls do
    assert parse_calls(text, auto, cut=True) == ([], text)
    whole = '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'
    required = plan_tools(TOOLS, "required")
    calls, content = parse_calls(whole + '<tool_call>{"name":"get_weather","arguments":{"ci', required, cut=True)
    assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] \
        == [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"ci')]
    calls, content = parse_calls(whole + "<tool_", required, cut=True)
    assert content is None and len(calls) == 1
    calls, content = parse_calls(whole[:-3], required, cut=True)  # only the closing tag cut: whole arguments
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert parse_calls('<tool_call>{"name":"a', required, cut=True) == ([], None)
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}})
    for text in ("<", "<tool_call>", '<tool_call>{"name":"ad'):  # the name is the request's from the start
        calls, content = parse_calls(text, named, cut=True)
        assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("add", "")]
    assert parse_calls('<tool_call>{"name":"a', required) == ([], '<tool_call>{"name":"a')  # not cut: unchanged


@NEEDS_LLAMA_CPP
def test_forced_calls_on_the_llama_cpp_engine(tiny_smol: Path, converter_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\ngeneration:\n  threads: 1\n  engine: llama.cpp\n"
                 "serve:\n  max_batch: 2\n  deployments:\n    - {name: cpp}\n")
    server, t, url = serve(create_app(load_config(f)))
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="cpp", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
        valid(r.choices[0].message.tool_calls, {"get_weather", "add"})
        assert r.model_extra["ragtune"]["tool_rendering"] == "generic"  # SmolLM2's template has no tools
    finally:
        server.should_exit = True
        t.join(10)


def test_langchain_structured_output_and_bind_tools(client: Any) -> None:
    """What LangChain apps call: ChatOpenAI(...).with_structured_output(Model) and bind_tools(...)."""
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=10)
        unit: Literal["c", "f"]

    class Add(BaseModel):
        """Add two numbers."""

        a: int = Field(ge=0, le=99)
        b: int = Field(ge=0, le=99)

    llm = ChatOpenAI(model="base", base_url=str(client.base_url), api_key="x", temperature=0, max_retries=0,
                     max_tokens=200)
    got = llm.with_structured_output(Weather, method="json_schema", strict=True).invoke("Weather in Paris?")
    assert isinstance(got, Weather) and len(got.city) <= 10
    msg = llm.bind_tools([Add], tool_choice="required", parallel_tool_calls=False).invoke("What is 2 + 3?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "Add"
    Add(**msg.tool_calls[0]["args"])


def test_auto_streams_text_that_is_not_a_call(client: Any) -> None:
    whole = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    deltas = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="base", messages=ASK, tools=TOOLS, max_tokens=24, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert not whole.choices[0].message.tool_calls  # the random model writes no call: plain text
    assert "".join(deltas) == whole.choices[0].message.content and len(deltas) > 1


def test_a_model_whose_template_takes_tools_renders_and_calls_through_it(
        tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import openai

    from tests.tinymodels import build_tiny_causal_lm

    model = build_tiny_causal_lm("qwen3", tmp_path_factory.mktemp("models") / "tiny-qwen-tools", tiny_llama,
                                 template=HERMES)
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {model}\ngeneration:\n  engine: transformers\nserve:\n  deployments:\n"
                 "    - {name: q}\n")
    server, t, url = serve(create_app(load_config(f)))
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="q", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)
        assert r.model_extra["ragtune"]["tool_rendering"] == "template"
        valid(r.choices[0].message.tool_calls, {"get_weather", "add"})
        call = r.choices[0].message.tool_calls[0]
        r2 = client.chat.completions.create(model="q", max_tokens=4, temperature=0, tools=TOOLS, messages=[
            *ASK, r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 C"}])
        assert r2.model_extra["ragtune"]["tool_rendering"] == "template" and r2.usage.prompt_tokens > 0
    finally:
        server.should_exit = True
        t.join(10)
