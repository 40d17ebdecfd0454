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

prepare.py checks and prepares the data, outputs.py writes the metrics, run card and adapter folder;
this module loads the model, builds the Trainer and runs it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError
from ragtune.train.callbacks import make_callbacks
from ragtune.train.checkpoints import (
    RUN_SETTINGS,
    check_checkpoint,
    check_resume_settings,
    checkpoint_step,
    last_complete_checkpoint,
    run_settings,
    say_how_to_resume,
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
from ragtune.train.outputs import (CHECKPOINTS, METRICS, dry_run_plan, output_lock, run_card, run_metrics,
                                   write_adapter)
from ragtune.train.prepare import (  # noqa: F401  (Prepared, PAD_CANDIDATES, template_text_sample: re-exported)
    PAD_CANDIDATES,
    Prepared,
    choose_pad_token,
    encode,
    prepare,
    template_text_sample,
)

log = logging.getLogger(__name__)


# --- run --------------------------------------------------------------------------------------


def _out_state(out: Path) -> tuple[bool, bool]:
    finished = (out / "adapter_config.json").is_file()
    ckpts = out / CHECKPOINTS
    has_ckpt = ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir())
    return finished, has_ckpt


def run_train(cfg: Any, resume: bool = False, overwrite: bool = False, dry_run: bool = False) -> Any:
    """Train a LoRA adapter per `cfg`; return the output folder (adapter + run card). With `dry_run`,
    check and prepare everything, time two batches, and return the plan (a dict) without training or
    writing anything. One run at a time per output folder (`output_lock`): a second is refused at once."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite ask for opposite things: --resume continues the run in "
                         "train.output_dir from its last checkpoint, --overwrite deletes it and starts over; pass one")
    out = Path(cfg.train.output_dir).expanduser().resolve()
    with output_lock(out, enabled=not dry_run and first_process()):
        return _run(cfg, out, resume, overwrite, dry_run)


def _run(cfg: Any, out: Path, resume: bool, overwrite: bool, dry_run: bool) -> Any:
    """run_train's work, under the output folder's lock.

    Steps: check the output folder (`_resume_point`), prepare the data (`prepare`), load the base model
    for training (`_load_for_training`), encode the records (`_encode_sets`), build the Trainer
    (`_sft_args`, `_build_trainer`), train (`_fit`), measure (`run_metrics`), then write the adapter
    folder atomically with its run card (`write_adapter`)."""
    from ragtune.train.rag import RAG_PROMPTS

    t_start = time.time()
    tc = cfg.train
    if cfg.model.adapter:  # set for ask/serve in a shared config, or in the hope of training an adapter further
        log.warning("model.adapter '%s' is not trained further: train makes a new adapter on model.path (to go on "
                    "with an adapter, merge it first, 'ragtune merge ADAPTER --out DIR', and set model.path=DIR; to "
                    "continue an interrupted run, --resume)", cfg.model.adapter)
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
    _check_lora_targets(loaded.model, tc.lora.target_modules)
    sets = _encode_sets(cfg, prep)
    _check_context(loaded.model, sets, cfg.data.max_length, prep.base)
    resume_step = checkpoint_step(resume_from)
    callbacks = [] if dry_run else make_callbacks(ckpt_dir / METRICS, resume_step, _out_state(out)[0])
    trainer, training = _build_trainer(cfg, prep, loaded, sets, ckpt_dir, callbacks)
    if dry_run:
        try:
            return dry_run_plan(trainer, tc, sets.train_enc, sets.n_tokens, sets.n_trained, len(prep.eval_records),
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
    try:  # the final evaluation can take a while: a Ctrl-C in it says how to get the adapter too
        metrics = run_metrics(trainer, result, train_secs, callbacks[0].rows, resume_step, sets.has_eval)
    except KeyboardInterrupt:
        if trainer.is_world_process_zero():
            say_how_to_resume(ckpt_dir, state.global_step, tc.save_steps)
        raise

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
    card = run_card(cfg, prep, metrics, training)
    write_adapter(out, staging, ckpt_dir, prep, card, callbacks[0].rows)
    log.info("wrote %s (%d steps, %.0f tokens/s)", out, state.global_step, metrics["tokens_per_second"] or 0)
    trainer.accelerator.wait_for_everyone()
    return out


def _resume_point(out: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint --resume continues from (None for a new run); refuses to overwrite a run unasked,
    and any folder that holds something other than a run (the finished run replaces the folder whole)."""
    finished, has_ckpt = _out_state(out)
    if out.is_file():
        raise UsageError(f"train.output_dir '{out}' is a file; name a folder for the adapter")
    # hidden ones count too (a .git, a .gitkeep): the folder is replaced whole; only the Finder's own is let go
    others = sorted(p.name for p in out.iterdir() if p.name != ".DS_Store") if out.is_dir() else []
    if others and not (finished or ckpt_dir.is_dir() or (out / "ragtune.json").is_file()):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UsageError(f"train.output_dir '{out}' holds files that are not a ragtune run ({shown}); the finished "
                         "run replaces the folder whole, so they would be deleted: name a new or empty folder")
    if resume:
        resume_from = last_complete_checkpoint(ckpt_dir, remove_incomplete=first_process())
        if resume_from is None:
            again = "with --overwrite instead of --resume" if finished else "without --resume"
            raise UsageError(f"--resume: no checkpoint in '{ckpt_dir}' to continue from; start a new run {again}")
        check_checkpoint(resume_from)
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


def _check_context(model: Any, sets: _Sets, max_length: int, base: Path) -> None:
    """Refuse records longer than the model's context: it has never seen those positions (RoPE past its range),
    so training there teaches at positions serving never reaches well, without a sign in the loss."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None)
    rows = sets.train_enc["input_ids"] + (list(sets.eval_ds["input_ids"]) if sets.eval_ds is not None else [])
    longest = max(map(len, rows), default=0)
    if isinstance(context, int) and 0 < context < longest:
        over = sum(len(r) > context for r in rows)
        raise UsageError(
            f"{over} record{'' if over == 1 else 's'} {'is' if over == 1 else 'are'} longer than the model's context "
            f"(up to {longest} tokens, data.max_length={max_length}; the model takes {context}: max_position_embeddings "
            f"in {base / 'config.json'}); set data.max_length={context} (records are cut there; one whose answer "
            "starts past it is reported invalid) or shorten them")


def _check_lora_targets(model: Any, targets: tuple[str, ...]) -> None:
    """Every train.lora.target_modules name matches a layer of this model, as peft matches a name list (the
    whole module name, or its last dotted parts); refused before anything is written, naming the model's own."""
    import torch

    if list(targets) == ["all-linear"]:
        return
    from transformers.pytorch_utils import Conv1D

    # the layer types peft's LoRA adapts (a whole block such as `mlp` is refused by peft with a traceback)
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D,
             torch.nn.MultiheadAttention)
    layers = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"})
        raise UsageError(
            f"train.lora.target_modules: {', '.join(repr(t) for t in missing)} "
            f"{'matches' if len(missing) == 1 else 'match'} no layer LoRA can adapt in this model; "
            "its linear layers are "
            f"{', '.join(linear) or '(none)'}: name some of them (train.lora.target_modules=[{','.join(linear[:2])}]) "
            "or use all-linear")


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
