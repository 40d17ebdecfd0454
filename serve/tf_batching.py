"""Batched decoding on the transformers engine: concurrent requests share each decode step.

    sched = TfScheduler(gen, max_batch=8, prefill_chunk=128)  # gen: a loaded transformers Generator
    req = sched.submit(SeqRequest(prompt=ids, budget=64, temperature=0.0, on_token=q.put))
    req.wait()                                   # req.ids, req.finish, req.t_first, ... once done
    sched.close()

Dynamic padded batches with a `DynamicCache` whose layers append each token into spare room at the
end of a buffer (transformers' own layer copies the whole cache per token), one thread owning the
model. Each step it

1. retires cancelled sequences (a prompt being prefilled included) and ends cancelled waiting
   requests, which never take a slot or a prefill;
2. admits waiting requests into free slots (`max_batch`, from `serve.max_batch`; a request whose
   prompt is being prefilled holds its slot);
3. prefills admitted prompts, each alone into its own cache: whole when nothing is decoding (exactly
   the forward a lone request gets, so its first token is the lone one) or inside `throughput()`;
   otherwise at most `prefill_chunk` prompt tokens this step (`serve.prefill_chunk`; in arrival
   order, the rest in later steps at the positions after the cached ones), so a long prompt joining
   delays the running answers' next token by one piece of prefill, not by the whole prompt. A
   prompt's last piece gives its first token, and its KV cache joins the running batch of its
   adapter, left-padded to the batch's length (or the batch is left-padded to the prompt's);
4. picks one adapter group (peft switches adapters for the whole model, so a batch never mixes
   them; groups with running sequences take turns every `quantum` steps, paused ones keep their
   cache);
5. decodes one token for every sequence of that group in one forward, with a 2-D attention mask that
   hides the padding and each row's own position ids (its real length, not the padded one: RoPE sees
   the positions a lone request has), then samples each row with its own settings (repetition
   penalty, grammar mask, temperature, top-p, its own seeded generator).

A finished or cancelled sequence leaves at once, its rows are cut out of the cache, and columns that
became padding in every row are trimmed, so the batch does not stay as long as its longest past
member.

Greedy is the argmax of the row's own logits: padding is masked to exact zeros in the softmax, but a
different batch shape may round a matmul differently in the last bit, so a batched answer gets the
lone ids wherever the top-2 margin is clear of that (tested on tiny random models, whose margins are
the narrowest). A prompt prefilled in pieces gets the whole prefill's logits up to the same
rounding. Models whose cache is not plain full attention (sliding-window, linear-attention or
shared-KV layers) cannot be padded this way: `batchable` says why and the Generator answers them one
at a time.
"""

from __future__ import annotations

import atexit
import collections
import functools
import logging
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.serve.batching import QUANTUM, SeqRequest, StepThread, hand_out

log = logging.getLogger(__name__)

__all__ = ["SeqRequest", "TfScheduler", "batchable"]
_LIVE: "weakref.WeakSet[TfScheduler]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Join the scheduler threads before the interpreter tears torch down under them."""
    for sched in list(_LIVE):
        sched.close()


