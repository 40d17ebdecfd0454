"""What goes over the wire to a remote OpenAI-compatible server, and what its refusals mean here.

    body = request_body(model, messages, cfg.generation, max_new_tokens, temperature, top_p, seed, stop,
                        stream, passed, schema_form)   # the /chat/completions JSON
    msgs = [wire_message(m) for m in messages]         # tool-call arguments as JSON strings, as OpenAI sends
    raise refusal(url, response)                       # a non-200: RemoteFailed (502/429) or the request's 400

Used by serve/remote.py (RemoteGenerator) and serve/remote_stream.py. RemoteFailed is the remote being
down or failing (`ragtune serve` answers 502, or 429 for a busy remote); a plain RagtuneError is the
remote refusing the request itself (the client's 400). A server that rejects OpenAI's json_schema
response_format (llama-cpp-python's `llama_cpp.server`) is sent `schema_as_json_object(body)` instead.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ragtune.errors import RagtuneError

PASSED = ("response_format", "tools", "tool_choice", "parallel_tool_calls")  # forwarded as they are


class RemoteFailed(RagtuneError):
    """The remote engine is down, broke off, or refused for a reason of this server's (its key, its model
    name, a 5xx): `ragtune serve` answers 502, a server error a client may retry, not the client's 400.
    A remote's 429 stays a 429; its other 4xx (a prompt over its context, ...) stay the request's 400."""

    def __init__(self, message: str, status: int = 502, code: str = "engine_unavailable"):
        super().__init__(message)
        self.api_status, self.api_code = status, code


def remote_refusal(url: str, status: int, detail: str) -> RagtuneError:
    """What a remote's non-200 answer is here (see RemoteFailed)."""
    message = f"remote engine {url} answered {status}: {detail}"
    if status == 429:
        return RemoteFailed(message, 429, "server_busy")
    if status >= 500 or status in (401, 403, 404):
        return RemoteFailed(message, 502, "engine_error")
    return RagtuneError(message)


def refusal(url: str, r: Any) -> RagtuneError:
    """remote_refusal of a read non-200 httpx response, with the remote's own error message."""
    try:
        detail = r.json().get("error", {}).get("message") or r.text[:300]
    except (ValueError, AttributeError):
        detail = r.text[:300]
    return remote_refusal(url, r.status_code, detail)


def request_body(model: str, messages: list[dict[str, Any]], g: Any, max_new_tokens: int | None,
                 temperature: float | None, top_p: float | None, seed: int | None, stop: Sequence[str] | None,
                 stream: bool, passed: dict[str, Any] | None = None, schema_form: str = "json_schema"
                 ) -> dict[str, Any]:
    """The /chat/completions body; unset settings are generation's (`g`), `passed` fields go as they are."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream,
                            "max_tokens": int(g.max_new_tokens if max_new_tokens is None else max_new_tokens),
                            "temperature": float(g.temperature if temperature is None else temperature)}
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update({k: v for k, v in (passed or {}).items() if k in PASSED and v is not None})
    if schema_form == "json_object":
        body = schema_as_json_object(body)
    return body


def schema_as_json_object(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's json_schema response_format in the form llama-cpp-python's server takes."""
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return body
    spec = rf.get("json_schema") or {}
    return {**body, "response_format": {"type": "json_object", "schema": spec.get("schema", {"type": "object"})}}


def may_refuse_schema(body: dict[str, Any], r: Any) -> bool:
    """Whether `r` may be a refusal of the json_schema form (llama_cpp.server answers its validation error
    with a 500 that names response_format.type); the caller reads the text to be sure."""
    return r.status_code in (400, 422, 500) and (body.get("response_format") or {}).get("type") == "json_schema"


def checked_passed(passed: dict[str, Any]) -> dict[str, Any]:
    """The generator's extra keyword arguments: only the PASSED fields (a TypeError names the others)."""
    unknown = sorted(set(passed) - set(PASSED))
    if unknown:
        raise TypeError(f"RemoteGenerator got unexpected keyword argument(s) {', '.join(unknown)}")
    return passed


def wire_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message in OpenAI's request shape (tool-call arguments as a JSON string, as the API sends them)."""
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id") or "", "type": "function", "function": {
            "name": c["function"]["name"],
            "arguments": a if isinstance(a := c["function"].get("arguments", "{}"), str) else json.dumps(a)}}
            for c in m["tool_calls"]]
    for k in ("tool_call_id", "name"):
        if m.get(k):
            out[k] = m[k]
    return out
