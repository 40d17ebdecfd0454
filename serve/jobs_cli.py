"""`ragtune jobs`: the fine-tuning jobs of `ragtune serve` (serve/jobs.py) from the shell.

    ragtune jobs list [--json]                 newest first: id, status, model, created, result
    ragtune jobs show ftjob-... [--json]       the job, its error, its events
    ragtune jobs cancel ftjob-... [--server URL] [--api-key KEY]

list and show read $RAGTUNE_HOME/jobs directly, with or without a server. cancel asks the server
that schedules the jobs (its POST /v1/fine_tuning/jobs/{id}/cancel stops a training worker): the one
--server names, else the URL that server wrote into `$RAGTUNE_HOME/jobs/.server.lock`, else
serve.host:serve.port; with no server running it cancels a waiting job on disk itself.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ragtune.errors import EXIT_OK, UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("jobs", help="list, show and cancel the fine-tuning jobs of 'ragtune serve'",
                       description="The fine-tuning jobs created through the server's OpenAI-compatible API "
                                   "(serve.fine_tuning: true), from $RAGTUNE_HOME/jobs.")
    jsub = p.add_subparsers(dest="jobs_cmd", metavar="{list,show,cancel}", required=True)
    pl = jsub.add_parser("list", help="every job, newest first")
    pl.add_argument("--json", action="store_true", help="OpenAI's job objects as JSON")
    ps = jsub.add_parser("show", help="one job with its error and events")
    ps.add_argument("job_id", help="ftjob-...")
    ps.add_argument("--json", action="store_true", help="the job object and its events as JSON")
    pc = jsub.add_parser("cancel", help="cancel a waiting or training job")
    pc.add_argument("job_id", help="ftjob-...")
    pc.add_argument("--server", metavar="URL", default=None,
                    help="the server running the jobs (default: env RAGTUNE_SERVER, else the URL the server recorded "
                         "in $RAGTUNE_HOME/jobs/.server.lock, else serve.host:serve.port)")
    pc.add_argument("--api-key", metavar="KEY", default=None, help="its API key (default: env RAGTUNE_API_KEY)")
    pc.add_argument("--json", action="store_true", help="the job object as JSON")
    for q in (pl, ps, pc):
        q.set_defaults(func=run_jobs)


def run_jobs(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json
    from ragtune.serve.job_store import JobStore, public

    store = JobStore()
    if args.jobs_cmd == "list":
        jobs = [public(j) for j in store.list()]
        if args.json:
            print_json({"object": "list", "data": jobs})
        elif not jobs:
            print(f"no fine-tuning jobs in {store.root}")
        else:
            from ragtune.cli import print_table

            print_table([_row(j) for j in jobs], ("id", "status", "model", "created", "result"))
        return EXIT_OK
    job = _get(store, args.job_id)
    if args.jobs_cmd == "show":
        events = store.events(args.job_id)
        if args.json:
            print_json({**public(job), "events": events})
        else:
            print(_describe(job, events))
        return EXIT_OK
    job = _cancel(store, job, args, cfg)
    if args.json:
        print_json(public(job))
    else:
        print(f"{job['id']}: {job['status']}")
    return EXIT_OK


def _get(store: Any, job_id: str) -> dict[str, Any]:
    from ragtune.errors import RagtuneError
    from ragtune.serve.job_store import DamagedRecord

    try:
        return store.get(job_id)
    except DamagedRecord as exc:
        raise RagtuneError(f"fine-tuning job '{job_id}' cannot be read: {exc}; move {exc.path.parent} out of "
                           f"{store.root} (or restore its job.json)") from None
    except KeyError:
        raise UsageError(f"no fine-tuning job '{job_id}' in {store.root}; 'ragtune jobs list' lists them") from None


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _row(job: dict[str, Any]) -> dict[str, Any]:
    err = job.get("error") or {}
    return {"id": job["id"], "status": job["status"], "model": job["model"], "created": _when(job["created_at"]),
            "result": job.get("fine_tuned_model") or err.get("code") or ""}


def _describe(job: dict[str, Any], events: list[dict[str, Any]]) -> str:
    hp = job.get("hyperparameters") or {}
    out = [f"{job['id']}: {job['status']}",
           f"  model {job['model']}, training file {job['training_file']}"
           + (f", validation file {job['validation_file']}" if job.get("validation_file") else ""),
           f"  n_epochs {hp.get('n_epochs')}, batch_size {hp.get('batch_size')}, learning_rate_multiplier "
           f"{hp.get('learning_rate_multiplier')}, seed {job.get('seed')}",
           f"  created {_when(job['created_at'])}" + (f", finished {_when(job['finished_at'])}"
                                                      if job.get("finished_at") else "")]
    if job.get("fine_tuned_model"):
        out.append(f"  model: {job['fine_tuned_model']} (trained tokens {job.get('trained_tokens')})")
    if job.get("error"):
        out.append(f"  error ({job['error'].get('code')}): {job['error'].get('message')}")
    if events:
        out.append("events:")
        out += [f"  {_when(e.get('created_at'))}  {e.get('message')}" for e in reversed(events)]
    return "\n".join(out)


def _cancel(store: Any, job: dict[str, Any], args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """Through the server that schedules the jobs; on disk when none does (no worker can be running then)."""
    import fcntl
    import os

    from ragtune.serve.job_store import FINAL, ended

    if job["status"] in FINAL:
        raise UsageError(f"job {job['id']} {ended(job['status'])}; only a waiting or training job can be cancelled")
    store.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.root / ".server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a server runs the jobs: it must stop the worker
            return _cancel_on_server(store, job["id"], args, cfg)
        job = store.get(job["id"])
        if job["status"] in FINAL:
            return job
        (store.dir(job["id"]) / "cancel").touch()  # a worker left by a dead server reads it as it stops
        job = store.update(job["id"], status="cancelled", finished_at=int(time.time()))
        store.event(job["id"], "Fine-tuning job cancelled (ragtune jobs cancel, no server running)")
        return job
    finally:
        os.close(fd)


def _cancel_on_server(store: Any, job_id: str, args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """POST the cancel to --server, else to the server that holds the jobs folder (the URL it recorded in its
    lock, then serve.host:serve.port); a usage error when none of those answers."""
    from ragtune.client import api_key, post_json, server_url

    path = f"/v1/fine_tuning/jobs/{job_id}/cancel"
    key = api_key(args.api_key) or cfg.serve.api_key
    url = server_url(args.server)
    if url:  # named by the user: its own errors as they are
        return post_json(url, path, {}, key)
    lock = store.root / ".server.lock"
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    tried = list(dict.fromkeys(u for u in (_recorded_url(lock), f"http://{f'[{host}]' if ':' in host else host}:"
                                           f"{cfg.serve.port}") if u))
    for candidate in tried:
        if _answers(candidate):
            return post_json(candidate, path, {}, key)
    raise UsageError(f"a ragtune server holds the jobs folder {store.root} (its lock {lock}) and only it can stop "
                     f"the job, but nothing answers at {' or '.join(tried)}; pass --server URL (or set "
                     "RAGTUNE_SERVER) with the address that server listens on, or the --config it was started with")


def _recorded_url(lock: Any) -> str:
    """The URL a running server wrote into the jobs folder's lock ("" when there is none)."""
    import json

    try:
        url = json.loads(lock.read_bytes().decode("utf-8")).get("url", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return url if isinstance(url, str) and url.startswith("http://") else ""


def _answers(url: str) -> bool:
    """Whether something accepts connections at `url`'s host and port."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=2):
            return True
    except (OSError, ValueError):
        return False
