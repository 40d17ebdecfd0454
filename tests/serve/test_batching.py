"""Continuous batching on the llama.cpp engine: concurrent requests share decode steps and get the
ids they get alone; a cancelled request frees its slot; adapters are never mixed in one batch.

"The ids they get alone" allows one thing (assert_alone_but_near_ties): which requests share a decode
step depends on thread timing, and a batch's shape rounds differently, so an answer may part from its
lone twin at a step whose top-2 logit gap is below MARGIN (a near-tie of this random model), never at
a step whose gap is clear.

Uses tests/conftest.py's tiny SmolLM2-tokenizer Llama and its f16 GGUF export.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.export.conftest import NEEDS_LLAMA_CPP, make_adapter

pytestmark = NEEDS_LLAMA_CPP
MARGIN = 0.05  # logits, as in tests/serve/test_llamacpp_engine.py
QUESTIONS = ["What is the capital of France?", "How many remote days do I get?", "Name three colours.",
             "Why is the sky blue?", "Count to five.", "Who wrote Hamlet?"]


def chat(q: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lora_dir(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_smol, tmp_path_factory.mktemp("batch-adapters") / "ft")


@pytest.fixture(scope="module")
def lora_gguf(tiny_smol: Path, converter_home: Path, lora_dir: Path) -> Path:
    from ragtune.serve.llamacpp import ensure_gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(converter_home))
        return ensure_gguf(tiny_smol, adapter_dir=lora_dir)


@pytest.fixture(scope="module")
def engine(tiny_f16: dict[str, Any], lora_gguf: Path) -> Any:
    from ragtune.serve.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_f16["path"], lora={"ft": lora_gguf}, n_threads=1, n_ctx=1024, max_batch=4).load()
    yield eng
    eng.close()


def together(engine: Any, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start every call in its own thread at once; the results in call order."""
    out: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        out[i] = engine.generate(**calls[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in out)
    return out


@functools.cache
def _reference(model_dir: str, adapter: str | None) -> Any:
    """The f16 GGUF's source model in transformers (fp32), with the LoRA the GGUF adapter came from."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _gap(model_dir: Path, ids: list[int], adapter: Path | None = None, repeat_penalty: float = 1.0) -> float:
    """transformers' top-2 logit gap at the step after `ids` (prompt + answer so far), with the engine's
    repetition penalty (transformers' rule, over every id seen) where one is set."""
    import torch

    model = _reference(str(model_dir), str(adapter) if adapter else None)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        if repeat_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            sel = logits[seen]
            logits[seen] = torch.where(sel > 0, sel / repeat_penalty, sel * repeat_penalty)
        top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_alone_but_near_ties(model_dir: Path, prompts: list[list[int]], got: list[list[int]],
                               alone: list[list[int]], adapters: list[Path | None] | None = None,
                               penalties: list[float] | None = None) -> list[int]:
    """Each batched answer `got[i]` equals its answer alone, or parts from it at a near-tie (top-2 gap below
    MARGIN): a batch shape's rounding may flip that step, and nothing else. The indexes that parted."""
    parted = []
    for i, (g, a) in enumerate(zip(got, alone)):
        if g == a:
            continue
        at = next((j for j, (x, y) in enumerate(zip(g, a)) if x != y), None)
        assert at is not None, (i, "one is a prefix of the other: not a flipped step", g, a)
        gap = _gap(model_dir, prompts[i] + a[:at], (adapters or [None] * len(got))[i],
                   (penalties or [1.0] * len(got))[i])
        assert gap < MARGIN, (i, at, gap, g, a)  # only a near-tie of this random model may flip
        parted.append(i)
    return parted


def test_concurrent_greedy_requests_get_the_ids_they_get_alone(engine: Any, tiny_smol: Path) -> None:
    calls = [dict(prompt_text=chat(q), max_new_tokens=8 + 3 * i, stop_ids=[-1], reuse_prefix=False)
             for i, q in enumerate(QUESTIONS)]  # 6 requests, 4 slots: two join when others leave
    alone = [engine.generate(**c)["ids"] for c in calls]
    steps = engine.scheduler.steps
    got = together(engine, calls)
    prompts = [engine.tokenize(c["prompt_text"]) for c in calls]
    flipped = assert_alone_but_near_ties(tiny_smol, prompts, [r["ids"] for r in got], alone)
    assert len(flipped) <= 1, (flipped, [r["ids"] for r in got], alone)
    assert [r["completion_tokens"] for r in got] == [8 + 3 * i for i in range(len(calls))]
    assert engine.scheduler.max_seen_batch == 4  # they really shared decode steps
    assert engine.scheduler.steps - steps < sum(len(a) for a in alone)  # fewer steps than one at a time


def test_requests_with_one_long_prefix_prefill_it_once_and_get_the_ids_they_get_alone(
        engine: Any, tiny_f16: dict[str, Any], tiny_smol: Path) -> None:
    from ragtune.serve.batching import SeqRequest
    from ragtune.serve.llamacpp import LlamaCppEngine

    sources = " ".join(f"Policy {i}: staff may work remotely {i % 5} days and file expenses within {i} days."
                       for i in range(7))  # a RAG system turn: the same sources for every question
    system = f"<|im_start|>system\nAnswer from the sources.\n\nSources:\n{sources}<|im_end|>\n"
    prompts = [engine.tokenize(system + chat(q)) for q in QUESTIONS[:4]]
    prefix = len(engine.tokenize(system))
    assert prefix > 100

    def submit_in_order(eng: Any, reuse: bool = True) -> list[list[int]]:
        with eng.scheduler.hold():  # admitted in this order at the next step, from a cold cache
            eng.scheduler.forget()
            reqs = [eng.scheduler.submit(SeqRequest(prompt=list(p), budget=6, reuse_prefix=reuse)) for p in prompts]
        return [r.wait().ids for r in reqs]

    shared = engine.scheduler.shared_tokens
    got = submit_in_order(engine)
    # the first computes the prefix; the three others wait one step and share its cells
    assert engine.scheduler.shared_tokens - shared >= 3 * prefix
    # one at a time on one slot, each reusing the prefix the one before left: the same pieces prefilled,
    # so the same numbers (sharing a cell is exact; a prompt prefilled in two pieces rounds differently
    # from one piece, which a tiny random model's near-ties can show), but for the decode steps' batch shape
    ref = LlamaCppEngine(tiny_f16["path"], n_threads=1, n_ctx=1024, max_batch=1).load()
    try:
        alone = [ref.generate(prompt_ids=p, max_new_tokens=6, stop_ids=[-1])["ids"] for p in prompts]
    finally:
        ref.close()
    assert_alone_but_near_ties(tiny_smol, prompts, got, alone)
    # without prefix reuse nothing is shared
    shared = engine.scheduler.shared_tokens
    submit_in_order(engine, reuse=False)
    assert engine.scheduler.shared_tokens == shared


def test_per_request_sampling_settings_hold_inside_a_batch(engine: Any, tiny_smol: Path) -> None:
    # a seeded draw is only reproducible across batch shapes where rounding cannot move it (a tiny
    # random model's near-flat distribution moves it), so sampling is checked through what it must do
    calls = [dict(prompt_text=chat(QUESTIONS[0]), max_new_tokens=12, stop_ids=[-1]),
             dict(prompt_text=chat(QUESTIONS[0]), max_new_tokens=12, temperature=1.2, top_p=1e-9, seed=7,
                  stop_ids=[-1]),  # top-p keeps only the best token: greedy
             dict(prompt_text=chat(QUESTIONS[0]), max_new_tokens=12, temperature=1.2, seed=7, stop_ids=[-1]),
             dict(prompt_text=chat(QUESTIONS[1]), max_new_tokens=12, stop_ids=[-1], repeat_penalty=1.3)]
    alone = [engine.generate(**c)["ids"] for c in calls]
    got = [r["ids"] for r in together(engine, calls)]
    assert alone[0] == alone[1]  # the same shape alone: exactly the same
    prompts = [engine.tokenize(c["prompt_text"]) for c in calls]
    assert_alone_but_near_ties(tiny_smol, [prompts[0]] * 2 + [prompts[3]], [got[0], got[1], got[3]],
                               [alone[0], alone[0], alone[3]], penalties=[1.0, 1.0, 1.3])
    assert got[2] != got[0] and alone[2] != alone[0]  # temperature 1.2 without top-p really samples


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(tiny_f16: dict[str, Any]) -> None:
    from ragtune.serve.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_f16["path"], n_threads=1, n_ctx=1024, max_batch=1).load()
    try:
        cancel = threading.Event()
        seen: list[int] = []
        first: dict[str, Any] = {}
        t = threading.Thread(target=lambda: first.update(eng.generate(
            chat(QUESTIONS[0]), max_new_tokens=400, stop_ids=[-1], cancel=cancel, on_token_id=seen.append)))
        t.start()
        deadline = time.time() + 30
        while len(seen) < 3 and time.time() < deadline:
            time.sleep(0.005)
        second: dict[str, Any] = {}
        t2 = threading.Thread(target=lambda: second.update(eng.generate(chat(QUESTIONS[1]), max_new_tokens=5,
                                                                       stop_ids=[-1])))
        t2.start()
        time.sleep(0.05)
        assert eng.scheduler.waiting == 1 and eng.scheduler.active == 1  # one slot, taken
        cancel.set()  # what the server does when a streaming client hangs up
        t.join(30)
        t2.join(30)
        assert first["finish_reason"] == "cancelled" and first["completion_tokens"] < 400
        assert second["finish_reason"] == "length" and second["completion_tokens"] == 5
        assert eng.scheduler.active == 0 and eng.scheduler.waiting == 0
    finally:
        eng.close()


def test_a_request_cancelled_while_waiting_ends_without_a_slot_or_a_prefill(tiny_f16: dict[str, Any]) -> None:
    """A client that hangs up while its request is queued: the request ends at the next step, while the slot's
    answer still runs, and its prompt is never prefilled (it was admitted when the slot came free, its prompt
    prefilled, and only then retired)."""
    from ragtune.serve.batching import SeqRequest
    from ragtune.serve.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(tiny_f16["path"], n_threads=1, n_ctx=1024, max_batch=1).load()
    try:
        real, fed = eng.decode, []
        eng.decode = lambda items: (fed.append([len(it[1]) for it in items]), real(items))[1]
        waiting = SeqRequest(prompt=eng.tokenize(chat(" ".join(QUESTIONS))), budget=4, cancel=threading.Event())
        seen: dict[str, Any] = {}

        def on_token(_tok: int) -> None:  # in the scheduler thread, between two steps
            n = len(running.ids)
            if n == 2:
                eng.scheduler.submit(waiting)
            elif n == 3:
                seen["queued"] = (eng.scheduler.waiting, eng.scheduler.active)
                waiting.cancel.set()  # what the server does when the queued request's client hangs up
            elif n == 5:
                seen["ended"] = waiting.done.is_set()

        running = SeqRequest(prompt=eng.tokenize(chat(QUESTIONS[0])), budget=12, on_token=on_token)
        eng.scheduler.submit(running)
        assert running.wait() and waiting.done.wait(30)
        assert seen == {"queued": (1, 1), "ended": True}  # ended while the one slot was still taken
        assert waiting.finish == "cancelled" and waiting.ids == [] and waiting.error is None
        assert sum(1 for step in fed for n in step if n > 1) == 1, fed  # the running prompt's prefill only
        assert running.finish == "length" and len(running.ids) == 12
        assert eng.scheduler.active == 0 and eng.scheduler.waiting == 0
    finally:
        eng.close()


def test_requests_on_different_adapters_are_never_in_one_batch(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                               tiny_smol: Path, lora_dir: Path) -> None:
    sched = engine.scheduler
    mixed: list[set[Any]] = []
    real = engine.decode

    def spy(items: Any) -> Any:
        slots = {it[0] for it in items}
        mixed.append({s.req.adapter for s in sched._running if s.slot in slots} | {engine._active})
        return real(items)

    # questions whose every greedy step has a top-2 margin of about 0.03 or more, with and without the adapter
    # (QUESTIONS[1] with it has a near-tie, 0.0014, at its third token): mostly clear steps to compare
    calls = [dict(prompt_text=chat(q), max_new_tokens=10, stop_ids=[-1], adapter=a, reuse_prefix=False)
             for q in (QUESTIONS[0], QUESTIONS[2]) for a in (None, "ft")]
    alone = [engine.generate(**c)["ids"] for c in calls]
    monkeypatch.setattr(engine, "decode", spy)
    got = together(engine, calls)
    assert_alone_but_near_ties(tiny_smol, [engine.tokenize(c["prompt_text"]) for c in calls],
                               [r["ids"] for r in got], alone, adapters=[c["adapter"] and lora_dir for c in calls])
    assert alone[0] != alone[1]  # the adapter changes the answer
    assert mixed and all(len(m) == 1 for m in mixed), mixed
    assert {next(iter(m)) for m in mixed} == {None, "ft"}


def test_a_streaming_client_that_hangs_up_frees_its_slot_on_the_server(
        tiny_smol: Path, converter_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    import uvicorn

    from ragtune.config import load_config
    from ragtune.serve.server import create_app
    from tests.conftest import free_port

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))  # the tiny model's GGUF is exported once there
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\ngeneration:\n  threads: 1\n  engine: llama.cpp\n"
                 "serve:\n  max_batch: 1\n  max_tokens_limit: 2000\n  deployments:\n    - {name: cpp}\n")
    app = create_app(load_config(f))
    sched = next(iter(app.state.runtime.generators.values())).engine_impl.scheduler
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "cpp", "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0, "stream": True}
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with httpx.stream("POST", url, json={**body, "max_tokens": 1500}, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks in: the answer is being decoded
            assert sched.active == 1 and any('"content"' in x for x in got)
        # hung up: the one slot comes free, and the next request gets it and finishes
        while sched.active and time.time() < deadline + 30:
            time.sleep(0.02)
        assert sched.active == 0
        r2 = httpx.post(url, json={**body, "stream": False, "max_tokens": 5}, timeout=60)
        assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 5
    finally:
        server.should_exit = True
        t.join(10)


def test_a_long_prompt_joining_running_answers_prefills_in_capped_chunks(engine: Any, tiny_smol: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """While anything decodes, a step carries at most prefill_chunk prompt tokens, so the running answers
    keep getting a token every short step. (The running answer's ids are not compared: over 120 tokens the
    tiny random model has near-ties that another batch shape's rounding flips, capped or not.)"""
    sched = engine.scheduler
    steps: list[tuple[int, int]] = []  # (decoding sequences, prompt tokens) of each decode call
    real = engine.decode

    def spy(items: Any) -> Any:
        steps.append((sum(1 for it in items if len(it[1]) == 1), sum(len(it[1]) for it in items if len(it[1]) > 1)))
        return real(items)

    long_q = chat(" ".join(QUESTIONS * 6))  # ~200 prompt tokens
    calls = [dict(prompt_text=chat(QUESTIONS[0]), max_new_tokens=120, stop_ids=[-1], reuse_prefix=False),
             dict(prompt_text=long_q, max_new_tokens=4, stop_ids=[-1], reuse_prefix=False)]
    alone = [engine.generate(**c)["ids"] for c in calls]
    monkeypatch.setattr(engine, "decode", spy)

    def run(chunk: int) -> list[list[int]]:
        monkeypatch.setattr(sched, "prefill_chunk", chunk)
        steps.clear()
        out: list[Any] = [None, None]
        first = threading.Thread(target=lambda: out.__setitem__(0, engine.generate(**calls[0])))
        first.start()
        while sched.steps == 0 or not any(d for d, _ in steps):  # the first answer is decoding
            time.sleep(0.001)
        out[1] = engine.generate(**calls[1])
        first.join(120)
        ids = [r["ids"] for r in out]
        assert_alone_but_near_ties(tiny_smol, [engine.tokenize(long_q)], [ids[1]], [alone[1]])
        return ids

    run(16)
    beside = [p for d, p in steps if d and p]
    assert beside and max(beside) <= 16, steps
    assert sum(beside) >= 150  # the long prompt was prefilled beside the running answer, 16 tokens a step
    run(0)
    assert max(p for d, p in steps if d) > 16, steps  # without the cap one step takes the whole prompt
    with sched.throughput():  # a batch nobody streams (eval, ask --questions): no cap, fewer steps
        run(16)
    assert max(p for d, p in steps if d) > 16, steps