def batchable(model: Any) -> str:
    """Why `model`'s KV cache cannot be batched with left padding ("" when it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot map to cache layers
        return f"its cache layout is unknown ({exc})"
    odd = sorted({type(x).__name__ for x in layers if type(x) is not DynamicLayer})
    if odd:
        return f"its cache has {', '.join(odd)} layers (not plain full attention)"
    return ""


@dataclass(eq=False)  # identity: rows are found in lists by `in`
class _Row:
    """A running sequence: its request, its real length in the cache, the token to feed next."""

    req: SeqRequest
    rng: Any
    seen: Any  # bool tensor over the vocabulary (repetition penalty), or None
    length: int = 0
    last: int = 0


@dataclass(eq=False)
class _Prefill:
    """An admitted request whose prompt is going into its own cache: `done` prompt tokens are in it."""

    req: SeqRequest
    cache: Any
    done: int = 0


@dataclass(eq=False)
class _Group:
    """The running sequences of one adapter: one padded KV cache, one attention mask (1 real, 0 pad)."""

    adapter: str | None
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: Any = None  # long tensor [rows, cache length]


class TfScheduler(StepThread):
    """Decodes every submitted request in shared transformers forwards, in a thread it starts lazily."""

    engine_name = "the transformers engine"

    def __init__(self, gen: Any, max_batch: int, lock: Any = None, quantum: int = QUANTUM, prefill_chunk: int = 0):
        if int(max_batch) < 1:
            raise RagtuneError(f"max_batch must be at least 1, got {max_batch}")
        super().__init__(lock, quantum, prefill_chunk)  # prefill_chunk 0: the whole prompt in one forward
        self.gen = gen
        self.max_batch = int(max_batch)
        self._groups: dict[str | None, _Group] = {}
        self._prefilling: list[_Prefill] = []  # admitted, prompt not all in its cache yet (arrival order)
        self._turn: str | None = None
        self._turn_steps = 0
        self._cache_kw, self._keep_one = forward_params(gen.model)
        self.steps = 0  # batched decode forwards made (for tests and benchmarks)
        self.prefill_forwards = 0  # prompt pieces fed (a whole prompt is one)
        self.max_seen_batch = 0  # the most sequences decoded in one forward
        _LIVE.add(self)

    def submit(self, req: SeqRequest) -> SeqRequest:
        if not req.prompt:
            raise RagtuneError("TfScheduler.submit: the prompt is empty")
        return super().submit(req)

    @property
    def active(self) -> int:
        """Sequences running now, their prompts' prefill included (slots in use)."""
        return sum(len(g.rows) for g in self._groups.values()) + len(self._prefilling)

    @property
    def width(self) -> int:
        return self.max_batch

    def _step_context(self) -> Any:
        import torch

        return torch.inference_mode()

    def _step(self) -> None:
        now = time.perf_counter()
        for g in list(self._groups.values()):
            gone = [r for r in g.rows if r.req.cancel is not None and r.req.cancel.is_set()]
            self._retire(g, gone, "cancelled", now)
        for p in [p for p in self._prefilling if p.req.cancel is not None and p.req.cancel.is_set()]:
            self._drop_prefill(p, "cancelled", now)
        self._end_cancelled_waiting(now)
        self._admit()
        self._prefill()
        group = self._choose_group()
        if group is not None:
            self._decode(group)

    def _admit(self) -> None:
        while self.active < self.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            req.t_admit = time.perf_counter()
            self._prefilling.append(_Prefill(req, _growing_cache(self.gen.model.config)))

    def _prefill(self) -> None:
        """This step's prompt tokens: all of them when nothing decodes or inside `throughput()` (a batch
        nobody streams: only its total time counts), else at most `prefill_chunk`, in arrival order."""
        decoding = any(g.rows for g in self._groups.values())
        room = self.prefill_cap(decoding)
        for p in list(self._prefilling):
            n = len(p.req.prompt) - p.done
            if room is not None:
                if room <= 0:
                    return
                n = min(n, room)
                room -= n
            self._piece(p, n)

    def _piece(self, p: _Prefill, n: int) -> None:
        """The next `n` prompt tokens into the request's own cache; after the last, its first token, then its
        cache joins its adapter's group. A whole prompt is the lone request's forward, unchanged."""
        import torch

        req = p.req
        logits = prefill_forward(self.gen.model, p.cache, req.prompt, p.done, p.done + n, self._cache_kw,
                                 self._keep_one, self.gen._adapter_ctx(req.adapter))
        p.done += n
        self.prefill_forwards += 1
        if p.done < len(req.prompt):
            return
        self._prefilling.remove(p)
        logits = logits.float().cpu()
        row = _Row(req=req, rng=_generator(req.seed), seen=None, length=len(req.prompt))
        if req.repeat_penalty != 1.0:
            row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            row.seen[torch.tensor(req.prompt)] = True
        group = self._groups.setdefault(req.adapter, _Group(req.adapter))
        self._join(group, row, p.cache)
        self._sample(group, [row], logits[None, :], time.perf_counter())

    def _drop_prefill(self, p: _Prefill, finish: str, t: float) -> None:
        """A request leaves mid-prefill: its slot and its cache go, it ends without a token."""
        self._prefilling.remove(p)
        p.req.finish, p.req.t_end = finish, t
        p.req.done.set()

    def _join(self, group: _Group, row: _Row, cache: Any) -> None:
        import torch
        import torch.nn.functional as F

        n = len(row.req.prompt)
        mask = torch.ones((1, n), dtype=torch.long, device=self.gen.model.device)
        if not group.rows:
            group.rows, group.cache, group.mask = [row], cache, mask
            return
        width = max(n, group.mask.shape[1])
        grow, pad = width - group.mask.shape[1], width - n
        for old, new in zip(group.cache.layers, cache.layers):
            if not old.is_initialized or not new.is_initialized:
                raise RagtuneError("a cache layer was not filled by the forward; this model cannot be batched "
                                   "(set serve.max_batch: 1)")
            old.keys = torch.cat([F.pad(old.keys, (0, 0, grow, 0)), F.pad(new.keys, (0, 0, pad, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, grow, 0)), F.pad(new.values, (0, 0, pad, 0))])
        group.mask = torch.cat([F.pad(group.mask, (grow, 0)), F.pad(mask, (pad, 0))])
        group.rows.append(row)

    def _choose_group(self) -> _Group | None:
        names = [a for a, g in self._groups.items() if g.rows]
        if not names:
            return None
        if self._turn not in names:
            self._turn, self._turn_steps = names[0], 0
        elif len(names) > 1 and self._turn_steps >= self.quantum:
            self._turn = names[(names.index(self._turn) + 1) % len(names)]
            self._turn_steps = 0
        return self._groups[self._turn]

    def _decode(self, group: _Group) -> None:
        """One token for every row of the group, in one forward over the padded cache."""
        import torch

        model = self.gen.model
        dev = model.device
        rows = list(group.rows)
        ids = torch.tensor([[r.last] for r in rows], device=dev)
        positions = torch.tensor([[r.length] for r in rows], device=dev)
        mask = torch.cat([group.mask, torch.ones((len(rows), 1), dtype=group.mask.dtype, device=dev)], dim=1)
        with self.gen._adapter_ctx(group.adapter):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{self._cache_kw: group.cache})
        group.mask = mask
        for r in rows:
            r.length += 1
        self.steps += 1
        self._turn_steps += 1
        self.max_seen_batch = max(self.max_seen_batch, len(rows))
        self._sample(group, rows, out.logits[:, -1, :].float().cpu(), time.perf_counter())

    def _sample(self, group: _Group, rows: list[_Row], logits: Any, t: float) -> None:
        ended: dict[str, list[_Row]] = collections.defaultdict(list)
        for r, row_logits in zip(rows, logits):
            why = self._next(r, row_logits, t)
            if why:
                ended[why].append(r)
        for why, gone in ended.items():
            self._retire(group, gone, why, t)

    def _next(self, r: _Row, logits: Any, t: float) -> str:
        """Pick and hand out one row's next token; the finish reason when the row ends, else ""."""
        req = r.req
        try:
            tok = _pick(_penalised(logits, r.seen, req.repeat_penalty, req.constraint), req.temperature,
                        req.top_p, r.rng)
            if req.constraint is not None:
                req.constraint.accept(tok)
        except RagtuneError as exc:  # the grammar failed: end this request only
            req.error = exc
            return "cancelled"
        why = hand_out(req, tok, r.seen, t)
        if not why:
            r.last = tok
        return why

    def _retire(self, group: _Group, gone: list[_Row], finish: str, t: float) -> None:
        """Cut rows out of the group's cache (and the padding no remaining row needs); release them."""
        if not gone:
            return
        import torch

        keep = [i for i, r in enumerate(group.rows) if r not in gone]
        if not keep:
            group.rows, group.cache, group.mask = [], None, None
        else:
            idx = torch.tensor(keep, device=group.mask.device)
            mask = group.mask[idx]
            first = int(torch.nonzero(mask.sum(dim=0))[0])  # leading columns that are padding in every row
            for layer in group.cache.layers:
                layer.keys = layer.keys[idx, :, first:, :]
                layer.values = layer.values[idx, :, first:, :]
            group.mask = mask[:, first:]
            group.rows = [group.rows[i] for i in keep]
        for r in gone:
            r.req.finish = finish
            r.req.t_end = t
            r.req.done.set()

    def _fail_all(self, exc: BaseException) -> None:
        t = time.perf_counter()
        for g in self._groups.values():
            for r in g.rows:
                r.req.error = exc
            self._retire(g, list(g.rows), "cancelled", t)
        for p in list(self._prefilling):
            p.req.error = exc
            self._drop_prefill(p, "cancelled", t)
        self._fail_waiting(exc, t)


