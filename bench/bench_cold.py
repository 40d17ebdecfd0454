"""Shell-script latency: cold `ragtune search` / `ask` processes, batch calls, and a running server.

    python bench/bench_cold.py                          # needs 'ragtune models prepare' done in $RAGTUNE_HOME
    python bench/bench_cold.py --repeats 5 --out /tmp/cold.json

Every figure is a whole process, started the way a script starts it, side by side with today's path
forced through its switch in the same run:
- cold `ragtune search "Q" --index NAME`: wall time and peak RSS (goal <= 1.5 s, <= 300 MB); beside
  it RAGTUNE_ONNX=0 (the query encoded by sentence-transformers, the path before the ONNX export);
- `ragtune search --queries FILE` with 200 queries (goal <= 15 s including start-up), both ways;
- cold `ragtune ask --engine llama.cpp --no-rag`: time to first token (goal <= 3 s), an upper bound:
  the process's wall time minus the decode time after the first token (from --json timings); beside
  it RAGTUNE_LIGHT_TOKENIZER=0 (transformers' tokenizer, the path before jinja2 + tokenizers);
- `ragtune ask --server URL --json` against a running `ragtune serve` (llama.cpp, same model): the
  process's wall time minus the server's own answer time (timings.total_s) (goal <= 100 ms), and the
  client process's own CPU seconds (what that overhead is made of on an idle machine, readable on a
  loaded one); through `python -m ragtune` and through the `ragtune` console script, in alternation with
  any `--client LABEL=EXE` (another install's `ragtune`, e.g. a scratch venv holding an older wheel:
  the baseline in the same run).
The index is a real corpus (default: examples/policies/docs_v1, the policies the questions ask about;
--corpus for another folder), built in a scratch RAGTUNE_HOME that links the prepared models, GGUF
cache and llama.cpp converter of the real one. A warm-up run of each command first (the ONNX export
at `index add`, the GGUF export and the tokenizer check at the first ask), so the rows time steady
cold starts. Wall times are the child's own, fork to exit (bench_ingest.timed). The children write
Python's bytecode cache as a user's Python does (PYTHONDONTWRITEBYTECODE, set in some development
shells, is dropped for them). The machine may be shared: the load average is recorded around every row.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_ingest import timed
from common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How many days a week can I work remotely?"


def scratch_home(real: Path) -> Path:
    """A fresh RAGTUNE_HOME with the real one's prepared models, GGUF cache and converter linked in."""
    if not (real / "models" / "SmolLM2-135M-Instruct").is_dir():
        raise SystemExit(f"the default chat model is not prepared in {real}: run 'ragtune models prepare' "
                         "(RAGTUNE_HOME picks the home)")
    home = Path(tempfile.mkdtemp(prefix="ragtune-bench-cold-"))
    for name in ("models", "gguf", "llama.cpp"):
        if (real / name).exists():
            os.symlink((real / name).resolve(), home / name)
    return home


def rows(label: str, cmd: list[str], env: dict[str, str], repeats: int, parse: Any = None) -> dict[str, Any]:
    return interleaved({label: cmd}, env, repeats, parse)[label]


