"""Greedy decoding at batch 1 over a static KV cache, the decode step compiled into CUDA graphs.

    dec = StaticGreedy(model, compile=True)               # one per loaded model; CUDA: compiled
    ids = dec.generate(prompt_ids, max_new_tokens=128, stop_ids={2}, on_token=print, cancel=event)

What `generation.cache: static` answers through on CUDA for greedy requests without a grammar or stop
strings (serve/decoding.py). transformers' `generate(cache_implementation="static")` also compiles
the model's step, but it still runs its per-token Python (logits processors, stopping criteria,
streamer) and copies every token to the host before launching the next step; at batch 1 that
overhead, not the GPU, sets the speed. Here one compiled function does the model step, the
repetition penalty and the argmax on the GPU; the next step is queued before the host has seen the
previous token, and the host reads the generated ids `sync_every` tokens at a time (a stop token found
in a chunk ends the answer there: the steps queued after it are discarded).

Greedy ids equal `model.generate(do_sample=False, repetition_penalty=p)` (tests/serve/test_static_decode.py,
eager on the CPU). Caches are kept per length bucket (prompt + new tokens rounded up to a power of two,
at least 256), so a server recompiles only for a new bucket. Failure mode: a model whose forward does
not take a static cache (transformers' `_can_compile_fullgraph` false) is refused by `supported`; the
caller keeps `generate`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

MIN_BUCKET = 256


def bucket(n: int) -> int:
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


def supported(model: Any) -> bool:
    """A decoder-only model whose cache can be static (transformers' own flag); others keep `generate`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (bool(getattr(inner, "_can_compile_fullgraph", getattr(inner, "_supports_static_cache", True)))
            and not getattr(inner.config, "is_encoder_decoder", False))


class StaticGreedy:
    def __init__(self, model: Any, compile: bool = False, sync_every: int = 8, repetition_penalty: float = 1.0):
        self.model = model
        self.compile = compile
        self.sync_every = max(1, int(sync_every))
        self.penalty = float(repetition_penalty)
        self._caches: dict[int, Any] = {}
        self._seen: Any = None  # ids penalised so far: one buffer at a fixed address (CUDA graphs replay on it)
        from ragtune.serve.tf_batching import forward_params

        # the cache argument's name (`cache` since transformers 5.25), and whether the prefill can skip the LM
        # head over the prompt (`logits_to_keep`)
        self._cache_kw, self._keep_one = forward_params(model)
        self._lock = threading.Lock()
        self._step_fn = self._step
        if compile:
            import torch

            self._step_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def _cache(self, size: int) -> Any:
        from transformers import StaticCache

        cache = self._caches.get(size)
        if cache is None:
            cache = self._caches[size] = StaticCache(config=self.model.config, max_cache_len=size)
        else:
            cache.reset()
        return cache

    def _pick(self, logits: Any, seen: Any) -> Any:
        """Repetition penalty (as transformers applies it: over every id in the prompt and the answer so
        far) and argmax, on the device; marks the chosen id as seen."""
        import torch

        logits = logits.float()
        if self.penalty != 1.0:
            logits = torch.where(seen, torch.where(logits < 0, logits * self.penalty, logits / self.penalty), logits)
        nxt = logits.argmax(-1)  # [1]
        seen.index_fill_(-1, nxt, True)
        return nxt

    def _forward(self, ids: Any, pos: Any, cache: Any) -> Any:
        kw = {self._cache_kw: cache, **({"logits_to_keep": 1} if self._keep_one else {})}
        return self.model(input_ids=ids, cache_position=pos, position_ids=pos[None], use_cache=True, **kw).logits[:, -1, :]

    def _step(self, tok: Any, pos: Any, cache: Any, seen: Any) -> Any:
        return self._pick(self._forward(tok, pos, cache), seen)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] | frozenset[int] = frozenset(),
                 on_token: Callable[[int], None] | None = None, cancel: Any = None) -> tuple[list[int], str]:
        """The answer's ids (a stop id included, as generate returns it) and why it ended: stop, length, cancelled."""
        import torch

        with self._lock, torch.inference_mode():
            dev = next(self.model.parameters()).device
            n = len(prompt_ids)
            cache = self._cache(bucket(n + max_new_tokens))
            if self._seen is None:
                vocab = self.model.get_output_embeddings().weight.shape[0]
                self._seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
                if self.compile:
                    torch._dynamo.mark_static_address(self._seen)
            seen = self._seen
            seen.zero_()
            ids = torch.tensor([prompt_ids], device=dev)
            seen[ids[0]] = True
            pos = torch.arange(n, device=dev)
            logits = self._forward(ids, pos, cache)
            out = torch.empty(max_new_tokens, dtype=torch.long, device=dev)
            out[0:1] = self._pick(logits, seen)
            answer: list[int] = []
            done = 0  # ids handed to the host so far
            for i in range(1, max_new_tokens + 1):
                if i < max_new_tokens:  # queue step i before reading the earlier ids
                    step_pos = torch.full((1,), n + i - 1, dtype=torch.long, device=dev)
                    out[i:i + 1] = self._step_fn(out[i - 1:i].view(1, 1), step_pos, cache, seen)
                if i - done >= self.sync_every or i == max_new_tokens:
                    for tid in out[done:i].tolist():
                        answer.append(tid)
                        if on_token is not None:
                            on_token(tid)
                        if tid in stop_ids:
                            return answer, "stop"
                    done = i
                    if cancel is not None and cancel.is_set():
                        return answer, "cancelled"
            return answer, "length"
