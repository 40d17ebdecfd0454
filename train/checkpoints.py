"""Checkpoints and --resume: which checkpoint is whole, which settings a resumed run must keep, and
the run's figures over every segment.

    from ragtune.train.checkpoints import last_complete_checkpoint, run_settings, check_resume_settings
    last = last_complete_checkpoint(out / "checkpoints", remove_incomplete=True)
    check_checkpoint(last)                                                 # UsageError when its files are damaged
    check_resume_settings(out / "checkpoints", run_settings(cfg, prep))   # UsageError naming each change

Failure modes: kill -9 while the Trainer saves leaves a checkpoint folder without its
trainer_state.json (skipped, never resumed from); resuming under other data, model or optimizer
settings would silently mix two runs (refused, with the settings that differ).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError

log = logging.getLogger(__name__)

RUN_SETTINGS = "ragtune-run.json"  # in checkpoints/: the settings --resume must keep
# what --resume may change; everything else in model/data/train would make the restored optimizer,
# scheduler and data order silently disagree with the run it continues
RESUME_MAY_CHANGE = frozenset({
    "model.device", "model.adapter", "data.skip_invalid", "train.output_dir", "train.epochs", "train.max_steps",
    "train.eval_steps", "train.save_steps", "train.logging_steps", "train.save_total_limit", "train.threads",
    "train.gradient_checkpointing", "train.mixed_precision",
})


def run_settings(cfg: Any, prep: Any) -> dict[str, Any]:
    """The settings a run's checkpoints belong to, flattened (files by content, not by name)."""
    from ragtune.config import flat_settings
    from ragtune.modeling import cached_file_sha256, model_hash, text_sha256

    flat = {k: v for k, v in flat_settings(cfg).items()
            if k.split(".", 1)[0] in ("model", "data", "train") and k not in RESUME_MAY_CHANGE}
    flat["model.path"] = "sha256:" + model_hash(prep.base)  # the base's content: it may move, not change
    flat["data.train_file"] = "sha256:" + cached_file_sha256(cfg.data.train_file)
    flat["data.eval_file"] = "sha256:" + cached_file_sha256(cfg.data.eval_file) if cfg.data.eval_file else ""
    flat["train.chat_template"] = "sha256:" + text_sha256(prep.template)
    if prep.rag is not None:  # the sources the prompts were built from: a changed index is a changed input
        flat["data.rag.index_identity"] = prep.rag.index["identity"]
        # the rag.* settings that shape the built prompts (checkpoints from before they were recorded: not compared)
        flat.update({"rag.question_first": cfg.rag.question_first, "rag.system_prompt": cfg.rag.system_prompt})
        if not cfg.data.rag.top_k:  # the sources per prompt come from rag.top_k
            flat["rag.top_k"] = cfg.rag.top_k
        # and the search that chose them (mode, fusion, reranker, dedupe, ...; not search.top_k, which the
        # training's retrieval does not read): the same rule
        flat.update({k: v for k, v in flat_settings(cfg).items() if k.startswith("search.") and k != "search.top_k"})
    return json.loads(json.dumps(flat))


def check_resume_settings(ckpt_dir: Path, now: dict[str, Any]) -> None:
    """Refuse --resume under settings other than the checkpoints' own (older checkpoints carry none: not checked)."""
    path = ckpt_dir / RUN_SETTINGS
    if not path.is_file():
        return
    try:
        then = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        then = None
    if not isinstance(then, dict):
        raise UsageError(f"--resume: '{path}' (the settings the checkpoints belong to) is damaged, so the run cannot "
                         "be checked to continue as it began; start a new run with --overwrite")
    if not str(then.get("model.path", "")).startswith("sha256:"):  # older checkpoints recorded the path: not compared
        then["model.path"] = now.get("model.path")
    show = lambda v: "(none)" if v is None else (v[:19] + "..." if isinstance(v, str) and v.startswith("sha256:")  # noqa: E731
                                                else json.dumps(v, ensure_ascii=False))
    diffs = [f"{k}: {show(then.get(k))} in the checkpoints, {show(now.get(k))} now"
             for k in sorted(set(then) | set(now))
             if then.get(k) != now.get(k) and not (k.startswith(("rag.", "search.")) and k not in then)]
    if diffs:
        raise UsageError(
            f"--resume: the checkpoints in '{ckpt_dir}' belong to a run with other settings:\n  " + "\n  ".join(diffs)
            + "\nresume with the original settings (only epochs, max_steps, eval/save/logging steps, save_total_limit, "
            "threads, gradient checkpointing and the device may change), or start a new run with --overwrite"
        )


