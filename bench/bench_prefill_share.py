"""A long prompt joining running answers: how much prefill one step may carry (`serve.prefill_chunk`).

    python bench/bench_prefill_share.py                               # llama.cpp: default model's f16 export
    python bench/bench_prefill_share.py --long 2000 --decoders 4 --chunks 0,256,128,64 --repeats 3 --out runs/bench/prefill.json
    python bench/bench_prefill_share.py --engine transformers --repeats 3   # TfScheduler, prefill_chunk 0 vs 128

`--decoders` requests with short prompts start answering (`--answer` tokens each, no stop token);
once each has 5 tokens, one request with a `--long`-token prompt arrives. While anything decodes,
`prefill_chunk` caps the prompt tokens a scheduler step carries: on llama.cpp the step is one batch
of every running answer's next token plus prompt tokens (0: up to the engine's n_batch, 512); on
transformers the prompt goes alone into its own cache, one piece per step, each followed by a decode
of the running answers (0: the whole prompt in one forward). Per row: the gap between two tokens of a
running answer while the long prompt prefills (mean and max), the long request's time to first
token, and the wall time until everything is answered. Rows run interleaved (0, 256, 128, ... then
again) so drifting load hits all alike; cells are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import cpu_name, f16_gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Generate = Callable[[list[int], int, Callable[[], None]], None]  # prompt, new tokens, called at each token


@dataclass
class Engine:
    """What a trial needs of an engine: a blocking generate, the cap's setter, what 0 means, metadata."""

    generate: Generate
    set_chunk: Callable[[int], None]
    whole: str  # the row label of prefill_chunk 0
    close: Callable[[], None]
    meta: dict[str, Any] = field(default_factory=dict)


def llamacpp_engine(args: argparse.Namespace) -> Engine:
    from ragtune.serve.llamacpp import LlamaCppEngine

    gguf = f16_gguf(args.model)
    engine = LlamaCppEngine(gguf, n_threads=args.threads, max_batch=args.decoders + 1,
                            n_ctx=max(4096, args.long + 1024)).load()

    def generate(prompt: list[int], budget: int, on_token: Callable[[], None]) -> None:
        engine.generate(prompt_ids=prompt, max_new_tokens=budget, stop_ids=[-1], reuse_prefix=False,
                        on_token_id=lambda _t: on_token())

    def set_chunk(c: int) -> None:
        engine.scheduler.prefill_chunk = c

    return Engine(generate, set_chunk, str(engine.n_batch), engine.close,
                  {"n_batch": engine.n_batch, "model": str(gguf)})


def transformers_engine(args: argparse.Namespace) -> Engine:
    """The Generator's TfScheduler (fp32 safetensors, `generation.threads` torch threads)."""
    from ragtune.config import load_config
    from ragtune.modeling import resolve_model_path
    from ragtune.serve.generator import Generator
    from ragtune.serve.tf_batching import SeqRequest

    model = resolve_model_path(args.model)
    cfg = load_config(None, [f"model.path={model}", "generation.engine=transformers",
                             f"generation.threads={args.threads}", f"serve.max_batch={args.decoders + 1}"])
    gen = Generator(cfg).load(adapters={})
    sched = gen.batcher

    def generate(prompt: list[int], budget: int, on_token: Callable[[], None]) -> None:
        sched.submit(SeqRequest(prompt=prompt, budget=budget, on_token=lambda _t: on_token())).wait()

    def set_chunk(c: int) -> None:
        sched.prefill_chunk = c

    return Engine(generate, set_chunk, "0 (whole prompt)", sched.close, {"model": str(model)})


def trial(engine: Engine, short: list[list[int]], long_prompt: list[int], answer: int, chunk: int) -> dict[str, float]:
    engine.set_chunk(chunk)
    stamps: list[list[float]] = [[] for _ in short]
    seen: dict[str, float] = {}

    def decode(i: int) -> None:
        engine.generate(short[i], answer, lambda i=i: stamps[i].append(time.perf_counter()))

    def join() -> None:
        seen["t0"] = time.perf_counter()
        engine.generate(long_prompt, 4, lambda: seen.setdefault("first", time.perf_counter()))

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
    ap.add_argument("--engine", choices=["llama.cpp", "transformers"], default="llama.cpp")
    ap.add_argument("--model", default="", help="model dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--long", type=int, default=2000, help="prompt tokens of the request that joins")
    ap.add_argument("--decoders", type=int, default=4, help="requests already answering")
    ap.add_argument("--answer", type=int, default=150, help="answer tokens of each running request")
    ap.add_argument("--chunks", default="", help="prefill_chunk values compared (0: no cap; default "
                    "0,256,128,64 on llama.cpp, 0,128 on transformers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(0)
    short = [[int(x) for x in rng.integers(100, 40000, 30)] for _ in range(args.decoders)]
    long_prompt = [int(x) for x in rng.integers(100, 40000, args.long)]
    engine = (transformers_engine if args.engine == "transformers" else llamacpp_engine)(args)
    engine.generate(short[0][:8], 2, lambda: None)  # warm-up
    chunks = [int(c) for c in (args.chunks or ("0,128" if args.engine == "transformers" else "0,256,128,64")).split(",")]
    cells: dict[int, list[dict[str, float]]] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for c in chunks:
            cells.setdefault(c, []).append(trial(engine, short, long_prompt, args.answer, c))
            r = cells[c][-1]
            print(f"prefill_chunk {c}: gap {r['gap_mean_s']:.2f} / {r['gap_max_s']:.2f} s, first token "
                  f"{r['ttft_long_s']:.2f} s, wall {r['wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = {c: {k: statistics.median(r[k] for r in v) for k in v[0]} for c, v in cells.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "engine": args.engine,
            "threads": args.threads, "long": args.long, "decoders": args.decoders, "answer": args.answer,
            "repeats": args.repeats, **engine.meta, "load_avg_start": load0, "load_avg_end": os.getloadavg()[0]}
    print(f"{meta['date']}, {meta['cpu']}, {args.engine}, {args.threads} threads, {args.decoders} answers running + "
          f"one {args.long}-token prompt, load {load0:.1f} -> {meta['load_avg_end']:.1f}")
    print("| prefill_chunk | token gap while it prefills, mean / max s | its first token s | wall s |")
    print("| ---: | ---: | ---: | ---: |")
    for c, r in rows.items():
        print(f"| {c or engine.whole} | {r['gap_mean_s']:.2f} / {r['gap_max_s']:.2f} | {r['ttft_long_s']:.2f} | "
              f"{r['wall_s']:.1f} |")
    if args.out:
        from ragtune.io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": rows, "trials": cells}, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
