"""Fine-tuning jobs on disk, shared by the server (serve/jobs.py) and the training worker (serve/job_worker.py).

    store = JobStore()                       # $RAGTUNE_HOME/jobs
    job = store.get("ftjob-...")             # the state: OpenAI's job object + a private "ragtune" block
    store.update(job_id, status="running")   # read, change, write atomically
    store.event(job_id, "Fine-tuning job started")
    store.events(job_id); store.checkpoints(job_id)

A job is one folder `$RAGTUNE_HOME/jobs/<id>/`:
- `job.json`: the state, replaced whole (temp file + fsync + rename) on every change, so a reader sees
  the old or the new state and never half of one;
- `events.jsonl`: OpenAI's event objects, appended one line per write (a torn or undecodable line is
  skipped);
- `training.jsonl` / `validation.jsonl`: copies of the uploaded files (deleting the upload later
  does not change the job);
- `config.yaml`: the resolved ragtune config the worker trains with;
- `run/`: the `ragtune train` output folder (adapter, run card, metrics.jsonl, loss.png, checkpoints/);
- `cancel`: present once a cancel was asked for (the worker then ends as cancelled, not failed);
- `worker.lock` / `worker.log`: held by the running worker; its output.

The server writes the states before and after a worker's life (validating_files, queued, cancelled, and
failed when a worker died); the worker writes running and its own end (succeeded, failed, cancelled).

A `job.json` that is not a job object (hand-edited, restored from elsewhere) is damaged: `get` raises
`DamagedRecord` (a KeyError that says why and where), `list` leaves it out and logs it once, so one
bad folder never stops the other jobs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("validating_files", "queued", "running", *FINAL)
PRIVATE = "ragtune"  # the key of the block kept on disk but not shown to clients
LOCK = "worker.lock"
CANCEL = "cancel"
RUN = "run"


def jobs_dir() -> Path:
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "jobs"


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def ft_model_name(base: str, suffix: str, job_id: str) -> str:
    """`ft:BASE:SUFFIX:ID`, the name a job's adapter is served under (ID: the job id without `ftjob-`)."""
    return f"ft:{base}:{suffix}:{job_id.removeprefix('ftjob-')}"


class DamagedRecord(KeyError):
    """A record file that is there but cannot be used: not JSON, or JSON of the wrong shape."""

    def __init__(self, path: Path, why: str):
        super().__init__(str(path))
        self.path, self.why = path, why

    def __str__(self) -> str:
        return f"{self.path} is damaged ({self.why})"


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def shape_problem(obj: Any, record_id: str, fields: dict[str, tuple[type, ...]]) -> str:
    """Why `obj` is not a record with id `record_id` and `fields` of those JSON types ("" when it is)."""
    if not isinstance(obj, dict):
        return f"it holds {json_type(obj)}, not an object"
    if obj.get("id") != record_id:
        return f"its id is {json.dumps(obj.get('id'))[:80]}, not the folder's name {record_id}"
    for key, types in fields.items():
        if key not in obj:
            return f"it has no '{key}'"
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"its '{key}' is {json_type(value)}"
    return ""


def read_record(path: Path, problem: Callable[[Any], str], key: str) -> dict[str, Any]:
    """The JSON object in `path`: KeyError(key) when there is none, DamagedRecord when it is unusable."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise KeyError(key) from None
    except OSError as exc:
        raise DamagedRecord(path, f"unreadable: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedRecord(path, f"not JSON: {exc}"[:200]) from None
    why = problem(obj)
    if why:
        raise DamagedRecord(path, why)
    return obj


class WarnOnce:
    """Log each damaged record once per version of its file, not on every listing (the scheduler lists twice
    a second)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, exc: DamagedRecord, fix: str) -> None:
        try:
            version = exc.path.stat().st_mtime_ns
        except OSError:
            version = 0
        if (str(exc.path), version) not in self.seen:
            self.seen.add((str(exc.path), version))
            log.warning("%s; it is left out: %s", exc, fix)


JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "model": (str,), "created_at": (int,), "training_file": (str,), PRIVATE: (dict,),
    "validation_file": (str, type(None)), "fine_tuned_model": (str, type(None)), "hyperparameters": (dict,),
    "error": (dict, type(None)), "result_files": (list,), "object": (str,),
}
PRIVATE_FIELDS: dict[str, tuple[type, ...]] = {"created_ns": (int,), "suffix": (str,), "base_path": (str,),
                                               "filenames": (dict,)}


def job_problem(job: Any, job_id: str) -> str:
    """Why a job.json cannot be used ("" when it can): the fields the server, the worker and the CLI read."""
    why = shape_problem(job, job_id, JOB_FIELDS)
    if why:
        return why
    if job["status"] not in STATUSES:
        return f"its status {json.dumps(job['status'])[:40]} is not one of {', '.join(STATUSES)}"
    private = {"id": job_id, **job[PRIVATE]}
    why = shape_problem(private, job_id, PRIVATE_FIELDS)
    return f"{why} in its '{PRIVATE}' block" if why else ""


