"""What an embedder costs on the FAQ sets of bench_quality.py: per chunk at ingest, per query at search.

    python bench/bench_embedder.py --root /tmp/bq                                  # the bundled MiniLM
    python bench/bench_embedder.py --root /tmp/bq --embedder /models/all-mpnet-base-v2 --embedder ""

For each embedder (a sentence-transformers directory; "" = the bundled all-MiniLM-L6-v2): load time,
the set's documents cut by the product's chunker at the defaults (chunk.size 256, overlap 128, capped at
the embedder's own limit), `embed_documents` over all of them in the ingest's batches (what `index add`
spends per chunk, bf16 autocast where the embedder allows it), then every question embedded alone
(`embed_query`) through sentence-transformers and through the embedder's verified ONNX export (the
query path of `ragtune search`; the export is written here first, into a temporary RAGTUNE_HOME).
Median per query. Not a timed test: figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import SETS, load_set  # noqa: E402


def _per_query_ms(embed, questions: list[str]) -> float:  # type: ignore[no-untyped-def]
    embed(questions[0])  # first call pays lazy set-up
    times = []
    for q in questions:
        t0 = time.perf_counter()
        embed(q)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 2)


def measure(path: str, set_name: str, root: Path) -> dict[str, object]:
    import dataclasses

    from ragtune.config import load_config
    from ragtune.retrieval.chunking import Chunker
    from ragtune.retrieval.embedder import Embedder
    from ragtune.retrieval.loaders import load_text

    cfg = load_config(None, ["embedder.device=cpu"] + ([f"embedder.path={path}"] if path else []))
    docs, questions = load_set(set_name, root)
    t0 = time.perf_counter()
    emb = Embedder(cfg.embedder)
    emb._load_st()  # sentence-transformers, as ingest loads it (it needs the tokenizer)
    load_s = time.perf_counter() - t0
    size, overlap = cfg.chunk.resolve()  # a new index's chunking: 256 / 128, as ingest cuts it
    chunker = Chunker(emb.tokenizer, min(size, emb.max_tokens), overlap)
    texts = [c.text for d, t in docs.items() for c in chunker.chunk(load_text(t, f"{d}.txt", d))]
    emb.embed_documents(texts[:4])  # settles the bf16 decision outside the timing
    t0 = time.perf_counter()
    emb.embed_documents(texts)
    doc_s = time.perf_counter() - t0
    qs = [q for q, _ in questions]
    row: dict[str, object] = {
        "embedder": str(emb.path), "dim": emb.dim, "max_tokens": emb.max_tokens, "load_s": round(load_s, 2),
        "chunks": len(texts), "doc_precision": emb.doc_precision(), "ms_per_chunk": round(doc_s / len(texts) * 1000, 1),
        "query_ms_sentence_transformers": _per_query_ms(emb.embed_query, qs),
    }
    emb._export_again = True
    t0 = time.perf_counter()
    exported = emb.ensure_export()
    row["onnx_export_s"] = round(time.perf_counter() - t0, 1)
    onnx = Embedder(dataclasses.replace(cfg.embedder))
    onnx.load()
    row["onnx_exported"] = exported
    row["query_ms_onnx"] = (_per_query_ms(onnx.embed_query, qs) if onnx.onnx is not None
                            else f"no usable export: {onnx.onnx_why}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/ragtune-bench-quality", help="where the .deb files are fetched and unpacked")
    ap.add_argument("--set", default="python-faq", choices=list(SETS), help="whose chunks and questions to embed")
    ap.add_argument("--embedder", action="append", default=None,
                    help="a sentence-transformers directory; '' = the bundled MiniLM (repeatable; default: MiniLM)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix="ragtune-bench-home-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: dict[str, object] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_average": os.getloadavg(), "command": " ".join(sys.argv), "embedders": []}
    for path in args.embedder if args.embedder is not None else [""]:
        row = measure(path, args.set, Path(args.root))
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        out["embedders"].append(row)  # type: ignore[union-attr]
    out["load_average_after"] = os.getloadavg()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