def say_how_to_resume(ckpt_dir: Path, step: int, save_steps: int) -> None:
    last = last_complete_checkpoint(ckpt_dir)
    if last:
        log.warning("stopped at step %d; %s is kept: run the same command with --resume to continue from it",
                    step, last)
    else:
        every = f"every {save_steps} steps" if save_steps > 0 else "at the end of each epoch"
        log.warning("stopped at step %d, before the first checkpoint (saved %s: train.save_steps); nothing to resume",
                    step, every)


def last_complete_checkpoint(ckpt_dir: Path, remove_incomplete: bool = False) -> str | None:
    """The newest checkpoint that was saved to the end, or None.

    The Trainer writes a checkpoint's trainer_state.json after its weights, optimizer, scheduler and RNG
    state: a folder without a readable one was cut off while saving (kill -9, a full disk). Those are
    skipped with a warning (and removed with `remove_incomplete`, as --resume does: the run saves them
    again when it gets there)."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for p in ckpt_dir.iterdir():
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and p.name.startswith("checkpoint-") and step.isdigit():
            found.append((int(step), p))
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
            return str(p)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("checkpoint %s is incomplete (interrupted while it was being saved)%s", p,
                        ": removed; resuming from the one before it" if remove_incomplete else "; skipped")
            if remove_incomplete:
                shutil.rmtree(p, ignore_errors=True)
    return None


def check_checkpoint(path: str) -> None:
    """Refuse to resume from a checkpoint whose files are damaged (a bad disk, a cut copy, an edit): the
    Trainer would stop on it with a traceback from safetensors or torch.load. Weights are checked to be whole
    safetensors files, and the optimizer, scheduler and RNG states whole archives (every member's CRC)."""
    import zipfile

    from safetensors import safe_open

    ckpt = Path(path)
    for f in sorted(ckpt.iterdir()):
        problem = ""
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):
                    pass
            elif f.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                    problem = f"member {bad} fails its checksum" if bad else ""
        except Exception as exc:  # noqa: BLE001 - safetensors and zipfile each raise their own kinds
            problem = str(exc).strip() or type(exc).__name__
        if problem:
            earlier = sorted((p for p in ckpt.parent.glob("checkpoint-*")
                              if p.name.removeprefix("checkpoint-").isdigit()
                              and int(p.name.removeprefix("checkpoint-")) < checkpoint_step(path)),
                             key=lambda p: int(p.name.removeprefix("checkpoint-")))
            how = (f"delete '{ckpt}' and run the same command again to resume from {earlier[-1].name}" if earlier
                   else f"delete '{ckpt}' and start over with --overwrite")
            raise UsageError(f"--resume: checkpoint '{ckpt}' is damaged ({f.name}: {problem}); {how}")


def whole_run_loss_mean(rows: list[dict[str, Any]], resume_step: int, segment_mean: float, last_step: int) -> float:
    """Mean training loss over every step of the run: after --resume, the steps before it (from the
    logged losses, each weighing the steps it averages) with this segment's exact mean."""
    if not resume_step:
        return segment_mean
    done, prev = 0.0, 0
    for r in rows:
        if "loss" in r and prev < r["step"] <= resume_step:
            done += float(r["loss"]) * (r["step"] - prev)
            prev = r["step"]
    if prev == 0 or last_step <= 0:
        return segment_mean
    return (done + segment_mean * (last_step - resume_step)) / (prev + last_step - resume_step)


def checkpoint_step(path: str | None) -> int:
    if not path:
        return 0
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return int(Path(path).name.rsplit("-", 1)[-1])
