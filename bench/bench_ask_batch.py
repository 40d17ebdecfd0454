"""`ragtune ask --questions FILE` on the llama.cpp engine: lines answered in batched waves (serve.max_batch 8,
the default) against one at a time (serve.max_batch 1), side by side in one invocation.

    python bench/bench_ask_batch.py                               # 48 demo questions, --no-rag and --index
    python bench/bench_ask_batch.py --questions 48 --repeats 2 --index demo-policies --out runs/bench/ask_batch.json

Each cell is the wall time of one whole `ragtune ask --questions` process (start-up, model load and
every answer: what a shell script pays), median of the repeats; the two settings alternate so that
drifting load hits both. The questions are the first N of examples/policies/questions.jsonl, asked with
configs/demo.yaml (its system prompt, rag.top_k 2, max_new_tokens 48). The index (default
demo-policies, what scripts/demo.sh builds) must exist for the --index rows. Also reported: how many
answers the two settings gave word for word alike (greedy; a batch's float rounding can move a near tie).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def ask(qfile: Path, slots: int, rag: list[str]) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "ragtune", "-q", "--config", str(ROOT / "configs" / "demo.yaml"), "ask",
           "--questions", str(qfile), "--engine", "llama.cpp", "--json", *rag, f"serve.max_batch={slots}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, [json.loads(x) for x in r.stdout.splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--index", default="demo-policies")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    qs = [json.loads(x)["question"] for x in (ROOT / "examples" / "policies" / "questions.jsonl")
          .read_text(encoding="utf-8").splitlines() if x.strip()][:a.questions]
    qfile = Path(tempfile.mkdtemp(prefix="bench-ask-")) / "q.txt"
    qfile.write_text("\n".join(qs) + "\n", encoding="utf-8")
    rows = []
    for label, rag in (("no sources (--no-rag)", ["--no-rag"]), (f"with sources (--index {a.index})", ["--index", a.index])):
        walls: dict[int, list[float]] = {1: [], 8: []}
        answers: dict[int, list[str]] = {}
        for _ in range(a.repeats):
            for slots in (1, 8):
                wall, out = ask(qfile, slots, rag)
                walls[slots].append(wall)
                answers[slots] = [o.get("answer", o.get("error", "")) for o in out]
        one, batched = statistics.median(walls[1]), statistics.median(walls[8])
        same = sum(x == y for x, y in zip(answers[1], answers[8]))
        rows.append({"mode": label, "one_at_a_time_s": round(one, 1), "batched_s": round(batched, 1),
                     "speedup": round(one / batched, 2), "same_answers": f"{same}/{len(qs)}",
                     "walls": {str(k): [round(w, 1) for w in v] for k, v in walls.items()}})
        print(f"{label}: one at a time {one:.1f} s, batched {batched:.1f} s ({one / batched:.2f}x); "
              f"same answers {same}/{len(qs)}", flush=True)
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "questions": len(qs), "repeats": a.repeats, "load_average": os.getloadavg()}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
