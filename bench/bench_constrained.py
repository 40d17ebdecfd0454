"""Grammar-constrained decoding against plain decoding on the llama.cpp engine, side by side in one run.

    python bench/bench_constrained.py                           # default model, 64 tokens, 5 repeats, 1 thread
    python bench/bench_constrained.py --tokens 64 --repeats 5 --batch 4 --out runs/bench/constrained.json

One Generator (`generation.engine=llama.cpp`, `serve.max_batch=--batch`) answers the same story
prompts greedily, alternating plain and constrained answers so drifting CPU load hits both alike.
Constrained answers use `response_format` json_schema {"story": string (minLength 400)}: the model
writes one long JSON string, so both kinds decode `--tokens` tokens (finish "length"). Reported:
per-answer decode tokens/s (after the first token; the mask is paid at every step) for a lone
request, and the aggregate tokens/s of `--batch` concurrent requests, medians over the repeats,
the constrained cost in percent (goal: <= 15%), and the time spent in the grammar itself per decode
step (mask + advance) as a share of a plain step: the figure a loaded machine distorts least.
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

from common import machine

TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "a lost dog in Paris", "two rival bakers",
          "a dragon afraid of fire", "a girl who builds a boat", "a city under the sea", "an old clock"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["story"],
          "properties": {"story": {"type": "string", "minLength": 400}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="concurrent requests of the batched phase")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (generation.threads; 0 = usable cores)")
    ap.add_argument("--out", default="runs/bench/constrained.json")
    args = ap.parse_args()

    from ragtune.config import load_config
    from ragtune.serve.constrained import response_format_grammar
    from ragtune.serve.generator import Generator

    cfg = load_config(None, ["generation.engine=llama.cpp", f"serve.max_batch={args.batch}",
                             f"generation.threads={args.threads}"])
    gen = Generator(cfg).load()
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}})
    spent = {"s": 0.0, "steps": 0}  # time inside the grammar (mask + advance), per decode step
    make = gen.constraint

    class Timed:
        def __init__(self, c: object) -> None:
            self.c = c

        def mask(self, logits: object) -> object:
            t0 = time.perf_counter()
            try:
                return self.c.mask(logits)
            finally:
                spent["s"] += time.perf_counter() - t0
                spent["steps"] += 1

        def accept(self, tok: int) -> None:
            t0 = time.perf_counter()
            self.c.accept(tok)
            spent["s"] += time.perf_counter() - t0

        @property
        def done(self) -> bool:
            return self.c.done

    gen.constraint = lambda g: Timed(make(g))

    def ask(i: int, constrained: bool) -> dict:
        msgs = [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."
                 + (" Answer in JSON with a 'story' field." if constrained else "")}]
        a = gen.answer(msgs, max_new_tokens=args.tokens, temperature=0.0, grammar=grammar if constrained else None)
        if constrained:
            json.loads(a.text + ('"}' if a.finish_reason == "length" else ""))  # a prefix of the JSON asked for
        return {"tokens": a.completion_tokens, "tps": a.timings["decode_tokens_per_s"], "finish": a.finish_reason}

    def batch(constrained: bool, r: int) -> float:
        out: list[dict] = [{}] * args.batch
        t0 = time.perf_counter()
        ths = [threading.Thread(target=lambda k=k: out.__setitem__(k, ask(r * args.batch + k, constrained)))
               for k in range(args.batch)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return sum(o["tokens"] for o in out) / (time.perf_counter() - t0)

    ask(0, False), ask(0, True)  # warm-up: kernels, the grammar tokenizer (built once per model)
    lone = {"plain": [], "constrained": []}
    agg = {"plain": [], "constrained": []}
    tokens = {"plain": [], "constrained": []}
    for r in range(args.repeats):
        for kind in (("plain", "constrained") if r % 2 == 0 else ("constrained", "plain")):
            res = ask(r, kind == "constrained")
            lone[kind].append(res["tps"])
            tokens[kind].append(res["tokens"])
            agg[kind].append(batch(kind == "constrained", r))
    med = {k: {"lone_decode_tps": statistics.median(lone[k]), f"batch{args.batch}_aggregate_tps":
               statistics.median(agg[k]), "tokens": tokens[k]} for k in lone}
    cost = {"lone_pct": 100 * (1 - med["constrained"]["lone_decode_tps"] / med["plain"]["lone_decode_tps"]),
            f"batch{args.batch}_pct": 100 * (1 - med["constrained"][f"batch{args.batch}_aggregate_tps"]
                                               / med["plain"][f"batch{args.batch}_aggregate_tps"])}
    cost["grammar_us_per_step"] = 1e6 * spent["s"] / max(1, spent["steps"])
    cost["grammar_pct_of_plain_step"] = 100 * spent["s"] / max(1, spent["steps"]) * med["plain"]["lone_decode_tps"]
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": os.getloadavg(), "command": " ".join(["python", *sys.argv]),
              "model": str(gen.base_path), "engine": "llama.cpp", "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
              "results": med, "constrained_cost": cost}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
