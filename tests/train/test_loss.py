"""The chunked linear cross-entropy equals the full-logits loss and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ragtune.train.loss import linear_cross_entropy, should_chunk


def _inputs(n: int = 37, h: int = 16, v: int = 101, bias: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_loss(chunk: int, bias: bool) -> None:
    hidden, weight, b, labels = _inputs(bias=bias)
    full = F.cross_entropy(F.linear(hidden, weight, b).float(), labels, reduction="sum")
    g_full = torch.autograd.grad(full * 0.5, [t for t in (hidden, weight, b) if t is not None])

    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, bias=b)
    g_got = torch.autograd.grad(got * 0.5, [t for t in (hidden, weight, b) if t is not None])

    assert torch.allclose(got.double(), full.double(), rtol=1e-6, atol=1e-6)
    for a, e in zip(g_got, g_full):
        assert a.dtype == e.dtype
        assert torch.allclose(a.double(), e.double(), rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_hidden_still_does() -> None:
    hidden, weight, _, labels = _inputs()
    weight = weight.detach()
    full = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    (g_full,) = torch.autograd.grad(full, [hidden])
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    (g_got,) = torch.autograd.grad(got, [hidden])
    assert weight.grad is None
    assert torch.allclose(g_got, g_full, rtol=1e-6, atol=1e-8)


def test_bf16_inputs_match_the_full_loss_to_bf16_rounding() -> None:
    hidden, weight, _, labels = _inputs(n=64, h=32, v=257)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    full = F.cross_entropy((hb @ wb.t()).float(), labels, reduction="sum")
    got = linear_cross_entropy(hb, wb, labels, chunk_size=16)
    assert abs(float(got) - float(full)) <= 1e-3 * abs(float(full))
    got.backward()
    assert hb.grad is not None and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def test_no_labelled_positions_gives_zero_with_a_graph() -> None:
    hidden, weight, _, labels = _inputs()
    loss = linear_cross_entropy(hidden[:0], weight, labels[:0])
    loss.backward()
    assert float(loss) == 0.0


def test_should_chunk_only_large_logits() -> None:
    assert not should_chunk(512, 49152)  # a CPU batch of SmolLM2 answers: 100 MB of logits
    assert should_chunk(16384, 151936)  # a packed GPU batch on a Qwen-size vocabulary: 10 GB


def test_the_compact_loss_chunks_and_still_equals_the_models_own_loss(tiny_llama, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    import ragtune.train.loss as loss_mod
    from ragtune.train.compact_loss import install_compact_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, :4] = -100
    n = int((labels[:, 1:] != -100).sum())

    ref = model(input_ids=ids, labels=labels, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, [model.model.layers[0].mlp.up_proj.weight, model.lm_head.weight])

    calls = []
    real = loss_mod.linear_cross_entropy
    monkeypatch.setattr(loss_mod, "CHUNK_ABOVE_ELEMENTS", 0)
    monkeypatch.setattr("ragtune.train.loss.linear_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **{**k, "chunk_size": 7}))
    assert install_compact_loss(model)
    calls.clear()  # the install-time probe may run through it too
    got = model(input_ids=ids, ragtune_labels=labels).loss / n
    got_grads = torch.autograd.grad(got, [model.model.layers[0].mlp.up_proj.weight, model.lm_head.weight])

    assert calls, "the chunked path was not taken"
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(got_grads, ref_grads):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-6)


def test_packed_batches_give_each_example_the_loss_it_has_unpacked(tiny_llama) -> None:
    """Packing (TRL's padding-free collator: one row, position_ids restarting per example) must not let
    an example attend to the one before it: per-example losses equal the examples trained alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ragtune.train.compact_loss import install_compact_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    examples = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 14, 6)]
    # loss on the second half of each example, as on an answer after its prompt
    masks = [[0] * (len(e) // 2) + [1] * (len(e) - len(e) // 2) for e in examples]
    coll = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = coll([{"input_ids": e, "labels": [t if k else -100 for t, k in zip(e, m)]}
                  for e, m in zip(examples, masks)])
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch

    def token_losses(ids: torch.Tensor, labels: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False, **kw).logits[0, :-1]
        return F.cross_entropy(logits, labels[0, 1:], reduction="none", ignore_index=-100)

    with torch.no_grad():
        packed = token_losses(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        start = 0
        for e, m in zip(examples, masks):
            labels = torch.tensor([[t if k else -100 for t, k in zip(e, m)]])
            alone = token_losses(torch.tensor([e]), labels)
            # the packed row's first label of an example follows the previous example's last token:
            # that position is masked in both (prompt tokens carry no loss)
            mine = packed[start:start + len(e) - 1]
            assert torch.allclose(mine, alone, rtol=1e-5, atol=1e-6)
            start += len(e)

        # and the compact loss (LM head on labelled positions only) sums the same per-token losses
        assert install_compact_loss(model)
        total = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      ragtune_labels=batch["labels"]).loss
        assert torch.allclose(total, packed.sum(), rtol=1e-5, atol=1e-5)
