"""Training callbacks: metrics.jsonl as it happens (kept across --resume) and one progress bar.

    from ragtune.train.callbacks import make_callbacks
    trainer = SFTTrainer(..., callbacks=make_callbacks(ckpt_dir / "metrics.jsonl", resume_step))
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ragtune.train.device import first_process

log = logging.getLogger(__name__)


def records_per_step(args: Any) -> int:
    """Records in one optimizer step, over every process."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def make_callbacks(metrics_path: Path, resume_step: int, finished: bool = False) -> list[Any]:
    """`finished`: the output folder already holds the run's adapter (a --resume of it must train on)."""
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Append every log record to metrics.jsonl as it happens (kept across --resume)."""

        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            if not first_process():
                return  # the first process alone reads and writes the file (others raced it empty on resume)
            if metrics_path.is_file() and resume_step > 0:
                damaged = 0
                for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
                        damaged += bool(line.strip())  # a line cut short by a kill while it was appended
                    elif row.get("step", 0) <= resume_step:
                        self.rows.append(row)
                if damaged:
                    log.warning("%s: %d damaged line%s left out (cut short when the run was killed?)", metrics_path,
                                damaged, "" if damaged == 1 else "s")
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self.rows.append(row)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class Progress(TrainerCallback):
        """One progress bar with the latest loss (a log line every 10 s when stderr is not a terminal)."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.last = 0.0
            self.post: dict[str, str] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                model = kw.get("model")
                lora = ""
                if hasattr(model, "get_nb_trainable_parameters"):
                    trainable, total = model.get_nb_trainable_parameters()
                    lora = f"; LoRA trains {trainable / 1e6:.2f}M parameters ({100 * trainable / max(total, 1):.2f}%)"
                span = "train.max_steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
                log.info("training %d step%s (%s, %d records per step)%s", state.max_steps,
                         "" if state.max_steps == 1 else "s", span, records_per_step(args), lora)
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                file=sys.stderr, disable=None, dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last steps' loss, not the last logging_steps multiple's
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.bar is None or not logs:
                return
            for k in ("loss", "eval_loss"):
                if k in logs:
                    self.post[k] = f"{logs[k]:.4f}"
            self.bar.set_postfix(self.post, refresh=False)
            now = {k: self.post[k] for k in ("loss", "eval_loss") if k in logs}  # this step's, not stale ones
            last_step = state.global_step >= state.max_steps
            if self.bar.disable and now and (time.time() - self.last > 10 or "eval_loss" in logs or last_step):
                self.last = time.time()
                log.info("step %d/%d %s", state.global_step, state.max_steps,
                         " ".join(f"{k} {v}" for k, v in now.items()))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    class NothingLeft(TrainerCallback):
        """Refuse a --resume of a finished run whose last checkpoint has reached the run's length: the Trainer
        would train one step past it and rewrite the adapter. (A run stopped after its last step, before its
        adapter was written, goes on: that extra step is the way to its adapter.)"""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if finished and resume_step and state.global_step >= state.max_steps:
                from ragtune.errors import UsageError

                span = (f"train.max_steps={args.max_steps}" if args.max_steps > 0
                        else f"train.epochs={args.num_train_epochs:g}")
                raise UsageError(
                    f"--resume: the last checkpoint is at step {state.global_step} and this run is {state.max_steps} "
                    f"steps long ({span}): nothing is left to train; raise train.max_steps or train.epochs to train "
                    "further (the output folder is unchanged)")

    return [MetricsFile(), Progress(), NothingLeft()]
