"""report.png: bars of the answer metrics per mode with 95% CI whiskers, and latency per mode.

    from ragtune.eval.report_chart import render_chart

    png: bytes = render_chart(report, k=4)      # report: build_report's object (or summarize's numbers)

matplotlib is imported when a chart is drawn, not before.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

from ragtune.eval.report_markdown import _label
from ragtune.eval.scoring import METRICS

CHART_METRICS = ("correct", "exact_match", "token_f1", "rouge_l", "contains", "recall_at_k", "citation_accuracy")


def render_chart(numbers: Mapping[str, Any], *, k: int) -> bytes:
    """PNG bytes: grouped bars of answer metrics per mode with CI whiskers, and latency per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(numbers["modes"])
    summary = numbers["summary"]
    labels = {m.key: _label(m, k) for m in METRICS}
    keys = [key for key in CHART_METRICS if any(summary[mode][key] for mode in modes)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(modes), 1)
    x = np.arange(len(keys))
    for j, mode in enumerate(modes):
        cis = [summary[mode][key] for key in keys]
        means = [100 * c["mean"] if c else np.nan for c in cis]  # n/a (no retrieval): no bar
        err = np.array([[100 * (c["mean"] - c["low"]) if c else 0.0 for c in cis],
                        [100 * (c["high"] - c["mean"]) if c else 0.0 for c in cis]])
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=mode)
    ax.set_xticks(x, [labels[key] for key in keys], rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (95% bootstrap CI)")
    ax.set_title(f"Answer quality, {numbers['n_questions']} questions")
    ax.legend(fontsize="small")
    p50 = [numbers["speed"][mode]["latency_p50_s"] or 0.0 for mode in modes]
    p95 = [numbers["speed"][mode]["latency_p95_s"] or 0.0 for mode in modes]
    xm = np.arange(len(modes))
    ax2.bar(xm - 0.2, p50, 0.4, label="p50", color="#555555")
    ax2.bar(xm + 0.2, p95, 0.4, label="p95", color="#aaaaaa")
    ax2.set_xticks(xm, modes, rotation=20, ha="right")
    ax2.set_ylabel("seconds per answer")
    ax2.set_title("Latency")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

