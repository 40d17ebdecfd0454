"""Reading a remote's chat completion stream (SSE): text deltas as they come, the answer at the end.

    s = RemoteStream(gen, job, body)         # RemoteGenerator.stream builds it; iterate in any thread
    s.sources; "".join(s); s.answer          # close() from another thread ends it at the next event
    s = RemoteAsyncStream(gen, job, body)    # RemoteGenerator.astream: read on the caller's event loop
    [d async for d in s]; s.answer; await s.aclose()

Both add the remote's `data:` lines up in an _Events: content deltas, tool-call pieces merged by index
into whole calls, the finish reason and the usage (a server that sends no usage, such as
llama_cpp.server, counts its content chunks as tokens). An abstained job yields the not-found message
without calling the remote. An error event or a broken connection is RemoteFailed (serve/remote_wire.py).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from ragtune.serve.remote_wire import RemoteFailed

if TYPE_CHECKING:
    from ragtune.serve.remote import RemoteAnswer, RemoteGenerator


class RemoteStream:
    """Text deltas from the remote server's SSE stream; `.sources` from the start, `.answer` at the end."""

    def __init__(self, gen: RemoteGenerator, job: dict[str, Any], body: dict[str, Any]):
        self.gen, self.job, self.body = gen, job, body
        self.sources = job["sources"]
        self.abstained = job["abstained"]
        self.answer: Any = None
        self._closed = threading.Event()
        self._it = self._run()

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._closed.set()
        try:
            self._it.close()
        except ValueError:  # being iterated in another thread: the flag ends it at the next event
            pass

    def _run(self) -> Iterator[str]:
        import httpx

        gen, job = self.gen, self.job
        if job["abstained"]:
            self.answer = gen._abstain(job)
            yield self.answer.text
            return
        events = _Events(gen.url)
        try:
            r = gen._post(self.body)
            try:
                for line in r.iter_lines():
                    if self._closed.is_set():
                        return
                    yield from events.add(line)
                    if events.done:
                        break
            finally:
                r.close()
        except httpx.HTTPError as exc:
            raise RemoteFailed(f"remote engine {gen.url} failed: {exc}") from exc
        self.answer = events.answer(gen, job, self.body)


class RemoteAsyncStream:
    """`RemoteStream` read on the caller's event loop (`RemoteGenerator.astream`): `async for` the text
    deltas; `.sources` from the start, `.answer` at the end; `await aclose()` closes the remote stream."""

    def __init__(self, gen: RemoteGenerator, job: dict[str, Any], body: dict[str, Any]):
        self.gen, self.job, self.body = gen, job, body
        self.sources = job["sources"]
        self.abstained = job["abstained"]
        self.answer: Any = None
        self._it = self._run()

    def __aiter__(self) -> "RemoteAsyncStream":
        return self

    async def __anext__(self) -> str:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()

    async def _run(self) -> AsyncIterator[str]:
        import httpx

        gen, job = self.gen, self.job
        if job["abstained"]:
            self.answer = gen._abstain(job)
            yield self.answer.text
            return
        events = _Events(gen.url)
        try:
            r = await gen._apost(self.body)
            try:
                async for line in r.aiter_lines():
                    for delta in events.add(line):
                        yield delta
                    if events.done:
                        break
            finally:
                await r.aclose()
        except httpx.HTTPError as exc:
            raise RemoteFailed(f"remote engine {gen.url} failed: {exc}") from exc
        self.answer = events.answer(gen, job, self.body)


class _Events:
    """What a remote's SSE lines add up to: text deltas as they come, tool-call pieces merged by index,
    the finish reason and the usage."""

    def __init__(self, url: str):
        self.url = url
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish, self.usage, self.t_first, self.done = "stop", {}, None, False

    def add(self, line: str) -> list[str]:
        """The text deltas of one SSE line (none for comments, keep-alives and `[DONE]`)."""
        if not line.startswith("data:"):
            return []
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return []
        event = json.loads(data)
        if "error" in event:
            raise RemoteFailed(f"remote engine {self.url}: {event['error'].get('message')}", code="engine_error")
        self.usage = event.get("usage") or self.usage
        out = []
        for choice in event.get("choices") or []:
            d = choice.get("delta") or {}
            self.finish = choice.get("finish_reason") or self.finish
            for c in d.get("tool_calls") or []:
                _merge_call(self.calls, c)
            if d.get("content"):
                self.t_first = self.t_first or time.perf_counter()
                self.parts.append(d["content"])
                out.append(d["content"])
        return out

    def answer(self, gen: RemoteGenerator, job: dict[str, Any], body: dict[str, Any]) -> RemoteAnswer:
        usage = self.usage
        if not usage:  # a server that ignores stream_options (llama_cpp.server): one chunk per token
            usage = {"completion_tokens": len(self.parts) + len(self.calls)}
        return gen._answer(job, "".join(self.parts), self.finish, usage, self.t_first,
                           [self.calls[k] for k in sorted(self.calls)], bool(body.get("tools")))


def _merge_call(calls: dict[int, dict[str, Any]], c: dict[str, Any]) -> None:
    """One streamed tool_calls delta into the whole call: id, type and name once, arguments in pieces."""
    call = calls.setdefault(int(c.get("index") or 0), {"id": "", "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
    call["id"] = c.get("id") or call["id"]
    fn = c.get("function") or {}
    call["function"]["name"] = fn.get("name") or call["function"]["name"]
    call["function"]["arguments"] += fn.get("arguments") or ""
