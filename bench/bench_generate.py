"""Answering speed: ragtune's Generator against plain transformers `generate`, side by side.

    python bench/bench_generate.py                       # default model (ragtune models prepare)
    python bench/bench_generate.py --tokens 64 --repeats 3 --out runs/bench/generate.json

Rows (same prompt, greedy, interleaved so drifting CPU load hits every row alike):
  plain generate on the base / on the base + unmerged LoRA (peft) / on the merged model, and
  ragtune's Generator on the same three, plus the base answered by a Generator that also holds the
  adapter (how a multi-deployment server answers `base`). Each row reports time to first token
  and decode tokens/s (median of the repeats). The LoRA is r16 on all linear layers with random
  B weights (speed does not depend on what it learned). Then the cost of retrieval per answer:
  search time and extra prompt tokens over examples/policies/docs_v1 with the bundled MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Stamps

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint. Use at least five sentences."
QUESTIONS = ROOT / "examples" / "policies" / "questions.jsonl"
DOCS = ROOT / "examples" / "policies" / "docs_v1"


def plain_generate(model: Any, ids: Any, tokens: int) -> dict[str, float]:
    import torch

    s = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                       streamer=s)
    t1 = time.perf_counter()
    n = len(s.times)
    return {"ttft_s": s.times[0] - t0, "decode_tok_s": (n - 1) / (t1 - s.times[0]), "tokens": n}


def ragtune_generate(gen: Any, messages: list[dict[str, str]], tokens: int, adapter: str | None) -> dict[str, float]:
    a = gen.answer(messages, adapter=adapter, max_new_tokens=tokens, temperature=0.0)
    return {"ttft_s": a.timings["ttft_s"], "decode_tok_s": a.timings["decode_tokens_per_s"],
            "tokens": a.completion_tokens, "text": a.text}


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA (r16, all linear) with random non-zero B, and the run card serving checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.modeling import chat_template_of, model_hash, text_sha256
    from ragtune.runcard import write_runcard

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.save_pretrained(str(out), safe_serialization=True)
    tpl = chat_template_of(base) or ""
    write_runcard(out, {"base_model": {"path": str(base), "hash": model_hash(base)},
                        "chat_template": {"template": tpl, "hash": text_sha256(tpl)},
                        "config": {"bench": True}, "data": {}, "metrics": {}, "exports": {}})
    return out


def make_merged(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    return out


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "decode_tok_s", "tokens")}


def bench_generation(cfg: Any, base: Path, work: Path, tokens: int, repeats: int) -> list[dict[str, Any]]:
    import torch
    from peft import PeftModel

    from ragtune.modeling import load_model, load_tokenizer
    from ragtune.serve.generator import Generator

    adapter = make_adapter(base, work / "adapter")
    merged = make_merged(base, adapter, work / "merged")
    tok = load_tokenizer(base)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])

    plain_base = load_model(base, device="cpu", dtype="float32")
    plain_peft = PeftModel.from_pretrained(load_model(base, device="cpu", dtype="float32"), str(adapter)).eval()
    plain_merged = load_model(merged, device="cpu", dtype="float32")
    g_base = Generator(cfg).load(base=str(base), adapters={})
    g_multi = Generator(cfg).load(base=str(base), adapters={"bench": str(adapter)})
    g_merged = Generator(cfg).load(base=str(merged), adapters={})

    rows: list[tuple[str, Any]] = [
        ("plain generate: base", lambda: plain_generate(plain_base, ids, tokens)),
        ("ragtune: base", lambda: ragtune_generate(g_base, messages, tokens, None)),
        ("ragtune: base, adapter loaded but off", lambda: ragtune_generate(g_multi, messages, tokens, None)),
        ("plain generate: base + unmerged LoRA", lambda: plain_generate(plain_peft, ids, tokens)),
        ("ragtune: base + unmerged LoRA", lambda: ragtune_generate(g_multi, messages, tokens, "bench")),
        ("plain generate: merged", lambda: plain_generate(plain_merged, ids, tokens)),
        ("ragtune: merged", lambda: ragtune_generate(g_merged, messages, tokens, None)),
    ]
    for _, fn in rows:  # warm-up: first calls pay kernel set-up
        fn()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in rows}
    for rep in range(repeats):
        for name, fn in rows:
            runs[name].append(fn())
            print(f"  rep {rep + 1}/{repeats} {name}: {runs[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return [{"row": name, **median_row(runs[name])} for name, _ in rows]


def bench_retrieval(cfg: Any, base: Path, work: Path, queries: int) -> dict[str, Any]:
    from ragtune.retrieval.ingest import ingest
    from ragtune.retrieval.search import Retriever
    from ragtune.serve.generator import Generator

    t0 = time.perf_counter()
    ingest(cfg, [str(DOCS)], progress=False)
    index_s = time.perf_counter() - t0
    qs = [json.loads(line)["question"] for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    qs = qs[:queries]
    gen = Generator(cfg).load(base=str(base), adapters={})
    r = Retriever(cfg).load()
    r.search("warm up", top_k=cfg.rag.top_k)
    search_s, extra_tokens, answer_rag, answer_plain = [], [], [], []
    for q in qs:
        msgs = [{"role": "user", "content": q}]
        t = time.perf_counter()
        r.search(q, top_k=cfg.rag.top_k)
        search_s.append(time.perf_counter() - t)
        with_rag = gen.answer(msgs, retriever=r, max_new_tokens=1)
        without = gen.answer(msgs, max_new_tokens=1)
        if not with_rag.abstained:
            extra_tokens.append(with_rag.prompt_tokens - without.prompt_tokens)
            answer_rag.append(with_rag.timings["ttft_s"])
            answer_plain.append(without.timings["ttft_s"])
    r.close()
    return {
        "queries": len(qs), "index_docs_s": index_s, "top_k": cfg.rag.top_k, "mode": cfg.search.mode,
        "search_ms_median": 1000 * statistics.median(search_s),
        "search_ms_max": 1000 * max(search_s),
        "extra_prompt_tokens_median": statistics.median(extra_tokens) if extra_tokens else None,
        "ttft_s_median_with_rag": statistics.median(answer_rag) if answer_rag else None,
        "ttft_s_median_without": statistics.median(answer_plain) if answer_plain else None,
        "abstained": len(qs) - len(extra_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=10, help="questions for the retrieval cost")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip-retrieval", action="store_true")
    ap.add_argument("--out", default="", help="write the results as JSON here too")
    args = ap.parse_args(argv)

    from ragtune.modeling import set_offline_env

    set_offline_env()
    import torch
    from transformers.utils import logging as hf_logging

    from ragtune.config import load_config
    from ragtune.modeling import resolve_model_path

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = resolve_model_path("")
    results: dict[str, Any] = {
        "model": base.name, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "tokens": args.tokens,
        "repeats": args.repeats, "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as tmp:
        work = Path(tmp)
        cfg = load_config(None, ["model.device=cpu", "model.dtype=float32", "embedder.device=cpu",
                                 "index.name=bench-generate"])
        results["generation"] = bench_generation(cfg, base, work, args.tokens, args.repeats)
        if not args.skip_retrieval:
            home = os.environ.get("RAGTUNE_HOME")
            os.environ["RAGTUNE_HOME"] = str(work / "home")  # a throwaway index, not the user's
            try:
                results["retrieval"] = bench_retrieval(cfg, base, work, args.queries)
            finally:
                if home is None:
                    os.environ.pop("RAGTUNE_HOME", None)
                else:
                    os.environ["RAGTUNE_HOME"] = home
    results["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    print(f"\n| row | time to first token (s) | decode tokens/s | tokens |\n| --- | ---: | ---: | ---: |")
    for r in results["generation"]:
        print(f"| {r['row']} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | {r['tokens']:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
