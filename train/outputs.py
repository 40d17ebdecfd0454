"""What a training run leaves: its metrics, its run card, and the adapter folder written whole or not
at all (temp + rename); and, for a dry run, the plan it prints instead.

    metrics = run_metrics(trainer, result, train_secs, rows, resume_step, has_eval)
    write_adapter(out, staging, ckpt_dir, prep, run_card(cfg, prep, metrics, training), rows)
    plan = dry_run_plan(trainer, cfg.train, enc, n_tokens, n_trained, n_eval, resume_step, training)
    with output_lock(out): ...                            # one run per output folder; a second is refused
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ragtune.errors import UsageError

from ragtune.train.callbacks import records_per_step
from ragtune.train.checkpoints import whole_run_loss_mean

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def run_metrics(trainer: Any, result: Any, train_secs: float, rows: list[dict[str, Any]], resume_step: int,
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


def run_card(cfg: Any, prep: Any, metrics: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
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


def write_adapter(out: Path, staging: Path, ckpt_dir: Path, prep: Any, card: dict[str, Any],
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


@contextmanager
def output_lock(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `out`'s run lock (an fcntl lock on .ragtune-train-NAME.lock beside it: the folder itself is
    replaced whole at the end) for a run, so a second `ragtune train` into the same folder is refused instead
    of mixing its checkpoints and metrics with the first's. The lock dies with its process; a folder the run
    made only to hold the lock is removed again when the run wrote nothing."""
    import fcntl

    if not enabled:
        yield
        return
    parent = out.parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".ragtune-train-{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise UsageError(f"train.output_dir '{out}' is in use by another 'ragtune train' ({holder or 'running'}); "
                         "wait for it to finish, or set train.output_dir to another folder") from None
    except OSError as exc:  # a file system without locks (some network and FUSE mounts): train unguarded
        os.close(fd)
        log.warning("cannot lock %s (%s): nothing stops a second run into %s meanwhile", path,
                    exc.strerror or exc, out)
        fd = -1
    if fd < 0:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        if made and not out.exists():
            path.unlink(missing_ok=True)
            for p in made:
                try:
                    p.rmdir()
                except OSError:
                    break
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def dry_run_plan(trainer: Any, tc: Any, enc: dict[str, list[list[int]]], n_tokens: int, n_trained: int,
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
