"""Where and how training runs: threads, precision, the base model's load, and the packing probe.

    from ragtune.train.device import bf16_autocast, load_base_model, set_threads
    model = load_base_model(cfg, base_dir, "cpu")
    set_threads(cfg.train.threads, n_params)          # 1 for tiny models, else the idle cores
    bf16 = bf16_autocast(cfg, "cpu", model.dtype, n_params)

Failure modes it guards against: threads that outnumber the idle cores stall each other; emulated
bf16 is slower than float32; packing on an attention that ignores sequence boundaries trains
across examples (`packing_supported` probes for it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError
from ragtune.modeling import cpu_has_native_bf16

log = logging.getLogger(__name__)


def set_threads(threads: int, n_params: int) -> int:
    """train.threads, else: 1 for tiny models, else the cores that are idle now.

    Thread sync costs more than it saves on tiny models, and threads that outnumber the idle
    cores stall each other: on a 2-core machine already running other jobs, 2 threads trained
    SmolLM2 at 5 tokens/s where 1 thread reached 33.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    elif n_params < 20_000_000:
        torch.set_num_threads(1)
    else:
        try:
            avail = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            avail = os.cpu_count() or 1
        busy = other_busy_cores()
        idle = int(avail - busy + 0.5)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), avail, idle)))
        if torch.get_num_threads() < avail:
            log.info("using %d of %d cores: other processes keep %.1f cores busy; set train.threads to choose",
                     torch.get_num_threads(), avail, busy)
    return torch.get_num_threads()


def first_process() -> bool:
    """True but in the second and later processes of a multi-process launch (torchrun, accelerate)."""
    return int(os.environ.get("RANK", "0")) == 0


