"""Hybrid fusion of a dense and a lexical ranking: weighted reciprocal rank (RRF) or
distribution-based score fusion (DBSF), computed here so the weights mean what they say.

    fused = fuse([("a", 0.82), ("b", 0.80)], [("b", 7.1), ("c", 3.0)], method="rrf", k=60, weights=(3, 1))
    # [("a", {...}), ("b", {...}), ("c", {...})], each with dense/sparse rank and score and "fused"

RRF: fused = w_dense / (k + dense_rank) + w_sparse / (k + sparse_rank), ranks from 1, a channel
that did not return the item adds 0. Equal weights let a weak lexical channel pull a right dense
ranking down (the tie of 1st+2nd against 2nd+1st is broken by nothing); weighting the dense
channel keeps its first answer unless the lexical channel ranks another far higher.
DBSF (Qdrant's definition): each channel's scores are mapped to [0, 1] by (s - (mean - 3 sd)) /
(6 sd) over that channel's returned list, clipped, then summed with the weights.
Fusing here rather than in the engine: Qdrant Edge 0.9's `Fusion.Rrf(weights=[3, 1])` (dense
first) ranked the lexical channel's first hit above the dense one's, the opposite of weighting
each channel's 1/(k + rank); and the per-channel ranks and scores are what `--explain` shows.
"""

from __future__ import annotations

import math
from typing import Any

METHODS = ("rrf", "dbsf")


def _dbsf_norm(scores: list[float]) -> list[float]:
    if not scores:
        return []
    mean = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if sd == 0:
        return [0.5] * len(scores)
    lo, hi = mean - 3 * sd, mean + 3 * sd
    return [min(1.0, max(0.0, (s - lo) / (hi - lo))) for s in scores]


def fuse(dense: list[tuple[str, float]], sparse: list[tuple[str, float]], method: str = "rrf", k: int = 60,
         weights: tuple[float, float] = (1.0, 1.0)) -> list[tuple[str, dict[str, Any]]]:
    """Items of both rankings (best first, as (id, score)), ordered by the fused score; each with
    `dense_rank`, `dense_score`, `sparse_rank`, `sparse_score` (None where that channel missed it)
    and `fused`. Ties keep the dense channel's order, then the sparse channel's."""
    if method not in METHODS:
        raise ValueError(f"fusion '{method}' is not one of {', '.join(METHODS)}")
    wd, ws = float(weights[0]), float(weights[1])
    info: dict[str, dict[str, Any]] = {}
    for channel, ranking in (("dense", dense), ("sparse", sparse)):
        norm = _dbsf_norm([s for _, s in ranking]) if method == "dbsf" else []
        w = wd if channel == "dense" else ws
        for rank, (item, score) in enumerate(ranking, 1):
            row = info.setdefault(item, {"dense_rank": None, "dense_score": None, "sparse_rank": None,
                                         "sparse_score": None, "fused": 0.0})
            if row[f"{channel}_rank"] is not None:
                continue  # an id twice in one channel counts once, at its best rank
            row[f"{channel}_rank"], row[f"{channel}_score"] = rank, float(score)
            row["fused"] += w * (norm[rank - 1] if method == "dbsf" else 1.0 / (k + rank))
    big = len(dense) + len(sparse) + 1
    return sorted(info.items(), key=lambda kv: (-kv[1]["fused"], kv[1]["dense_rank"] or big,
                                                 kv[1]["sparse_rank"] or big))
