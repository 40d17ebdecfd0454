"""RAG-sized requests batched on the llama.cpp engine: flash attention on (ragtune's default) against off,
and one GGUF type against another.

    python bench/bench_rag_batch.py                                   # default model's f16 export
    python bench/bench_rag_batch.py --requests 8 --prompt 250 --tokens 30 --repeats 3 --threads 2 --out runs/bench/rag_batch.json
    python bench/bench_rag_batch.py --types f16,bf16 --flash on       # the GGUF types, flash attention on

Each row runs `--requests` prompts of `--prompt` tokens (a RAG prompt with its sources: eval's rag modes
average ~255 on the demo) and `--tokens` answer tokens each (exactly: no stop token) through ragtune's
LlamaCppEngine with `max_batch` = requests: one at a time, then all at once (threads, as `eval.concurrency`
sends them). The llama.cpp context is one unified KV cache shared by the slots; without flash attention
a token attends over every cell in use, every slot's (masked, but computed), so a prompt prefilled beside
the running ones costs several times its prefill alone. Rows are interleaved (on, off, on, off...) so
that drifting CPU load hits both alike; cells are medians of the repeats, wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import cpu_name, gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(engine: Any, prompts: list[list[int]], tokens: int, together: bool) -> tuple[float, float]:
    """(wall s, process CPU s) to answer every prompt, one at a time or all at once."""
    def one(p: list[int]) -> None:
        engine.generate(prompt_ids=p, max_new_tokens=tokens, stop_ids=[-1], reuse_prefix=False)

    w0, c0 = time.perf_counter(), time.process_time()
    if together:
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for p in prompts:
            one(p)
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=250, help="prompt tokens per request")
    ap.add_argument("--tokens", type=int, default=30, help="answer tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f16", help="GGUF types, comma-separated (ragtune export's: f16, bf16, ...)")
    ap.add_argument("--flash", default="on,off", help="flash attention settings to run: on, off or on,off")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    import numpy as np

    from ragtune.serve.llamacpp import LlamaCppEngine

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    ggufs = {t: gguf(args.model, t) for t in types}
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(100, 40000, args.prompt)] for _ in range(args.requests)]
    flash = [f.strip() == "on" for f in args.flash.split(",")]
    engines = {(t, fa): LlamaCppEngine(ggufs[t], n_threads=args.threads, max_batch=args.requests, flash_attn=fa).load()
               for t in types for fa in flash}
    for eng in engines.values():
        eng.generate(prompt_ids=prompts[0][:8], max_new_tokens=2)  # warm-up
    cells: dict[str, list[tuple[float, float]]] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for (t, fa), eng in engines.items():
            for together in (False, True):
                key = (f"{t}, flash attention {'on' if fa else 'off'}, "
                       f"{'all at once' if together else 'one at a time'}")
                cells.setdefault(key, []).append(run(eng, prompts, args.tokens, together))
    rows = {k: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v)}
            for k, v in cells.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "threads": args.threads,
            "requests": args.requests, "prompt_tokens": args.prompt, "answer_tokens": args.tokens,
            "repeats": args.repeats, "gguf": {t: str(g) for t, g in ggufs.items()}, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0]}
    print(f"{meta['date']}, {meta['cpu']}, {args.threads} threads, {args.requests} requests x {args.prompt} prompt "
          f"+ {args.tokens} answer tokens, load {load0:.1f} -> {meta['load_avg_end']:.1f}")
    print("| row | wall s | CPU s |\n| --- | ---: | ---: |")
    for k, r in rows.items():
        print(f"| {k} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    if args.out:
        from ragtune.io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2))
    for eng in engines.values():
        eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
