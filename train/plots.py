"""loss.png: train and eval loss against the step, from the metrics.jsonl rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(rows: list[dict[str, Any]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ragtune.io import atomic_write_bytes

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())
