"""The static-cache greedy decoder (serve/static_decode.py) gives generate's greedy ids; on the CPU it runs
eager (CUDA compiles the step: tests/train/test_cuda.py's machine, scripts/gpu-check.sh)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ragtune.serve.static_decode import StaticGreedy, bucket


@pytest.fixture(scope="module")
def model(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()


def reference(model, prompt: list[int], n: int, penalty: float, eos: int | None = None) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, repetition_penalty=penalty,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty,sync_every", [(1.0, 8), (1.3, 3), (1.3, 1)])
def test_greedy_ids_equal_generate(model, penalty: float, sync_every: int) -> None:
    prompt = [5, 17, 99, 23, 7, 64, 31]
    want = reference(model, prompt, 40, penalty)
    got, why = StaticGreedy(model, sync_every=sync_every, repetition_penalty=penalty).generate(prompt, 40)
    assert (got, why) == (want, "length")


def test_a_stop_id_ends_the_answer_where_generate_ends_it(model) -> None:
    prompt = [11, 12, 13, 14]
    free = reference(model, prompt, 30, 1.2)
    stop = free[9]
    want = reference(model, prompt, 30, 1.2, eos=stop)
    streamed: list[int] = []
    dec = StaticGreedy(model, sync_every=4, repetition_penalty=1.2)
    got, why = dec.generate(prompt, 30, stop_ids={stop}, on_token=streamed.append)
    assert got == want == streamed and got[-1] == stop and why == "stop"
    # the cache of that length bucket is reused, and a second answer is not disturbed by the first
    assert dec.generate(prompt, 30, stop_ids={stop}) == (want, "stop") and len(dec._caches) == 1


def test_cancel_ends_after_the_chunk_in_flight(model) -> None:
    cancel = threading.Event()
    cancel.set()
    got, why = StaticGreedy(model, sync_every=4).generate([3, 4, 5], 30, cancel=cancel)
    assert why == "cancelled" and len(got) == 4


def test_length_buckets() -> None:
    assert [bucket(n) for n in (1, 256, 257, 1000, 1025)] == [256, 256, 512, 1024, 2048]


def test_supported_takes_a_decoder_only_llama(model) -> None:
    from ragtune.serve.static_decode import supported

    assert supported(model)
