"""The HTTP server under concurrent streaming clients: batched decoding against one-at-a-time, side by side.

    python bench/bench_serve.py                                   # default model, llama.cpp engine
    python bench/bench_serve.py --clients 8 --tokens 64 --stress 16 --repeats 3 --out runs/bench/serve.json
    python bench/bench_serve.py --engine transformers --out runs/bench/serve-tf.json

Starts two `ragtune serve` processes on the default model with `generation.engine=--engine`: one
with `serve.max_batch=N` (batched) and one with `serve.max_batch=1` (today's one-at-a-time server).
Each repeat runs `--clients` concurrent streaming chat completions (greedy, `max_tokens=--tokens`,
a different question each) against the baseline and then the batched server, alternating so that
drifting CPU load hits both alike. Per phase: aggregate completion tokens/s (the usage counts of
every answer over the phase's wall time) and the p50 time to first content token seen by a client.
`--batched-via old=/path/to/other/bin/ragtune` adds another install's batched server to every
repeat (a before/after in one run; the ratio stays this install's), `--one-at-a-time-via` another
install's one-at-a-time server. Then `--stress` concurrent
clients against the batched server: every error and every non-200 is
counted. With `--remote`, the same request through a `ragtune serve` deployment `engine: openai`
against calling the remote server (llama-cpp-python's `llama_cpp.server` on the same GGUF) directly,
in rounds whose order rotates; `--remote-via old=/path/to/other/bin/ragtune` adds another install's
server (an older ragtune, for a before/after in one run) to the same rounds:

    python bench/bench_serve.py --repeats 0 --threads 1 --remote --remote-requests 40 --remote-via old=OLD/bin/ragtune
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import machine

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "a lost dog in Paris", "two rival bakers",
          "a dragon afraid of fire", "a girl who builds a boat", "a city under the sea", "an old clock",
          "a detective cat", "a garden on Mars", "a forgotten violin", "a train that never stops",
          "a snowman in summer", "a library at night", "a pirate who hates water", "the last tree"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, overrides: list[str], log: Path, config: str = "", exe: str = "") -> subprocess.Popen:
    cmd = [exe or str(ROOT / ".venv/bin/ragtune"), "serve", "--port", str(port), *overrides]
    if config:
        cmd[2:2] = ["--config", config]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f}s")


def one_stream(base: str, model: str, question: str, tokens: int, out: dict[str, Any]) -> None:
    """One streaming chat completion; records ttft, tokens, status or error."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        with httpx.stream("POST", base + "/chat/completions", json=body, timeout=600) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                r.read()
                out["error"] = r.text[:200]
                return
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    out["tokens"] = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or []:
                    if (ch.get("delta") or {}).get("content") and "ttft_s" not in out:
                        out["ttft_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["t0"], out["t1"] = t0, time.perf_counter()


def phase(base: str, model: str, clients: int, tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    gate = threading.Barrier(clients)

    def run(i: int) -> None:
        gate.wait()
        one_stream(base, model, f"Write a long story about {TOPICS[i % len(TOPICS)]}.", tokens, results[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.get("status") == 200 and "error" not in r]
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    n = sum(r.get("tokens", 0) for r in ok)
    ttfts = [r["ttft_s"] for r in ok if "ttft_s" in r]
    return {"clients": clients, "ok": len(ok), "errors": clients - len(ok),
            "5xx": sum(1 for r in results if r.get("status", 0) >= 500), "tokens": n, "wall_s": wall,
            "tok_s": n / wall if wall > 0 else 0.0, "p50_ttft_s": statistics.median(ttfts) if ttfts else None,
            "failures": [r.get("error") for r in results if "error" in r][:3]}


def remote_overhead(args: argparse.Namespace, logs: Path, procs: list[subprocess.Popen]) -> dict[str, Any]:
    """Median latency of one short non-streaming answer: via ragtune's `engine: openai` deployment
    (this install's, and each `--remote-via` install's) against the same request straight to
    llama_cpp.server (same GGUF), interleaved, the order rotating every round."""
    import httpx

    sys.path.insert(0, str(ROOT))
    from ragtune.config import load_config
    from ragtune.modeling import resolve_model_path
    from ragtune.serve.llamacpp import ensure_gguf

    cfg = load_config(None)
    gguf = ensure_gguf(resolve_model_path(cfg.model.path), type=cfg.generation.gguf_type)
    rport = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                   str(rport), "--n_threads", str(args.threads or 2), "--model_alias", "remote"],
                                  stdout=(logs / "llama_cpp_server.log").open("w"), stderr=subprocess.STDOUT))
    wait_ready(f"http://127.0.0.1:{rport}/v1/models", procs[-1], "llama_cpp.server")
    conf = logs / "remote.yaml"
    conf.write_text("serve:\n  deployments:\n    - {name: remote, engine: openai, "
                    f"url: 'http://127.0.0.1:{rport}/v1', model: remote}}\n")
    urls = {"direct": f"http://127.0.0.1:{rport}/v1"}
    for label, exe in [("ragtune", ""), *(item.split("=", 1) for item in args.remote_via)]:
        port = free_port()
        procs.append(start_server(port, [], logs / f"serve_remote_{label}.log", config=str(conf), exe=exe))
        wait_ready(f"http://127.0.0.1:{port}/health", procs[-1], f"ragtune serve (remote, {label})")
        urls[label] = f"http://127.0.0.1:{port}/v1"
    body = {"model": "remote", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0}
    wall: dict[str, list[float]] = {k: [] for k in urls}
    own: dict[str, list[float]] = {k: [] for k in urls if k != "direct"}
    names = list(urls)
    with httpx.Client(timeout=120) as c:
        for i in range(args.remote_requests + 1):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                r = c.post(urls[name] + "/chat/completions", json=body)
                r.raise_for_status()
                if i:  # the first round warms every server up
                    wall[name].append(time.perf_counter() - t0)
                    if name != "direct":  # the client's wall time less the remote call as ragtune timed it
                        own[name].append(wall[name][-1] - r.json()["ragtune"]["timings"]["total_s"])
    d = statistics.median(wall["direct"])
    out: dict[str, Any] = {"direct_ms": d * 1000, "requests": args.remote_requests, "via": {}}
    for name in own:
        v = statistics.median(wall[name])
        out["via"][name] = {"via_ms": v * 1000, "overhead_ms": (v - d) * 1000,
                            "paired_overhead_ms": 1000 * statistics.median(
                                b - a for a, b in zip(wall["direct"], wall[name])),
                            "own_ms": 1000 * statistics.median(own[name])}
    out.update({k: out["via"]["ragtune"][k] for k in ("via_ms", "overhead_ms")})  # this install's, as before
    out["via_ragtune_ms"] = out.pop("via_ms")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--stress", type=int, default=16, help="concurrent clients for the error check (0 = skip)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="batching comparison rounds (0 = skip it)")
    ap.add_argument("--engine", choices=["llama.cpp", "transformers"], default="llama.cpp")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0 = usable cores / torch's default)")
    ap.add_argument("--batched-via", action="append", default=[], metavar="LABEL=EXE",
                    help="also time another install's `ragtune` batched server (e.g. an older one) in the same repeats")
    ap.add_argument("--one-at-a-time-via", action="append", default=[], metavar="LABEL=EXE",
                    help="also time another install's one-at-a-time server (max_batch 1) in the same repeats")
    ap.add_argument("--remote", action="store_true", help="also measure the engine: openai overhead")
    ap.add_argument("--remote-requests", type=int, default=20)
    ap.add_argument("--remote-via", action="append", default=[], metavar="LABEL=EXE",
                    help="with --remote, also time another install's `ragtune` (e.g. an older one) in the same rounds")
    ap.add_argument("--out", default="runs/bench/serve.json")
    args = ap.parse_args(argv)
    logs = ROOT / "runs/bench/serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = [f"generation.engine={args.engine}", f"generation.threads={args.threads}", "serve.max_queue=256",
              f"serve.max_tokens_limit={max(2048, args.tokens)}"]
    ports = {"one-at-a-time (max_batch 1)": free_port(), f"batched (max_batch {args.max_batch})": free_port()}
    exes = {name: "" for name in ports}
    slots = dict(zip(ports, (1, args.max_batch)))
    for via, mb in ((args.batched_via, args.max_batch), (args.one_at_a_time_via, 1)):
        for item in via:  # another install's server in the same repeats
            label, exe = item.split("=", 1)
            name = f"{'batched' if mb > 1 else 'one-at-a-time'} (max_batch {mb}, {label})"
            ports[name], exes[name], slots[name] = free_port(), exe, mb
    if args.repeats < 1:  # --repeats 0: no batching comparison (e.g. --remote alone)
        ports, args.stress = {}, 0
    procs: list[subprocess.Popen] = []
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    try:
        for i, (name, port) in enumerate(ports.items()):
            mb = slots[name]
            procs.append(start_server(port, [*common, f"serve.max_batch={mb}"], logs / f"serve_{i}_{mb}.log",
                                      exe=exes[name]))
        for (name, port), p in zip(ports.items(), procs):
            wait_ready(f"http://127.0.0.1:{port}/health", p, name)
            phase(f"http://127.0.0.1:{port}/v1", "base", 1, 8)  # warm-up
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ports}
        for rep in range(args.repeats):
            for name, port in ports.items():
                r = phase(f"http://127.0.0.1:{port}/v1", "base", args.clients, args.tokens)
                rows[name].append(r)
                print(f"repeat {rep + 1} {name}: {r['tok_s']:.1f} tok/s, p50 TTFT {r['p50_ttft_s']}, "
                      f"errors {r['errors']}", flush=True)
        stress = None
        if args.stress:
            stress = phase(f"http://127.0.0.1:{list(ports.values())[1]}/v1", "base", args.stress, args.tokens)
            print(f"stress {args.stress} clients: ok {stress['ok']}, errors {stress['errors']}, 5xx {stress['5xx']}")
        remote = remote_overhead(args, logs, procs) if args.remote else None
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    summary, ratio = {}, 0.0
    for name, rs in rows.items():
        summary[name] = {"tok_s": statistics.median(r["tok_s"] for r in rs),
                         "p50_ttft_s": statistics.median(r["p50_ttft_s"] for r in rs if r["p50_ttft_s"] is not None),
                         "errors": sum(r["errors"] for r in rs), "tokens": [r["tokens"] for r in rs]}
    if summary:
        base_name, batch_name = list(ports)[:2]
        ratio = summary[batch_name]["tok_s"] / summary[base_name]["tok_s"] if summary[base_name]["tok_s"] else 0.0
    result = {"date": t_start, "machine": machine(), "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
              "command": "python bench/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "engine": args.engine, "clients": args.clients, "tokens": args.tokens, "summary": summary, "ratio": ratio,
              "stress": stress, "remote": remote, "runs": rows}
    if summary:
        print(f"\n| {t_start}, {machine()}, {args.engine}, {args.clients} streaming clients x {args.tokens} tokens "
              "| aggregate tok/s | p50 TTFT (s) | errors |\n| --- | ---: | ---: | ---: |")
        for name, s in summary.items():
            print(f"| {name} | {s['tok_s']:.1f} | {s['p50_ttft_s']:.2f} | {s['errors']} |")
        print(f"ratio {ratio:.2f}x")
    print(f"{t_start}, load average {load0:.2f} at the start, {result['load_avg_end']:.2f} at the end")
    if stress:
        print(f"{args.stress} clients on the batched server: {stress['ok']} ok, {stress['errors']} errors, "
              f"{stress['5xx']} 5xx, {stress['tok_s']:.1f} tok/s")
    if remote:
        print(f"remote engine: direct {remote['direct_ms']:.1f} ms (median of {remote['requests']} interleaved)")
        for name, v in remote["via"].items():
            print(f"  via {name}: {v['via_ms']:.1f} ms, overhead {v['overhead_ms']:.1f} ms (paired "
                  f"{v['paired_overhead_ms']:.1f} ms); its own time outside the remote call {v['own_ms']:.1f} ms")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from ragtune.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
