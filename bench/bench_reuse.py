"""Re-indexing changed documents: kept vectors for unchanged chunks against re-embedding everything.

    python bench/bench_reuse.py                     # 60 files of python3.11-doc (apt-get download)
    python bench/bench_reuse.py --max-files 20 --out /tmp/reuse.json

Two scenarios, each run twice in this one process over copies of the same corpus (an even spread of
Debian's python3.11-doc HTML, as bench_ingest.py): once as ragtune does it (a changed or re-read
document keeps the vectors of the chunks whose text did not change), once with that turned off
(every chunk of a changed document embedded again: what ragtune did before, and what LangChain's
indexing API does for a changed document):
- edit: one sentence added to one paragraph of each of the 5 largest pages, then `index sync`;
- reread: the HTML reader's version raised (what an upgrade with a better reader does), then `index sync`:
  every page is read again.
Each row: sync seconds, embedding seconds, chunks written and kept. Quality: the two final indexes are
compared chunk by chunk (cosine of the stored vectors by chunk text) and must agree to float rounding.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EDIT = " This sentence was added to measure a re-sync after an edit."


def edit_pages(corpus: Path, n: int) -> list[str]:
    """Add one sentence to the first long paragraph of the `n` largest pages."""
    pages = sorted(corpus.rglob("*.html"), key=lambda p: p.stat().st_size, reverse=True)[:n]
    for p in pages:
        html = p.read_text(encoding="utf-8")
        m = re.search(r"<p>([^<]{200,}?)</p>", html)
        if m is None:
            raise SystemExit(f"{p}: no long paragraph to edit")
        p.write_text(html[: m.end(1)] + EDIT + html[m.end(1):], encoding="utf-8")
    return [p.name for p in pages]


def vectors(name: str) -> dict[str, Any]:
    import numpy as np

    from ragtune.retrieval.store import EdgeStore

    with EdgeStore(name).open() as s:
        return {p["text"]: np.asarray(v["dense"], dtype=np.float32)
                for _pid, p, v in s.scroll({"kind": "chunk"}, ["text"], True)}


def run(cfg: Any, corpus: Path, name: str, scenario: str, keep: bool, pages: int) -> dict[str, Any]:
    from ragtune.retrieval import ingest_write, loaders
    from ragtune.retrieval.ingest import ingest

    ingest(cfg, [str(corpus)], index=name, delete_missing=True, progress=False)
    saved_kept, saved_versions = ingest_write.kept_vectors, dict(loaders.READER_VERSIONS)
    try:
        if not keep:
            ingest_write.kept_vectors = lambda store, ids: {}  # type: ignore[assignment]
        edited: list[str] = []
        if scenario == "edit":
            edited = edit_pages(corpus, pages)
        else:
            loaders.READER_VERSIONS["html"] += 1
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = ingest(cfg, [str(corpus)], index=name, delete_missing=True, progress=False)
        wall = time.perf_counter() - t0
    finally:
        ingest_write.kept_vectors = saved_kept  # type: ignore[assignment]
        loaders.READER_VERSIONS.clear()
        loaders.READER_VERSIONS.update(saved_versions)
    row = {"seconds": round(wall, 2), "embed_seconds": round(res.embed_seconds, 2),
           "chunks_written": res.chunks_written, "chunks_kept": res.chunks_reused,
           "documents": len(res.replaced) + len(res.reread), "load_before": round(load, 2),
           "load_after": round(os.getloadavg()[0], 2)}
    if edited:
        row["edited"] = edited
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="*", default=["python3.11-doc"],
                    help="folders of HTML, or Debian doc packages (bench_retrieval.DEBIAN_DOCS)")
    ap.add_argument("--max-files", type=int, default=60, help="files spread over the corpus (0 = all)")
    ap.add_argument("--pages", type=int, default=5, help="pages edited in the edit scenario")
    ap.add_argument("--workdir", default="/tmp/ragtune-bench-reuse", help="corpus download and scratch folder")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    from bench_retrieval import get_corpus, subset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "corpus"
    n_files = subset(get_corpus(args.corpus, work), source, args.max_files)
    os.environ["RAGTUNE_HOME"] = tempfile.mkdtemp(prefix="home-", dir=work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ragtune.config import load_config

    cfg = load_config(None, [])
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join(sys.argv), "files": n_files, "rows": {}, "agreement": {}}
    for scenario in ("edit", "reread"):
        finals = {}
        for keep in (False, True):
            label = f"{scenario}/{'kept' if keep else 're-embed all'}"
            corpus = work / f"c-{scenario}-{keep}"
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.copytree(source, corpus)
            name = f"{scenario}-{'kept' if keep else 'all'}"
            out["rows"][label] = row = run(cfg, corpus, name, scenario, keep, args.pages)
            print(label, row, file=sys.stderr, flush=True)
            finals[keep] = vectors(name)
        a, b = finals[False], finals[True]
        import numpy as np

        common = sorted(set(a) & set(b))
        cos = [float(np.dot(a[t], b[t]) / (np.linalg.norm(a[t]) * np.linalg.norm(b[t]))) for t in common]
        out["agreement"][scenario] = {"same_chunk_texts": set(a) == set(b), "chunks": len(common),
                                      "min_cosine": round(min(cos), 6) if cos else None}
        r0, r1 = out["rows"][f"{scenario}/re-embed all"], out["rows"][f"{scenario}/kept"]
        out[f"{scenario}_speedup"] = round(r0["seconds"] / r1["seconds"], 2) if r1["seconds"] else None
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
