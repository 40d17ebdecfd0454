"""The fine-tuning jobs of `ragtune serve` (serve.fine_tuning: true): made, validated, queued, trained
and served; serve/jobs.py answers the HTTP routes with it.

    from ragtune.serve.jobs import JobManager, JobRequest

    manager = JobManager(runtime).claim()   # take the jobs folder (a second server stops here)
    manager.start()                         # serve the succeeded jobs' models, start the scheduler
    job = manager.create(JobRequest(model="base", training_file="file-..."))   # validating_files
    manager.cancel(job["id"])
    manager.close()                         # the scheduler and a running worker stop

A created job is validated at once in the server with the checks of `ragtune data check` (with the
base model's tokenizer and chat template): bad data fails the job with OpenAI's `error` object whose
message is the CLI's report (every bad line, what is wrong, the fix). Valid jobs queue and train one
at a time, oldest first, each in its own worker process (`python -m ragtune.serve.job_worker`), so
the server keeps answering. The run's settings are the server config's `train.*`/`data.*` with the
job's model, files, seed and hyperparameters (`n_epochs` -> train.epochs, `batch_size` ->
train.batch_size, `learning_rate_multiplier` x train.learning_rate; "auto" keeps the config's).

A succeeded job's adapter is added to the served base model and appears in /v1/models as
`ft:BASE:SUFFIX:ID` (and `...+rag` when the config's index is served), without a restart.

Restarts: jobs live on disk (serve/job_store.py). A server that starts finds every job in its last
state; a job that was running when the server stopped is marked failed with that reason (its worker
stops with the server), jobs still validating are validated again, and queued ones run in order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.errors import RagtuneError, UsageError
from ragtune.serve.job_checks import check_job_files
from ragtune.serve.job_store import CANCEL, FINAL, PRIVATE, RUN, JobStore, ended, new_id, worker_alive

if TYPE_CHECKING:
    from ragtune.serve.jobs import JobRequest

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the scheduler looks at the worker and the queue
STOP_WAIT_S = 60.0  # how long a cancel or a shutdown waits for the worker to stop before killing it


class JobManager:
    """Create, validate, queue, run (one worker process at a time), cancel and recover jobs."""

    def __init__(self, runtime: Any, store: JobStore | None = None):
        from ragtune.serve.files import FileStore

        self.runtime = runtime
        self.cfg = runtime.cfg
        self.store = store or JobStore()
        self.files = FileStore()
        self.lock = threading.RLock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.current: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server_lock: int | None = None
        self._tokenizers: dict[str, tuple[Any, str]] = {}

    # --- life ---

    def claim(self) -> "JobManager":
        """Take the jobs folder: one server schedules it (called before the port opens, so a second server
        stops with this message; `close` lets it go)."""
        import fcntl

        if self._server_lock is not None:
            return self
        self.store.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store.root / ".server.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another 'ragtune serve' with serve.fine_tuning runs its jobs from {self.store.root}; "
                             "stop it, or give this server its own RAGTUNE_HOME") from None
        self._server_lock = fd
        _record_url(fd, self.cfg.serve)
        return self

    def start(self) -> "JobManager":
        """Serve the succeeded jobs' models and start the scheduler (the jobs folder claimed first)."""
        self.claim()
        for job in self.store.list():
            if job["status"] == "succeeded":
                self._register(job)
        self._thread = threading.Thread(target=self._loop, name="ragtune-jobs", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the scheduler; a running job's worker stops too (the job fails: the server stopped)."""
        import fcntl

        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        with self.lock:
            proc = self.proc
        if proc is not None:
            proc.terminate()
            self._wait(proc)
            with self.lock:
                self._reap()
        if self._server_lock is not None:
            os.ftruncate(self._server_lock, 0)  # the URL in it is no longer served
            fcntl.flock(self._server_lock, fcntl.LOCK_UN)
            os.close(self._server_lock)
            self._server_lock = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler keeps going; the fault is in the log
                log.exception("fine-tuning job scheduler")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def tick(self) -> None:
        """One round: reap a finished worker, validate new jobs, settle orphans, start the next queued job."""
        with self.lock:
            self._reap()
        jobs = self.store.list()[::-1]  # oldest first
        for job in jobs:
            if job["status"] == "validating_files" and not self._stop.is_set():
                self._validate(job)
        with self.lock:
            if self._stop.is_set():
                return
            busy = False
            for job in self.store.list()[::-1]:
                if job["status"] == "running" and job["id"] != self.current:
                    if worker_alive(self.store.dir(job["id"])):
                        busy = True  # a worker of a stopped server, stopping by itself
                    else:
                        self._settle_dead(job, "the server stopped while this job was training; no model was "
                                          "written. Create the job again to train it", "server_stopped")
            if self.proc is None and not busy:
                nxt = next((j for j in self.store.list()[::-1] if j["status"] == "queued"), None)
                if nxt is not None:
                    self._launch(nxt)

    # --- create ---

    def create(self, req: JobRequest) -> dict[str, Any]:
        from ragtune.serve.jobs import Hyperparameters
        from ragtune.serve.server import APIError

        d = self._trainable(req.model)
        if req.method is not None and req.method.type != "supervised":
            raise APIError(400, f"method type '{req.method.type}' is not supported here; use 'supervised' (LoRA SFT "
                           "on chat JSONL)", param="method.type", code="unsupported")
        if req.integrations:
            raise APIError(400, "integrations (Weights & Biases) are not supported: ragtune runs offline; the run's "
                           "metrics are in the job's events and result file", param="integrations", code="unsupported")
        hp = req.hyperparameters
        nested = req.method.supervised.hyperparameters if req.method and req.method.supervised else None
        if hp is not None and nested is not None and hp != nested:
            raise APIError(400, "hyperparameters and method.supervised.hyperparameters differ; send one of them",
                           param="hyperparameters", code="invalid_request")
        hp = hp or nested or Hyperparameters()
        if req.validation_file is not None and not req.validation_file.strip():
            raise APIError(400, "validation_file is empty; send a file id, or leave validation_file out to train "
                           "without one", param="validation_file", code="invalid_request")
        files = {}
        for param in ("training_file", "validation_file"):
            fid = getattr(req, param)
            if fid is None:
                continue
            try:
                meta = self.files.get(fid)
            except KeyError:
                raise APIError(400, f"{param} '{fid}' is not an uploaded file (POST /v1/files uploads one with "
                               "purpose fine-tune; GET /v1/files lists them)", param=param,
                               code="invalid_file") from None
            if meta.get("purpose") != "fine-tune":
                raise APIError(400, f"{param} '{fid}' has purpose '{meta.get('purpose')}'; upload training data "
                               "with purpose fine-tune", param=param, code="invalid_file")
            files[param] = meta
        job_id = new_id("ftjob-")
        tc = self.cfg.train
        epochs = tc.epochs if hp.n_epochs == "auto" else hp.n_epochs
        batch = tc.batch_size if hp.batch_size == "auto" else hp.batch_size
        mult = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
        seed = tc.seed if req.seed is None else req.seed
        resolved = {"n_epochs": int(epochs) if float(epochs).is_integer() else epochs, "batch_size": batch,
                    "learning_rate_multiplier": mult}
        now = time.time_ns()
        job = {
            "object": "fine_tuning.job", "id": job_id, "model": req.model, "created_at": now // 10**9,
            "finished_at": None, "fine_tuned_model": None, "organization_id": "org-ragtune", "result_files": [],
            "status": "validating_files", "training_file": req.training_file, "validation_file": req.validation_file,
            "hyperparameters": resolved, "trained_tokens": None, "error": None, "seed": seed,
            "estimated_finish": None, "integrations": [], "metadata": req.metadata, "user_provided_suffix": req.suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": resolved}},
            PRIVATE: {"created_ns": now, "suffix": req.suffix or "", "base_path": str(d.generator.base_path),
                      "filenames": {p: m.get("filename", "") for p, m in files.items()}},
        }
        job_dir = self.store.dir(job_id)
        run_cfg = self._run_config(d.generator.base_path, job_dir, "validation_file" in files, epochs, batch,
                                   tc.learning_rate * mult, seed)
        copies = {"training.jsonl": self.files.root / req.training_file / "content"}
        if "validation_file" in files:
            copies["validation.jsonl"] = self.files.root / req.validation_file / "content"
        with self.lock:
            try:
                self.store.create(job, copies, {"config.yaml": run_cfg})
            except FileNotFoundError:
                raise APIError(400, "a file of this job was deleted while the job was being created; upload it "
                               "again", param="training_file", code="invalid_file") from None
            self.store.event(job_id, f"Created fine-tuning job: {job_id}")
            if req.validation_file == req.training_file:
                self.store.event(job_id, f"validation_file is the training file ({req.training_file}): the validation "
                                 "loss measures the training data itself, not how the model does on new data",
                                 level="warn")
        self._wake.set()
        return job

    def _trainable(self, name: str) -> Any:
        """The deployment a job trains from: local engine, no adapter, no index."""
        from ragtune.serve.server import APIError

        ok = [n for n, d in self.runtime.deployments.items()
              if d.engine != "openai" and not d.adapter and not d.index and not d.unavailable and d.generator]
        d = self.runtime.find(name)  # its own name or a serve.model_aliases name (OpenAI's, kept by the user's code)
        if d is None or d.name not in ok:
            why = "is not served here" if d is None else (
                "generates on a remote server" if d.engine == "openai" else
                "already has an adapter" if d.adapter else "retrieves from an index" if d.index else
                "is unavailable")
            raise APIError(400, f"model '{name}' {why}; fine-tune one of the served base models: "
                           f"{', '.join(ok) or 'none'}",
                           param="model", code="model_not_available")
        return d

    def _run_config(self, base: Any, job_dir: Path, has_validation: bool, epochs: float, batch: int, lr: float,
                    seed: int) -> str:
        """The server's config with the job's model, files, output folder and hyperparameters, as YAML."""
        import yaml

        from ragtune.config import replace, to_dict

        c = self.cfg
        cfg = replace(c, model=replace(c.model, path=str(base), adapter=""),
                      data=replace(c.data, train_file=str(job_dir / "training.jsonl"),
                                   eval_file=str(job_dir / "validation.jsonl") if has_validation else ""),
                      train=replace(c.train, output_dir=str(job_dir / RUN), epochs=float(epochs), batch_size=batch,
                                    learning_rate=lr, seed=seed),
                      serve=type(c.serve)())  # the API key stays out of the job folder and the run card
        return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)

    # --- validate ---

    def _validate(self, job: dict[str, Any]) -> None:
        """`ragtune data check` on the job's files (outside the lock); queued, or failed with the report."""
        job_id = job["id"]
        self.store.event(job_id, "Validating training file: " + job["training_file"]
                         + (f" and validation file: {job['validation_file']}" if job.get("validation_file") else ""))
        notes: list[str] = []
        try:
            error = self._check_files(job, notes)
        except Exception as exc:  # a fault while checking: the job fails with it rather than staying stuck
            log.exception("validating %s", job_id)
            error = {"code": "validation_failed", "message": f"the files could not be checked: "
                     f"{type(exc).__name__}: {exc}", "param": None}
        with self.lock:
            if self.store.get(job_id)["status"] != "validating_files":
                return  # cancelled meanwhile
            for note in notes:  # what `ragtune data check` prints as notes: the job trains, but should know
                self.store.event(job_id, note, level="warn")
            if error:
                self.store.update(job_id, status="failed", error=error, finished_at=int(time.time()))
                self.store.event(job_id, "Fine-tuning job failed: " + error["message"], level="error")
            else:
                self.store.update(job_id, status="queued")
                self.store.event(job_id, "Files validated, moving job to queued state")

    def _check_files(self, job: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
        """The error object of the first file with problems (None when both are fine); `notes` gets the
        data check's notes on files that pass."""
        tok, template = self._tokenizer(job[PRIVATE]["base_path"])
        return check_job_files(job, self.store.dir(job["id"]), tok, template, self.cfg.data, notes)

    def _tokenizer(self, base: str) -> tuple[Any, str]:
        """The base model's tokenizer and the chat template training will use (train.chat_template or its own)."""
        from ragtune.modeling import load_tokenizer
        from ragtune.train.template import template_of

        if base not in self._tokenizers:
            tok = load_tokenizer(base, trust_remote_code=self.cfg.model.trust_remote_code)
            tpl_file = self.cfg.train.chat_template
            template = Path(tpl_file).expanduser().read_text(encoding="utf-8") if tpl_file else template_of(tok)
            self._tokenizers[base] = (tok, template)
        return self._tokenizers[base]

    # --- run ---

    def _launch(self, job: dict[str, Any]) -> None:
        """Start the worker for `job` (under the lock)."""
        job_dir = self.store.dir(job["id"])
        with open(job_dir / "worker.log", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ragtune.serve.job_worker", str(job_dir)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.current = job["id"]
        log.info("job %s: training in worker process %d", job["id"], self.proc.pid)

    def _reap(self) -> None:
        """Settle the worker that has exited (under the lock)."""
        if self.proc is None or self.proc.poll() is None:
            return
        rc, job_id = self.proc.returncode, self.current
        self.proc, self.current = None, None
        job = self.store.get(job_id)
        if job["status"] not in FINAL:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            self._settle_dead(job, f"the training worker {how} before the job finished; no model was written "
                              f"(its output: {self.store.dir(job_id) / 'worker.log'}). Create the job again to "
                              "train it", "worker_died")
        self._wake.set()

    def _settle_dead(self, job: dict[str, Any], message: str, code: str) -> None:
        """A job whose worker is gone without writing its end: succeeded if it trained to the end (its model
        is served first), else cancelled if that was asked, else failed."""
        from ragtune.serve.job_worker import _cleanup

        job_dir = self.store.dir(job["id"])
        result = job[PRIVATE].get("result")
        if result and (job_dir / RUN / "adapter_config.json").is_file():
            self._register({**job, **result})
            self.store.update(job["id"], status="succeeded", estimated_finish=None, **result)
            self.store.event(job["id"], "The job has successfully completed")
            return
        _cleanup(job_dir)
        if (job_dir / CANCEL).exists():
            self.store.update(job["id"], status="cancelled", finished_at=int(time.time()))
            self.store.event(job["id"], "Fine-tuning job cancelled: training stopped, no model was written")
        else:
            self.store.update(job["id"], status="failed", finished_at=int(time.time()),
                              error={"code": code, "message": message, "param": None})
            self.store.event(job["id"], f"Fine-tuning job failed: {message}", level="error")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: at once when it waits, by stopping its worker when it trains."""
        from ragtune.serve.server import APIError

        with self.lock:
            job = self.store.get(job_id)
            if job["status"] in FINAL:
                raise APIError(400, f"job {job_id} {ended(job['status'])}; only a job that is validating_files, "
                               "queued or running can be cancelled", param="fine_tuning_job_id",
                               code="job_not_cancellable")
            job_dir = self.store.dir(job_id)
            (job_dir / CANCEL).touch()
            proc = self.proc if self.current == job_id else None
            if proc is None and job["status"] != "running":
                self.store.update(job_id, status="cancelled", finished_at=int(time.time()))
                self.store.event(job_id, "Fine-tuning job cancelled")
                return self.store.get(job_id)
            self.store.event(job_id, "Cancellation requested: stopping the training")
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        if proc is not None:
            self._wait(proc)
            with self.lock:
                self._reap()
        return self.store.get(job_id)

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop within %.0fs: killed", proc.pid, STOP_WAIT_S)
            proc.kill()
            proc.wait()

    # --- serve the result ---

    def _register(self, job: dict[str, Any]) -> None:
        """Add a succeeded job's adapter to the base it was trained from, as `ft:...` (+ its `+rag` twin)."""
        from ragtune.serve.server import Deployment

        rt = self.runtime
        name = job.get("fine_tuned_model")
        src = rt.find(job["model"])
        if not name or name in rt.deployments:
            return
        if src is None or src.generator is None or src.engine == "openai":
            log.warning("job %s: model '%s' is not served by this server: %s is not offered", job["id"], job["model"],
                        name)
            return
        run = self.store.dir(job["id"]) / RUN
        gen = src.generator
        try:
            with gen.lock:  # no generation runs while the adapter is added to the model
                adapter = gen.add_adapter(name, run)
        except RagtuneError as exc:
            log.error("job %s: %s could not be served: %s", job["id"], name, exc)
            self.store.event(job["id"], f"{name} could not be served: {exc}", level="error")
            return
        new = {name: Deployment(name, src.base, str(run), "", src.engine, generator=gen, adapter_name=adapter)}
        index = self.cfg.index.name
        if self.cfg.rag.enabled and index in rt.retrievers:
            new[name + "+rag"] = Deployment(name + "+rag", src.base, str(run), index, src.engine, generator=gen,
                                            adapter_name=adapter, retriever=rt.retrievers[index])
        rt.deployments = {**rt.deployments, **new}  # replaced whole: readers iterate the old dict safely
        log.info("serving %s", ", ".join(new))


def _record_url(fd: int, serve: Any) -> None:
    """Write the URL this server answers on into its lock file, for `ragtune jobs cancel` to find it."""
    import json

    host = serve.host if serve.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{serve.port}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"url": url, "pid": os.getpid()}) + "\n").encode("utf-8"), 0)
    except OSError as exc:  # the lock holds all the same; `jobs cancel` then needs --server
        log.warning("could not record this server's URL in the jobs folder's lock: %s", exc)
