"""Decoding for the generator: a prepared job's token ids from the engine, one path per engine.

    stats = gen._run(job, on_token, cancel)    # `Generator.answer` and `AnswerStream` call it
    stats["tokens"], stats["finish_reason"]    # also queue_s, prefill_s, decode_s (and the clock at first, end)

`GeneratorDecoding` is the decoding half of `ragtune.serve.generator.Generator` (a mixin over the
state `Generator.__init__` and `load` set). `_run` picks the path: llama.cpp's batch scheduler, the
transformers batch scheduler (`gen.batcher`, `ragtune.serve.tf_batching`), the CUDA static-cache
greedy decoder (`ragtune.serve.static_decode`), or transformers' `generate` under the lock. Each hands
`on_token` every new id and stops at `cancel`, an end-of-sequence id, a stop string or the budget; a
request cancelled while it waited for the model (its client gone) ends without a prefill.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from ragtune.serve.stops import _Decoder, cut_at_stop

if TYPE_CHECKING:
    from ragtune.serve.generator import _Job

log = logging.getLogger(__name__)


class _Sink:
    """A transformers streamer that hands each new token id to a callback (the prompt is skipped)."""

    def __init__(self, on_token: Any):
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def _run_stats(t_wait: float, t0: float, first: float, t1: float, tokens: int, reason: str) -> dict[str, Any]:
    """What a `Generator._run*` path reports: queue, prefill and decode seconds, tokens, why it ended."""
    return {"queue_s": t0 - t_wait, "prefill_s": first - t0, "first": first, "decode_s": t1 - first,
            "end": t1, "tokens": tokens, "finish_reason": reason}


def _grammar_processor(constraint: Any, n_prompt: int) -> Any:
    """A transformers LogitsProcessorList that masks each step's scores with `constraint` (batch of one)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Grammar(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if input_ids.shape[1] > n_prompt:  # the token picked last step advances the grammar
                constraint.accept(int(input_ids[0, -1]))
            ok = torch.from_numpy(constraint.allowed()).to(scores.device)
            n = min(ok.shape[0], scores.shape[-1])
            scores[:, :n] = scores[:, :n].masked_fill(~ok[:n], float("-inf"))
            scores[:, n:] = float("-inf")
            return scores

    return LogitsProcessorList([_Grammar()])


