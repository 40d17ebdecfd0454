"""The chat request: its schema, the checks past the schema, and what it asks of the generator.

    req = parse_request(body, cfg)        # a ChatRequest, or a 400 naming the field (serve.* limits)
    messages = to_messages(req)           # [{"role", "content", tool fields...}]; text parts joined
    kwargs = generation_kwargs(req, d, cfg)
    kwargs.update(output_kwargs(req, d))  # grammar (response_format, forced tool calls) and the ToolPlan
    d.generator.stream(messages, **kwargs)

Types are strict, as OpenAI's API: "stream": "yes" is a 400, not a guess; fields not used are allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ragtune.serve.deployments import Deployment
from ragtune.serve.protocol import APIError, read_json, validation_error

MIN_TEMPERATURE = 0.01  # 0 < t below this divides logits into inf/nan probabilities; 0 is greedy
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # transformers' stop-string tables grow with a stop's length times the vocabulary


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    # strict types, as OpenAI's API: "stream": "yes" or "max_tokens": "5" is a 400 naming the field, not
    # a guess; clients send fields we do not use (user, metadata, ...)
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)  # typed, then refused
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)  # unless 0 (unsupported)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    response_format: Any = None  # checked by ragtune.serve.constrained (400s that name the part)
    tools: Any = None  # these three by ragtune.serve.tools
    tool_choice: Any = None
    parallel_tool_calls: Any = None


def parse_request(body: bytes, cfg: Any) -> ChatRequest:
    data = read_json(body)
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    s = cfg.serve
    if len(req.messages) > s.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; the limit is {s.max_messages} (serve.max_messages)",
                       param="messages", code="too_many_messages")
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name)
        if v is not None and v > s.max_tokens_limit:
            raise APIError(400, f"{name}={v} is over the limit {s.max_tokens_limit} (serve.max_tokens_limit)",
                           param=name, code="max_tokens_too_large")
    if req.stream_options is not None and not req.stream:  # OpenAI's 400: the options would be ignored unsaid
        raise APIError(400, "stream_options is only allowed when stream is true; send \"stream\": true or leave "
                       "stream_options out", param="stream_options", code="invalid_request")
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported")
    extra = req.model_extra or {}
    for name, now in (("functions", "tools"), ("function_call", "tool_choice")):  # ignored, a call would not come
        if extra.get(name) is not None:
            raise APIError(400, f"{name} is OpenAI's deprecated form of {now}, which this server takes: send the "
                           f"functions as tools=[{{\"type\": \"function\", \"function\": {{...}}}}] and {now}",
                           param=name, code="unsupported")
    for name in ("logprobs", "top_logprobs"):  # asked for and answered with null would look like a server bug
        if extra.get(name):
            raise APIError(400, f"{name} is not supported by this server (answers carry no token "
                                "log-probabilities); leave it out or set it to false/0", param=name, code="unsupported")
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):  # ignored, the answer would differ unsaid
        if getattr(req, name):  # 0, {} and null are what clients send when they mean none
            raise APIError(400, f"{name} is not supported by this server: its decoding has no OpenAI-style penalties "
                           "or token biases (the server's generation.repetition_penalty applies to every answer); "
                           "leave it out or send " + ("{}" if name == "logit_bias" else "0"), param=name,
                           code="unsupported")
    if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature={req.temperature} is too small to sample with (its probabilities "
                       f"overflow); use 0 for greedy decoding or at least {MIN_TEMPERATURE}",
                       param="temperature", code="invalid_request")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: {len(stops)} strings; up to {MAX_STOPS} are taken", param="stop",
                       code="invalid_request")
    for i, x in enumerate(stops):
        where = "stop" if isinstance(req.stop, str) else f"stop.{i}"
        if not x or len(x) > MAX_STOP_CHARS:
            raise APIError(400, f"{where}: a stop string must be non-empty and at most {MAX_STOP_CHARS} characters "
                           f"(this one has {len(x)})", param=where, code="invalid_request")
    return req


def to_messages(req: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages.{i}.content.{j}"
                if part.type != "text":
                    raise APIError(400, f"{where}: content part type '{part.type}' is not supported (text parts "
                                   "only: {\"type\": \"text\", \"text\": ...})", param=where, code="unsupported")
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs its \"text\" (a string); it is missing or null",
                                   param=f"{where}.text", code="invalid_request")
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = m.content or ""
        if m.role in ("user", "system", "developer", "tool") and (m.content is None or m.content == []):
            raise APIError(400, f"messages[{i}]: a {m.role} message needs content (a string or text parts); "
                           "it is missing, null or empty", param=f"messages.{i}.content", code="invalid_request")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                    **tool_fields(m.model_dump(), i)})
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "messages need at least one user message", param="messages", code="invalid_request")
    pair_tool_results(out)
    return out


def pair_tool_results(messages: list[dict[str, Any]]) -> None:
    """Each tool message answers a call an earlier assistant turn made (OpenAI's rule): its tool_call_id
    is checked, and the call's function name is put on it where the client left it out (OpenAI's tool
    messages carry none; the generic tool rendering shows the model that name)."""
    calls: dict[str, str] = {}  # call id -> function name
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or ():
            if c["id"]:
                calls[c["id"]] = c["function"]["name"]
        if m["role"] != "tool":
            continue
        cid = m["tool_call_id"]
        if cid not in calls:
            made = ", ".join(f"{k} ({v})" for k, v in list(calls.items())[-8:]) or "none"
            shown = cid if len(cid) <= 80 else cid[:80] + "..."
            raise APIError(400, f"messages[{i}]: tool_call_id '{shown}' answers no call of an earlier assistant turn "
                           f"(calls made: {made}); send the id of the tool_calls entry this result answers",
                           param=f"messages.{i}.tool_call_id", code="invalid_request")
        m.setdefault("name", calls[cid])


def tool_fields(m: dict[str, Any], i: int) -> dict[str, Any]:
    from ragtune.serve.tools import ToolError, check_tool_turn

    try:
        return check_tool_turn(m, i)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_request") from exc


def generation_kwargs(req: ChatRequest, d: Deployment, cfg: Any) -> dict[str, Any]:
    gcfg = cfg.generation
    max_tokens = req.max_completion_tokens or req.max_tokens or min(gcfg.max_new_tokens, cfg.serve.max_tokens_limit)
    temperature = gcfg.temperature if req.temperature is None else req.temperature
    seed = None if req.seed is None else req.seed % 2**64  # negative seeds as their unsigned twin
    return dict(adapter=d.adapter_name, retriever=d.retriever, max_new_tokens=max_tokens,
                temperature=temperature, top_p=req.top_p, seed=seed, rag=cfg.rag,
                stop=[req.stop] if isinstance(req.stop, str) else req.stop)


def output_kwargs(req: ChatRequest, d: Deployment) -> dict[str, Any]:
    """`grammar` (response_format, or calls only for tool_choice required / a named function) and `tools`
    (a ragtune.serve.tools.ToolPlan); a malformed or unenforceable one is a 400 naming the field."""
    from ragtune.serve.constrained import UnsupportedSchema, response_format_grammar
    from ragtune.serve.tools import ToolError, plan_tools

    try:
        grammar = response_format_grammar(req.response_format)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        calls_only = plan.grammar() if plan is not None else None
    except (UnsupportedSchema, ToolError) as exc:
        code = "invalid_response_format" if exc.param.startswith("response_format") else "invalid_tools"
        raise APIError(400, str(exc), param=exc.param, code=code) from exc
    if grammar is not None and calls_only is not None:
        raise APIError(400, "response_format and a tool_choice that forces a call cannot both constrain the answer; "
                       "send one of them", param="response_format", code="invalid_request")
    out: dict[str, Any] = {}
    if grammar or calls_only:
        out["grammar"] = grammar or calls_only
    if plan is not None:
        out["tools"] = plan
    if d.engine == "openai":  # checked as for a local engine, then forwarded as sent
        return {k: v for k, v in (("response_format", req.response_format), ("tools", req.tools),
                                  ("tool_choice", req.tool_choice),
                                  ("parallel_tool_calls", req.parallel_tool_calls)) if v is not None}
    return out
