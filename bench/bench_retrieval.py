"""Retrieval benchmark: ingest, re-sync and query latency/recall, Qdrant Edge vs qdrant-client local.

    python bench/bench_retrieval.py                                  # 5,471 Debian doc pages + 100k points
    python bench/bench_retrieval.py --corpus python3.11-doc --max-files 200 --skip-queries
    python bench/bench_retrieval.py --skip-ingest --out /tmp/bench.json

1. Full ingest of a real corpus (default: the HTML of Debian's python-scipy-doc and
   postgresql-doc-15, 5,471 files, fetched with `apt-get download` and unpacked with `dpkg -x`; or
   --corpus DIR... / PACKAGE...): chunks/s and the share of wall time outside the embedder,
   through Qdrant Edge, then the same files through qdrant-client's local mode (that second run
   reuses the first run's embeddings, so its time is all outside the embedder).
2. Re-sync after changing one file: time as a share of the full ingest.
3. Query latency p50/p95 at --points chunks of synthetic clustered 384-d vectors (plus sparse
   vectors), query embedding excluded, dense HNSW and hybrid; recall@10 against exact search.
Not a timed test: results go to docs/benchmarks.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Debian documentation packages whose HTML makes the default corpus: 4,304 SciPy reference pages
# (one per function or class: many short documents) and 1,167 PostgreSQL manual pages = 5,471 files
DEBIAN_DOCS = {
    "python-scipy-doc": "usr/share/doc/python-scipy-doc/html",
    "postgresql-doc-15": "usr/share/doc/postgresql-doc-15/html",
    "python3.11-doc": "usr/share/doc/python3.11/html",
}
DEFAULT_PACKAGES = ["python-scipy-doc", "postgresql-doc-15"]


def get_corpus(args: list[str], workdir: Path) -> list[Path]:
    """Folders of HTML: --corpus DIR... as given, else Debian doc packages (apt-get download + dpkg -x)."""
    if args and all(Path(a).is_dir() for a in args):
        return [Path(a) for a in args]
    out = []
    for pkg in args or DEFAULT_PACKAGES:
        if pkg not in DEBIAN_DOCS:
            raise SystemExit(f"--corpus: '{pkg}' is neither a folder nor one of {', '.join(DEBIAN_DOCS)}")
        target = workdir / "debs" / pkg
        html = target / DEBIAN_DOCS[pkg]
        if not html.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["apt-get", "download", pkg], cwd=target, check=True, capture_output=True)
            deb = next(target.glob(f"{pkg}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
        out.append(html)
    return out


def subset(srcs: list[Path], dst: Path, max_files: int) -> int:
    files = [(src, p) for src in srcs for p in sorted(src.rglob("*.html")) if p.is_file() and not p.is_symlink()]
    if max_files:
        files = files[:: max(1, len(files) // max_files)][:max_files]  # spread over the whole tree
    if dst.exists():
        shutil.rmtree(dst)
    for src, f in files:
        out = dst / (src.parent.name if src.name == "html" else src.name) / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    return len(files)


def cache_embeddings() -> None:
    """The second backend reuses the first one's vectors: its ingest time is all outside the embedder."""
    import numpy as np

    from ragtune.retrieval.embedder import Embedder

    real = Embedder.embed
    cache: dict[str, object] = {}

    def embed(self, texts, batch_size=None):  # noqa: ANN001, ANN202
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            for t, v in zip(missing, real(self, missing, batch_size=batch_size)):
                cache[t] = v
        return np.stack([cache[t] for t in texts])

    Embedder.embed = embed


def run_ingest(cfg, corpus: Path, index: str) -> dict:  # noqa: ANN001
    from ragtune.retrieval.ingest import ingest

    res = ingest(cfg, [str(corpus)], index=index, delete_missing=True, progress=False)
    return {"documents": len(res.added), "chunks": res.chunks_written, "seconds": round(res.seconds, 2),
            "embed_seconds": round(res.embed_seconds, 2),
            "chunks_per_s": round(res.chunks_written / res.seconds, 1),
            "outside_embedder_share": round(1 - res.embed_seconds / res.seconds, 3), "skipped": len(res.skipped)}


