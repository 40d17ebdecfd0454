"""Cross-entropy through the LM head without materialising the whole vocabulary's logits.

    from ragtune.train.loss import linear_cross_entropy
    loss_sum = linear_cross_entropy(hidden, lm_head.weight, labels, chunk_size=2048)

`hidden` holds the final hidden states of the labelled positions only ([N, H]), `labels` their
targets ([N]). The positions are processed `chunk_size` rows at a time: each chunk's logits
([chunk, V], in float32) are computed, turned into the loss and into the gradients of `hidden`
(and of the head's weight when it trains), then freed. Peak memory is one chunk's logits instead
of N x V: for a 150k vocabulary and 16k labelled tokens that is 1.2 GB per 2k-row chunk instead of
9.8 GB. The gradients are computed during the forward pass (the loss is a plain sum, so backward
only scales them by the incoming gradient); the result is the summed loss, as `F.cross_entropy(...,
reduction="sum")` on the full logits gives, and the same gradients.

Failure mode: a head that scales or soft-caps its logits is not a plain projection; the caller
(train/compact_loss.py) probes for that and falls back to the model's own loss.
"""

from __future__ import annotations

from typing import Any

# below this many logit elements (labelled positions x vocabulary) the full logits are small enough
# (256 MB in float32) that one matmul is faster than chunking
CHUNK_ABOVE_ELEMENTS = 64 * 1024 * 1024


def linear_cross_entropy(hidden: Any, weight: Any, labels: Any, chunk_size: int = 2048,
                         bias: Any = None) -> Any:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, chunk by chunk."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, labels, int(chunk_size), bias)


def should_chunk(n_positions: int, vocab: int) -> bool:
    return n_positions * vocab > CHUNK_ABOVE_ELEMENTS


def _function() -> Any:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, labels: Any, chunk_size: int, bias: Any) -> Any:
            acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
            need_h = hidden.requires_grad
            need_w = weight.requires_grad
            need_b = bias is not None and bias.requires_grad
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size]
                y = labels[start:start + chunk_size]
                logits = h @ weight.t()
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                if bias is not None:
                    logits = logits + bias.to(logits.dtype)
                lse = torch.logsumexp(logits, dim=-1)
                total = total + (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum loss)/d(logits) = softmax - one_hot, computed in place over the chunk's logits
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
                if need_h:
                    grad_h[start:start + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += g.t().to(h.dtype).matmul(h).to(acc)
                if need_b:
                    grad_b += g.sum(0).to(acc)
            ctx.save_for_backward(
                grad_h if grad_h is not None else torch.empty(0),
                grad_w if grad_w is not None else torch.empty(0),
                grad_b if grad_b is not None else torch.empty(0),
            )
            ctx.needs = (need_h, need_w, need_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs
            w_dtype, b_dtype = ctx.dtypes
            return (
                grad_h * grad_out.to(grad_h.dtype) if need_h else None,
                (grad_w * grad_out).to(w_dtype) if need_w else None,
                None,
                None,
                (grad_b * grad_out).to(b_dtype) if need_b else None,
            )

    return LinearCrossEntropy


class _Lazy:
    """Build the autograd Function on first use, so importing this module does not import torch."""

    fn: Any = None

    def apply(self, *args: Any) -> Any:
        if self.fn is None:
            type(self).fn = _function()
        return self.fn.apply(*args)


_LinearCrossEntropy = _Lazy()
