"""Continuous batching for the llama.cpp engine: concurrent requests decoded in one llama.cpp batch.

    sched = Scheduler(engine, lock=gen.lock)     # engine: a loaded LlamaCppEngine (its step primitives)
    req = sched.submit(SeqRequest(prompt=ids, budget=64, temperature=0.0, on_token=q.put))
    req.wait()                                   # req.ids, req.finish, req.t_first, ... once done
    sched.close()

One thread owns the llama.cpp context. Each step it (1) retires cancelled sequences (and ends
cancelled waiting requests, which never take a slot or a prefill), (2) admits
waiting requests into free sequence slots (`engine.n_seq`, from `serve.max_batch`), reusing the
longest cached prefix a slot holds for the same adapter — its own, or a running sequence's, whose
cells the new one then shares (llama.cpp's `seq_cp`: RAG prompts with the same sources, or one long
system prompt, are prefilled once; a request whose prefix another is still prefilling waits for it
one step rather than computing it twice) — (3) picks one adapter group — llama.cpp
applies LoRA to the whole context, so one batch never mixes adapters; groups with running
sequences take turns every `quantum` steps and paused ones keep their KV cache — (4) builds one
batch of every running sequence of that group (a prompt chunk for a new one, one token for a
decoding one, at most `engine.n_batch` tokens), decodes it, and (5) samples each sequence from its
own logits row with its own settings (a request's grammar, `constraint`, masks its row first). New requests join at the next step boundary; a finished or
cancelled one leaves at once and its slot serves the next. Greedy is the argmax of the sequence's
own row, so a batched request gets the ids it gets alone wherever the top-2 margin is clear of the
float rounding that a different batch shape brings.

The KV cache is one buffer of `engine.n_ctx` cells shared by the slots (llama.cpp's unified cache):
memory does not grow with `max_batch`. A request is admitted only when its prompt plus its token
budget fits beside the running ones (idle slots' cached prefixes are evicted first), so a decode
never runs out of cells mid-answer; a lone request may use the whole context.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

QUANTUM = 16  # steps an adapter group decodes before another group with running sequences gets its turn
SHARE_WAIT = 32  # prompt tokens another sequence is still prefilling that make a request wait a step to share them


@dataclass
class SeqRequest:
    """One sequence to generate; the scheduler fills in the results and sets `done`."""

    prompt: list[int]
    budget: int  # new tokens at most
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    stops: frozenset[int] = frozenset()  # end-of-generation ids (kept in `ids`)
    repeat_penalty: float = 1.0
    reuse_prefix: bool = True
    constraint: Any = None  # a ragtune.serve.constrained.Constraint: masks this sequence's logits each step
    on_token: Callable[[int], Any] | None = None  # called in the scheduler thread: keep it cheap
    cancel: Any = None  # anything with is_set(); checked at every step boundary
    ids: list[int] = field(default_factory=list)
    finish: str = "length"  # stop | length | cancelled
    error: BaseException | None = None
    t_submit: float = 0.0
    t_admit: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> "SeqRequest":
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self


class _Seq:
    """A running sequence in a slot: what its KV holds and what it still has to feed."""

    def __init__(self, req: SeqRequest, slot: int, keep: int, vocab: int):
        import numpy as np

        self.req = req
        self.slot = slot
        self.pos = keep  # tokens of this sequence already in the KV cache
        self.feed = list(req.prompt[keep:])  # tokens to put in the KV cache next
        self.tokens = list(req.prompt[:keep])  # what the KV cache holds, token by token
        self.rng = np.random.default_rng(req.seed)
        self.seen = None
        if req.repeat_penalty != 1.0:
            self.seen = np.zeros(vocab, dtype=bool)
            self.seen[np.asarray(req.prompt)] = True


@dataclass
class _Slot:
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)  # cached prefix (idle) or the running sequence's KV
    last_used: float = 0.0
    busy: bool = False


def hand_out(req: SeqRequest, tok: int, seen: Any, t: float) -> str:
    """Record `tok`, picked for `req` (and accepted by its grammar), and pass it to the caller; the
    finish reason when the request ends with it (stop, length, cancelled), else ""."""
    if seen is not None:
        seen[tok] = True  # the repetition penalty's memory
    req.ids.append(tok)
    if req.t_first is None:
        req.t_first = t
    if req.on_token is not None:
        try:
            req.on_token(tok)
        except BaseException as exc:  # the caller's callback failed: end its request only
            req.error = exc
            return "cancelled"
    if tok in req.stops or (req.constraint is not None and req.constraint.done):
        return "stop"
    if len(req.ids) >= req.budget:
        return "length"
    if req.cancel is not None and req.cancel.is_set():
        return "cancelled"
    return ""


def _common(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


class StepThread:
    """The thread half of a batch scheduler, shared by both engines: a queue of waiting requests and
    one thread, started at the first submit, that runs the subclass's `_step` under the model lock
    while anything waits or runs. A step that raises, or a close mid-answer, fails every caller
    (`_fail_all`) rather than leaving one waiting forever. Subclasses define `_step`, `active`,
    `_fail_all` and `_running_requests`, and may wrap each step in `_step_context`."""

    engine_name = "the engine"  # in messages: "the llama.cpp engine", "the transformers engine"

    def __init__(self, lock: Any = None, quantum: int = QUANTUM, prefill_chunk: int = 0):
        self.lock = lock  # held around each step (the Generator's lock: one model call at a time)
        self.quantum = max(1, int(quantum))
        self.prefill_chunk = int(prefill_chunk)  # prompt tokens per step while others decode (0: no cap)
        self._waiting: collections.deque[SeqRequest] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._held = 0  # hold(): no step starts while > 0
        self._throughput = 0  # throughput(): > 0 while a batch nobody streams is being answered
        self.submitted = 0  # requests ever submitted (hold's callers see theirs arrive)
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def throughput(self) -> Any:
        """Inside this block the process answers a batch that nobody watches token by token (eval,
        `ask --questions`: `Generator.answer_all`), so a scheduler that gives up throughput for smooth
        streams (the llama.cpp one's `prefill_chunk`) does not."""
        with self._cv:
            self._throughput += 1
        try:
            yield self
        finally:
            with self._cv:
                self._throughput -= 1

    def prefill_cap(self, decoding: bool) -> int | None:
        """Prompt tokens this step may carry: `prefill_chunk` while answers are decoding (so a long prompt
        joining delays their next token by that much prefill), None (no cap) when nothing decodes, when
        prefill_chunk is 0, or inside `throughput()`."""
        return self.prefill_chunk if decoding and self.prefill_chunk > 0 and not self._throughput else None

    @contextlib.contextmanager
    def hold(self) -> Any:
        """No step starts inside this block (one running now finishes): requests submitted inside
        it all wait, in submission order, and are admitted together at the first step after it. So
        the steps that follow depend on that order alone, not on when each caller's thread ran:
        `Generator.answer_all` gets the same batches, and the same float rounding, on every run."""
        with self._cv:
            self._held += 1
        try:
            yield self
        finally:
            with self._cv:
                self._held -= 1
                self._cv.notify_all()

    def submit(self, req: SeqRequest) -> SeqRequest:
        req.t_submit = time.perf_counter()
        with self._cv:
            if self._closed:
                raise RagtuneError(f"{self.engine_name} is closed")
            self._waiting.append(req)
            self.submitted += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"ragtune-batch-{type(self).__name__}",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
        return req

    @property
    def active(self) -> int:
        """Sequences running now (slots in use)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Sequences decoded together at most (the slots)."""
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _step(self) -> None:
        raise NotImplementedError

    def _step_context(self) -> Any:
        return contextlib.nullcontext()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (self._held or (not self._waiting and not self.active)):
                    self._cv.wait()
                if self._closed:
                    self._fail_all(RagtuneError(f"{self.engine_name} was closed while generating"))
                    return
            try:
                with self.lock if self.lock is not None else contextlib.nullcontext(), self._step_context():
                    self._step()
            except BaseException as exc:  # never leave a caller waiting forever
                log.exception("%s: a batch step failed", self.engine_name)
                self._fail_all(exc if isinstance(exc, RagtuneError) else RagtuneError(f"{self.engine_name} failed: {exc}"))

    def _fail_all(self, exc: BaseException) -> None:
        """Every running request, then every waiting one, ends with `exc`."""
        raise NotImplementedError

    def _end_cancelled_waiting(self, t: float) -> None:
        """Waiting requests whose caller has gone (cancel set: a client that hung up while queued) end now,
        "cancelled", without taking a slot or prefilling their prompt."""
        with self._cv:
            gone = [r for r in self._waiting if r.cancel is not None and r.cancel.is_set()]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            r.finish, r.t_admit, r.t_end = "cancelled", t, t
            r.done.set()

    def _fail_waiting(self, exc: BaseException, t: float) -> None:
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for r in waiting:
            r.error, r.finish, r.t_end = exc, "cancelled", t
            r.done.set()


class Scheduler(StepThread):
    """Decodes every submitted request in shared llama.cpp batches, in a thread it starts lazily."""

    engine_name = "the llama.cpp engine"

    def __init__(self, engine: Any, lock: Any = None, quantum: int = QUANTUM, prefill_chunk: int = 0):
        super().__init__(lock, quantum, prefill_chunk)  # prefill_chunk 0: up to n_batch
        self.engine = engine
        self.slots = [_Slot() for _ in range(engine.n_seq)]
        self._running: list[_Seq] = []
        self._group: str | None = None
        self._group_steps = 0
        self.steps = 0  # decode calls made (for tests and benchmarks)
        self.max_seen_batch = 0  # the most sequences decoded in one call
        self.shared_tokens = 0  # prompt tokens taken from another sequence's cache instead of computed

    @property
    def active(self) -> int:
        """Sequences running now (slots in use)."""
        return len(self._running)

    @property
    def width(self) -> int:
        return len(self.slots)

    def _step(self) -> None:
        now = time.perf_counter()
        for s in list(self._running):
            if s.req.cancel is not None and s.req.cancel.is_set():
                self._retire(s, "cancelled", now)
        self._end_cancelled_waiting(now)
        self._admit(now)
        batch = self._choose_group()
        if not batch:
            return
        items, owners = self._build(batch)
        self.engine.set_adapter(self._group)
        rows = self.engine.decode(items)
        self.steps += 1
        self._group_steps += 1
        self.max_seen_batch = max(self.max_seen_batch, len(owners))
        t = time.perf_counter()
        for s, fed in zip(batch, (it[1] for it in items)):
            s.tokens.extend(fed)
            s.pos += len(fed)
        for s, row in zip(owners, rows):
            self._sample(s, row, t)

    def _admit(self, now: float) -> None:
        n_ctx = self.engine.n_ctx
        while True:
            with self._cv:
                if not self._waiting:
                    return
                req = self._waiting[0]
            free = [i for i, s in enumerate(self.slots) if not s.busy]
            if not free:
                return
            slot, keep = self._pick_slot(req, free)
            donor, shared, pending = self._running_prefix(req)
            if pending - max(keep, shared) >= SHARE_WAIT:
                return  # a running prompt is computing this one's prefix: share it next step (FIFO: the rest wait too)
            need = len(req.prompt) + req.budget
            reserved = sum(len(s.req.prompt) + s.req.budget for s in self._running)
            idle = sorted((i for i in free if i != slot and self.slots[i].tokens), key=lambda i: self.slots[i].last_used)
            cached = sum(len(self.slots[i].tokens) for i in idle)
            while reserved + cached + need > n_ctx and idle:
                i = idle.pop(0)
                cached -= len(self.slots[i].tokens)
                self.slots[i].tokens, self.slots[i].adapter = [], None
                self.engine.seq_rm(i, 0)
            if reserved + cached + need > n_ctx:
                return  # waits until a running sequence frees cells
            with self._cv:
                self._waiting.popleft()
            sl = self.slots[slot]
            if donor is not None and shared > keep:
                self.engine.seq_rm(slot, 0)
                self.engine.seq_cp(donor, slot, shared)
                sl.tokens, keep = list(req.prompt[:shared]), shared
                self.shared_tokens += shared
            else:
                self.engine.seq_rm(slot, keep)
            sl.busy, sl.adapter, sl.tokens = True, req.adapter, sl.tokens[:keep]
            req.t_admit = now
            self._running.append(_Seq(req, slot, keep, self.engine.n_vocab))

    def _pick_slot(self, req: SeqRequest, free: list[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with the prompt (same adapter)."""
        best, best_keep = None, -1
        for i in free:
            s = self.slots[i]
            keep = 0
            if req.reuse_prefix and s.tokens and s.adapter == req.adapter:
                keep = _common(s.tokens, req.prompt, len(req.prompt) - 1)  # at least one token for fresh logits
            if keep > best_keep or (keep == best_keep and not s.tokens and best is not None and self.slots[best].tokens):
                best, best_keep = i, keep
        assert best is not None
        return best, max(best_keep, 0)

    def forget(self) -> int:
        """Drop every idle slot's cached prefix (benchmarks and tests start from a cold cache); the
        cached tokens dropped. Call it while `hold()` keeps steps from starting."""
        dropped = 0
        for i, sl in enumerate(self.slots):
            if not sl.busy and sl.tokens:
                dropped += len(sl.tokens)
                sl.tokens, sl.adapter = [], None
                self.engine.seq_rm(i, 0)
        return dropped

    def _running_prefix(self, req: SeqRequest) -> tuple[int | None, int, int]:
        """The running sequence (same adapter) whose tokens share the longest prefix with the prompt: its
        slot, how many of those tokens its cache holds now, and how many it will once its prompt is in."""
        donor, shared, pending = None, 0, 0
        if not req.reuse_prefix:
            return donor, shared, pending
        limit = len(req.prompt) - 1  # evaluate at least one token for fresh logits
        for s in self._running:
            if s.req.adapter != req.adapter:
                continue
            n = _common(s.tokens, req.prompt, limit)
            if n > shared:
                donor, shared = s.slot, n
            if n == len(s.tokens) and s.feed:  # still prefilling: what it is about to compute counts too
                n += _common(s.feed, req.prompt[n:], limit - n)
            pending = max(pending, n)
        return donor, shared, pending

    def _choose_group(self) -> list[_Seq]:
        groups: list[str | None] = []
        for s in self._running:
            if s.req.adapter not in groups:
                groups.append(s.req.adapter)
        if not groups:
            return []
        if self._group not in groups:
            self._group, self._group_steps = groups[0], 0
        elif len(groups) > 1 and self._group_steps >= self.quantum:
            self._group = groups[(groups.index(self._group) + 1) % len(groups)]
            self._group_steps = 0
        return [s for s in self._running if s.req.adapter == self._group]

    def _build(self, batch: list[_Seq]) -> tuple[list[tuple[int, list[int], int, bool]], list[_Seq]]:
        """Decoding sequences first (one token each), then prompt chunks in arrival order; while any
        sequence decodes, prompts get at most `prefill_chunk` tokens of the step, so a long prompt
        joining slows each running answer's next token by that much prefill, not by a whole n_batch
        (not inside `throughput()`: a batch's total time is what counts there)."""
        room = self.engine.n_batch
        order = sorted(batch, key=lambda s: (len(s.feed) > 1, s.req.t_submit))
        decoding = sum(1 for s in order if len(s.feed) == 1)
        cap = self.prefill_cap(decoding > 0)
        if cap is not None:
            room = min(room, decoding + cap)
        items, owners, kept = [], [], []
        for s in order:
            if room <= 0:
                break
            chunk = s.feed[:room]
            room -= len(chunk)
            want = len(chunk) == len(s.feed)
            items.append((s.slot, chunk, s.pos, want))
            kept.append(s)
            s.feed = s.feed[len(chunk):]
            if want:
                owners.append(s)
        batch[:] = kept
        return items, owners

    def _sample(self, s: _Seq, logits: Any, t: float) -> None:
        import numpy as np

        from ragtune.serve.llamacpp import _pick

        req = s.req
        if s.seen is not None:
            logits = logits.copy()
            sel = logits[s.seen]
            logits[s.seen] = np.where(sel > 0, sel / req.repeat_penalty, sel * req.repeat_penalty)
        try:
            if req.constraint is not None:
                req.constraint.mask(logits)  # the row is this sequence's own: masked in place
            tok = _pick(logits, req.temperature, req.top_p, s.rng)
            if req.constraint is not None:
                req.constraint.accept(tok)
        except RagtuneError as exc:  # the grammar failed: end this request only
            req.error = exc
            self._retire(s, "cancelled", t)
            return
        why = hand_out(req, tok, s.seen, t)
        if why:
            self._retire(s, why, t)
        else:
            s.feed = [tok]

    def _retire(self, s: _Seq, finish: str, t: float) -> None:
        self._running.remove(s)
        sl = self.slots[s.slot]
        sl.busy, sl.tokens, sl.last_used = False, s.tokens, t
        if len(sl.tokens) != s.pos:  # a prompt chunk was in flight: keep only what the KV holds
            sl.tokens = sl.tokens[: s.pos]
        s.req.finish = finish
        s.req.t_end = t
        s.req.done.set()

    def _fail_all(self, exc: BaseException) -> None:
        t = time.perf_counter()
        for s in list(self._running):
            s.req.error = exc
            self._retire(s, "cancelled", t)
            self.slots[s.slot].tokens = []
            try:
                self.engine.seq_rm(s.slot, 0)
            except Exception:  # noqa: BLE001 - the context may be gone; the slot is dropped anyway
                log.debug("clearing slot %d failed", s.slot, exc_info=True)
        self._fail_waiting(exc, t)