def forward_params(model: Any) -> tuple[str, bool]:
    """The cache argument's name (`cache` since transformers 5.x deprecated `past_key_values`) and whether
    the forward takes `logits_to_keep` (the prefill needs the last row only, not the LM head over the prompt)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values", False
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def prefill_forward(model: Any, cache: Any, prompt: list[int], start: int, end: int, cache_kw: str, keep_one: bool,
                    adapter_ctx: Any) -> Any:
    """Feed `prompt[start:end]` into `cache`, which holds `prompt[:start]` (a batch of one, no padding),
    under `adapter_ctx`; the last position's logits. A piece after the first gets the
    positions after the cached ones (RoPE); only the last row of logits is computed where the forward
    takes `logits_to_keep` (an earlier piece's is discarded: the LM head over one row costs little)."""
    import torch

    dev = model.device
    ids = torch.tensor([prompt[start:end]], device=dev)
    kw = {cache_kw: cache, **({"logits_to_keep": 1} if keep_one else {})}
    if start:
        kw["position_ids"] = torch.arange(start, end, device=dev)[None, :]
    mask = torch.ones((1, end), dtype=torch.long, device=dev)
    with adapter_ctx:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    return out.logits[0, -1, :]


def _growing_cache(config: Any) -> Any:
    """A DynamicCache whose layers append in place (`_grow_layer`)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layer = _grow_layer()
    cache.layers = [layer() for _ in cache.layers]
    return cache


@functools.cache
def _grow_layer() -> type:
    """transformers' DynamicLayer, but `update` writes the new positions into spare room at the end of a
    larger buffer instead of concatenating: DynamicLayer copies the whole cache of every layer at every
    token (on SmolLM2-135M, 8 rows of 200 tokens, a quarter of the decode step). `keys` and `values` stay
    views of the filled part, so the scheduler's joins and cuts, which replace them, still work: the next
    update copies what they hold into a new buffer, with room for half as many tokens again."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _room: tuple[Any, Any, Any, Any] | None = None  # key buffer, value buffer, and the views handed out

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            end = n + key_states.shape[-2]
            room = self._room
            if room is None or self.keys is not room[2] or self.values is not room[3] or end > room[0].shape[-2]:
                size = end + max(64, end // 2)
                kb = key_states.new_empty((*key_states.shape[:2], size, key_states.shape[-1]))
                vb = value_states.new_empty((*value_states.shape[:2], size, value_states.shape[-1]))
                if n:
                    kb[:, :, :n] = self.keys
                    vb[:, :, :n] = self.values
            else:
                kb, vb = room[0], room[1]
            kb[:, :, n:end] = key_states
            vb[:, :, n:end] = value_states
            self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
            self._room = (kb, vb, self.keys, self.values)
            return self.keys, self.values

    return GrowingLayer


def _generator(seed: int | None) -> Any:
    import torch

    return torch.Generator().manual_seed(int(seed) if seed is not None else random.getrandbits(63))


def _penalised(logits: Any, seen: Any, penalty: float, constraint: Any) -> Any:
    """The row after transformers' repetition penalty (over prompt and answer ids) and the grammar mask."""
    import torch

    if seen is not None:
        sel = logits[seen]
        logits[seen] = torch.where(sel < 0, sel * penalty, sel / penalty)
    if constraint is not None:
        ok = torch.from_numpy(constraint.allowed())
        n = min(ok.shape[0], logits.shape[-1])
        logits[:n] = logits[:n].masked_fill(~ok[:n], float("-inf"))
        logits[n:] = float("-inf")
    return logits


def _pick(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy argmax at temperature 0; else temperature, then nucleus (top-p), then a draw from `rng`."""
    import torch

    if temperature == 0:
        return int(torch.argmax(logits))
    p = torch.softmax(logits.double() / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(p, descending=True)
        keep = int(torch.searchsorted(torch.cumsum(sorted_p, 0), torch.tensor([top_p], dtype=p.dtype))[0]) + 1
        q = torch.zeros_like(p)
        q[order[:keep]] = sorted_p[:keep]
        p = q
    return int(torch.multinomial(p, 1, generator=rng)[0])
