"""LoRA SFT with TRL on chat JSONL: check the data, train, write adapter + run card.

    ragtune train --config configs/train/smollm2-lora.yaml data.train_file=examples/train.jsonl
    python -c "from ragtune.config import load_config; from ragtune.train.recipe import run_train; \
               run_train(load_config('configs/train/smollm2-lora.yaml'))"

What ragtune does on top of a plain `SFTTrainer`:
- data checked first (every problem with its line number); invalid data stops the run unless
  data.skip_invalid;
- loss on assistant tokens only for any chat template (prefix rendering, see template.py), the
  end-of-turn token trained, pad distinct from eos;
- the LM head runs only at trained positions (the vocab projection is ~20% of a small model);
- length-grouped batches (little padding); packing only where the attention honours boundaries;
- device-aware defaults (CPU: fp32, bf16 autocast where the CPU has native bf16, no gradient checkpointing;
  CUDA: bf16 where supported);
- checkpoints in output_dir/checkpoints, `resume` continues from the last one's step, and the
  final folder (adapter, tokenizer + template, ragtune.json, metrics.jsonl, loss.png) appears at
  once (temp + rename).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import CheckFailed, UsageError
from ragtune.train.callbacks import make_callbacks, records_per_step
from ragtune.train.checkpoints import (
    RUN_SETTINGS,
    check_resume_settings,
    checkpoint_step,
    last_complete_checkpoint,
    run_settings,
    say_how_to_resume,
    whole_run_loss_mean,
)
from ragtune.train.compact_loss import install_compact_loss, make_trainer_class
from ragtune.train.device import (
    bf16_autocast,
    first_process,
    fused_kernels,
    gradient_checkpointing,
    load_base_model,
    packing_supported,
    set_threads,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")


@dataclass
class Prepared:
    """Everything resolved before the model is loaded (cheap; also used by the benchmark)."""

    base: Path
    tokenizer: Any
    template: str
    train_records: list[Any]
    eval_records: list[Any]
    train_report: Any
    eval_report: Any | None
    skipped: int
    rag: Any = None  # ragtune.train.rag.RagBuild: the records rebuilt with retrieved sources (data.rag.index)


def _read_template(cfg: Any, tokenizer: Any) -> str:
    from ragtune.train.template import template_of

    if cfg.train.chat_template:
        p = Path(cfg.train.chat_template).expanduser()
        if not p.is_file():
            raise UsageError(f"train.chat_template '{p}' does not exist; give a .jinja file or leave it empty")
        return p.read_text(encoding="utf-8")
    return template_of(tokenizer)


def prepare(cfg: Any, rag_cache: Path | None = None) -> Prepared:
    """Resolve the base model and tokenizer, check the data, split off eval records; with data.rag.index,
    rebuild them as served prompts with retrieved sources (reusing `rag_cache` when it matches)."""
    from ragtune.modeling import load_tokenizer, resolve_model_path
    from ragtune.train.data import check_file, record_prompt, split_items

    if not cfg.data.train_file:
        raise UsageError("no training data: set data.train_file=FILE.jsonl (chat JSONL, one {\"messages\": [...]} per line)")
    base = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    template = _read_template(cfg, tok)
    tok.chat_template = template
    max_len = cfg.data.max_length
    rep = check_file(cfg.data.train_file, tok, template, max_len, dedupe=cfg.data.dedupe)
    for note in (rep.tool_note(), rep.duplicate_note()):
        if note:
            log.warning("%s", note)
    skipped = len(rep.rejected)
    if not rep.records:
        raise CheckFailed(f"no valid training records in {cfg.data.train_file}; nothing was trained:\n{rep.format()}")
    if not rep.ok:
        if not cfg.data.skip_invalid:
            raise CheckFailed(
                f"the training data has problems; nothing was trained:\n{rep.format()}\n"
                f"fix the lines above (or 'ragtune data check {cfg.data.train_file} --write-clean OUT'), "
                f"or pass --skip-invalid to train on the {len(rep.records)} valid records"
            )
        log.warning("skipping %d invalid records of %s (data.skip_invalid)", skipped, cfg.data.train_file)
    if rep.conflicts:
        log.warning("%s", rep.conflict_note())
    cut = rep.stats.get("cut_lines") or []
    if cut:
        log.warning("the answers of %d record(s) of %s are cut at data.max_length=%d (lines %s): their ends and stop "
                    "tokens are not trained", len(cut), cfg.data.train_file, max_len,
                    ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else ""))
    train_records = rep.records
    eval_records: list[Any] = []
    eval_rep = None
    if cfg.data.eval_file:
        eval_rep = check_file(cfg.data.eval_file, tok, template, max_len, dedupe=cfg.data.dedupe)
        if eval_rep.tool_lines:
            log.warning("%s", eval_rep.tool_note())
        if not eval_rep.ok and not cfg.data.skip_invalid:
            raise CheckFailed(f"the eval data has problems; nothing was trained:\n{eval_rep.format()}")
        eval_records = eval_rep.records
        seen = {record_prompt(r) for r in train_records}
        shared = [r.line for r in eval_records if record_prompt(r) in seen]
        if shared:
            lines = ", ".join(map(str, shared[:5])) + (", ..." if len(shared) > 5 else "")
            log.warning("%d of %d eval records ask a question the training data also asks (%s line %s): their eval "
                        "loss measures memory, not generalisation; remove them from one of the files",
                        len(shared), len(eval_records), cfg.data.eval_file, lines)
    elif cfg.data.eval_fraction > 0:
        train_records, eval_records = split_items(train_records, cfg.data.eval_fraction, cfg.train.seed,
                                                  key=record_prompt)
    rag = None
    if cfg.data.rag.index:
        from ragtune.train.rag import apply_rag

        train_records, eval_records, rag = apply_rag(cfg, tok, template, rep, train_records, eval_records, rag_cache)
    return Prepared(base, tok, template, train_records, eval_records, rep, eval_rep, skipped, rag)


def choose_pad_token(tokenizer: Any, template: str) -> str:
    """A pad token distinct from eos, taken from the existing vocabulary (no resize) when possible."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand != eos:
            return cand
    used = {eos, tokenizer.bos_token}
    sample = template_text_sample(tokenizer, template)
    if tokenizer.unk_token and tokenizer.unk_token not in used and tokenizer.unk_token not in sample:
        return tokenizer.unk_token
    for tok_text in tokenizer.get_added_vocab():
        if tok_text not in used and tok_text not in sample:
            return tok_text
    raise UsageError(
        "the tokenizer has no token that can serve as padding distinct from its end-of-sequence token; "
        "add a pad token to the base model's tokenizer (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) "
        "and resize the embeddings), then train again"
    )


