"""GPU benchmarks (issue #16): `ragtune train` against TRL on the same GPU, decoding at batch 1, QLoRA memory.

    python bench/bench_cuda.py make-data --deb python3.11-doc_*.deb --out chat.jsonl     # 4,000 chat records
    python bench/bench_cuda.py make-model --shape 135m --tokenizer TOKDIR --out DIR [--dtype float32]
    python bench/bench_cuda.py train --data chat.jsonl --tokenizer TOKDIR --runs 135m:ragtune,135m:trl-packing-liger
    python bench/bench_cuda.py decode --tokenizer TOKDIR --shapes 135m,8b

Models have random weights of a real shape, built on the GPU (`from_config` under `torch.device`), with
the same seed for every run: speed does not depend on what the weights know, and both sides start from
identical weights, so their held-out losses compare. TOKDIR holds a tokenizer with a chat template
(SmolLM2's: a prepared model folder, its weights are not read). Shapes: 135m (SmolLM2-135M), 1.7b
(SmolLM2-1.7B), 6.5b (Llama-2-7B's layers with SmolLM2's vocabulary), 8b (Llama-3-8B, decode only), and
tiny (a CPU smoke test of this script).

train: every run in its own process (liger-kernel patches modules process-wide), same records (held-out
records set aside), same LoRA (r16, alpha 32, dropout 0.05, all linear layers), batch 8, max_length 1024,
learning rate 2e-4 linear, seed. Runs:
  ragtune            `ragtune train` with its defaults for the device (run_train, nothing changed)
  ragtune-gc         the same with train.gradient_checkpointing=on
  ragtune-nokernels  the same with train.kernels=none
  ragtune-packing    the same with train.packing=true
  ragtune-qlora      train.qlora=true (4-bit base, saved to /dev/shm first: bitsandbytes quantizes on load)
  trl-defaults       TRL SFTTrainer with its defaults (bf16=True)
  trl-packing        ... packing=True
  trl-packing-liger  ... packing=True, use_liger_kernel=True (the best peer configuration)
  trl-packing-liger-nogc  ... and gradient_checkpointing=False (TRL's default is True)
With --steps 0 --train-records N every run trains one epoch over the same N records (equal data: the
held-out losses compare; packed runs take fewer, larger steps); with --steps K every run takes K steps
(equal steps: a packed step carries more tokens, so its loss is not comparable).
tokens/s counts non-padding tokens (attention-mask ones, or every token of a padding-free batch) of the
steps after the first --warmup, between CUDA-synchronised step ends; peak memory is
torch.cuda.max_memory_allocated over the whole run; held-out loss is the mean NLL per assistant token of
the trained model on the held-out records (the same metric for every run).

decode: greedy, batch 1, a chat prompt, --tokens new tokens (end-of-sequence ignored): plain
`model.generate` (dynamic cache), the same call with `cache_implementation="static"` (transformers then
compiles the decoding step), and ragtune's StaticGreedy (serve/static_decode.py: the step, penalty and
argmax in one compiled CUDA graph, the host reading ids 8 at a time), which `generation.cache: static`
answers greedy requests through on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64, tie_word_embeddings=True),
    "6.5b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, vocab_size=128256),
}
LORA = dict(r=16, alpha=32, dropout=0.05)
HELDOUT = 48


def shape_config(tokdir: Path, shape: str) -> Any:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tokdir), local_files_only=True)
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    cfg.use_cache = True
    return cfg


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def random_model(tokdir: Path, shape: str, dtype: str = "bfloat16", seed: int = 0) -> Any:
    """The shape with random weights, built where it will run (the same weights for the same seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device()):
        return AutoModelForCausalLM.from_config(shape_config(tokdir, shape), dtype=getattr(torch, dtype))


def copy_tokenizer(tokdir: Path, out: Path) -> None:
    """The tokenizer, chat template and generation settings of `tokdir` into `out` (those it has)."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        if (tokdir / name).is_file():
            shutil.copyfile(tokdir / name, out / name)


def save_model(model: Any, tokdir: Path, out: Path) -> Path:
    """A loadable model folder: the weights, plus the tokenizer and chat template of `tokdir`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copy_tokenizer(tokdir, out)
    return out


