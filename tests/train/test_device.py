"""How training is set up for its device: the activation estimate behind automatic gradient checkpointing,
and the fused-kernel setting (train.kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.config import load_config
from ragtune.errors import UsageError
from ragtune.train.device import activation_bytes, fused_kernels, gradient_checkpointing


def saved_for_backward(model, ids) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward of `model`."""
    import torch

    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).last_hidden_state.sum()
    return sum(seen.values())


@pytest.mark.parametrize("hidden,inter", [(128, 352), (256, 688)])
def test_activation_estimate_covers_what_a_lora_step_keeps(hidden: int, inter: int) -> None:
    """The estimate that decides gradient checkpointing on CUDA must not be below what a LoRA forward
    really keeps (bf16, LoRA r16 with dropout on every linear layer), nor wildly above it. A short sequence:
    on a CPU, SDPA's math kernel also keeps a tokens x tokens matrix that CUDA's fused kernels do not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    peft.train()
    tokens = 64
    ids = torch.randint(0, 512, (1, tokens))
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    kept = saved_for_backward(peft.base_model.model.model, ids) - weights  # saved weights are not activations
    est = activation_bytes(cfg, tokens, lora_r=16)
    assert kept > 0
    assert kept <= est <= 3 * kept, (kept, est)


def test_checkpointing_and_kernels_on_a_cpu() -> None:
    cfg = load_config(None, [])
    assert gradient_checkpointing(cfg, "cpu", model=None) is False  # auto: memory is not the limit on a CPU
    assert gradient_checkpointing(load_config(None, ["train.gradient_checkpointing=on"]), "cpu", model=None) is True
    assert fused_kernels(cfg, "cpu", model=None) == "none"
    assert fused_kernels(load_config(None, ["train.kernels=none"]), "cuda", model=None) == "none"
    with pytest.raises(UsageError, match="train.kernels=liger needs a CUDA GPU.*train.kernels=auto or none"):
        fused_kernels(load_config(None, ["train.kernels=liger"]), "cpu", model=None)


def test_kernels_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="train.kernels"):
        load_config(None, ["train.kernels=triton"])