def template_text_sample(tokenizer: Any, template: str) -> str:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template)
    except Exception:  # noqa: BLE001 - only a heuristic
        return ""


def encode(records: list[Any], tokenizer: Any, template: str, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids and labels (-100 off the assistant answers), truncated to max_length."""
    from ragtune.train.template import tokenize_conversation

    ids_all, labels_all = [], []
    for r in records:
        enc = getattr(r, "enc", None) or tokenize_conversation(tokenizer, r.messages, template)
        ids = enc.input_ids[:max_length]
        labels = [t if m else -100 for t, m in zip(ids, enc.mask[:max_length])]
        ids_all.append(ids)
        labels_all.append(labels)
    return {"input_ids": ids_all, "labels": labels_all}


# --- run --------------------------------------------------------------------------------------


def _out_state(out: Path) -> tuple[bool, bool]:
    finished = (out / "adapter_config.json").is_file()
    ckpts = out / CHECKPOINTS
    has_ckpt = ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir())
    return finished, has_ckpt


def run_train(cfg: Any, resume: bool = False, overwrite: bool = False, dry_run: bool = False) -> Any:
    """Train a LoRA adapter per `cfg`; return the output folder (adapter + run card). With `dry_run`,
    check and prepare everything, time two batches, and return the plan (a dict) without training or
    writing anything.

    Steps: check the output folder (`_resume_point`), prepare the data (`prepare`), load the base model
    for training (`_load_for_training`), encode the records (`_encode_sets`), build the Trainer
    (`_sft_args`, `_build_trainer`), train (`_fit`), measure (`_run_metrics`), then write the adapter
    folder atomically with its run card (`_write_adapter`)."""
    from ragtune.train.rag import RAG_PROMPTS

    t_start = time.time()
    tc = cfg.train
    out = Path(tc.output_dir).expanduser().resolve()
    ckpt_dir = out / CHECKPOINTS
    existed = {d for d in (out, ckpt_dir) if d.exists()}
    resume_from = _resume_point(out, ckpt_dir, resume, overwrite)
    _quiet_libraries()

    prep = prepare(cfg, rag_cache=ckpt_dir / RAG_PROMPTS if resume else None)
    if overwrite and not resume and not dry_run and ckpt_dir.exists():  # only once the data has passed its check
        shutil.rmtree(ckpt_dir)
    settings = run_settings(cfg, prep)
    if resume:
        check_resume_settings(ckpt_dir, settings)
    loaded = _load_for_training(cfg, prep)
    sets = _encode_sets(cfg, prep)
    resume_step = checkpoint_step(resume_from)
    callbacks = [] if dry_run else make_callbacks(ckpt_dir / METRICS, resume_step)
    trainer, training = _build_trainer(cfg, prep, loaded, sets, ckpt_dir, callbacks)
    if dry_run:
        try:
            return _dry_run_plan(trainer, tc, sets.train_enc, sets.n_tokens, sets.n_trained, len(prep.eval_records),
                                 resume_step, training)
        finally:
            for d in (ckpt_dir, out):  # the Trainer makes its output folder on creation: leave no trace
                if d not in existed and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()

    if not resume and first_process():  # written once the run is sure to start: a refusal leaves no folder
        from ragtune.io import atomic_write_json

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ckpt_dir / RUN_SETTINGS, settings)
        if prep.rag is not None:
            prep.rag.write(ckpt_dir / RAG_PROMPTS)  # cached with the run: --resume reuses them
    result, train_secs = _fit(trainer, cfg, ckpt_dir, resume_from)
    state = trainer.state
    if resume_from and state.global_step <= resume_step and (tc.max_steps <= 0 or tc.max_steps > resume_step):
        raise UsageError(f"resume from step {resume_step} did not continue (now at step {state.global_step})")
    metrics = _run_metrics(trainer, result, train_secs, callbacks[0].rows, resume_step, sets.has_eval)

    # Every rank takes part in saving (FSDP gathers the sharded weights); rank 0 writes the folder.
    staging = out.parent / f".{out.name}.saving"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:
        # Trainer.save_model writes nothing under SHARDED_STATE_DICT (checkpoints keep using it):
        # gather the full state for the adapter files
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()  # until rank 0 has written the folder
        return out
    metrics["wall_seconds"] = round(time.time() - t_start, 2)
    card = _run_card(cfg, prep, metrics, training)
    _write_adapter(out, staging, ckpt_dir, prep, card, callbacks[0].rows)
    log.info("wrote %s (%d steps, %.0f tokens/s)", out, state.global_step, metrics["tokens_per_second"] or 0)
    trainer.accelerator.wait_for_everyone()
    return out


def _resume_point(out: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint --resume continues from (None for a new run); refuses to overwrite a run unasked,
    and any folder that holds something other than a run (the finished run replaces the folder whole)."""
    finished, has_ckpt = _out_state(out)
    if out.is_file():
        raise UsageError(f"train.output_dir '{out}' is a file; name a folder for the adapter")
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others and not (finished or ckpt_dir.is_dir() or (out / "ragtune.json").is_file()):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UsageError(f"train.output_dir '{out}' holds files that are not a ragtune run ({shown}); the finished "
                         "run replaces the folder whole, so they would be deleted: name a new or empty folder")
    if resume:
        resume_from = last_complete_checkpoint(ckpt_dir, remove_incomplete=first_process())
        if resume_from is None:
            again = "with --overwrite instead of --resume" if finished else "without --resume"
            raise UsageError(f"--resume: no checkpoint in '{ckpt_dir}' to continue from; start a new run {again}")
        return resume_from
    if (finished or has_ckpt) and not overwrite:
        what = "a trained adapter" if finished else "checkpoints of an unfinished run"
        raise UsageError(
            f"train.output_dir '{out}' already holds {what}; pass --resume to continue it, --overwrite to start "
            "over, or set train.output_dir to a new folder"
        )
    return None


def _quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    if not log.isEnabledFor(logging.DEBUG):
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


@dataclass
class _Loaded:
    """The base model made ready to train, and how it will train."""

    model: Any
    device: str
    threads: int
    pad: str
    gradient_checkpointing: bool
    bf16: bool
    fp16: bool
    dtype: str  # as the run card says it: "float32", "nf4 4-bit, bfloat16 compute", ...
    kernels: str = "none"  # fused kernels put in (train.kernels)


def _load_for_training(cfg: Any, prep: Any) -> _Loaded:
    """Base model on its device with the pad token chosen; refuses packing the attention cannot mask."""
    import torch

    from ragtune.modeling import pick_device
    from ragtune.train.template import last_trained_is_stop_token

    tc = cfg.train
    tok, template = prep.tokenizer, prep.template
    if not last_trained_is_stop_token(tok, template):
        log.warning("the chat template ends assistant turns without a special end-of-turn token; the model "
                    "may not learn to stop (give a template that closes turns with one: train.chat_template)")
    device = pick_device(cfg.model.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        # each process of a multi-GPU launch on its own GPU from the start: "cuda" would mean GPU 0 for
        # all of them until the Trainer moves the model (the packing probe runs before that)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = load_base_model(cfg, prep.base, device)
    kernels = fused_kernels(cfg, device, model)
    n_params = sum(p.numel() for p in model.parameters())
    threads = set_threads(tc.threads, n_params) if device == "cpu" else torch.get_num_threads()
    pad = choose_pad_token(tok, template)
    tok.pad_token = pad
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if tc.packing and not packing_supported(model if tc.qlora else model.to(device), tok.pad_token_id):
        raise UsageError(
            f"train.packing=true: this model's attention ({model.config._attn_implementation}) lets packed "
            "examples attend to each other, which would train across examples; set train.packing=false "
            "(length-grouped batches waste little padding) or use an attention implementation that honours "
            "sequence boundaries (flash_attention_2 on CUDA)"
        )
    gc = gradient_checkpointing(cfg, device, model)
    bf16 = bf16_autocast(cfg, device, model.dtype, n_params)
    fp16 = device == "cuda" and model.dtype == torch.float16
    dtype = str(model.dtype).replace("torch.", "")  # before QLoRA's preparation casts norms to float32
    if tc.qlora:
        dtype = f"nf4 4-bit, {dtype} compute"
    elif bf16 and model.dtype != torch.bfloat16:
        dtype = f"{dtype} weights, bfloat16 autocast"
    log.info("base %s (%.0fM params) on %s, %s, threads %d, gradient checkpointing %s",
             prep.base, n_params / 1e6, device, dtype, threads, gc)
    if tc.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    return _Loaded(model, device, threads, pad, gc, bf16, fp16, dtype, kernels)


@dataclass
class _Sets:
    """The encoded training and eval records."""

    train_enc: dict[str, list[list[int]]]
    train_ds: Any
    eval_ds: Any
    n_tokens: int  # tokens per epoch
    n_trained: int  # of them, the ones with a loss (assistant turns)

    @property
    def has_eval(self) -> bool:
        return self.eval_ds is not None and len(self.eval_ds) > 0


def _encode_sets(cfg: Any, prep: Any) -> _Sets:
    from datasets import Dataset

    tok, template = prep.tokenizer, prep.template
    train_enc = encode(prep.train_records, tok, template, cfg.data.max_length)
    n_tokens = sum(map(len, train_enc["input_ids"]))
    n_trained = sum(len(row) - row.count(-100) for row in train_enc["labels"])
    log.info("data: %d training records (%s tokens per epoch, %s of them trained), %d eval records%s",
             len(prep.train_records), f"{n_tokens:,}", f"{n_trained:,}", len(prep.eval_records),
             f", {prep.skipped} invalid skipped" if prep.skipped else "")
    eval_ds = (Dataset.from_dict(encode(prep.eval_records, tok, template, cfg.data.max_length))
               if prep.eval_records else None)
    return _Sets(train_enc, Dataset.from_dict(train_enc), eval_ds, n_tokens, n_trained)


def _sft_args(cfg: Any, ckpt_dir: Path, loaded: _Loaded, has_eval: bool) -> Any:
    """TRL's SFTConfig from ragtune's settings."""
    from trl import SFTConfig

    tc = cfg.train
    steps_or_epoch = lambda n: ("steps", n) if n > 0 else ("epoch", 500)  # noqa: E731
    eval_strategy, eval_steps = steps_or_epoch(tc.eval_steps) if has_eval else ("no", 500)
    save_strategy, save_steps = steps_or_epoch(tc.save_steps)
    return SFTConfig(
        output_dir=str(ckpt_dir),
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,
        weight_decay=tc.weight_decay,
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        max_length=cfg.data.max_length,
        packing=tc.packing,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=tc.save_total_limit if tc.save_total_limit > 0 else None,
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        seed=tc.seed,
        use_cpu=loaded.device == "cpu",
        bf16=loaded.bf16,
        fp16=loaded.fp16,
        gradient_checkpointing=loaded.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if tc.group_by_length and not tc.packing else "random",
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",  # kept in trainer_state.json: --resume counts the whole run
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a graph walk
    )


def _build_trainer(cfg: Any, prep: Any, loaded: _Loaded, sets: _Sets, ckpt_dir: Path,
                   callbacks: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The Trainer (LoRA on the chosen modules, the compact loss installed), and how it trains (for the run card)."""
    from peft import LoraConfig as PeftLoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    tc = cfg.train
    target = list(tc.lora.target_modules)
    peft_config = PeftLoraConfig(
        r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
        target_modules="all-linear" if target == ["all-linear"] else target, task_type="CAUSAL_LM")
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(model=loaded.model, args=_sft_args(cfg, ckpt_dir, loaded, sets.has_eval),
                          train_dataset=sets.train_ds, eval_dataset=sets.eval_ds, processing_class=prep.tokenizer,
                          peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    inner = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    trainer.compact_loss = install_compact_loss(inner)
    training = {  # how it trains: the run card's "training", and the dry run's plan
        "device": loaded.device,
        "dtype": loaded.dtype,
        "threads": loaded.threads,
        "gradient_checkpointing": loaded.gradient_checkpointing,
        "kernels": loaded.kernels,
        "pad_token": loaded.pad,
        "assistant_only_loss": "prefix-rendered assistant spans (answer + end-of-turn token)",
        "compact_lm_head": trainer.compact_loss,
        "packing": tc.packing,
        "group_by_length": tc.group_by_length and not tc.packing,
    }
    return trainer, training


def _fit(trainer: Any, cfg: Any, ckpt_dir: Path, resume_from: str | None) -> tuple[Any, float]:
    """trainer.train, with how to resume after Ctrl-C and what to change after running out of GPU memory."""
    import torch

    tc = cfg.train
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        if trainer.is_world_process_zero():
            say_how_to_resume(ckpt_dir, trainer.state.global_step, tc.save_steps)
        raise
    except torch.OutOfMemoryError as exc:
        raise UsageError(
            f"out of GPU memory at train.batch_size={tc.batch_size}, data.max_length={cfg.data.max_length}: lower "
            "train.batch_size (raise train.grad_accum to keep the effective batch), lower data.max_length, or set "
            "train.gradient_checkpointing=on" + ("" if tc.qlora else " or train.qlora=true")
            + ("; continue from the last checkpoint with --resume"
               if last_complete_checkpoint(ckpt_dir) else "")
        ) from exc
    return result, time.time() - t0


def _run_metrics(trainer: Any, result: Any, train_secs: float, rows: list[dict[str, Any]], resume_step: int,
                 has_eval: bool) -> dict[str, Any]:
    """The run card's metrics, for the whole run (a resumed one included)."""
    state = trainer.state
    # Trainer's clock includes the evaluations run during training: take them out of tokens/s
    in_loop_eval = sum(r.get("eval_runtime", 0.0) for r in rows if resume_step < r["step"] <= state.global_step)
    runtime = max(1e-9, float(result.metrics.get("train_runtime", train_secs)) - in_loop_eval)
    eval_loss = None
    if has_eval:
        last = [r for r in state.log_history if "eval_loss" in r]  # the same on every rank
        if last and last[-1].get("step") == state.global_step:
            eval_loss = float(last[-1]["eval_loss"])
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])
    tokens = _gather_sum(trainer, trainer.tokens_seen)  # this segment's (the rate); the whole run's below
    run_tokens = int(state.num_input_tokens_seen or 0) or tokens
    train_losses = [r["loss"] for r in rows if "loss" in r]
    tail = train_losses[-max(1, len(train_losses) // 10):] if train_losses else []
    return {
        "train_loss": sum(tail) / len(tail) if tail else None,
        "train_loss_mean": whole_run_loss_mean(rows, resume_step, float(result.training_loss), state.global_step),
        "eval_loss": eval_loss,
        "train_tokens": run_tokens,
        "tokens_per_second": tokens / runtime if runtime > 0 else None,
        "wall_seconds": None,  # set by run_train: its whole wall time
        "train_seconds": round(runtime, 2),
        "steps": state.global_step,
        "resumed_from_step": resume_step or None,
    }


def _run_card(cfg: Any, prep: Any, metrics: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    from ragtune import __version__
    from ragtune.config import to_dict
    from ragtune.modeling import file_sha256, model_hash, text_sha256
    from ragtune.train.data import shared_system_prompt

    card = {
        "ragtune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"path": str(prep.base), "hash": model_hash(prep.base)},
        "chat_template": {"template": prep.template, "hash": text_sha256(prep.template)},
        "system_prompt": shared_system_prompt(prep.train_report.records),  # as in the file; serving adds it by default
        "config": to_dict(cfg, secrets=False),  # a run card travels with its adapter: no keys in it
        "data": {
            "train_file": str(Path(cfg.data.train_file).resolve()),
            "train_sha256": file_sha256(cfg.data.train_file),
            "train_records": len(prep.train_records),
            "eval_file": str(Path(cfg.data.eval_file).resolve()) if cfg.data.eval_file else "",
            "eval_records": len(prep.eval_records),
            "skipped_records": prep.skipped,
        },
        "metrics": metrics,
        "training": training,
        "exports": [],
    }
    if prep.rag is not None:
        card["rag"] = prep.rag.block()
    return card


def _write_adapter(out: Path, staging: Path, ckpt_dir: Path, prep: Any, card: dict[str, Any],
                   rows: list[dict[str, Any]]) -> None:
    """The output folder, whole or not at all: adapter, tokenizer, template, run card, metrics, loss plot."""
    from ragtune.io import atomic_dir
    from ragtune.runcard import repoint_adapter, write_runcard
    from ragtune.train.plots import plot_losses
    from ragtune.train.rag import RAG_PROMPTS

    with atomic_dir(out) as tmp:
        for item in staging.iterdir():
            os.replace(item, tmp / item.name)
        staging.rmdir()
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run card holds the config
        repoint_adapter(tmp, prep.base)
        prep.tokenizer.save_pretrained(str(tmp))
        (tmp / "chat_template.jinja").write_text(prep.template, encoding="utf-8")
        write_runcard(tmp, card)
        if prep.rag is not None:
            prep.rag.write(tmp / RAG_PROMPTS)
        shutil.copyfile(ckpt_dir / METRICS, tmp / METRICS)
        plot_losses(rows, tmp / "loss.png")
        if ckpt_dir.exists():
            os.replace(ckpt_dir, tmp / CHECKPOINTS)


def _dry_run_plan(trainer: Any, tc: Any, enc: dict[str, list[list[int]]], n_tokens: int, n_trained: int,
                  n_eval: int, resume_step: int, training: dict[str, Any]) -> dict[str, Any]:
    """What `train` would do: steps, tokens, trainable parameters, and a time estimate from timed batches."""
    import math

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous

    args = trainer.args
    loader = trainer.get_train_dataloader()
    updates_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * updates_per_epoch)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    batches = iter(loader)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by the training loop
    seconds_per_token = None
    if trainer.args.world_size == 1:  # time forward + backward on real batches (the first warms up)
        for i in range(2):
            batch = next(batches, None)
            if batch is None:
                break
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
            sync()
            t0 = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            sync()
            trainer.model.zero_grad(set_to_none=True)
            if i == 1 or seconds_per_token is None:
                seconds_per_token = (time.perf_counter() - t0) / max(tokens, 1)
    epochs = steps / updates_per_epoch
    left = max(0, steps - resume_step) / steps
    estimate = seconds_per_token * n_tokens * epochs * left if seconds_per_token else None
    return {
        "train_records": len(enc["input_ids"]), "eval_records": n_eval, "tokens_per_epoch": n_tokens,
        "trained_tokens_per_epoch": n_trained, "steps": steps, "resume_from_step": resume_step or None,
        "epochs": round(epochs, 3), "records_per_step": records_per_step(args),
        "trainable_parameters": trainable, "total_parameters": total,
        "estimated_train_seconds": estimate,
        "training": training,
    }


def _gather_sum(trainer: Any, n: int) -> int:
    import torch

    if trainer.accelerator.num_processes <= 1:
        return n
    t = torch.tensor([n], device=trainer.accelerator.device)
    return int(trainer.accelerator.gather(t).sum())