def shape_dir(tokdir: Path, shape: str, work: Path) -> Path:
    """A model folder for `ragtune train` to read its tokenizer, template and config from; its weights file
    holds no tensors (the runs build the weights at random on the GPU instead of loading them)."""
    from safetensors.torch import save_file

    out = work / f"shape-{shape}"
    out.mkdir(parents=True, exist_ok=True)
    shape_config(tokdir, shape).save_pretrained(str(out))
    copy_tokenizer(tokdir, out)
    save_file({}, str(out / "model.safetensors"))
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


# --- data -------------------------------------------------------------------------------------


def make_data(args: argparse.Namespace) -> int:
    """Chat records from a documentation package: a section's title as the question, its text (20-400
    words) as the answer. Real prose, real length spread; the content does not matter for speed."""
    import html
    import re

    deb = Path(args.deb)
    work = Path(tempfile.mkdtemp(prefix="bench-cuda-data-"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], check=True)
    pages = sorted(p for p in work.rglob("*.html") if "/_" not in str(p))
    records: list[dict[str, Any]] = []
    sec_re = re.compile(r"<section id=\"[^\"]+\">\s*<h[1-4]>(.*?)<a class=\"headerlink\".*?</h[1-4]>(.*?)(?=<section|</section>)",
                        re.S)
    for page in pages:
        text = page.read_text(encoding="utf-8", errors="replace")
        for title, body in sec_re.findall(text):
            title = html.unescape(re.sub(r"<[^>]+>", "", title)).strip()
            words = html.unescape(re.sub(r"<[^>]+>", " ", body)).split()
            if len(words) < 20 or not title:
                continue
            for part, start in enumerate(range(0, len(words), 400)):  # long sections: one record per 400 words
                answer = words[start:start + 400]
                if len(answer) < 20:
                    continue
                more = f", part {part + 1}" if len(words) > 400 else ""
                records.append({"messages": [
                    {"role": "user", "content": f"What does the Python documentation say about \"{title}\" "
                                                f"({page.stem}{more})?"},
                    {"role": "assistant", "content": " ".join(answer)}]})
            if len(records) >= args.records:
                break
        if len(records) >= args.records:
            break
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    n_words = sorted(len(r["messages"][1]["content"].split()) for r in records)
    print(f"{len(records)} records from {len(pages)} pages of {deb.name}; answer words: median "
          f"{n_words[len(n_words) // 2]}, min {n_words[0]}, max {n_words[-1]} -> {args.out}")
    return 0 if records else 1


def make_model(args: argparse.Namespace) -> int:
    tokdir = Path(args.tokenizer)
    model = random_model(tokdir, args.shape, args.dtype)
    save_model(model, tokdir, Path(args.out))
    print(f"{args.shape} with random weights ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{args.dtype}) -> {args.out}")
    return 0


# --- train ------------------------------------------------------------------------------------


def split_records(data: Path, tokdir: Path, work: Path, train_records: int = 0) -> tuple[Path, list[Any], Any, str]:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.data import check_file, record_prompt, split_items

    tok = load_tokenizer(tokdir)
    template = tok.chat_template
    rep = check_file(str(data), tok, template, 1024)
    train, held = split_items(rep.records, HELDOUT / max(1, len(rep.records)), 42, key=record_prompt)
    if train_records > 0:
        train = train[:train_records]
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps({"messages": r.messages}, ensure_ascii=False) + "\n" for r in train),
                          encoding="utf-8")
    return train_file, held[:HELDOUT], tok, template


def heldout_loss(model: Any, tok: Any, template: str, records: list[Any]) -> float:
    """Mean NLL per assistant token (answer + end-of-turn) over `records`, batch 1, bf16 autocast on CUDA."""
    import contextlib

    import torch

    from ragtune.train.recipe import encode

    enc = encode(records, tok, template, 1024)
    dev = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    was = model.training
    model.eval()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for ids, labels in zip(enc["input_ids"], enc["labels"]):
            logits = model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0, :-1].float()
            y = torch.tensor(labels[1:], device=dev)
            m = y != -100
            total += torch.nn.functional.cross_entropy(logits[m], y[m], reduction="sum").item()
            count += int(m.sum())
    model.train(was)
    return total / max(count, 1)


