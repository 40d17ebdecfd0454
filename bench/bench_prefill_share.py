"""A long prompt joining running answers (llama.cpp engine): how much prefill one step may carry.

    python bench/bench_prefill_share.py                               # default model's f16 export
    python bench/bench_prefill_share.py --long 2000 --decoders 4 --chunks 0,256,128,64 --repeats 3 --out runs/bench/prefill.json

`--decoders` requests with short prompts start answering (`--answer` tokens each, no stop token);
once each has 5 tokens, one request with a `--long`-token prompt arrives. Each step of the
scheduler carries every decoding sequence's next token plus prompt tokens; `prefill_chunk` caps
those prompt tokens while anything decodes (0: up to the engine's n_batch, 512). Per row: the gap
between two tokens of a running answer while the long prompt prefills (mean and max), the long
request's time to first token, and the wall time until everything is answered. Rows run
interleaved (0, 256, 128, ... then again) so drifting load hits all alike; cells are medians.
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

from common import cpu_name, f16_gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trial(engine: Any, short: list[list[int]], long_prompt: list[int], answer: int, chunk: int) -> dict[str, float]:
    engine.scheduler.prefill_chunk = chunk
    stamps: list[list[float]] = [[] for _ in short]
    seen: dict[str, float] = {}

    def decode(i: int) -> None:
        engine.generate(prompt_ids=short[i], max_new_tokens=answer, stop_ids=[-1], reuse_prefix=False,
                        on_token_id=lambda _t, i=i: stamps[i].append(time.perf_counter()))

    def join() -> None:
        seen["t0"] = time.perf_counter()
        engine.generate(prompt_ids=long_prompt, max_new_tokens=4, stop_ids=[-1], reuse_prefix=False,
                        on_token_id=lambda _t: seen.setdefault("first", time.perf_counter()))

    w0 = time.perf_counter()
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(short))]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 5:
        time.sleep(0.002)
    late = threading.Thread(target=join)
    late.start()
    for t in threads + [late]:
        t.join()
    wall = time.perf_counter() - w0
    t0, t1 = seen["t0"], seen["first"]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if t0 <= b and a <= t1]
    return {"gap_mean_s": statistics.mean(gaps) if gaps else 0.0, "gap_max_s": max(gaps, default=0.0),
            "ttft_long_s": t1 - t0, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--long", type=int, default=2000, help="prompt tokens of the request that joins")
    ap.add_argument("--decoders", type=int, default=4, help="requests already answering")
    ap.add_argument("--answer", type=int, default=150, help="answer tokens of each running request")
    ap.add_argument("--chunks", default="0,256,128,64", help="prefill_chunk values compared (0: n_batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    import numpy as np

    from ragtune.serve.llamacpp import LlamaCppEngine

    gguf = f16_gguf(args.model)
    rng = np.random.default_rng(0)
    short = [[int(x) for x in rng.integers(100, 40000, 30)] for _ in range(args.decoders)]
    long_prompt = [int(x) for x in rng.integers(100, 40000, args.long)]
    engine = LlamaCppEngine(gguf, n_threads=args.threads, max_batch=args.decoders + 1,
                            n_ctx=max(4096, args.long + 1024)).load()
    engine.generate(prompt_ids=short[0][:8], max_new_tokens=2)  # warm-up
    chunks = [int(c) for c in args.chunks.split(",")]
    cells: dict[int, list[dict[str, float]]] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for c in chunks:
            cells.setdefault(c, []).append(trial(engine, short, long_prompt, args.answer, c))
    rows = {c: {k: statistics.median(r[k] for r in v) for k in v[0]} for c, v in cells.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "threads": args.threads,
            "long": args.long, "decoders": args.decoders, "answer": args.answer, "repeats": args.repeats,
            "n_batch": engine.n_batch, "gguf": str(gguf), "load_avg_start": load0, "load_avg_end": os.getloadavg()[0]}
    print(f"{meta['date']}, {meta['cpu']}, {args.threads} threads, {args.decoders} answers running + one "
          f"{args.long}-token prompt, load {load0:.1f} -> {meta['load_avg_end']:.1f}")
    print("| prefill_chunk | token gap while it prefills, mean / max s | its first token s | wall s |")
    print("| ---: | ---: | ---: | ---: |")
    for c, r in rows.items():
        print(f"| {c or engine.n_batch} | {r['gap_mean_s']:.2f} / {r['gap_max_s']:.2f} | {r['ttft_long_s']:.2f} | "
              f"{r['wall_s']:.1f} |")
    if args.out:
        from ragtune.io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