def bench_ingest(args, workdir: Path) -> dict:  # noqa: ANN001
    from ragtune.config import load_config, replace
    from ragtune.retrieval import ingest as ing

    src = get_corpus(args.corpus, workdir)
    corpus = workdir / "corpus"
    n_files = subset(src, corpus, args.max_files)
    cfg = load_config(None, [f"embedder.batch_size={args.batch_size}"])
    cache_embeddings()
    out: dict = {"files": n_files, "corpus": [str(p) for p in src]}
    out["edge_full"] = run_ingest(cfg, corpus, "bench-edge")
    # re-sync after changing one file
    victim = sorted(corpus.rglob("*.html"))[len(list(corpus.rglob("*.html"))) // 2]
    victim.write_text(victim.read_text(encoding="utf-8").replace("</body>", "<p>An edited paragraph.</p></body>"),
                      encoding="utf-8")
    t0 = time.perf_counter()
    res = ing.ingest(cfg, [str(corpus)], index="bench-edge", delete_missing=True, progress=False)
    dt = time.perf_counter() - t0
    out["edge_resync_one_file"] = {"seconds": round(dt, 3), "replaced": res.replaced,
                                   "chunks_written": res.chunks_written,
                                   "share_of_full": round(dt / out["edge_full"]["seconds"], 4)}
    t0 = time.perf_counter()
    res = ing.ingest(cfg, [str(corpus)], index="bench-edge", delete_missing=True, progress=False)
    out["edge_resync_unchanged"] = {"seconds": round(time.perf_counter() - t0, 3), "chunks_written": res.chunks_written}
    # the same files through qdrant-client local mode (embeddings cached: all of it is store + pipeline)
    local = replace(cfg, store=replace(cfg.store, url=f"local:{workdir / 'qdrant-local'}"))
    r = run_ingest(local, corpus, "bench-local")
    out["local_full_cached_embeddings"] = r
    edge_outside = out["edge_full"]["seconds"] - out["edge_full"]["embed_seconds"]
    out["outside_embedder_seconds"] = {"edge": round(edge_outside, 2),
                                       "local": round(r["seconds"] - r["embed_seconds"], 2)}
    return out


def synthetic(n: int, dim: int, seed: int, latent: int = 32):  # noqa: ANN201
    """Clustered unit vectors of low intrinsic dimension, like real sentence embeddings.

    (Isotropic noise in all 384 dimensions makes every point nearly equidistant, which no ANN index
    handles and no embedding model produces.)"""
    import numpy as np

    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(12345).normal(size=(latent, dim)).astype(np.float32)
    centers = rng.normal(size=(max(16, n // 100), latent)).astype(np.float32)
    z = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, latent)).astype(np.float32)
    x = z @ proj + 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hybrid_like_retriever(retr, q, sp, ef: int, n: int = 50, top_k: int = 10) -> list:  # noqa: ANN001
    """Retriever.search's hybrid path without the embedder: its two channel queries (ordered as it orders them)
    and its own fusion, `Retriever._fused` (DBSF 3:1, copies of one text folded, the lexical-only hits'
    cosines), on the store `retr` holds."""
    from ragtune.retrieval.search import _canonical

    dense = _canonical(retr.store.query(dense=q, mode="dense", limit=n, hnsw_ef=ef))
    sparse = _canonical(retr.store.query(sparse=sp, mode="sparse", limit=n))
    return retr._fused(q, dense, sparse, top_k)


def bench_queries(args, workdir: Path) -> dict:  # noqa: ANN001
    import numpy as np

    from ragtune.config import load_config
    from ragtune.retrieval.search import Retriever
    from ragtune.retrieval.store import EdgeStore, PointData, ServerStore

    n, dim = args.points, 384
    vecs = synthetic(n, dim, 0)
    queries = synthetic(args.queries, dim, 1)
    rng = np.random.default_rng(2)
    vocab = 20000
    sparse_docs = [(sorted(set(rng.zipf(1.3, 40) % vocab)),) for _ in range(n)]
    points = [PointData(f"00000000-0000-4000-8000-{i:012d}", vecs[i],
                        (list(map(int, sparse_docs[i][0])), [1.0] * len(sparse_docs[i][0])),
                        {"kind": "chunk", "doc_id": f"d{i // 20}", "source": f"s{i // 20}.html", "chunk_index": i % 20,
                         "text": f"chunk {i}"})
              for i in range(n)]
    q_sparse = [(sorted(set(map(int, rng.zipf(1.3, 3) % vocab))), None) for _ in range(args.queries)]
    out: dict = {"points": n, "queries": args.queries, "dim": dim}
    stores = {"edge": lambda: EdgeStore("bench-q"), "qdrant_client_local_memory": lambda: ServerStore("bench-q", ":memory:")}
    for label, make in stores.items():
        s = make()
        t0 = time.perf_counter()
        s.open(create_dim=dim)
        for i in range(0, n, 1000):
            s.upsert(points[i : i + 1000])
        t_up = time.perf_counter() - t0
        print(f"{label}: upserted {n} points in {t_up:.1f}s", flush=True)
        t0 = time.perf_counter()
        s.optimize()
        t_opt = time.perf_counter() - t0
        print(f"{label}: optimized in {t_opt:.1f}s", flush=True)
        res: dict = {"upsert_s": round(t_up, 1), "optimize_s": round(t_opt, 1)}
        retr = Retriever(load_config(None, []), "bench-q")  # the default search settings, on this store
        retr.store = s
        nq = len(queries) if label == "edge" else min(len(queries), args.local_queries)  # local: brute force
        res["queries"] = nq
        # "hybrid": the engine's own RRF (reference); "hybrid_ragtune": what Retriever.search does (both
        # channels' top 50, fused by Retriever._fused itself with the default settings)
        runs = [("dense", 0), ("hybrid", 0), ("hybrid_ragtune", 128)] + (
            [("dense", ef) for ef in args.hnsw_ef] if label == "edge" else [])
        for mode, ef in runs:
            lat, recall = [], []
            for qi, q in enumerate(queries[:nq]):
                sp = (q_sparse[qi][0], [1.0] * len(q_sparse[qi][0]))
                t0 = time.perf_counter()
                if mode == "hybrid_ragtune":
                    hits = hybrid_like_retriever(retr, q, sp, ef)
                else:
                    hits = s.query(dense=q, sparse=sp, mode=mode, limit=10, candidates=50, hnsw_ef=ef)
                lat.append((time.perf_counter() - t0) * 1000)
                if mode == "dense":
                    exact = s.query(dense=q, mode="dense", limit=10, exact=True)
                    recall.append(len({h.id for h in hits} & {h.id for h in exact}) / 10)
            lat.sort()
            key = mode if not ef else f"{mode}_ef{ef}"
            res[key] = {"p50_ms": round(statistics.median(lat), 2), "p95_ms": round(lat[int(0.95 * len(lat)) - 1], 2)}
            if recall:
                res[key]["recall_at_10"] = round(sum(recall) / len(recall), 4)
        s.close()
        out[label] = res
        print(label, json.dumps(res), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="*", default=[],
                    help="folders of HTML, or Debian doc packages (default: python-scipy-doc postgresql-doc-15)")
    ap.add_argument("--max-files", type=int, default=0, help="files of the corpus to ingest (0 = all)")
    ap.add_argument("--points", type=int, default=100_000, help="synthetic chunks for the latency/recall part")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--local-queries", type=int, default=30, help="queries for qdrant-client local mode (brute force)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hnsw-ef", type=int, nargs="*", default=[128, 256], help="extra dense runs on Edge with these ef")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-queries", action="store_true")
    ap.add_argument("--workdir", default="", help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default="", help="write the results as JSON here too")
    args = ap.parse_args()

    from ragtune.modeling import set_offline_env

    set_offline_env()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ragtune-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["RAGTUNE_HOME"] = str(workdir / "home")
    shutil.rmtree(workdir / "home", ignore_errors=True)
    shutil.rmtree(workdir / "qdrant-local", ignore_errors=True)
    result: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                    "load_average_at_start": os.getloadavg()}
    if not args.skip_ingest:
        result["ingest"] = bench_ingest(args, workdir)
        print(json.dumps(result["ingest"], indent=1), flush=True)
    if not args.skip_queries:
        result["queries"] = bench_queries(args, workdir)
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
