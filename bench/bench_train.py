"""Training throughput: `ragtune train` against a plain TRL `SFTTrainer` script, side by side.

    python bench/bench_train.py [--data examples/policies/train_v1.jsonl] [--epochs 1] [--threads 0] [--ragtune-fp32]

Same base model (the prepared SmolLM2-135M-Instruct), same records (90% of --data; the other 10%
held out), same LoRA (r16, alpha 32, dropout 0.05, all-linear), batch 8, max_length 1024, learning
rate, epochs, seed, device and thread count. The baseline is TRL's defaults plus what a CPU needs
(`use_cpu=True, bf16=False`): gradient checkpointing on, random batches, loss on every token.
ragtune runs with its own device-aware defaults, which on a CPU with native bf16 (avx512_bf16/AMX)
include bf16 autocast over fp32 weights; `--ragtune-fp32` also runs it with train.mixed_precision=no.

tokens/s = non-padding tokens of the training records x epochs / train_runtime (Trainer's own
clock, excluding model load and data preparation), counted the same way for both. "Final loss"
compares like with like: both adapters are scored on the held-out records with the same metric,
mean NLL per assistant token. Run ragtune first, then the baseline, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def heldout_loss(model, tok, template, records, max_length=1024) -> float:
    """Mean NLL per assistant token (answer + end-of-turn) over the records, batch 1."""
    import torch

    from ragtune.train.recipe import encode

    enc = encode(records, tok, template, max_length)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in zip(enc["input_ids"], enc["labels"]):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            y = torch.tensor(labels[1:])
            m = y != -100
            total += torch.nn.functional.cross_entropy(logits[m], y[m], reduction="sum").item()
            count += int(m.sum())
    return total / count


def run_ragtune(args, train_file: Path, out: Path, precision: str = "auto") -> dict:
    from ragtune.config import load_config
    from ragtune.runcard import read_runcard
    from ragtune.train.recipe import run_train

    cfg = load_config(None, [
        f"data.train_file={train_file}", "data.max_length=1024", "data.eval_fraction=0.0",
        f"train.output_dir={out}", f"train.epochs={args.epochs}", f"train.learning_rate={args.lr}",
        "train.batch_size=8", "train.lora.r=16", "train.lora.alpha=32", "train.lora.dropout=0.05",
        "train.save_steps=100000", "train.logging_steps=5", f"train.seed={args.seed}",
        f"train.threads={args.threads}", "train.warmup_ratio=0.0", "train.lr_scheduler=linear",
        f"train.mixed_precision={precision}",
    ])
    t0 = time.time()
    run_train(cfg)
    card = read_runcard(out)
    m = card["metrics"]
    return {"train_seconds": m["train_seconds"], "train_tokens": m["train_tokens"],
            "tokens_per_second": m["tokens_per_second"], "steps": m["steps"], "wall_seconds": time.time() - t0,
            "final_train_loss": m["train_loss"], "loss_kind": "assistant tokens", "dtype": card["training"]["dtype"]}


def run_trl_baseline(args, records, base: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    ds = Dataset.from_list([{"messages": r.messages} for r in records])
    cfg = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False,  # what TRL needs to start on a CPU
                    num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=8,
                    max_length=1024, seed=args.seed, save_strategy="no", logging_steps=5, report_to=[],
                    lr_scheduler_type="linear")
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    res = trainer.train()
    runtime = res.metrics["train_runtime"]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    tail = losses[-max(1, len(losses) // 10):]
    trainer.model.save_pretrained(str(out / "adapter"))
    return {"train_seconds": runtime, "train_tokens": int(tokens * args.epochs),
            "tokens_per_second": tokens * args.epochs / runtime, "steps": trainer.state.global_step,
            "wall_seconds": time.time() - t0, "final_train_loss": sum(tail) / len(tail),
            "loss_kind": "all tokens (TRL default)", "gradient_checkpointing": cfg.gradient_checkpointing}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "examples/policies/train_v1.jsonl"))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = all usable cores)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--ragtune-fp32", action="store_true",
                    help="also run ragtune with train.mixed_precision=no (where its default autocasts to bf16)")
    args = ap.parse_args()

    from ragtune.modeling import set_offline_env

    set_offline_env()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ragtune.modeling import load_tokenizer, resolve_model_path
    from ragtune.train.data import check_file, record_prompt, split_items

    if args.threads <= 0:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    base = resolve_model_path("")
    tok = load_tokenizer(base)
    template = tok.chat_template
    rep = check_file(args.data, tok, template, 1024)
    # held-out records ask no trained question (the default data has none repeated: the split is unchanged)
    train, held = split_items(rep.records, 0.1, args.seed, key=record_prompt)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps({"messages": r.messages}, ensure_ascii=False) + "\n" for r in train),
                          encoding="utf-8")
    print(f"data: {len(train)} train / {len(held)} held-out records from {args.data}; {args.epochs} epoch(s); "
          f"{args.threads} threads", flush=True)

    rt = run_ragtune(args, train_file, work / "ragtune")
    print(f"ragtune ({rt['dtype']}): {rt['tokens_per_second']:.1f} tokens/s ({rt['train_seconds']:.0f}s)", flush=True)
    fp32 = None
    if args.ragtune_fp32:
        torch.set_num_threads(args.threads)
        fp32 = run_ragtune(args, train_file, work / "ragtune-fp32", precision="no")
        print(f"ragtune ({fp32['dtype']}): {fp32['tokens_per_second']:.1f} tokens/s ({fp32['train_seconds']:.0f}s)",
              flush=True)
    torch.set_num_threads(args.threads)
    bl = run_trl_baseline(args, train, base, work / "trl")
    print(f"TRL baseline: {bl['tokens_per_second']:.1f} tokens/s ({bl['train_seconds']:.0f}s)", flush=True)

    base_model = lambda: AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)  # noqa: E731
    rt["heldout_loss"] = heldout_loss(PeftModel.from_pretrained(base_model(), str(work / "ragtune")),
                                      tok, template, held)
    bl["heldout_loss"] = heldout_loss(PeftModel.from_pretrained(base_model(), str(work / "trl" / "adapter")),
                                      tok, template, held)
    if fp32:
        fp32["heldout_loss"] = heldout_loss(PeftModel.from_pretrained(base_model(), str(work / "ragtune-fp32")),
                                            tok, template, held)
        fp32["speedup"] = fp32["tokens_per_second"] / bl["tokens_per_second"]
    before = heldout_loss(base_model(), tok, template, held)
    ratio = rt["tokens_per_second"] / bl["tokens_per_second"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {args.threads} threads",
        "cpu_flags_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "data": args.data, "train_records": len(train), "heldout_records": len(held), "epochs": args.epochs,
        "heldout_loss_before": before, "ragtune": rt, "trl_baseline": bl, "speedup": ratio,
        **({"ragtune_fp32": fp32} if fp32 else {}),
    }
    print(json.dumps(result, indent=2))
    print(f"\nspeedup {ratio:.2f}x; held-out assistant-token loss: ragtune {rt['heldout_loss']:.4f}, "
          f"TRL {bl['heldout_loss']:.4f} (base model {before:.4f})")
    if fp32:
        print(f"ragtune float32: {fp32['speedup']:.2f}x, held-out loss {fp32['heldout_loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
