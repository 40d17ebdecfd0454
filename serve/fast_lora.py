"""Lean LoRA forwards for answering: unmerged adapters at close to merged speed.

At batch 1 a decode step is dispatch-bound, and peft's LoRA `Linear.forward` (active-adapter loop,
dtype casts, dropout module, scaling) costs more than its two rank-r matmuls: on SmolLM2-135M with
LoRA on all linear layers it added ~28% per token on CPU. While a request runs, each LoRA layer's
`forward` is replaced by `base(x) + (x @ A) @ (B * scale)` for the active adapter (A, B
precomputed once), or by the base layer alone when no adapter is active — which gives exactly the
base model's tokens. Afterwards the peft forwards come back. Layers or adapters this does not cover
(DoRA, LoRA bias, fan-in-fan-out, non-Linear bases) keep peft's own path.

    fast = FastLora(peft_model)
    fast.prepare("policies")              # after each load_adapter
    with fast.active("policies"): model.generate(...)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


class FastLora:
    def __init__(self, model: Any):
        self.model = model
        self.layers = _lora_layers(model)
        self.weights: dict[str, dict[int, tuple[Any, Any]]] = {}  # adapter -> {id(layer): (A^T, B^T*scale)}
        self.blocked = ""  # why the lean path is off for every adapter and the base

    def supports(self, name: str | None) -> bool:
        return not self.blocked and (name is None or name in self.weights)

    def _find_blocker(self) -> str:
        """Other peft layers (modules_to_save, trainable tokens, LoRA on embeddings, ...) switch only
        through set_adapter/disable_adapter, so their presence sends everything through peft."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for name, m in self.model.named_modules():
            if isinstance(m, AuxiliaryTrainingWrapper) or (isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLinear)):
                return f"{name} is a {type(m).__name__}"
        return ""

    def prepare(self, name: str) -> bool:
        """Precompute one adapter's matrices; False (peft's path) if any layer is not plain LoRA."""
        import torch

        self.layers = _lora_layers(self.model)  # a new adapter may wrap more layers
        self.blocked = self._find_blocker()
        if self.blocked:
            log.info("adapter %s: %s; answering through peft's forward", name, self.blocked)
            return False
        per_layer: dict[int, tuple[Any, Any]] = {}
        for m in self.layers:
            if name not in m.lora_A:
                continue
            plain = (
                isinstance(m.base_layer, torch.nn.Linear)
                and not m.use_dora.get(name, False)
                and not getattr(m, "fan_in_fan_out", False)
                and isinstance(m.lora_A[name], torch.nn.Linear) and m.lora_A[name].bias is None
                and isinstance(m.lora_B[name], torch.nn.Linear) and m.lora_B[name].bias is None
                and not getattr(m, "merged_adapters", None)
            )
            if not plain:
                log.info("adapter %s: a layer is not plain LoRA; answering through peft's forward", name)
                self.weights.pop(name, None)
                return False
            with torch.no_grad():
                a = m.lora_A[name].weight.t().contiguous()
                b = (m.lora_B[name].weight.t() * m.scaling[name]).contiguous()
            per_layer[id(m)] = (a, b)
        self.weights[name] = per_layer
        return True

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        """Answer with adapter `name` (None = the base alone) for the duration of the block."""
        weights = self.weights[name] if name is not None else {}
        for m in self.layers:
            w = weights.get(id(m))
            # through __dict__: nn.Module.__setattr__ would register a Module value as a submodule
            m.__dict__["forward"] = m.base_layer.__call__ if w is None else _lean_forward(m.base_layer, *w)
        try:
            yield
        finally:
            for m in self.layers:
                m.__dict__.pop("forward", None)


def _lean_forward(base: Any, a: Any, b: Any) -> Any:
    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        return base(x) + (x @ a) @ b

    return forward