class GeneratorDecoding:
    """The model runs of a `Generator` (see the module docstring)."""

    @contextlib.contextmanager
    def _adapter_ctx(self, name: str | None) -> Iterator[None]:
        if not self.adapters:
            yield
        elif self._fast is not None and self._fast.supports(name):
            with self._fast.active(name):
                yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def _generation_kwargs(self, job: _Job) -> dict[str, Any]:
        from transformers import GenerationConfig

        g = self.cfg.generation
        sample = job.temperature > 0
        kw: dict[str, Any] = dict(
            max_new_tokens=job.max_new_tokens,
            do_sample=sample,
            eos_token_id=self._eos,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0],
            repetition_penalty=g.repetition_penalty,
        )
        if sample:
            kw.update(temperature=job.temperature, top_p=job.top_p, top_k=0)
        if job.stop:
            kw["stop_strings"] = list(job.stop)
        if g.cache == "static":
            if self.device == "cuda":
                kw["cache_implementation"] = "static"
            else:
                log.debug("generation.cache=static is CUDA-only; using the dynamic cache on %s", self.device)
        out: dict[str, Any] = {"generation_config": GenerationConfig(**kw)}
        if job.stop:
            out["tokenizer"] = self.tokenizer  # transformers matches stop strings through it
        return out

    def _run(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """Run generate under the lock; returns timing and stop facts."""
        if self.engine_impl is not None:
            return self._run_llama_cpp(job, on_token, cancel)
        if self.batcher is not None:
            return self._run_scheduled(job, on_token, cancel)
        if (self.cfg.generation.cache == "static" and self.device == "cuda" and job.temperature <= 0
                and job.grammar is None and not job.stop):
            from ragtune.serve.static_decode import supported

            if supported(self.model):
                return self._run_static(job, on_token, cancel)
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        times: dict[str, float] = {}
        count = [0, -1]  # tokens, last id

        def token(tid: int) -> None:
            if count[0] == 0:
                times["first"] = time.perf_counter()
            count[0] += 1
            count[1] = tid
            on_token(tid)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flag = cancel is not None and cancel.is_set()
                return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

        t_wait = time.perf_counter()
        with self.lock:
            t0 = time.perf_counter()
            if cancel is not None and cancel.is_set():  # gone while waiting for the model: no prefill
                return _run_stats(t_wait, t0, t0, t0, 0, "cancelled")
            if job.seed is not None:
                torch.manual_seed(job.seed)
            ids = torch.tensor([job.input_ids], device=self.model.device)
            extra: dict[str, Any] = {}
            if job.grammar is not None:
                extra["logits_processor"] = _grammar_processor(self.constraint(job.grammar), len(job.input_ids))
            with self._adapter_ctx(job.adapter), torch.inference_mode():
                self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Sink(token),
                    stopping_criteria=StoppingCriteriaList([_Cancel()]), **self._generation_kwargs(job), **extra,
                )
            t1 = time.perf_counter()
        first = times.get("first", t1)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif count[1] in self._eos:
            reason = "stop"
        else:
            reason = "length" if count[0] >= job.max_new_tokens else "stop"
        return _run_stats(t_wait, t0, first, t1, count[0], reason)

    def _run_static(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """A greedy answer through the static-cache decoder whose step is compiled into CUDA graphs
        (serve/static_decode.py): generate's greedy ids without its per-token host work."""
        from ragtune.serve.static_decode import StaticGreedy

        times: dict[str, float] = {}

        def token(tid: int) -> None:
            times.setdefault("first", time.perf_counter())
            on_token(tid)

        t_wait = time.perf_counter()
        with self.lock:
            t0 = time.perf_counter()
            if cancel is not None and cancel.is_set():  # gone while waiting for the model: no prefill
                return _run_stats(t_wait, t0, t0, t0, 0, "cancelled")
            dec = getattr(self, "_static", None)
            if dec is None or dec.model is not self.model:  # adapters loaded since: a decoder for the new model
                dec = self._static = StaticGreedy(self.model, compile=True,
                                                  repetition_penalty=float(self.cfg.generation.repetition_penalty))
            with self._adapter_ctx(job.adapter):
                ids, reason = dec.generate(list(job.input_ids), job.max_new_tokens, frozenset(self._eos), token, cancel)
            t1 = time.perf_counter()
        first = times.get("first", t1)
        return _run_stats(t_wait, t0, first, t1, len(ids), reason)

    def _run_llama_cpp(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        return self._run_scheduled(job, on_token, cancel)

    def _run_scheduled(self, job: _Job, on_token: Any, cancel: threading.Event | None) -> dict[str, Any]:
        """`_run` through a batch scheduler (llama.cpp's, or transformers' `batcher`): the same ids,
        callbacks and stats; stop strings end the sequence at the step they complete."""
        times: dict[str, float] = {}
        count = [0]
        stopped = threading.Event()  # a stop string completed (transformers' stop_strings)
        dec = _Decoder(self.tokenizer) if job.stop else None
        longest = max((len(x) for x in job.stop), default=1)

        def token(tid: int) -> None:
            if count[0] == 0:
                times["first"] = time.perf_counter()
            count[0] += 1
            on_token(tid)
            if dec is not None:
                delta = dec.add(tid)  # a stop string completes inside the new text and its tail before it
                if delta and cut_at_stop(dec.emitted[-(len(delta) + longest - 1):], job.stop)[1]:
                    stopped.set()

        class _Either:
            def is_set(self) -> bool:
                return stopped.is_set() or (cancel is not None and cancel.is_set())

        constraint = self.constraint(job.grammar) if job.grammar is not None else None
        t_wait = time.perf_counter()  # the engine's scheduler batches concurrent calls (serve.max_batch slots)
        if self.engine_impl is not None:
            r = self.engine_impl.generate(
                prompt_ids=job.input_ids, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                top_p=job.top_p, seed=job.seed, on_token_id=token, cancel=_Either(), adapter=job.adapter,
                stop_ids=self._eos or None, repeat_penalty=float(self.cfg.generation.repetition_penalty),
                constraint=constraint,
            )
        else:
            from ragtune.serve.tf_batching import SeqRequest

            req = self.batcher.submit(SeqRequest(
                prompt=list(job.input_ids), budget=job.max_new_tokens, temperature=job.temperature,
                top_p=job.top_p, seed=job.seed, adapter=job.adapter, stops=frozenset(self._eos),
                repeat_penalty=float(self.cfg.generation.repetition_penalty), constraint=constraint,
                on_token=token, cancel=_Either(),
            )).wait()
            r = {"queue_s": req.t_admit - req.t_submit, "finish_reason": req.finish}
        t1 = time.perf_counter()
        t0 = t_wait + r["queue_s"]
        first = times.get("first", t1)
        reason = r["finish_reason"]
        if reason == "cancelled" and stopped.is_set() and not (cancel is not None and cancel.is_set()):
            reason = "stop"
        return _run_stats(t_wait, t0, first, t1, count[0], reason)

    def constraint(self, grammar: str) -> Any:
        """A fresh `ragtune.serve.constrained.Constraint` for `grammar` over this model's vocabulary."""
        from ragtune.serve.constrained import grammars_for

        if self.engine_impl is not None:
            n_vocab = self.engine_impl.n_vocab
        else:
            n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        return grammars_for(self, self.tokenizer, n_vocab, self._eos).constraint(grammar)