def interleaved(cmds: dict[str, list[str]], env: dict[str, str], repeats: int, parse: Any = None) -> dict[str, Any]:
    """Each command once per round, `repeats` rounds, so a changing load hits every row alike."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in cmds}
    for _ in range(repeats):
        for label, cmd in cmds.items():
            r = timed(cmd, env)
            if parse is not None:
                r.update(parse(r["stdout"], r["wall_s"]))
            r.pop("stdout")
            runs[label].append(r)
    return {label: _summary(label, rs) for label, rs in runs.items()}


def _summary(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
                           "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 3),
                           "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs)}
    for key in ("ttft_process_s", "overhead_s"):
        if key in runs[0]:
            out[f"{key}_median"] = round(statistics.median(r[key] for r in runs), 3)
    print(label, json.dumps({k: v for k, v in out.items() if k != "runs"}), file=sys.stderr, flush=True)
    return out


def ttft(stdout: str, wall: float) -> dict[str, float]:
    t = json.loads(stdout)["timings"]
    return {"ttft_process_s": round(wall - (t["total_s"] - t["ttft_s"]), 3), "answer_total_s": t["total_s"]}


def overhead(stdout: str, wall: float) -> dict[str, float]:
    t = json.loads(stdout)["timings"]
    return {"overhead_s": round(wall - t["total_s"], 3), "server_total_s": t["total_s"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    cfg = ROOT / "configs" / "serve" / "base-only.yaml"
    p = subprocess.Popen([sys.executable, "-m", "ragtune", "serve", "--config", str(cfg), "--port", str(port),
                          "generation.engine=llama.cpp", "serve.max_batch=1", "generation.max_new_tokens=16"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(0.5)
        if p.poll() is not None:
            raise SystemExit(f"ragtune serve exited with {p.returncode}")
    p.kill()
    raise SystemExit("ragtune serve did not answer /health within 180 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT / "examples" / "policies" / "docs_v1"))
    ap.add_argument("--repeats", type=int, default=5, help="runs of each fast row")
    ap.add_argument("--slow-repeats", type=int, default=2, help="runs of each today's-path row")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", default="", help="OMP_NUM_THREADS for every process (default: unset)")
    ap.add_argument("--rows", default="search,queries,ask,server", help="which groups of rows to run")
    ap.add_argument("--client", action="append", default=[], metavar="LABEL=EXE",
                    help="also time ask --server through this ragtune executable (repeatable), alternating")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    groups = set(args.rows.split(","))
    real = Path(os.environ.get("RAGTUNE_HOME") or Path.home() / ".cache" / "ragtune").expanduser()
    home = scratch_home(real)
    env = {**os.environ, "RAGTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's Python keeps ragtune's compiled modules; the warm-ups write them
    if args.threads:
        env["OMP_NUM_THREADS"] = args.threads
    rt = [sys.executable, "-m", "ragtune"]
    out: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join(sys.argv), "corpus": args.corpus, "load_average_start": os.getloadavg(),
                           "omp_num_threads": args.threads or "unset", "rows": {}}
    r = out["rows"]
    built = timed([*rt, "index", "add", args.corpus, "--index", "cold", "--no-progress", "--json"], env)
    out["index"] = {k: json.loads(built["stdout"])[k] for k in ("chunks_written", "seconds")}
    q = [*rt, "search", QUESTION, "--index", "cold", "--json"]
    timed(q, env)  # warm-up: page cache
    if "search" in groups:
        r["search"] = rows("search", q, env, args.repeats)
        r["search_sentence_transformers"] = rows("search (RAGTUNE_ONNX=0)", q, {**env, "RAGTUNE_ONNX": "0"},
                                                 args.slow_repeats)
    questions = [json.loads(line)["question"] for line in (ROOT / "examples/policies/questions.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    qfile = home / "queries.txt"
    qfile.write_text("\n".join(questions[i % len(questions)] for i in range(args.queries)) + "\n", encoding="utf-8")
    batch = [*rt, "search", "--queries", str(qfile), "--index", "cold"]
    if "queries" in groups:
        r["search_queries"] = rows(f"search --queries ({args.queries})", batch, env, 1)
        r["search_queries_sentence_transformers"] = rows("search --queries (RAGTUNE_ONNX=0)", batch,
                                                         {**env, "RAGTUNE_ONNX": "0"}, 1)
    ask = [*rt, "ask", QUESTION, "--engine", "llama.cpp", "--no-rag", "--json", "--max-new-tokens", "16",
           "serve.max_batch=1"]
    timed(ask, env)  # warm-up: GGUF export (once per model) and the tokenizer check
    if "ask" in groups:
        r["ask_llamacpp"] = rows("ask --engine llama.cpp", ask, env, args.repeats, ttft)
        r["ask_llamacpp_transformers_tokenizer"] = rows("ask (RAGTUNE_LIGHT_TOKENIZER=0)", ask,
                                                        {**env, "RAGTUNE_LIGHT_TOKENIZER": "0"}, args.slow_repeats,
                                                        ttft)
    if "server" in groups:
        port = free_port()
        server = serve(env, port)
        try:
            remote = [*rt, "ask", QUESTION, "--server", f"http://127.0.0.1:{port}", "--json"]
            timed(remote, env)  # warm-up: the server's first request
            clients = {"ask_server": remote}
            script = Path(sys.executable).with_name("ragtune")
            if script.exists():
                clients["ask_server_console_script"] = [str(script), *remote[3:]]
            for item in args.client:
                label, _, exe = item.partition("=")
                clients[f"ask_server_{label}"] = [exe, *remote[3:]]
                timed(clients[f"ask_server_{label}"], env)  # warm-up: its bytecode cache
            r.update(interleaved(clients, env, args.repeats, overhead))
        finally:
            server.terminate()
            server.wait(timeout=30)
    out["load_average_end"] = os.getloadavg()
    checks = {"search_wall_s<=1.5": ("search", "wall_s_median", 1.5), "search_rss_mb<=300": ("search",
              "peak_rss_mb_max", 300), "search_queries_s<=15": ("search_queries", "wall_s_median", 15),
              "ask_ttft_s<=3": ("ask_llamacpp", "ttft_process_s_median", 3),
              "ask_server_overhead_s<=0.1": ("ask_server", "overhead_s_median", 0.1)}
    out["goals"] = {name: r[row][key] <= limit for name, (row, key, limit) in checks.items() if row in r}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