class Timer:
    """A TrainerCallback: time and the trainer's token count at every step end (after a CUDA sync),
    and the held-out loss when training ends."""

    def __init__(self, tok: Any, template: str, held: list[Any], profile_at: int = 0):
        from transformers import TrainerCallback

        self.rows: list[tuple[float, int]] = []
        self.trainer: Any = None
        self.heldout: float | None = None
        self.peak: float | None = None
        self.profiler: Any = None
        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync()
                outer.rows.append((time.perf_counter(), int(outer.trainer.tokens_seen)))
                if profile_at and len(outer.rows) == profile_at:  # --profile: the next 3 steps
                    import torch

                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    outer.profiler = torch.profiler.profile(activities=acts)
                    outer.profiler.__enter__()
                elif outer.profiler is not None and len(outer.rows) == profile_at + 3:
                    outer.profiler.__exit__(None, None, None)
                    table = outer.profiler.key_averages()
                    for key in ("self_cuda_time_total", "self_cpu_time_total"):
                        try:
                            print(f"== profile of 3 steps, by {key}\n" + table.table(sort_by=key, row_limit=25),
                                  file=sys.stderr, flush=True)
                        except Exception as exc:  # noqa: BLE001 - a key the build lacks (no CUDA)
                            print(f"(no {key}: {exc})", file=sys.stderr)
                    outer.profiler = None

            def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                outer.peak = peak_gb()
                outer.heldout = heldout_loss(model, tok, template, held)

        self.callback = CB()

    def result(self, warmup: int) -> dict[str, Any]:
        w = min(warmup, len(self.rows) - 2)
        (t0, n0), (t1, n1) = self.rows[w], self.rows[-1]
        return {"steps": len(self.rows), "timed_steps": len(self.rows) - 1 - w, "tokens": n1 - n0,
                "seconds": round(t1 - t0, 3), "tokens_per_second": round((n1 - n0) / (t1 - t0), 1),
                "heldout_loss": round(self.heldout, 4) if self.heldout is not None else None,
                "peak_memory_gb": self.peak}


def count_tokens(inputs: Any) -> int:
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())  # padding-free batches hold no padding


def run_ragtune(variant: str, shape: str, args: argparse.Namespace, train_file: Path, timer: Timer,
                work: Path) -> dict[str, Any]:
    import ragtune.train.recipe as recipe
    from ragtune.config import load_config
    from ragtune.runcard import read_runcard

    tokdir = Path(args.tokenizer)
    model_path = tokdir
    extra = {"ragtune-gc": ["train.gradient_checkpointing=on"], "ragtune-nokernels": ["train.kernels=none"],
             "ragtune-packing": ["train.packing=true"], "ragtune-qlora": ["train.qlora=true"]}.get(variant, [])
    if variant == "ragtune-qlora":  # bitsandbytes quantizes while loading: the real loader, from a saved copy
        import shutil

        import torch

        model = random_model(tokdir, shape)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        shm = Path("/dev/shm")
        where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * size else work
        model_path = save_model(model, tokdir, where / f"bench-{shape}-{os.getpid()}")
        del model

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        recipe.load_base_model = lambda cfg, base, dev: random_model(tokdir, shape)
    make_cb, make_cls = recipe.make_callbacks, recipe.make_trainer_class
    recipe.make_callbacks = lambda *a, **k: [*make_cb(*a, **k), timer.callback]

    def trainer_class() -> type:
        base = make_cls()

        class Timed(base):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, **k)
                timer.trainer = self

        return Timed

    recipe.make_trainer_class = trainer_class
    out = work / "out"
    cfg = load_config(None, [
        f"model.path={model_path}", f"data.train_file={train_file}", "data.max_length=1024",
        "data.eval_fraction=0.0", f"train.output_dir={out}", f"train.max_steps={args.steps or -1}", "train.epochs=1",
        f"train.learning_rate={args.lr}", "train.batch_size=8", f"train.lora.r={LORA['r']}",
        f"train.lora.alpha={LORA['alpha']}", f"train.lora.dropout={LORA['dropout']}", "train.save_steps=100000",
        "train.logging_steps=1", "train.seed=42", "train.warmup_ratio=0.0", "train.lr_scheduler=linear", *extra])
    recipe.run_train(cfg, overwrite=True)
    card = read_runcard(out)["training"]
    return {"dtype": card["dtype"], "gradient_checkpointing": card["gradient_checkpointing"],
            "kernels": card.get("kernels"), "packing": card["packing"], "loss": "assistant tokens (compact head)"}


