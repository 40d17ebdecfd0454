"""POST /v1/chat/completions: the answer whole, or streamed as OpenAI's chunks (SSE, ends with [DONE]).

    add_chat_route(app, runtime)    # create_app does this

A whole answer is generated as a stream too, cancelled when the client hangs up (answer_unless_disconnected);
a streamed one holds its queue slot until the stream ends (start_stream, sse_events). The answer's sources
come back in the extra field `sources`, ragtune's details in `ragtune`; with tools, `<tool_call>` text
becomes tool_calls (serve/tools.py), and a call cut off by max_tokens is a call with its arguments as far
as they got and finish_reason "length", as on OpenAI's API.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request

from ragtune.errors import RagtuneError
from ragtune.serve.chat_request import generation_kwargs, output_kwargs, parse_request, to_messages
from ragtune.serve.deployments import Deployment, Runtime, unknown_model
from ragtune.serve.protocol import APIError, error_body, read_body

log = logging.getLogger(__name__)


def add_chat_route(app: Any, runtime: Runtime) -> None:
    """POST /v1/chat/completions: parse and check, then answer whole or as a stream."""
    cfg = runtime.cfg

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, cfg.serve.max_body_bytes)
        req = parse_request(body, cfg)
        d = runtime.find(req.model)
        if d is None:
            raise unknown_model(req.model, runtime)
        if d.unavailable:
            raise APIError(400, d.unavailable, param="model", code="engine_unavailable")
        messages = to_messages(req)
        kwargs = generation_kwargs(req, d, cfg)
        kwargs.update(output_kwargs(req, d))
        plan = kwargs.get("tools") if d.engine != "openai" else None  # a remote parses its own calls
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())
        runtime.enter()
        if not req.stream:
            try:
                ans = await answer_unless_disconnected(request, d, messages, kwargs)
            finally:
                runtime.leave()
            return completion_body(cid, now, d, ans, plan)
        stream = await start_stream(d, messages, kwargs, runtime)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        from fastapi.responses import StreamingResponse

        return StreamingResponse(sse_events(stream, cid, now, d, include_usage, runtime, plan),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def request_error(exc: RagtuneError) -> APIError:
    """A generator's refusal as a 400, with the OpenAI code its kind carries (`api_code`: a prompt over the
    model's context is ragtune.errors.PromptTooLong, context_length_exceeded); a kind with an `api_status`
    keeps it (a remote engine that is down: ragtune.serve.remote.RemoteFailed, a 502 server_error)."""
    code = getattr(exc, "api_code", None)
    status = getattr(exc, "api_status", 400)
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return APIError(status, str(exc), kind, param="messages" if code == "context_length_exceeded" else None,
                    code=code)


DISCONNECT_POLL_S = 0.1


async def answer_unless_disconnected(request: Any, d: Deployment, messages: list[dict[str, str]],
                                     kwargs: dict[str, Any]) -> Any:
    """The whole answer, generated as a stream that is cancelled when the client hangs up
    (the same cancellation a streaming request gets), so a gone client frees the model."""
    import anyio
    from starlette.concurrency import run_in_threadpool

    if hasattr(d.generator, "answer_async"):  # engine openai: one remote request on this loop, no threads
        return await remote_answer_unless_disconnected(request, d, messages, kwargs)
    try:
        stream = await run_in_threadpool(d.generator.stream, messages, **kwargs)
    except RagtuneError as exc:
        raise request_error(exc) from exc
    result: dict[str, Any] = {}

    def drain() -> None:
        try:
            for _ in stream:
                pass
        except BaseException as exc:  # handed to the request below
            result["error"] = exc

    done = anyio.Event()

    async def run() -> None:
        await anyio.to_thread.run_sync(drain)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        while not done.is_set():
            with anyio.move_on_after(DISCONNECT_POLL_S):
                await done.wait()
            gone = not done.is_set() and await request.is_disconnected()
            if gone:
                stream.close()  # the worker stops at its next token; drain() then returns
                log.info("client disconnected from a %s request: generation cancelled", d.name)
                await done.wait()
    stream.close()
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, RagtuneError):
            raise request_error(exc) from exc
        raise exc
    ans = stream.answer
    if ans is not None and ans.finish_reason == "cancelled":
        log.info("cancelled after %d of %d tokens", ans.completion_tokens, kwargs["max_new_tokens"])
    return ans


async def remote_answer_unless_disconnected(request: Any, d: Deployment, messages: list[dict[str, str]],
                                            kwargs: dict[str, Any]) -> Any:
    """A remote engine's whole answer as one non-streaming remote request awaited here (a streamed one
    and the worker threads around it cost the remote and this server a wake-up per token); a client that
    hangs up cancels it, which closes the remote connection."""
    import anyio

    result: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        async def call() -> None:
            try:
                result["answer"] = await d.generator.answer_async(messages, **kwargs)
            except Exception as exc:  # handed to the request below
                result["error"] = exc
            tg.cancel_scope.cancel()  # ends the watch

        async def watch() -> None:
            while True:
                await anyio.sleep(DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    log.info("client disconnected from a %s request: remote request cancelled", d.name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(call)
        tg.start_soon(watch)
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, RagtuneError):
            raise request_error(exc) from exc
        raise exc
    if "answer" not in result:
        raise APIError(400, "the client disconnected before the answer was ready", code="client_disconnected")
    return result["answer"]


async def start_stream(d: Deployment, messages: list[dict[str, str]], kwargs: dict[str, Any],
                       runtime: Runtime) -> Any:
    """The AnswerStream (retrieval has run); the queue slot is released when it ends or fails here."""
    from starlette.concurrency import run_in_threadpool

    try:
        if hasattr(d.generator, "astream"):  # engine openai: the remote's events are read on this loop
            return await d.generator.astream(messages, **kwargs)
        return await run_in_threadpool(d.generator.stream, messages, **kwargs)
    except RagtuneError as exc:
        runtime.leave()
        raise request_error(exc) from exc
    except BaseException:
        runtime.leave()
        raise


def _meta(d: Deployment, ans: Any) -> dict[str, Any]:
    return {"mode": ans.mode, "abstained": ans.abstained, "adapter": ans.adapter, "index": d.index or None,
            "engine": getattr(d.generator, "engine", None) or d.engine, "best_score": ans.best_score,
            "timings": ans.timings,
            "tool_rendering": getattr(ans, "tool_rendering", None)}


def _usage(ans: Any) -> dict[str, int]:
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens}


def _finish(reason: str, calls: Any = ()) -> str:
    """OpenAI's finish_reason: "length" when max_tokens cut the answer, calls or not (a cut call's arguments
    are incomplete), else "tool_calls" when it made calls."""
    return "length" if reason == "length" else "tool_calls" if calls else "stop"


def completion_body(cid: str, created: int, d: Deployment, ans: Any, plan: Any = None) -> dict[str, Any]:
    from ragtune.serve.tools import parse_calls

    calls, content = parse_calls(ans.text, plan, cut=ans.finish_reason == "length")
    if getattr(ans, "tool_calls", None):  # engine openai: the remote's own calls
        calls, content = remote_calls(ans.tool_calls), ans.text or None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": d.name, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish(ans.finish_reason, calls)}],
        "usage": _usage(ans),
        "sources": ans.sources,
        "ragtune": _meta(d, ans),
    }


def remote_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A remote engine's tool_calls in OpenAI's shape (an id where it gave none, arguments as a string)."""
    out = []
    for c in calls:
        fn = c.get("function") or {}
        args = fn.get("arguments", "{}")
        out.append({"id": c.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
                    "function": {"name": str(fn.get("name") or ""),
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


TOOL_OPEN = "<tool_call>"


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
           include_usage: bool, **extra: Any) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        body["usage"] = None
    body.update(extra)
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


_DONE = object()


async def sse_events(stream: Any, cid: str, created: int, d: Deployment, include_usage: bool,
                     runtime: Runtime, plan: Any = None) -> AsyncIterator[str]:
    """OpenAI's chunk stream: role (+ sources) first, content deltas, a finish chunk, usage, [DONE].
    With tools (`plan`) text streams until a `<tool_call>` starts (or may be starting); from there on it
    is held to the end, then sent as tool_calls deltas (each call's id and name, then its arguments)."""
    import anyio

    from ragtune.serve.tools import parse_calls

    from ragtune.serve.generator import held_back

    held: list[str] | None = [] if plan is not None and plan.choice != "none" else None
    sent = 0  # characters of the held text already streamed as content

    try:
        yield _chunk(cid, created, d.name, {"role": "assistant", "content": ""}, None, include_usage,
                     sources=stream.sources)
        try:
            while True:
                delta = await anext(stream, _DONE)  # read on this loop: no worker-thread hop per token
                if delta is _DONE:
                    break
                if held is not None:
                    held.append(delta)
                    text = "".join(held)
                    cut = text.find(TOOL_OPEN)
                    cut = len(text) - held_back(text, [TOOL_OPEN]) if cut < 0 else cut
                    if cut > sent:
                        yield _chunk(cid, created, d.name, {"content": text[sent:cut]}, None, include_usage)
                        sent = cut
                    continue
                yield _chunk(cid, created, d.name, {"content": delta}, None, include_usage)
        except Exception as exc:  # the headers are sent: report in-band, the way OpenAI does
            if isinstance(exc, RagtuneError):  # the request's fault (a grammar given up on): no traceback
                log.warning("%s request ended mid-stream: %s", d.name, exc)
                body = request_error(exc).body()
            else:
                log.exception("generation failed mid-stream")
                body = error_body(str(exc), "server_error")
            yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        ans = stream.answer
        calls = remote_calls(getattr(ans, "tool_calls", None) or [])  # engine openai: the remote's own
        if held is not None:
            rest = "".join(held)[sent:]
            calls, content = parse_calls(rest, plan, cut=ans.finish_reason == "length")
            if content:
                yield _chunk(cid, created, d.name, {"content": content}, None, include_usage)
        for k, c in enumerate(calls):
            head = {"index": k, "id": c["id"], "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": ""}}
            yield _chunk(cid, created, d.name, {"tool_calls": [head]}, None, include_usage)
            yield _chunk(cid, created, d.name, {"tool_calls": [{"index": k, "function": {
                "arguments": c["function"]["arguments"]}}]}, None, include_usage)
        yield _chunk(cid, created, d.name, {}, _finish(ans.finish_reason, calls), include_usage,
                     sources=ans.sources, ragtune=_meta(d, ans))
        if include_usage:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": d.name,
                    "system_fingerprint": None, "choices": [], "usage": _usage(ans)}
            yield "data: " + json.dumps(body) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        try:
            with anyio.CancelScope(shield=True):  # a client that hung up cancelled this generator
                await stream.aclose()
        finally:
            runtime.leave()