class JobStore:
    """Jobs by id under one folder; ids are `ftjob-` + 24 random hex characters."""

    def __init__(self, root: Path | None = None):
        self.root = root or jobs_dir()
        self._warn = WarnOnce()

    def dir(self, job_id: str) -> Path:
        if not (job_id.startswith("ftjob-") and job_id[6:].isalnum() and len(job_id) <= 64):
            raise KeyError(job_id)  # never a path: no '..', no '/'
        return self.root / job_id

    def create(self, job: dict[str, Any], copies: dict[str, Path], texts: dict[str, str]) -> None:
        """Write a new job folder whole (state, copies of its files, texts) under a temp name, then rename it."""
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{job['id']}.tmp"
        tmp.mkdir()
        try:
            for name, src in copies.items():
                shutil.copyfile(src, tmp / name)
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")
            _write_json(tmp / "job.json", job)
            os.replace(tmp, self.dir(job["id"]))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get(self, job_id: str) -> dict[str, Any]:
        """The state; KeyError when there is no such (complete) job, DamagedRecord when its job.json is unusable."""
        return read_record(self.dir(job_id) / "job.json", lambda j: job_problem(j, job_id), job_id)

    def put(self, job: dict[str, Any]) -> dict[str, Any]:
        _write_json(self.dir(job["id"]) / "job.json", job)
        return job

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        job = self.get(job_id)
        job.update(changes)
        return self.put(job)

    def list(self) -> list[dict[str, Any]]:
        """Every complete job, newest first."""
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith("ftjob-"):
                    try:
                        out.append(self.get(d.name))
                    except DamagedRecord as exc:
                        self._warn(exc, f"move {d} out of {self.root} (or restore its job.json)")
                    except KeyError:
                        continue
        return sorted(out, key=lambda j: (-j[PRIVATE]["created_ns"], j["id"]))

    def event(self, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict[str, Any] | None = None) -> None:
        """Append one event (a single write of one line: appends from the server and the worker do not interleave)."""
        ev = {"object": "fine_tuning.job.event", "id": new_id("ftevent-"), "created_at": int(time.time()),
              "level": level, "message": message, "data": data or {}, "type": type_}
        line = (json.dumps(ev, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.dir(job_id) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The events, newest first; a line that is not an event (cut by a crash mid-write, not UTF-8) is skipped."""
        path = self.dir(job_id) / "events.jsonl"
        out = []
        try:
            data = path.read_bytes()
        except OSError:
            return []
        for line in data.split(b"\n"):
            try:
                ev = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("id"), str):
                out.append(ev)
        return out[::-1]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """OpenAI's checkpoint objects for the run's complete checkpoints, newest first."""
        job = self.get(job_id)
        ckpts = self.dir(job_id) / RUN / "checkpoints"
        found = []
        if ckpts.is_dir():
            for p in ckpts.iterdir():
                step = p.name.removeprefix("checkpoint-")
                if p.is_dir() and p.name.startswith("checkpoint-") and step.isdigit():
                    try:  # written last: a checkpoint without it was cut off while saving
                        state = json.loads((p / "trainer_state.json").read_bytes().decode("utf-8"))
                    except (OSError, ValueError):
                        continue
                    if isinstance(state, dict) and isinstance(state.get("log_history", []), list):
                        found.append((int(step), p, state))
        name = ft_model_name(job["model"], job[PRIVATE]["suffix"], job_id)
        out = []
        for step, p, state in sorted(found, key=lambda f: -f[0]):
            logs = [r for r in state.get("log_history", []) if isinstance(r, dict) and r.get("step", 0) <= step]
            train = [r["loss"] for r in logs if "loss" in r]
            valid = [r["eval_loss"] for r in logs if "eval_loss" in r]
            out.append({
                "object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id[6:]}-{step}",
                "created_at": int(p.stat().st_mtime), "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                "fine_tuning_job_id": job_id, "step_number": step,
                "metrics": {"step": float(step), "train_loss": train[-1] if train else None,
                            "valid_loss": valid[-1] if valid else None},
            })
        return out


def ended(status: str) -> str:
    """How a finished job is said to have ended: 'is already cancelled', 'has already succeeded'."""
    return f"is already {status}" if status == "cancelled" else f"has already {status}"


def public(job: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's job object (the private block stays on disk)."""
    return {k: v for k, v in job.items() if k != PRIVATE}


def page(rows: list[dict[str, Any]], after: str, limit: int) -> tuple[list[dict[str, Any]], bool] | None:
    """The rows after the one with id `after` (None when there is no such row), at most `limit`; has_more."""
    if after:
        ids = [r["id"] for r in rows]
        if after not in ids:
            return None
        rows = rows[ids.index(after) + 1:]
    return rows[:limit], len(rows) > limit


def _write_json(path: Path, obj: Any) -> None:
    from ragtune.io import atomic_write_json

    atomic_write_json(path, obj)


def worker_alive(job_dir: Path) -> bool:
    """Whether a worker holds the job's lock (a crashed or killed worker's lock is free at once)."""
    import fcntl

    path = job_dir / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
