"""retrieval/fusion.py against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ragtune.retrieval.fusion import fuse


def test_weighted_rrf_by_hand() -> None:
    dense, sparse = [("a", 0.9), ("b", 0.8)], [("b", 7.0), ("a", 5.0)]
    equal = dict(fuse(dense, sparse, k=60))
    assert equal["a"]["fused"] == pytest.approx(1 / 61 + 1 / 62) == equal["b"]["fused"]
    assert [i for i, _ in fuse(dense, sparse, k=60)] == ["a", "b"]  # a tie keeps the dense order
    weighted = fuse(dense, sparse, k=60, weights=(1.0, 3.0))
    assert [i for i, _ in weighted] == ["b", "a"]
    assert weighted[0][1]["fused"] == pytest.approx(1 / 62 + 3 / 61)
    only_dense = dict(fuse(dense, [("c", 1.0)], k=10, weights=(2.0, 1.0)))
    assert only_dense["c"] == {"dense_rank": None, "dense_score": None, "sparse_rank": 1, "sparse_score": 1.0,
                               "fused": pytest.approx(1 / 11)}


def test_dbsf_by_hand() -> None:
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]  # mean 0.7, sd sqrt(0.08/3)
    sd = math.sqrt(0.08 / 3)
    got = dict(fuse(dense, [("c", 2.0)], method="dbsf"))
    assert got["a"]["fused"] == pytest.approx((0.9 - (0.7 - 3 * sd)) / (6 * sd))
    assert got["b"]["fused"] == pytest.approx(0.5)
    assert got["c"]["fused"] == pytest.approx((0.5 - (0.7 - 3 * sd)) / (6 * sd) + 0.5)  # one score: sd 0 -> 0.5
    with pytest.raises(ValueError, match="fusion 'sum' is not one of rrf, dbsf"):
        fuse(dense, [], method="sum")
