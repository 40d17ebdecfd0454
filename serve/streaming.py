"""AnswerStream: an answer's text deltas as the model produces them, in a thread or on an event loop.

    s = gen.stream(messages, adapter=None, retriever=r)    # ragtune.serve.generator.Generator.stream
    s.sources                                              # retrieval has run: known from the start
    for delta in s: print(delta, end="")                   # or: async for delta in s (on an event loop)
    s.answer                                               # the Answer, once the stream is exhausted
    s.close()                                              # (or await s.aclose()) stop at the next token

The worker runs `Generator._run` and hands each token id over; `_StreamText` (`ragtune.serve.stops`)
turns the ids into deltas cut at the first stop string.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Iterator

from ragtune.serve.stops import _StreamText

if TYPE_CHECKING:
    from ragtune.serve.generator import Answer, Generator, _Job


_END = object()


class AnswerStream:
    """Iterate for text deltas; `.sources` is known from the start, `.answer` once exhausted.

    Generation runs in a worker thread that holds the generator's lock; `close()` (or abandoning
    the iterator) stops it at the next token, so a client that hangs up frees the model.
    On an event loop, `async for` reads the same deltas without a thread hop per token: the worker
    posts each token id to the loop (`call_soon_threadsafe`), and tokens that arrived together come
    out as one delta; `await aclose()` stops the worker.
    """

    def __init__(self, gen: Generator, job: _Job):
        self.gen = gen
        self.job = job
        self.sources = job.sources
        self.mode = job.mode
        self.abstained = job.abstained
        self.prompt_tokens = 0 if job.abstained else len(job.input_ids)
        self.answer: Answer | None = None
        self._cancel = threading.Event()
        self._it = self._run()
        self._aq: Any = None  # the asyncio.Queue of `async for`, made at its first step
        self._astate: tuple[_StreamText, dict[str, Any]] | None = None

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generating at the next token; safe from another thread while one is iterating."""
        self._cancel.set()
        try:
            self._it.close()
        except ValueError:  # being iterated in another thread: the cancel flag ends it
            pass

    def _start(self, put: Any) -> dict[str, Any]:
        """Start the worker thread, which hands `put` each token id, then _END or its exception;
        returns the dict it fills with the run's stats before _END."""
        gen, job = self.gen, self.job
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result.update(gen._run(job, put, self._cancel))
                put(_END)
            except BaseException as exc:  # handed to the consumer
                put(exc)

        threading.Thread(target=work, name="ragtune-generate", daemon=True).start()
        return result

    def _end(self, st: _StreamText, result: dict[str, Any]) -> str:
        tail, text = st.finish()
        if st.hit:
            result["finish_reason"] = "stop"
        self.answer = self.gen._finish(self.job, text, st.dec.ids, result)
        return tail

    def _run(self) -> Iterator[str]:
        if self.job.abstained:
            self.answer = self.gen._abstain_answer(self.job)
            yield self.answer.text
            return
        q: queue.Queue[Any] = queue.Queue()
        result = self._start(q.put)
        st = _StreamText(self.gen.tokenizer, self.job.stop)
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                delta = st.add(item)
                if delta:
                    yield delta
            tail = self._end(st, result)
            if tail:
                yield tail
        finally:
            self._cancel.set()  # no-op when finished; stops the worker when the consumer left early

    # --- on an event loop ---------------------------------------------------------------------

    def __aiter__(self) -> "AnswerStream":
        return self

    async def __anext__(self) -> str:
        import asyncio

        if self._aq is None:
            self._aq = asyncio.Queue()
            if self.job.abstained:
                self.answer = self.gen._abstain_answer(self.job)
                return self.answer.text  # _astate stays None: the next step ends the stream
            loop, aq = asyncio.get_running_loop(), self._aq

            def put(item: Any) -> None:
                try:
                    loop.call_soon_threadsafe(aq.put_nowait, item)
                except RuntimeError:  # the loop is closed (the server stopped): stop generating
                    self._cancel.set()

            self._astate = (_StreamText(self.gen.tokenizer, self.job.stop), self._start(put))
        if self._astate is None:
            raise StopAsyncIteration
        st, result = self._astate
        while True:
            items = [await self._aq.get()]
            while not self._aq.empty():  # what arrived meanwhile goes out in one delta
                items.append(self._aq.get_nowait())
            out = []
            for item in items:
                if item is _END:
                    self._astate = None
                    self._cancel.set()
                    out.append(self._end(st, result))
                    break
                if isinstance(item, BaseException):
                    self._astate = None
                    self._cancel.set()
                    raise item
                out.append(st.add(item))
            text = "".join(out)
            if text:
                return text
            if self._astate is None:
                raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop generating at the next token (the worker sees the flag; nothing to await)."""
        self._cancel.set()
        self._astate = None
