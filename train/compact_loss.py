"""The LM head only where there are labels: the training loss ragtune's SFTTrainer computes.

    from ragtune.train.compact_loss import install_compact_loss, make_trainer_class
    trainer = make_trainer_class()(model=peft_model, ...)
    trainer.compact_loss = install_compact_loss(base_model)   # False: TRL's own loss

The vocabulary projection is ~20% of a small model's compute, and only assistant positions carry
labels: the backbone runs on every token, the head on the labelled ones (chunked for large
vocabularies, train/loss.py). Failure mode: a head that scales or soft-caps its logits is not a plain
projection; a 16-token probe compares the compact loss with the model's own and keeps the model's
when they differ.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

log = logging.getLogger(__name__)


_SCALED_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def install_compact_loss(model: Any) -> bool:
    """Give `model.forward` a `ragtune_labels=` path: backbone, then the LM head on labelled positions only.

    Returns False (and changes nothing) for models whose logits are scaled or soft-capped; those
    train through TRL's own loss instead.
    """
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ragtune.train.loss import linear_cross_entropy, should_chunk

    text_config = model.config.get_text_config()
    if any(getattr(text_config, a, None) is not None for a in _SCALED_HEAD_ATTRS):
        return False
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, ragtune_labels: Any = None, **kwargs: Any) -> Any:
        if ragtune_labels is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        for k in ("labels", "num_items_in_batch", "shift_labels", "fused_lm_head"):
            kwargs.pop(k, None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = ragtune_labels[:, 1:].to(hidden.device)
        mask = labels != -100
        head, picked, targets = self.get_output_embeddings(), hidden[mask], labels[mask]
        if type(head) is torch.nn.Linear and should_chunk(picked.shape[0], head.weight.shape[0]):
            # large vocabulary x many labelled tokens: never hold the whole logits (train/loss.py)
            loss_sum = linear_cross_entropy(picked, head.weight, targets, bias=head.bias)
        else:
            loss_sum = F.cross_entropy(head(picked).float(), targets, reduction="sum")
        return CausalLMOutputWithPast(loss=loss_sum, logits=None)

    model.forward = types.MethodType(forward, model)
    if not _compact_loss_matches(model, previous):
        model.forward = previous  # a head this path does not reproduce (custom scaling, say): TRL's loss
        log.info("the model's LM head is not a plain projection: training with the full-vocabulary loss")
        return False
    return True


def _compact_loss_matches(model: Any, full_forward: Any) -> bool:
    """Probe on 16 tokens: does the compact loss equal the model's own (full-logits) loss?"""
    import torch

    was_training = model.training
    model.eval()
    try:
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        gen = torch.Generator().manual_seed(0)
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, 16), generator=gen).to(device)
        labels = ids.clone()
        labels[:, :8] = -100
        with torch.no_grad():
            ref = float(full_forward(input_ids=ids, labels=labels, use_cache=False).loss)
            got = float(model(input_ids=ids, ragtune_labels=labels).loss) / int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return abs(got - ref) <= 2e-2 * max(1.0, abs(ref))  # bf16 rounding passes; a scaled head does not


def make_trainer_class() -> type:
    from trl import SFTTrainer

    class RagtuneSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss runs the LM head on assistant positions only and counts tokens."""

        compact_loss = True
        tokens_seen = 0

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if self.model.training:
                if "attention_mask" in inputs:
                    self.tokens_seen += int(inputs["attention_mask"].sum())
                else:
                    self.tokens_seen += int(inputs["input_ids"].numel())
            if not self.compact_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs, ragtune_labels=labels)
            n = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = outputs.loss / torch_as(n, outputs.loss).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, outputs) if return_outputs else loss

    return RagtuneSFTTrainer


def torch_as(n: Any, like: Any) -> Any:
    import torch

    return torch.as_tensor(n, device=like.device, dtype=like.dtype)