def other_busy_cores(window: float = 0.5) -> float:
    """How many cores other processes use right now: /proc/stat's busy time over `window` seconds,
    less this process's own. (The load average trails by a minute and counts this process, whose
    data check and model load just ran: on an idle machine it made training take one core of two.)"""

    def sample() -> tuple[float, float]:
        # user nice system idle iowait irq softirq steal (guest time is already in user and nice)
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # all but idle and iowait
        own = sum(float(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        return busy, own

    try:
        tick = os.sysconf("SC_CLK_TCK")
        b0, o0 = sample()
        time.sleep(window)
        b1, o1 = sample()
        return max(0.0, ((b1 - b0) - (o1 - o0)) / tick / window)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS): the load average
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def gradient_checkpointing(cfg: Any, device: str, model: Any) -> bool:
    """train.gradient_checkpointing, else (auto): on CUDA, on for QLoRA, and on when the activations of a
    step would not fit beside the weights in the GPU's free memory (`activation_bytes`); off on CPUs.

    Recomputing the activations costs about a third more compute per step, so it is worth it only where
    memory is the limit: on an H200 a 6.5B Llama shape at batch 8 x 1024 tokens fits without it."""
    mode = cfg.train.gradient_checkpointing
    if mode != "auto":
        return mode == "on"
    if device != "cuda":
        return False
    if cfg.train.qlora:
        return True
    import torch

    free, _total = torch.cuda.mem_get_info()
    need = activation_bytes(model.config, cfg.train.batch_size * cfg.data.max_length, cfg.train.lora.r)
    if next(model.parameters()).device.type != "cuda":  # the Trainer moves the weights there later
        need += sum(p.numel() * p.element_size() for p in model.parameters())
    fits = need <= 0.8 * free
    log.info("activations of one step: about %.1f GB, %.1f GB free on the GPU: gradient checkpointing %s",
             need / 1e9, free / 1e9, "off" if fits else "on")
    return not fits


def activation_bytes(config: Any, tokens: int, lora_r: int = 16) -> int:
    """Bytes a decoder-only transformer keeps for backward over `tokens` tokens with LoRA on all linear
    layers, under bf16 (an estimate from what each layer saves, on the high side):
    per token and layer about 20 hidden-size and 7 MLP-size bf16 tensors (norm inputs and outputs, q/k/v,
    attention output, LoRA dropout copies and masks, gate/up/activation products) plus two float32 norm inputs.
    Fused attention (SDPA's flash and memory-efficient kernels on CUDA) keeps no tokens x tokens matrix;
    tests/train/test_device.py checks the estimate against what a LoRA forward really keeps."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, i, layers = int(c.hidden_size), int(getattr(c, "intermediate_size", 4 * c.hidden_size)), int(c.num_hidden_layers)
    per_token_layer = 2 * (20 * h + 7 * i + 8 * lora_r) + 4 * 2 * h
    return tokens * layers * per_token_layer


def bf16_autocast(cfg: Any, device: str, dtype: Any, n_params: int) -> bool:
    """Train under bf16 autocast (the Trainer's bf16=True)? See train.mixed_precision."""
    import torch

    mode = cfg.train.mixed_precision
    if mode == "no" or device not in ("cuda", "cpu"):
        return False
    if device == "cuda":
        return dtype == torch.bfloat16 or (mode == "bf16" and torch.cuda.is_bf16_supported())
    if mode == "bf16":
        if not cpu_has_native_bf16():
            log.warning("train.mixed_precision=bf16: this CPU has no native bf16 (avx512_bf16/AMX), so bf16 is "
                        "emulated and likely slower than float32")
        return True
    # bf16 matmuls over fp32 master weights: 1.7x the tokens/s of fp32 for SmolLM2 on an avx512_bf16 CPU,
    # same held-out loss (docs/benchmarks.md); tiny models gain nothing
    return dtype == torch.float32 and n_params >= 20_000_000 and cpu_has_native_bf16()


def fused_kernels(cfg: Any, device: str, model: Any) -> str:
    """train.kernels: put liger-kernel's fused RoPE, RMSNorm and SwiGLU into `model` (before LoRA wraps it);
    returns what was applied ("none", or "liger: rope, rms_norm, swiglu"). Its loss kernels stay out: the
    compact loss (compact_loss.py) already runs the head only where there are labels."""
    mode = cfg.train.kernels
    if mode == "none" or (mode == "auto" and (device != "cuda" or cfg.train.qlora)):
        return "none"
    if device != "cuda":
        raise UsageError(f"train.kernels=liger needs a CUDA GPU (Triton kernels), but training runs on '{device}'; "
                         "set train.kernels=auto or none")
    # liger-kernel logs a warning per backend it cannot load (CuTe DSL, Ascend) even when Triton's works
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        if mode == "liger":
            raise UsageError("train.kernels=liger needs liger-kernel: pip install liger-kernel (or train.kernels=none)")
        return "none"
    model_type = getattr(model.config, "model_type", "")
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if mode == "liger":
            raise UsageError(f"train.kernels=liger: liger-kernel has no kernels for model type '{model_type}'; "
                             "set train.kernels=auto or none")
        return "none"
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger: rope, rms_norm, swiglu"


def load_base_model(cfg: Any, base: Path, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from ragtune.modeling import check_memory, pick_dtype

    kwargs: dict[str, Any] = {}
    dtype = pick_dtype(device, cfg.model.dtype)
    if cfg.train.qlora:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            raise UsageError(
                "train.qlora=true under FSDP: ragtune shards full-precision bases only; launch 4-bit training with "
                "configs/accelerate/multi-gpu-ddp.yaml (every GPU holds the 4-bit base) or set train.qlora=false"
            )
        if device != "cuda":
            raise UsageError(
                f"train.qlora=true needs a CUDA GPU (bitsandbytes 4-bit), but training runs on '{device}'; "
                "set train.qlora=false to train a LoRA adapter on the full-precision model"
            )
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UsageError("train.qlora=true needs bitsandbytes: pip install bitsandbytes") from exc
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    check_memory(base, device, dtype, qlora=cfg.train.qlora)
    model = AutoModelForCausalLM.from_pretrained(
        str(base), local_files_only=True, use_safetensors=True, dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    return model


def packing_supported(model: Any, pad_id: int) -> bool:
    """Does this model's attention keep packed sequences apart? Probe: packed logits == separate logits."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    was_training = model.training
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    a = [(7 * i + 3) % vocab for i in range(6)]
    b = [(11 * i + 5) % vocab for i in range(5)]
    dev = next(model.parameters()).device
    coll = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    batch = coll([{"input_ids": a}, {"input_ids": b}])
    batch.pop("labels")
    batch = {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not derive packed masks
        packed = model(**batch, use_cache=False).logits[0, len(a):].float()
        alone = model(input_ids=torch.tensor([b], device=dev), use_cache=False).logits[0].float()
        # what attending across the boundary changes: b read right after a, as one sequence
        joined = model(input_ids=torch.tensor([a + b], device=dev), use_cache=False).logits[0, len(a):].float()
    model.train(was_training)
    err = float((packed - alone).abs().max())
    leak = float((joined - alone).abs().max())
    # fp32 agrees to rounding; in bf16/fp16 the two shapes round differently (about 2% of a leak's change
    # on SmolLM2 in bf16), while an attention that ignores the boundary changes as much as `joined` does
    return err <= 1e-3 * max(1.0, float(alone.abs().max())) or err <= 0.1 * leak
