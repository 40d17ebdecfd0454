"""The remote engine: ragtune retrieves, builds the prompt, cites and abstains; any OpenAI-compatible
server (vLLM, Ollama, llama.cpp's server) generates.

    gen = RemoteGenerator(cfg, url="http://gpu-box:8000/v1", model="policies-merged", api_key="").load()
    ans = gen.answer(messages, retriever=r)          # the same Answer as the local engines give
    s = gen.stream(messages, retriever=r); s.sources; "".join(s); s.answer
    ans = await gen.answer_async(messages, retriever=r)   # on an event loop (the server's requests)
    s = await gen.astream(messages, retriever=r); [d async for d in s]; s.answer

The messages sent are the ones a local engine would render (the retrieval system turn with the
numbered sources from `ragtune.chat.rag_messages`), so citations and abstention behave the same;
abstention never calls the remote server. Errors from the remote server come back as RagtuneError
naming the URL and its status: RemoteFailed (a 502 from `ragtune serve`) where the remote is down or
failed, a plain RagtuneError (the request's 400) where it refused the request. Token counts are the
remote server's `usage` (a stream from a server that sends none counts its content chunks as tokens
and leaves prompt tokens at 0).

`response_format`, `tools`, `tool_choice` and `parallel_tool_calls` are forwarded as they are; the
remote's `tool_calls` come back in `RemoteAnswer.tool_calls`. A server that rejects OpenAI's
`{"type": "json_schema"}` (llama-cpp-python's `llama_cpp.server` takes `{"type": "json_object",
"schema": ...}`) gets the schema in that form, and this generator keeps using it. ask, chat and eval
take the remote from `generation.url/model/api_key` (`remote_generator(cfg)`).

Here: RemoteGenerator (retrieval, the requests, the answers), check_remote and remote_generator. The
request body and what a refusal means: serve/remote_wire.py; reading a streamed answer:
serve/remote_stream.py (RemoteStream, RemoteAsyncStream).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ragtune.errors import UsageError
from ragtune.serve.generator import Answer
from ragtune.serve.remote_stream import RemoteAsyncStream, RemoteStream
from ragtune.serve.remote_wire import (RemoteFailed, checked_passed, may_refuse_schema, refusal, request_body,
                                       schema_as_json_object, wire_message)

KEY_ENV = "RAGTUNE_ENGINE_API_KEY"  # the remote's key when generation.api_key is empty


@dataclass
class RemoteAnswer(Answer):
    tool_calls: list[dict[str, Any]] | None = None  # the remote's OpenAI tool_calls, as it sent them


def check_remote(cfg: Any) -> None:
    """engine openai for ask, chat and eval: generation.url and generation.model must say where to go."""
    g = cfg.generation
    problems = []
    if not g.url:
        problems.append("generation.url is empty: give the remote server's /v1 base URL (--url "
                        "http://HOST:PORT/v1 or generation.url=http://HOST:PORT/v1)")
    elif not g.url.startswith(("http://", "https://")):
        problems.append(f"generation.url '{g.url}' is not an http(s) URL; e.g. http://127.0.0.1:8080/v1")
    if not g.model:
        problems.append("generation.model is empty: name a model the remote server serves (--model NAME or "
                        "generation.model=NAME; its GET /v1/models lists them)")
    if problems:
        raise UsageError("engine openai: " + "; ".join(problems))


def remote_generator(cfg: Any) -> "RemoteGenerator":
    """The remote named by generation.url/model/api_key (the key falls back to $RAGTUNE_ENGINE_API_KEY)."""
    check_remote(cfg)
    g = cfg.generation
    return RemoteGenerator(cfg, g.url, g.model, g.api_key or os.environ.get(KEY_ENV, ""))


class RemoteGenerator:
    engine = "openai"

    def __init__(self, cfg: Any, url: str, model: str, api_key: str = "", timeout_s: float = 600.0):
        import httpx

        if not url or not model:
            raise UsageError("engine openai needs a `url` (the server's /v1 base) and a `model` it serves")
        self.cfg = cfg
        self.url = url.rstrip("/")
        self.model = model
        self.base_path = self.url
        self.lock = threading.Lock()  # not held for generation: the remote server does its own queueing
        self.adapters: dict[str, Any] = {}
        self.schema_form = "json_schema"  # "json_object" once the remote refused OpenAI's json_schema form
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=self.headers)
        self._ahttp: tuple[Any, Any] | None = None  # (event loop, httpx.AsyncClient) of answer_async, astream

    @property
    def loaded(self) -> bool:
        return True

    def load(self, base: Any = None, adapters: Any = None) -> "RemoteGenerator":
        """Nothing to load (the remote server holds the model); refuses adapters, as `answer` does.
        Lets callers that build a local Generator (`Generator(cfg).load(adapters=...)`) take this one."""
        if adapters:
            names = ", ".join(adapters)
            raise UsageError(f"engine openai serves '{self.model}' as it is; adapters ({names}) cannot be applied "
                             "(merge one with 'ragtune merge' and serve the merged model remotely)")
        return self

    def resolve_adapter(self, adapter: str | None) -> None:
        if adapter:
            raise UsageError(f"engine openai serves '{self.model}' as it is; adapter '{adapter}' cannot be applied")
        return None

    def warmup(self) -> float:
        return 0.0

    def close(self) -> None:
        self.http.close()

    async def aclose(self) -> None:
        """Close the async client of `answer_async` and `astream` (on their loop); `close` closes the other."""
        if self._ahttp is not None:
            client, self._ahttp = self._ahttp[1], None
            await client.aclose()

    # --- answering ----------------------------------------------------------------------------

    def _prepare(self, messages: Sequence[dict[str, str]], retriever: Any, rag: Any,
                 adapter: str | None) -> dict[str, Any]:
        from ragtune.chat import rag_messages
        from ragtune.serve.answer import retrieve

        if adapter:
            raise UsageError(f"engine openai serves '{self.model}' as it is; adapter '{adapter}' cannot be applied "
                             "(merge it with 'ragtune merge' and serve the merged model remotely)")
        rcfg = rag or self.cfg.rag
        msgs = [wire_message(m) for m in messages]
        if not any(m["role"] == "user" for m in msgs):
            raise UsageError("messages need at least one user turn")
        job = {"t0": time.perf_counter(), "mode": "base", "sources": [], "abstained": False, "best": None,
               "retrieval_s": 0.0, "not_found": rcfg.not_found_message, "messages": msgs}
        if retriever is not None:
            got = retrieve(retriever, msgs, rcfg.top_k, rcfg.min_score)
            job.update(mode="rag", sources=got.sources, abstained=got.abstain, best=got.best_score,
                       retrieval_s=got.seconds)
            if not got.abstain:
                job["messages"] = rag_messages(msgs, got.sources, rcfg.system_prompt, rcfg.question_first)
        return job

    def _body(self, job: dict[str, Any], max_new_tokens: int | None, temperature: float | None,
              top_p: float | None, seed: int | None, stop: Sequence[str] | None, stream: bool,
              passed: dict[str, Any] | None = None) -> dict[str, Any]:
        return request_body(self.model, job["messages"], self.cfg.generation, max_new_tokens, temperature, top_p,
                            seed, stop, stream, passed, self.schema_form)

    def _post(self, body: dict[str, Any]) -> Any:
        """POST /chat/completions (streamed when the body says so); a remote that refuses the json_schema
        form is asked again with the schema as json_object, and keeps that form from then on."""
        import httpx

        stream = bool(body.get("stream"))
        try:
            r = self.http.send(self.http.build_request("POST", self.url + "/chat/completions", json=body),
                               stream=stream)
            if may_refuse_schema(body, r):
                r.read()
                if "response_format" in r.text:
                    r.close()
                    other = schema_as_json_object(body)
                    r = self.http.send(self.http.build_request("POST", self.url + "/chat/completions", json=other),
                                       stream=stream)
                    if r.status_code == 200:
                        self.schema_form = "json_object"
        except httpx.HTTPError as exc:
            raise RemoteFailed(f"remote engine {self.url} could not be reached: {exc}") from exc
        if r.status_code != 200:
            r.read()
            r.close()
            raise refusal(self.url, r)
        return r

    async def _apost(self, body: dict[str, Any]) -> Any:
        """`_post` on the caller's event loop (`answer_async`, `astream`)."""
        import httpx

        client, stream = self._async_client(), bool(body.get("stream"))
        try:
            r = await client.send(client.build_request("POST", self.url + "/chat/completions", json=body),
                                  stream=stream)
            if may_refuse_schema(body, r):
                await r.aread()
                if "response_format" in r.text:
                    await r.aclose()
                    other = schema_as_json_object(body)
                    r = await client.send(client.build_request("POST", self.url + "/chat/completions", json=other),
                                          stream=stream)
                    if r.status_code == 200:
                        self.schema_form = "json_object"
        except httpx.HTTPError as exc:
            raise RemoteFailed(f"remote engine {self.url} could not be reached: {exc}") from exc
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            raise refusal(self.url, r)
        return r

    def _async_client(self) -> Any:
        """One httpx.AsyncClient per event loop (a server has one), so its connections are kept alive."""
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        if self._ahttp is None or self._ahttp[0] is not loop:
            self._ahttp = (loop, httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers))
        return self._ahttp[1]

    def _answer(self, job: dict[str, Any], text: str, finish: str, usage: dict[str, Any],
                t_first: float | None, tool_calls: list[dict[str, Any]] | None = None,
                tools: bool = False) -> RemoteAnswer:
        t1 = time.perf_counter()
        timings = {"retrieval_s": job["retrieval_s"], "total_s": t1 - job["t0"]}
        if t_first is not None:
            timings["ttft_s"] = t_first - job["t0"]
        return RemoteAnswer(text=text, sources=job["sources"], mode=job["mode"],
                            prompt_tokens=int(usage.get("prompt_tokens") or 0),
                            completion_tokens=int(usage.get("completion_tokens") or 0), abstained=False,
                            finish_reason="length" if finish == "length" else "stop",
                            timings={k: round(v, 6) for k, v in timings.items()}, adapter=None,
                            best_score=job["best"], tool_calls=tool_calls or None,
                            tool_rendering="remote" if tools else None)

    def _abstain(self, job: dict[str, Any]) -> RemoteAnswer:
        return RemoteAnswer(text=job["not_found"], sources=[], mode=job["mode"], abstained=True, finish_reason="stop",
                      timings={"retrieval_s": round(job["retrieval_s"], 6),
                               "total_s": round(time.perf_counter() - job["t0"], 6)}, best_score=job["best"])

    def answer(self, messages: Sequence[dict[str, Any]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, rag: Any = None, stop: Sequence[str] | None = None,
               **passed: Any) -> RemoteAnswer:
        """`passed`: response_format, tools, tool_choice, parallel_tool_calls (OpenAI's shapes)."""
        job = self._prepare(messages, retriever, rag, adapter)
        if job["abstained"]:
            return self._abstain(job)
        body = self._body(job, max_new_tokens, temperature, top_p, seed, stop, False, checked_passed(passed))
        return self._whole(job, self._post(body), passed)

    async def answer_async(self, messages: Sequence[dict[str, Any]], adapter: str | None = None,
                           retriever: Any = None, max_new_tokens: int | None = None, temperature: float | None = None,
                           top_p: float | None = None, seed: int | None = None, rag: Any = None,
                           stop: Sequence[str] | None = None, **passed: Any) -> RemoteAnswer:
        """`answer` on the caller's event loop (the server's): one non-streaming request to the remote with
        no worker thread in between (retrieval, when there is a retriever, still runs in one). Cancelling
        the awaiting task closes the remote connection; a remote that generates whole answers without
        watching its client (llama_cpp.server) finishes that answer, as it would for any client."""
        job = await self._aprepare(messages, retriever, rag, adapter)
        if job["abstained"]:
            return self._abstain(job)
        body = self._body(job, max_new_tokens, temperature, top_p, seed, stop, False, checked_passed(passed))
        return self._whole(job, await self._apost(body), passed)

    async def astream(self, messages: Sequence[dict[str, Any]], adapter: str | None = None, retriever: Any = None,
                      max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                      seed: int | None = None, rag: Any = None, stop: Sequence[str] | None = None,
                      **passed: Any) -> "RemoteAsyncStream":
        """`stream` on the caller's event loop: the remote's events are read there, with no worker thread
        woken per token."""
        job = await self._aprepare(messages, retriever, rag, adapter)
        return RemoteAsyncStream(self, job, self._body(job, max_new_tokens, temperature, top_p, seed, stop, True,
                                                       checked_passed(passed)))

    async def _aprepare(self, messages: Sequence[dict[str, Any]], retriever: Any, rag: Any,
                        adapter: str | None) -> dict[str, Any]:
        """`_prepare`; retrieval (embedding the query, searching) in a worker thread when there is any."""
        import anyio

        if retriever is None:
            return self._prepare(messages, retriever, rag, adapter)
        return await anyio.to_thread.run_sync(self._prepare, messages, retriever, rag, adapter)

    def _whole(self, job: dict[str, Any], r: Any, passed: dict[str, Any]) -> RemoteAnswer:
        """The RemoteAnswer of a non-streaming chat completion."""
        try:
            body = r.json()
            choice = body["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteFailed(f"remote engine {self.url} answered 200 without a chat completion "
                               f"({type(exc).__name__}: {exc}): {r.text[:300]}", code="engine_error") from None
        return self._answer(job, message.get("content") or "", choice.get("finish_reason") or "stop",
                            body.get("usage") or {}, None, message.get("tool_calls"), bool(passed.get("tools")))

    def stream(self, messages: Sequence[dict[str, Any]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, rag: Any = None, stop: Sequence[str] | None = None,
               **passed: Any) -> "RemoteStream":
        job = self._prepare(messages, retriever, rag, adapter)
        return RemoteStream(self, job, self._body(job, max_new_tokens, temperature, top_p, seed, stop, True,
                                                  checked_passed(passed)))