def run_trl(variant: str, shape: str, args: argparse.Namespace, train_file: Path, timer: Timer,
            work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokdir = Path(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(str(tokdir), local_files_only=True)
    rows = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    ds = Dataset.from_list(rows)
    cuda = device() == "cuda"
    cfg = SFTConfig(output_dir=str(work / "trl"), bf16=cuda, use_cpu=not cuda, per_device_train_batch_size=8,
                    max_length=1024, max_steps=args.steps or -1, num_train_epochs=1, learning_rate=args.lr,
                    lr_scheduler_type="linear",
                    seed=42, save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True,
                    packing=variant != "trl-defaults", use_liger_kernel="liger" in variant,
                    gradient_checkpointing=not variant.endswith("-nogc"))

    class Counted(SFTTrainer):
        tokens_seen = 0

        def compute_loss(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            if model.training:
                self.tokens_seen += count_tokens(inputs)
            return super().compute_loss(model, inputs, *a, **k)

    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counted(model=random_model(tokdir, shape), args=cfg, train_dataset=ds, processing_class=tok,
                      peft_config=peft, callbacks=[timer.callback])
    timer.trainer = trainer
    trainer.train()
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "packing": cfg.packing,
            "liger": cfg.use_liger_kernel, "loss": "every token (TRL default)" if not cfg.assistant_only_loss
            else "assistant tokens"}


def train_one(args: argparse.Namespace) -> int:
    """One run (one process): its figures as JSON on the last line of stdout."""
    from ragtune.modeling import set_offline_env

    set_offline_env()
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-cuda-"))
    args.tokenizer = str(shape_dir(Path(args.tokenizer), args.shape, work))
    train_file, held, tok, template = split_records(Path(args.data), Path(args.tokenizer), work, args.train_records)
    timer = Timer(tok, template, held, profile_at=args.warmup + 1 if args.profile else 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run = run_ragtune if args.variant.startswith("ragtune") else run_trl
    how = run(args.variant, args.shape, args, train_file, timer, work)
    res = {"shape": args.shape, "variant": args.variant, **timer.result(args.warmup), **how,
           "wall_seconds": round(time.time() - t0, 1)}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def train_all(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    out = Path(args.json) if args.json else None
    for spec in args.runs.split(","):
        shape, variant = spec.split(":")
        steps = args.steps.get(shape, args.default_steps) if isinstance(args.steps, dict) else args.steps
        cmd = [sys.executable, __file__, "train-one", "--shape", shape, "--variant", variant, "--data", args.data,
               "--tokenizer", args.tokenizer, "--steps", str(steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
               "--train-records", str(args.train_records)] + (["--profile"] if args.profile else [])
        t0 = time.time()
        p = None
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode == 0 and lines:
                res = json.loads(lines[-1][7:])
            else:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                res = {"shape": shape, "variant": variant, "error": f"exit {p.returncode}: " + " | ".join(tail)[-600:]}
        except subprocess.TimeoutExpired:
            res = {"shape": shape, "variant": variant, "error": f"over {args.run_timeout}s"}
        if args.profile and p is not None and "== profile" in (p.stderr or ""):
            prof = p.stderr[p.stderr.index("== profile"):]
            if out:
                out.with_name(f"{out.stem}.{shape}.{variant}.profile.txt").write_text(prof)
            else:
                print(prof)
        res["process_seconds"] = round(time.time() - t0, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if out:
            out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "runs": results}, indent=1) + "\n")
    print_train_table(results)
    return 0 if all("error" not in r for r in results) else 1


def print_train_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'shape':6} {'run':18} {'tokens/s':>9} {'vs liger':>8} {'held-out':>9} {'peak GB':>8} {'gc':>5}  kernels/notes")
    best = {r["shape"]: r["tokens_per_second"] for r in results
            if r.get("variant") == "trl-packing-liger" and "tokens_per_second" in r}
    for r in results:
        if "error" in r:
            print(f"{r['shape']:6} {r['variant']:18} ERROR {r['error'][:160]}")
            continue
        ratio = f"{r['tokens_per_second'] / best[r['shape']]:.2f}x" if r["shape"] in best else "-"
        print(f"{r['shape']:6} {r['variant']:18} {r['tokens_per_second']:9.0f} {ratio:>8} {r['heldout_loss']:9.4f} "
              f"{r['peak_memory_gb'] or 0:8.1f} {str(r.get('gradient_checkpointing'))[:5]:>5}  "
              f"{r.get('kernels') or ('liger' if r.get('liger') else '')} {r.get('dtype', '')}")


def machine() -> str:
    import torch

    import transformers
    import peft
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"trl {trl.__version__}")


# --- decode -----------------------------------------------------------------------------------


def decode(args: argparse.Namespace) -> int:
    from ragtune.modeling import set_offline_env

    set_offline_env()
    import torch
    from transformers import GenerationConfig

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "How many days per week can I work remotely?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    results = []
    for shape in args.shapes.split(","):
        model = random_model(Path(args.tokenizer), shape).eval()
        x = ids.to(model.device)
        n = args.tokens

        def run(static: bool) -> float:
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            if static:
                kw["cache_implementation"] = "static"
            gc = GenerationConfig(**kw)
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(x, generation_config=gc)
            sync()
            assert out.shape[1] == x.shape[1] + n, out.shape
            return n / (time.perf_counter() - t0)

        from ragtune.serve.static_decode import StaticGreedy

        dec = StaticGreedy(model, compile=device() == "cuda")

        def ragtune_static() -> float:
            sync()
            t0 = time.perf_counter()
            got, _ = dec.generate(ids[0].tolist(), n)
            sync()
            assert len(got) == n
            return n / (time.perf_counter() - t0)

        row: dict[str, Any] = {"shape": shape, "tokens": n}
        for name, fn, warm in (("plain_generate", lambda: run(False), 1), ("static_compiled", lambda: run(True), 2),
                               ("ragtune_static", ragtune_static, 2)):
            t0 = time.time()
            for _ in range(warm):
                fn()
            row[f"{name}_warmup_seconds"] = round(time.time() - t0, 1)
            row[name] = round(max(fn() for _ in range(args.repeats)), 1)
        row["speedup"] = round(row["static_compiled"] / row["plain_generate"], 2)
        row["ragtune_speedup"] = round(row["ragtune_static"] / row["plain_generate"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime()),
                                               "runs": results}, indent=1) + "\n")
    print(f"\n{'shape':6} {'plain tok/s':>12} {'generate static':>16} {'speedup':>8} {'ragtune static':>15} {'speedup':>8}")
    for r in results:
        print(f"{r['shape']:6} {r['plain_generate']:12.1f} {r['static_compiled']:16.1f} {r['speedup']:7.2f}x "
              f"{r['ragtune_static']:15.1f} {r['ragtune_speedup']:7.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-data")
    p.add_argument("--deb", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=4000)
    p = sub.add_parser("make-model")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    for name in ("train", "train-one"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True)
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--warmup", type=int, default=3, help="steps not timed (kernel compilation, allocator)")
        p.add_argument("--lr", type=float, default=2e-4)
        p.add_argument("--profile", action="store_true",
                       help="torch.profiler tables of 3 steps after the warm-up (train-one: to stderr; train: "
                            "beside --json as JSON_STEM.SHAPE.RUN.profile.txt, else to stdout)")
        p.add_argument("--train-records", type=int, default=0,
                       help="train on the first N records only (0 = all); with --steps 0, one epoch of them: "
                            "every run sees the same data, so held-out losses compare")
        if name == "train":
            p.add_argument("--runs", required=True, help="SHAPE:RUN,... (see the module doc)")
            p.add_argument("--steps", default="20", help="steps per run: N, or SHAPE=N,SHAPE=N; 0 = one epoch")
            p.add_argument("--run-timeout", type=int, default=300)
            p.add_argument("--json", default="")
        else:
            p.add_argument("--shape", required=True, choices=sorted(SHAPES))
            p.add_argument("--variant", required=True)
            p.add_argument("--steps", type=int, default=20, help="0 = one epoch")
    p = sub.add_parser("decode")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shapes", default="135m,8b")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="")
    args = ap.parse_args()
    if args.cmd == "train":
        if "=" in args.steps:
            args.default_steps = 20
            args.steps = {k: int(v) for k, v in (x.split("=") for x in args.steps.split(","))}
        else:
            args.steps = int(args.steps)
    return {"make-data": make_data, "make-model": make_model, "train": train_all, "train-one": train_one,
            "decode": decode}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
