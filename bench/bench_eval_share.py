"""Eval's RAG prompts on the llama.cpp engine: shared prefixes prefilled once, against every prompt prefilled whole.

    python bench/bench_eval_share.py                          # the demo's questions over its index (run the demo first)
    python bench/bench_eval_share.py --repeats 3 --out runs/bench/eval_share.json

The prompts are exactly those `ragtune eval --modes rag` answers: the demo's 132 questions
(examples/policies/questions.jsonl), each with its top 2 sources from the demo's index and the eval
system prompt, greedy, 64 tokens at most, stopping at the end of turn. All of them go to one engine
(8 slots, flash attention, the f16 export eval uses) at once, held and admitted in a fixed order, as
`Generator.answer_all` queues them. Rows, interleaved so drifting load hits each alike:

- `whole, question order`: `reuse_prefix=False` (every prompt prefilled from its first token) — eval before;
- `shared, question order`: a request takes a running sequence's cells for the prefix they share
  (the system instruction on every prompt; the sources where two questions retrieved the same);
- `shared, sorted`: the same, prompts queued sorted by token ids so alike prompts run side by side —
  what `Generator.answer_all` (eval, `ask --questions`) does now.

Per row: wall seconds (median of the repeats), prompt tokens prefilled (the rest came from shared
cells), and how many of the 132 answers equal the first row's (a prompt prefilled in two pieces rounds
differently from one piece, which can move a near-tie).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def answer(engine: Any, prompts: list[list[int]], stops: frozenset[int], share: bool, order: list[int]
           ) -> tuple[float, int, list[list[int]]]:
    """(wall s, prompt tokens prefilled, ids per prompt) for every prompt submitted in `order`."""
    from ragtune.serve.batching import SeqRequest

    sched = engine.scheduler
    with sched.hold():
        sched.forget()
        shared0 = sched.shared_tokens
        t0 = time.perf_counter()
        reqs = {i: sched.submit(SeqRequest(prompt=list(prompts[i]), budget=64, stops=stops, reuse_prefix=share))
                for i in order}
    ids = [reqs[i].wait().ids for i in range(len(prompts))]
    wall = time.perf_counter() - t0
    return wall, sum(len(p) for p in prompts) - (sched.shared_tokens - shared0), ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--index", default="demo-policies")
    ap.add_argument("--questions", default=str(ROOT / "examples/policies/questions.jsonl"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    from ragtune.config import load_config
    from ragtune.retrieval.sources import open_retriever
    from ragtune.serve.generator import Generator

    cfg = load_config(args.config, ["generation.engine=llama.cpp", "generation.gguf_type=f16"])
    gen = Generator(cfg, engine="llama.cpp").load(adapters={})
    retriever = open_retriever(cfg, args.index, without="run the demo first (./scripts/demo.sh builds it)")
    questions = [json.loads(x)["question"] for x in Path(args.questions).read_text(encoding="utf-8").splitlines() if x.strip()]
    system = cfg.eval.system_prompt
    jobs = [gen.prepare(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}],
                        None, retriever, 64, 0.0) for q in questions]
    jobs = [j for j in jobs if not j.abstained]  # eval answers those without the model
    retriever.close()
    engine = gen.engine_impl
    prompts = [list(j.input_ids) for j in jobs]
    stops = frozenset(gen._eos)  # the ids Generator stops at (end of turn)
    sorted_order = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
    rows = {"whole, question order": (False, list(range(len(prompts)))),
            "shared, question order": (True, list(range(len(prompts)))),
            "shared, sorted": (True, sorted_order)}
    walls: dict[str, list[float]] = {k: [] for k in rows}
    computed: dict[str, int] = {}
    ids: dict[str, list[list[int]]] = {}
    answer(engine, prompts[:8], stops, False, list(range(8)))  # warm-up
    for _ in range(args.repeats):
        for name, (share, order) in rows.items():
            w, n, got = answer(engine, prompts, stops, share, order)
            walls[name].append(w)
            computed[name], ids[name] = n, got
            print(f"  {name}: {w:.1f} s, {n} prompt tokens prefilled", flush=True)
    engine.close()
    first = next(iter(rows))
    base = statistics.median(walls[first])
    total = sum(len(p) for p in prompts)
    print(f"\n{len(prompts)} RAG prompts ({total} prompt tokens, {total / len(prompts):.0f} each), {cpu_name()}, "
          f"medians of {args.repeats}\n")
    print("| row | wall s | x first row | prompt tokens prefilled | answers equal to the first row's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    result = []
    for name in rows:
        med = statistics.median(walls[name])
        same = sum(a == b for a, b in zip(ids[name], ids[first]))
        print(f"| {name} | {med:.1f} | {base / med:.2f} | {computed[name]} | {same} of {len(prompts)} |")
        result.append({"row": name, "wall_s": walls[name], "median_s": med, "prefilled": computed[name],
                       "same_answers": same})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "rows": result, "prompts": len(prompts),
                                              "prompt_tokens": total, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
                                             indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
