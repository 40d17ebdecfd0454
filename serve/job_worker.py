"""The process that trains one fine-tuning job, started by `ragtune serve` (serve/jobs.py):

    python -m ragtune.serve.job_worker $RAGTUNE_HOME/jobs/ftjob-...

It holds the job's `worker.lock` for its whole life, writes `running`, trains with `run_train` (the
same code as `ragtune train`: run card, metrics.jsonl, loss.png, checkpoints) into the job's `run/`
folder, turns the logged losses into metrics events as they appear, and writes its end: trained
(the result, see below), failed (with OpenAI's error object) or cancelled.

SIGTERM stops the training at once (between two torch operations): with the job's `cancel` file
present the job ends cancelled, without it failed (the server stopped). The adapter folder is
written whole at the very end (temp + rename) and a stop before then leaves none; a stop while the
folder is being written removes the unfinished copy. When the server process dies, the worker
notices within a second and stops the same way; should that stop not begin within STOP_GRACE_S
(20 s; env RAGTUNE_WORKER_STOP_GRACE_S), the job is marked failed from the watchdog thread and the
process ends. A finished run leaves its result in the state's private block and exits; the server
adds the model to what it serves and only then marks the job succeeded, so a client that sees
`succeeded` can use `fine_tuned_model` at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ragtune.serve.job_store import CANCEL, LOCK, PRIVATE, RUN, JobStore, ft_model_name

log = logging.getLogger("ragtune.serve.job_worker")

POLL_S = 0.5


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM (a BaseException: no `except Exception` in the Trainer swallows it)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below must not be cut short
    raise Stopped()


GRACE_ENV = "RAGTUNE_WORKER_STOP_GRACE_S"


def _stop_grace() -> float:
    """STOP_GRACE_S: 20 s, or env RAGTUNE_WORKER_STOP_GRACE_S (seconds; tests shorten it)."""
    try:
        grace = float(os.environ.get(GRACE_ENV) or 20.0)
    except ValueError:
        grace = -1.0
    if not 0 < grace < float("inf"):
        log.warning("%s=%r is not a positive number of seconds: using 20", GRACE_ENV, os.environ.get(GRACE_ENV))
        return 20.0
    return grace


STOP_GRACE_S = _stop_grace()
_STOPPING = threading.Event()  # set where the main thread begins its clean-up after Stopped


def _watch_parent(ppid: int, store: JobStore, job_id: str, job_dir: Path) -> None:
    """Stop this worker when the server that started it is gone (its parent changes). SIGTERM raises Stopped
    in the main thread; should that not begin the clean-up within STOP_GRACE_S (the exception lost in a
    library's handler, the main thread stuck in native code), the job is marked stopped from here and the
    process ends, rather than train on with no server."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            log.warning("the server (pid %d) is gone: stopping", ppid)
            os.kill(os.getpid(), signal.SIGTERM)
            if not _STOPPING.wait(STOP_GRACE_S):
                log.error("the training did not stop within %.0f s of SIGTERM: ending the worker", STOP_GRACE_S)
                try:
                    _stopped(store, job_id, job_dir)
                finally:
                    os._exit(1)
            return


class MetricsEvents:
    """Tail run/checkpoints/metrics.jsonl (appended by run_train as it logs) into metrics events."""

    def __init__(self, store: JobStore, job_id: str, metrics: Path):
        self.store, self.job_id, self.metrics = store, job_id, metrics
        self.offset = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            self.flush()

    def flush(self) -> None:
        try:
            with open(self.metrics, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row or "eval_loss" in row:
                step = int(row.get("step", 0))
                parts = [f"training loss={row['loss']:.4f}"] if "loss" in row else []
                if "eval_loss" in row:
                    parts.append(f"validation loss={row['eval_loss']:.4f}")
                data_ = {"step": step, "epoch": row.get("epoch"), "train_loss": row.get("loss"),
                         "valid_loss": row.get("eval_loss")}
                self.store.event(self.job_id, f"Step {step}: " + ", ".join(parts), type_="metrics", data=data_)


def main(argv: list[str] | None = None) -> int:
    import fcntl

    from ragtune.modeling import set_offline_env

    set_offline_env()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ragtune.serve.job_worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(args[0]).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = JobStore(job_dir.parent)
    job_id = job_dir.name
    lock = os.open(job_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.error("another worker holds %s", job_dir / LOCK)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_watch_parent, args=(os.getppid(), store, job_id, job_dir), daemon=True).start()
    try:
        job = store.get(job_id)
        if job["status"] != "queued" or (job_dir / CANCEL).exists():
            log.info("job %s is %s: nothing to do", job_id, job["status"])
            return 0
        job[PRIVATE]["worker_pid"] = os.getpid()
        store.put({**job, "status": "running"})
        store.event(job_id, "Fine-tuning job started")
        return run(store, job_id, job_dir)
    except Stopped:  # before training began
        _STOPPING.set()
        _stopped(store, job_id, job_dir)
        return 0


def run(store: JobStore, job_id: str, job_dir: Path) -> int:
    from ragtune.config import load_config
    from ragtune.errors import RagtuneError
    from ragtune.train.recipe import run_train

    events = MetricsEvents(store, job_id, job_dir / RUN / "checkpoints" / "metrics.jsonl")
    tail = threading.Thread(target=events.run, daemon=True)
    tail.start()
    try:
        cfg = load_config(job_dir / "config.yaml")
        out = run_train(cfg, overwrite=True)
    except Stopped:
        _STOPPING.set()
        events.stop.set()
        _stopped(store, job_id, job_dir)
        return 0
    except RagtuneError as exc:
        events.stop.set()
        _cleanup(job_dir)
        _fail(store, job_id, "training_failed", str(exc))
        return 1
    except Exception as exc:  # a fault of the training code: its traceback goes to worker.log
        events.stop.set()
        log.exception("training failed")
        _cleanup(job_dir)
        _fail(store, job_id, "training_failed", f"training failed: {type(exc).__name__}: {exc} "
              f"(traceback in {job_dir / 'worker.log'})")
        return 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the adapter is written: the job has succeeded
    events.stop.set()
    tail.join()
    events.flush()
    _succeed(store, job_id, out)
    return 0


def _succeed(store: JobStore, job_id: str, out: Path) -> None:
    from ragtune.runcard import read_runcard

    job = store.get(job_id)
    card = read_runcard(out)
    m = card.get("metrics") or {}
    name = ft_model_name(job["model"], job[PRIVATE]["suffix"], job_id)
    result = _result_file(job_id, out)
    job[PRIVATE]["result"] = {"fine_tuned_model": name, "finished_at": int(time.time()),
                              "trained_tokens": m.get("train_tokens"), "result_files": [result] if result else []}
    store.put(job)  # the server serves the model, then marks the job succeeded (serve/jobs.py)
    store.event(job_id, f"New fine-tuned model created: {name}")
    log.info("job %s trained: %s", job_id, name)


def _result_file(job_id: str, out: Path) -> str | None:
    """The step metrics as a CSV in the Files API (OpenAI's result file), or None when it cannot be written."""
    import csv
    import io
    import tempfile

    from ragtune.serve.files import FileStore

    rows = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_bytes().splitlines():
            try:
                r = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:  # a line cut by a crash: the CSV is written from the whole ones
                continue
            if isinstance(r, dict) and ("loss" in r or "eval_loss" in r):
                rows.append([r.get("step"), r.get("epoch"), r.get("loss", ""), r.get("eval_loss", "")])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "epoch", "train_loss", "valid_loss"])
    w.writerows(rows)
    files = FileStore()
    files.root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=files.root, prefix=".result-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
        return files.add(f"step_metrics-{job_id}.csv", "fine-tune-results", Path(tmp))["id"]
    except OSError:
        log.exception("the result file could not be written")
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _stopped(store: JobStore, job_id: str, job_dir: Path) -> None:
    _cleanup(job_dir)
    if (job_dir / CANCEL).exists():
        store.update(job_id, status="cancelled", finished_at=int(time.time()), estimated_finish=None)
        store.event(job_id, "Fine-tuning job cancelled: training stopped, no model was written")
        log.info("job %s cancelled", job_id)
    else:
        _fail(store, job_id, "server_stopped", "the server stopped while this job was training; no model was "
              "written. Create the job again to train it")


def _fail(store: JobStore, job_id: str, code: str, message: str, param: str | None = None) -> None:
    store.update(job_id, status="failed", finished_at=int(time.time()), estimated_finish=None,
                 error={"code": code, "message": message, "param": param})
    store.event(job_id, f"Fine-tuning job failed: {message}", level="error")
    log.error("job %s failed: %s", job_id, message)


def _cleanup(job_dir: Path) -> None:
    """Remove what a stopped run_train may have left half-written beside the run folder (the adapter
    is written into a temp folder and renamed; the run folder itself holds only checkpoints until then),
    and an adapter a stop came just too late for: a job that did not succeed leaves no model."""
    run = job_dir / RUN
    if (run / "adapter_config.json").exists():
        os.replace(run, job_dir / f".{RUN}.discarded")
    for p in job_dir.iterdir():
        if p.name.startswith(f".{RUN}.") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
