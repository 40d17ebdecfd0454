"""Batched decoding on the transformers engine (serve/tf_batching.py): concurrent requests share decode
steps and get the ids the one-at-a-time path (transformers' `generate`, `serve.max_batch: 1`) gives
them; per-request settings hold inside a batch; adapters never share a forward; a client that hangs
up frees its slot on a real server. Also the incremental detokenizer (`_Decoder`).

The models are tiny_llama and a tiny Qwen3 with their linear weights scaled by 8: at the default
initialisation a tiny random model answers one repeated token whatever the prompt, which would hide
a wrong position id or mask; scaled, every prompt gets its own answer (top-2 margins 1e-4..1e-2,
far above fp32 rounding).
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

QUESTIONS = ["What is the capital of France?", "How many remote days do I get?", "Name three colours.",
             "Why is the sky blue?", "Count to five.", "Who wrote Hamlet?"]


def sharpen(src: Path, out: Path, factor: float = 8.0) -> Path:
    """A copy of the model at `src` (tokenizer, template and all) with its linear weights times `factor`."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(factor)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sharp_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharpen(tiny_llama, tmp_path_factory.mktemp("tfb") / "sharp-llama")


@pytest.fixture(scope="module")
def sharp_qwen3(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodels import build_tiny_causal_lm

    raw = build_tiny_causal_lm("qwen3", tmp_path_factory.mktemp("tfb") / "qwen3", tiny_llama)
    return sharpen(raw, tmp_path_factory.mktemp("tfb") / "sharp-qwen3")


def generator(model: Path, max_batch: int, *more: str, adapters: dict[str, str] | None = None) -> Any:
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    cfg = load_config(None, [f"model.path={model}", "generation.engine=transformers", "generation.threads=1",
                             f"serve.max_batch={max_batch}", *more])
    gen = Generator(cfg).load(adapters=adapters or {})
    assert (gen.batcher is None) == (max_batch == 1)
    return gen


def run_ids(gen: Any, call: dict[str, Any]) -> tuple[list[int], dict[str, Any], str]:
    """One request through the generator's run path: its token ids, stats and final text."""
    from ragtune.serve.generator import cut_at_stop

    call = dict(call)
    messages = [{"role": "user", "content": call.pop("q")}]
    job = gen.prepare(messages, **call)
    ids: list[int] = []
    stats = gen._run(job, ids.append, None)
    text = cut_at_stop(gen.tokenizer.decode(ids, skip_special_tokens=True), job.stop)[0]
    return ids, stats, text


def together(gen: Any, calls: list[dict[str, Any]]) -> list[tuple[list[int], dict[str, Any], str]]:
    """Every call in its own thread, released at once; the results in call order."""
    out: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(i: int) -> None:
        start.wait()
        out[i] = run_ids(gen, calls[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None for r in out)
    return out


@pytest.mark.parametrize("model", ["sharp_llama", "sharp_qwen3"])
def test_concurrent_greedy_requests_get_the_ids_of_the_one_at_a_time_path(model: str,
                                                                          request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    lone_gen, batched = generator(path, 1), generator(path, 4)
    calls = [dict(q=q, max_new_tokens=8 + 5 * i, temperature=0.0) for i, q in enumerate(QUESTIONS)]
    calls[2]["max_new_tokens"] = 1  # ends in its prefill step
    lone = [run_ids(lone_gen, c) for c in calls]
    assert len({tuple(ids) for ids, _, _ in lone}) == len(calls)  # every prompt has its own answer
    steps = batched.batcher.steps
    got = together(batched, calls)  # 6 requests, 4 slots: two join later, at a step boundary
    assert [ids for ids, _, _ in got] == [ids for ids, _, _ in lone]
    assert [len(ids) for ids, _, _ in got] == [c["max_new_tokens"] for c in calls]  # each its own max_tokens
    assert all(s["finish_reason"] == "length" for _, s, _ in got)
    assert batched.batcher.max_seen_batch == 4  # they really shared forwards
    assert batched.batcher.steps - steps < sum(len(ids) for ids, _, _ in lone) - len(calls)
    assert batched.batcher.active == 0 and batched.batcher.waiting == 0


def test_answer_all_keeps_order_reports_a_bad_prompt_and_gets_the_lone_answers(sharp_llama: Path) -> None:
    """Generator.answer_all: every request queued while the scheduler is held, admitted in order; a
    prompt that cannot fit comes back as its error, the others as the one-at-a-time path answers them."""
    from ragtune.errors import UsageError

    lone_gen, batched = generator(sharp_llama, 1), generator(sharp_llama, 3)
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    msgs.insert(2, [{"role": "user", "content": "word " * 5000}])  # over the tiny model's context
    lone = lone_gen.answer_all([(m, None) for m in msgs], max_new_tokens=12, temperature=0.0)
    steps = batched.batcher.steps
    done: list[int] = []
    got = batched.answer_all([(m, None) for m in msgs], max_new_tokens=12, temperature=0.0, on_done=done.append)
    assert sorted(done) == list(range(len(msgs)))  # each result reported once, the refused one included
    assert isinstance(got[2], UsageError) and isinstance(lone[2], UsageError)
    answered = [i for i in range(len(msgs)) if i != 2]
    assert [got[i].text for i in answered] == [lone[i].text for i in answered]
    assert len({lone[i].text for i in answered}) == len(answered)  # each prompt its own answer
    assert batched.batcher.max_seen_batch == 3  # they shared forwards
    assert batched.batcher.steps - steps < sum(lone[i].completion_tokens for i in answered)
    # held and released: nothing left running or waiting, and the scheduler still answers afterwards
    assert batched.batcher.active == 0 and batched.batcher.waiting == 0
    assert batched.answer(msgs[0], max_new_tokens=12, temperature=0.0).text == lone[0].text


def test_stop_strings_repetition_penalty_and_grammar_hold_inside_a_batch(sharp_llama: Path) -> None:
    from ragtune.serve.constrained import response_format_grammar

    grammar = response_format_grammar({"type": "json_object"})
    lone_gen = generator(sharp_llama, 1, "generation.repetition_penalty=1.3")
    batched = generator(sharp_llama, 4, "generation.repetition_penalty=1.3")
    plain = run_ids(lone_gen, dict(q=QUESTIONS[3], max_new_tokens=20, temperature=0.0))[2]
    stop = plain[len(plain) // 2: len(plain) // 2 + 3]
    calls = [dict(q=QUESTIONS[3], max_new_tokens=20, temperature=0.0, stop=[stop]),
             dict(q=QUESTIONS[0], max_new_tokens=16, temperature=0.0),  # penalised: transformers' own processor alone
             dict(q=QUESTIONS[1], max_new_tokens=40, temperature=0.0, grammar=grammar)]
    lone = [run_ids(lone_gen, c) for c in calls]
    got = together(batched, calls)
    assert [ids for ids, _, _ in got[:2]] == [ids for ids, _, _ in lone[:2]]
    assert got[0][2] == lone[0][2] == plain[: plain.index(stop)]  # cut before the stop string
    assert got[0][1]["finish_reason"] == "stop" and len(got[0][0]) < 20  # and decoding ended there
    # a finished grammar ends the sequence at once (as on llama.cpp); generate() spends one more step on EOS
    assert lone[2][1]["finish_reason"] == got[2][1]["finish_reason"] == "stop"
    assert lone[2][0] == got[2][0] + [lone_gen._eos[0]] and got[2][2] == lone[2][2]
    assert isinstance(json.loads(got[2][2]), dict)


def test_per_request_sampling_settings_hold_inside_a_batch(sharp_llama: Path) -> None:
    batched = generator(sharp_llama, 4)
    greedy = dict(q=QUESTIONS[0], max_new_tokens=12, temperature=0.0)
    nucleus = dict(q=QUESTIONS[0], max_new_tokens=12, temperature=1.5, top_p=1e-9, seed=3)  # keeps the best token
    hot = dict(q=QUESTIONS[0], max_new_tokens=12, temperature=1.5, seed=7)
    hot_other_seed = dict(hot, seed=8)
    alone = [run_ids(batched, c)[0] for c in (greedy, nucleus, hot, hot_other_seed)]
    got = [r[0] for r in together(batched, [greedy, nucleus, hot, hot_other_seed])]
    assert got[0] == got[1] == alone[0] == alone[1]
    assert got[2] == alone[2] and got[3] == alone[3]  # a seeded draw is the request's own, batch or not
    assert got[2] != got[0] and got[2] != got[3]  # temperature without top-p really samples, per seed


def test_requests_on_different_adapters_never_share_a_forward(tiny_llama: Path, tiny_adapter: Path,
                                                              other_adapter: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.serve.conftest import QA

    adapters = {"policies": str(tiny_adapter), "other": str(other_adapter)}
    lone_gen = generator(tiny_llama, 1, adapters=adapters)
    batched = generator(tiny_llama, 8, adapters=adapters)
    sched = batched.batcher
    seen: list[set[Any]] = []
    real = sched._decode

    def spy(group: Any) -> None:
        seen.append({r.req.adapter for r in group.rows} | {group.adapter})
        real(group)

    calls = [dict(q=q, adapter=a, max_new_tokens=12, temperature=0.0)
             for q, _ in QA for a in (None, "policies", "other")]
    lone = [run_ids(lone_gen, c) for c in calls]
    assert lone[1][2].startswith(QA[0][1]) and lone[2][2] != lone[1][2]  # each adapter its own trained answer
    monkeypatch.setattr(sched, "_decode", spy)
    got = together(batched, calls)
    assert [ids for ids, _, _ in got] == [ids for ids, _, _ in lone]
    assert seen and all(len(s) == 1 for s in seen), seen
    assert set().union(*seen) == {None, "policies", "other"}


# --- a long prompt joining running answers: prefilled in pieces of serve.prefill_chunk ----------------


@pytest.mark.parametrize("model", ["sharp_llama", "sharp_qwen3"])
def test_a_prompt_prefilled_in_pieces_gets_the_logits_and_cache_of_the_whole_prefill(
        model: str, request: pytest.FixtureRequest) -> None:
    """Pieces after the first sit at the positions after the cached ones (RoPE): the last piece's logits
    and the cache equal the whole prompt's up to float rounding."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from ragtune.serve.tf_batching import _growing_cache, forward_params, prefill_forward

    lm = AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(model)), dtype=torch.float32).eval()
    cache_kw, keep_one = forward_params(lm)
    prompt = [(7 * i + 3) % 600 + 20 for i in range(61)]  # the tiny vocabulary has 673 ids
    whole, pieces = _growing_cache(lm.config), _growing_cache(lm.config)
    with torch.inference_mode():
        want = prefill_forward(lm, whole, prompt, 0, len(prompt), cache_kw, keep_one, contextlib.nullcontext())
        for start in range(0, len(prompt), 8):
            got = prefill_forward(lm, pieces, prompt, start, min(start + 8, len(prompt)), cache_kw, keep_one,
                                  contextlib.nullcontext())
    got, want = got.float(), want.float()
    assert got.shape == want.shape == (lm.config.vocab_size,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert int(got.argmax()) == int(want.argmax())
    for a, b in zip(pieces.layers, whole.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["sharp_llama", "sharp_qwen3"])
def test_a_long_prompt_prefilled_in_pieces_beside_a_running_answer_gets_the_lone_answer(
        model: str, request: pytest.FixtureRequest) -> None:
    """serve.prefill_chunk reaches the scheduler; a prompt longer than it, joining a running answer, goes in
    pieces, and both answers are still the ones the one-at-a-time path gives."""
    path = request.getfixturevalue(model)
    lone_gen, batched = generator(path, 1), generator(path, 4, "serve.prefill_chunk=8")
    sched = batched.batcher
    assert sched.prefill_chunk == 8
    calls = [dict(q=QUESTIONS[0], max_new_tokens=40, temperature=0.0),
             dict(q=" ".join(QUESTIONS), max_new_tokens=10, temperature=0.0)]
    lone = [run_ids(lone_gen, c) for c in calls]
    out: list[Any] = [None]
    first = threading.Thread(target=lambda: out.__setitem__(0, run_ids(batched, calls[0])))
    first.start()
    while sched.steps == 0:  # the first answer is decoding
        time.sleep(0.001)
    pieces = sched.prefill_forwards
    long = run_ids(batched, calls[1])
    pieces = sched.prefill_forwards - pieces
    first.join(120)
    assert long[0] == lone[1][0] and out[0][0] == lone[0][0]
    n_prompt = len(batched.prepare([{"role": "user", "content": calls[1]["q"]}]).input_ids)
    assert n_prompt > 40 and pieces == -(-n_prompt // 8), (n_prompt, pieces)


def test_pieces_of_a_prompt_run_under_its_own_adapter_between_another_adapters_tokens(
        tiny_llama: Path, tiny_adapter: Path, other_adapter: Path) -> None:
    """peft switches adapters for the whole model: each piece of the joining prompt runs under its adapter,
    each decode step of the running answer under its own, so both get their lone answers."""
    from tests.serve.conftest import QA

    adapters = {"policies": str(tiny_adapter), "other": str(other_adapter)}
    lone_gen = generator(tiny_llama, 1, adapters=adapters)
    batched = generator(tiny_llama, 4, "serve.prefill_chunk=8", adapters=adapters)
    sched = batched.batcher
    long_q = " ".join(QUESTIONS) + " " + QA[0][0]
    running = dict(q=QUESTIONS[0], max_new_tokens=40, temperature=0.0)  # no adapter: 40 tokens, no EOS
    joining = {a: dict(q=long_q, adapter=a, max_new_tokens=10, temperature=0.0) for a in (None, "policies", "other")}
    lone = {a: run_ids(lone_gen, c)[0] for a, c in joining.items()}
    lone_running = run_ids(lone_gen, running)[0]
    assert len({tuple(v) for v in lone.values()}) == 3  # the adapter decides the answer
    n_prompt = len(batched.prepare([{"role": "user", "content": long_q}]).input_ids)
    for a in ("policies", "other"):
        out: list[Any] = [None]
        first = threading.Thread(target=lambda: out.__setitem__(0, run_ids(batched, running)))
        steps = sched.steps
        first.start()
        while sched.steps == steps:
            time.sleep(0.001)
        pieces = sched.prefill_forwards
        got = run_ids(batched, joining[a])[0]
        assert sched.prefill_forwards - pieces == -(-n_prompt // 8)  # every piece beside the running answer
        first.join(120)
        assert got == lone[a] and out[0][0] == lone_running


def long_prompt(sched: Any) -> list[int]:
    ids = sched.gen.tokenizer(" ".join(QUESTIONS * 4), add_special_tokens=False)["input_ids"][:80]
    assert len(ids) == 80
    return ids


def join_beside(sched: Any, chunk: int, cancel_long: bool = False) -> dict[str, Any]:
    """A short prompt answers; at its second token a long prompt (80 tokens) arrives, then a short one (2
    slots: it waits). Records (slots in use, requests waiting) at each token of the running answer while the
    long prompt is admitted and has no token yet, and the prompt pieces fed after the running answer's own
    prefill. `cancel_long`: the long request is cancelled at the second such token, the running one too."""
    from ragtune.serve.tf_batching import SeqRequest

    sched.prefill_chunk = chunk
    running = SeqRequest(prompt=[5, 9, 13, 17, 21, 25], budget=60, cancel=threading.Event())
    late = [SeqRequest(prompt=long_prompt(sched), budget=4, cancel=threading.Event()),
            SeqRequest(prompt=[7, 11, 19, 23], budget=3)]
    beside: list[tuple[int, int]] = []

    def on_token(_tok: int) -> None:  # in the scheduler thread, between two steps
        if len(running.ids) == 2:
            for r in late:
                sched.submit(r)
        elif late[0].t_admit and not late[0].ids:
            beside.append((sched.active, sched.waiting))
            if cancel_long and len(beside) == 2:
                late[0].cancel.set()
                running.cancel.set()

    running.on_token = on_token
    pieces = sched.prefill_forwards
    sched.submit(running)
    for r in [running, *late]:
        assert r.done.wait(120)
    return {"beside": beside, "pieces": sched.prefill_forwards - pieces - 1, "late": late, "running": running}


def test_a_running_answer_gets_tokens_between_the_pieces_of_a_long_prompt(sharp_llama: Path) -> None:
    """With prefill_chunk 8 the running answer decodes between the long prompt's 10 pieces; with 0 the long
    prompt is prefilled in one forward and the running answer waits for all of it. The prefilling request
    holds a slot (active counts it) and its first token is the one it gets alone."""
    from ragtune.serve.tf_batching import SeqRequest

    sched = generator(sharp_llama, 2).batcher
    alone = sched.submit(SeqRequest(prompt=long_prompt(sched), budget=4)).wait().ids
    capped = join_beside(sched, 8)
    assert len(capped["beside"]) == 9 and set(capped["beside"]) == {(2, 1)}, capped["beside"]
    assert capped["pieces"] == 10 + 1  # the long prompt in 10 pieces, then the short one whole
    assert capped["late"][0].ids == alone and capped["late"][0].finish == "length"
    whole = join_beside(sched, 0)
    assert whole["beside"] == [] and whole["pieces"] == 2 and whole["late"][0].ids == alone
    assert sched.active == 0 and sched.waiting == 0


def test_cancelling_a_request_mid_prefill_frees_its_slot(sharp_llama: Path) -> None:
    sched = generator(sharp_llama, 2).batcher
    got = join_beside(sched, 8, cancel_long=True)
    long, short = got["late"]
    assert long.finish == "cancelled" and long.ids == [] and long.t_first is None and long.error is None
    assert got["running"].finish == "cancelled"
    assert got["beside"] == [(2, 1), (2, 1)]  # the short request waited for the slot the long one held...
    assert short.finish == "length" and len(short.ids) == 3  # ...and got it
    assert sched.active == 0 and sched.waiting == 0 and sched._prefilling == []


def test_a_request_cancelled_while_waiting_ends_without_a_slot_or_a_prefill(sharp_llama: Path) -> None:
    """A client that hangs up while its request is queued: the request ends at the next step, while both slots
    are still answering, and its prompt is never prefilled (it waited for a slot, was prefilled whole, and only
    then retired)."""
    from ragtune.serve.tf_batching import SeqRequest

    sched = generator(sharp_llama, 2).batcher
    waiting = SeqRequest(prompt=long_prompt(sched), budget=4, cancel=threading.Event())
    seen: dict[str, Any] = {}

    def on_token(_tok: int) -> None:  # in the scheduler thread, between two steps
        n = len(running[0].ids)
        if n == 2:
            sched.submit(waiting)
        elif n == 3:
            seen["queued"] = (sched.waiting, sched.active)
            waiting.cancel.set()  # what the server does when the queued request's client hangs up
        elif n == 5:
            seen["ended"] = waiting.done.is_set()

    running = [SeqRequest(prompt=[5, 9, 13, 17, 21, 25], budget=12, on_token=on_token),
               SeqRequest(prompt=[7, 11, 19, 23], budget=12)]
    pieces = sched.prefill_forwards
    with sched.hold():  # both admitted at one step
        for r in running:
            sched.submit(r)
    for r in [*running, waiting]:
        assert r.done.wait(120)
    assert seen == {"queued": (1, 2), "ended": True}  # ended while both slots were still taken
    assert waiting.finish == "cancelled" and waiting.ids == [] and waiting.error is None
    assert sched.prefill_forwards - pieces == 2  # the running prompts' prefills only
    assert [len(r.ids) for r in running] == [12, 12] and sched.active == 0 and sched.waiting == 0


def test_a_request_whose_client_left_while_it_waited_for_the_model_is_not_prefilled(sharp_llama: Path) -> None:
    """serve.max_batch 1 (transformers' generate under the model lock): a request whose stream is closed while
    another holds the model ends "cancelled" when it gets the lock, with no forward of its prompt (it ran its
    prefill and one token first)."""
    gen = generator(sharp_llama, 1)
    queued = [{"role": "user", "content": " ".join(QUESTIONS)}]
    n_queued = len(gen.prepare(queued, max_new_tokens=4, temperature=0.0).input_ids)
    widths: list[int] = []
    hook = gen.model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append((kw.get("input_ids") if "input_ids" in kw else args[0]).shape[1]),
        with_kwargs=True)
    try:
        s = gen.stream(queued, max_new_tokens=4, temperature=0.0)
        out: list[str] = []
        before = {t for t in threading.enumerate() if t.name == "ragtune-generate"}
        reader = threading.Thread(target=lambda: out.extend(s))
        with gen.lock:  # another request holds the model
            reader.start()
            deadline = time.time() + 30
            while not {t for t in threading.enumerate() if t.name == "ragtune-generate"} - before:
                assert time.time() < deadline, "the stream's worker did not start"
                time.sleep(0.01)
            time.sleep(0.1)  # the worker now waits for the lock
            s.close()  # its client hung up while it waited
        reader.join(60)
        assert not reader.is_alive()
        assert s.answer.finish_reason == "cancelled" and s.answer.completion_tokens == 0 and out == []
        assert widths == [], widths  # its prompt never went through the model
        assert gen.answer(queued, max_new_tokens=2, temperature=0.0).completion_tokens == 2
        assert widths[0] == n_queued  # (the hook sees a prefill when there is one)
    finally:
        hook.remove()


def test_batch_answering_prefills_a_long_prompt_whole_even_beside_running_answers(sharp_llama: Path) -> None:
    """Inside throughput() (Generator.answer_all: eval, ask --questions) nobody watches the running answers'
    tokens, so prefill_chunk does not split prompts there."""
    sched = generator(sharp_llama, 2).batcher
    with sched.throughput():
        got = join_beside(sched, 8)
    assert got["beside"] == [] and got["pieces"] == 2
    assert sched.active == 0 and sched.waiting == 0


def test_the_growing_cache_holds_what_dynamic_cache_holds_and_appends_in_place(sharp_llama: Path) -> None:
    """The scheduler's cache layers give the forward the keys and values transformers' DynamicCache gives
    (the same logits, bit for bit), append each token into spare room of one buffer instead of copying the
    cache, and take a cache cut or replaced from outside (joins, retired rows) into a new buffer."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from ragtune.serve.tf_batching import _growing_cache

    model = AutoModelForCausalLM.from_pretrained(str(sharp_llama), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 13, 17, 21], [0, 0, 4, 8, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    caches = [_growing_cache(model.config), DynamicCache(config=model.config)]
    with torch.inference_mode():
        outs = [model(input_ids=ids, attention_mask=mask, cache=c, use_cache=True).logits for c in caches]
        assert torch.equal(outs[0], outs[1])
        buffers = {layer._room[0].data_ptr() for layer in caches[0].layers}
        for step in range(6):
            mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
            pos = mask.sum(dim=1, keepdim=True) - 1
            feed = torch.tensor([[30 + step], [40 + step]])
            outs = [model(input_ids=feed, attention_mask=mask, position_ids=pos, cache=c,
                          use_cache=True).logits for c in caches]
            assert torch.equal(outs[0], outs[1])
        grown, plain = caches[0].layers[0], caches[1].layers[0]
        assert torch.equal(grown.keys, plain.keys) and grown.keys.shape[-2] == 11
        assert {layer._room[0].data_ptr() for layer in caches[0].layers} == buffers  # no copy while it grew
        for c in caches:  # a row retired, as TfScheduler._retire cuts it
            for layer in c.layers:
                layer.keys, layer.values = layer.keys[1:, :, 2:], layer.values[1:, :, 2:]
        mask = torch.cat([mask[1:, 2:], torch.ones((1, 1), dtype=mask.dtype)], dim=1)
        outs = [model(input_ids=torch.tensor([[50]]), attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                      cache=c, use_cache=True).logits for c in caches]
        assert torch.equal(outs[0], outs[1]) and caches[0].layers[0].keys.shape == caches[1].layers[0].keys.shape


def test_a_model_whose_cache_cannot_be_padded_answers_one_at_a_time(tiny_llama: Path, tmp_path: Path) -> None:
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator
    from ragtune.serve.tf_batching import batchable
    from tests.tinymodels import build_tiny_causal_lm

    gemma = build_tiny_causal_lm("gemma3_text", tmp_path / "gemma", tiny_llama)  # sliding-window layers
    gen = Generator(load_config(None, [f"model.path={gemma}", "generation.engine=transformers",
                                       "serve.max_batch=4"])).load(adapters={})
    assert gen.batcher is None and "DynamicSlidingWindowLayer" in batchable(gen.model)
    ans = gen.answer([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=3, temperature=0.0)
    assert ans.completion_tokens == 3 and ans.finish_reason == "length"


def test_a_streaming_client_that_hangs_up_frees_its_slot_on_the_server(sharp_llama: Path, tmp_path: Path) -> None:
    import httpx

    from ragtune.config import load_config
    from ragtune.serve.server import create_app
    from tests.conftest import start_server

    model = tmp_path / "long"  # a context long enough that an answer outlasts the test (no EOS on QUESTIONS[0])
    shutil.copytree(sharp_llama, model)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 65536}))
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {model}\ngeneration:\n  threads: 1\n  engine: transformers\n"
                 "serve:\n  max_batch: 2\n  max_tokens_limit: 60000\n  deployments:\n    - {name: tf}\n")
    app = create_app(load_config(f))
    sched = next(iter(app.state.runtime.generators.values())).batcher
    server, thread, port = start_server(app)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def body(q: str, **kw: Any) -> dict[str, Any]:
        return {"model": "tf", "messages": [{"role": "user", "content": q}], "temperature": 0, "stream": True, **kw}

    def some_text(lines: Any) -> None:
        """Read SSE lines until a chunk carries answer text: its request is decoding."""
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return

    try:
        deadline = time.time() + 120
        with httpx.stream("POST", url, json=body(QUESTIONS[0], max_tokens=50000), timeout=120) as a:
            assert a.status_code == 200
            a_lines = a.iter_lines()
            some_text(a_lines)  # A is decoding
            with httpx.stream("POST", url, json=body(QUESTIONS[0], max_tokens=50000), timeout=120) as b:
                assert b.status_code == 200
                b_lines = b.iter_lines()
                some_text(b_lines)
                assert sched.active == 2  # both in the batch
                next(a_lines)
            # B hung up: A keeps decoding while B's slot comes free
            while sched.active != 1 and time.time() < deadline:
                next(a_lines)
            assert sched.active == 1
            some_text(a_lines)  # and A still streams
        while sched.active and time.time() < deadline:  # A hung up too
            time.sleep(0.02)
        assert sched.active == 0 and sched.waiting == 0
        r = httpx.post(url, json=body(QUESTIONS[2], stream=False, max_tokens=5), timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        server.should_exit = True
        thread.join(10)


# --- the incremental detokenizer ---------------------------------------------------------------------


def sentencepiece_tokenizer() -> Any:
    """A Llama-2-style tokenizer (Metaspace pieces, leading space stripped on decode) built here."""
    from tokenizers.implementations import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.tinymodels import CORPUS

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS * 4, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_decoder_deltas_are_prefixes_of_the_full_decode_and_concatenate_to_it(kind: str, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from ragtune.serve.stops import _Decoder

    tok = AutoTokenizer.from_pretrained(str(tiny_llama)) if kind == "byte-level" else sentencepiece_tokenizer()
    rnd = random.Random(0)
    texts = ["Employees may  work remotely, naïve café — 3.5 km. 서울은 한국의 수도입니다 🙂👍🏽 end .",
             "a  b   c\n\n  d .  , ' s"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs += [[rnd.randrange(len(tok)) for _ in range(120)] for _ in range(20)]  # byte fragments, specials
    for ids in seqs:
        dec, streamed = _Decoder(tok), ""
        for i, t in enumerate(ids):
            delta = dec.add(t)
            streamed += delta
            assert tok.decode(ids[: i + 1], skip_special_tokens=True).startswith(dec.emitted)
        streamed += dec.finish()
        assert streamed == dec.emitted == tok.decode(ids, skip_special_tokens=True)
    assert dec.ids == ids
