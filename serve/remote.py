"""The remote engine: ragtune retrieves, builds the prompt, cites and abstains; any OpenAI-compatible
server (vLLM, Ollama, llama.cpp's server) generates.

    gen = RemoteGenerator(cfg, url="http://gpu-box:8000/v1", model="policies-merged", api_key="").load()
    ans = gen.answer(messages, retriever=r)          # the same Answer as the local engines give
    s = gen.stream(messages, retriever=r); s.sources; "".join(s); s.answer

The messages sent are the ones a local engine would render (the retrieval system turn with the
numbered sources from `ragtune.chat.rag_messages`), so citations and abstention behave the same;
abstention never calls the remote server. Errors from the remote server come back as RagtuneError
naming the URL and its status. Token counts are the remote server's `usage` (a stream from a server
that sends none counts its content chunks as tokens and leaves prompt tokens at 0).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator, Sequence

from ragtune.errors import RagtuneError, UsageError


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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers)

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

    # --- answering ----------------------------------------------------------------------------

    def _prepare(self, messages: Sequence[dict[str, str]], retriever: Any, rag: Any,
                 adapter: str | None) -> dict[str, Any]:
        from ragtune.chat import rag_messages
        from ragtune.serve.answer import retrieve

        if adapter:
            raise UsageError(f"engine openai serves '{self.model}' as it is; adapter '{adapter}' cannot be applied "
                             "(merge it with 'ragtune merge' and serve the merged model remotely)")
        rcfg = rag or self.cfg.rag
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "user" for m in msgs):
            raise UsageError("messages need at least one user turn")
        job = {"t0": time.perf_counter(), "mode": "base", "sources": [], "abstained": False, "best": None,
               "retrieval_s": 0.0, "not_found": rcfg.not_found_message, "messages": msgs}
        if retriever is not None:
            got = retrieve(retriever, msgs, rcfg.top_k, rcfg.min_score)
            job.update(mode="rag", sources=got.sources, abstained=got.abstain, best=got.best_score,
                       retrieval_s=got.seconds)
            if not got.abstain:
                job["messages"] = rag_messages(msgs, got.sources, rcfg.system_prompt)
        return job

    def _body(self, job: dict[str, Any], max_new_tokens: int | None, temperature: float | None,
              top_p: float | None, seed: int | None, stop: Sequence[str] | None, stream: bool) -> dict[str, Any]:
        g = self.cfg.generation
        body: dict[str, Any] = {"model": self.model, "messages": job["messages"], "stream": stream,
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
        return body

    def _answer(self, job: dict[str, Any], text: str, finish: str, usage: dict[str, Any],
                t_first: float | None) -> Any:
        from ragtune.serve.generator import Answer

        t1 = time.perf_counter()
        timings = {"retrieval_s": job["retrieval_s"], "total_s": t1 - job["t0"]}
        if t_first is not None:
            timings["ttft_s"] = t_first - job["t0"]
        return Answer(text=text, sources=job["sources"], mode=job["mode"],
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0), abstained=False,
                      finish_reason="length" if finish == "length" else "stop",
                      timings={k: round(v, 6) for k, v in timings.items()}, adapter=None, best_score=job["best"])

    def _abstain(self, job: dict[str, Any]) -> Any:
        from ragtune.serve.generator import Answer

        return Answer(text=job["not_found"], sources=[], mode=job["mode"], abstained=True, finish_reason="stop",
                      timings={"retrieval_s": round(job["retrieval_s"], 6),
                               "total_s": round(time.perf_counter() - job["t0"], 6)}, best_score=job["best"])

    def _fail(self, r: Any) -> RagtuneError:
        try:
            detail = r.json().get("error", {}).get("message") or r.text[:300]
        except (ValueError, AttributeError):
            detail = r.text[:300]
        return RagtuneError(f"remote engine {self.url} answered {r.status_code}: {detail}")

    def answer(self, messages: Sequence[dict[str, str]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, rag: Any = None, stop: Sequence[str] | None = None) -> Any:
        import httpx

        job = self._prepare(messages, retriever, rag, adapter)
        if job["abstained"]:
            return self._abstain(job)
        try:
            r = self.http.post(self.url + "/chat/completions",
                               json=self._body(job, max_new_tokens, temperature, top_p, seed, stop, False))
        except httpx.HTTPError as exc:
            raise RagtuneError(f"remote engine {self.url} could not be reached: {exc}") from exc
        if r.status_code != 200:
            raise self._fail(r)
        body = r.json()
        choice = body["choices"][0]
        return self._answer(job, choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                            body.get("usage") or {}, None)

    def stream(self, messages: Sequence[dict[str, str]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, rag: Any = None, stop: Sequence[str] | None = None) -> "RemoteStream":
        job = self._prepare(messages, retriever, rag, adapter)
        return RemoteStream(self, job, self._body(job, max_new_tokens, temperature, top_p, seed, stop, True))


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
        parts: list[str] = []
        finish, usage, t_first = "stop", {}, None
        try:
            with gen.http.stream("POST", gen.url + "/chat/completions", json=self.body) as r:
                if r.status_code != 200:
                    r.read()
                    raise gen._fail(r)
                for line in r.iter_lines():
                    if self._closed.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RagtuneError(f"remote engine {gen.url}: {event['error'].get('message')}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        finish = choice.get("finish_reason") or finish
                        if delta:
                            t_first = t_first or time.perf_counter()
                            parts.append(delta)
                            yield delta
        except httpx.HTTPError as exc:
            raise RagtuneError(f"remote engine {gen.url} failed: {exc}") from exc
        if not usage:  # a server that ignores stream_options (llama_cpp.server): one chunk per token
            usage = {"completion_tokens": len(parts)}
        self.answer = gen._answer(job, "".join(parts), finish, usage, t_first)
