"""OpenAI's fine-tuning jobs API on `ragtune serve`, through the official `openai` client against real
uvicorn servers that train the tiny model in their worker processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import free_port, start_server
from tests.train.conftest import trainable_llama  # noqa: F401  (fixture: a model LoRA can make confident)

FACTS = [("What is the secret code?", "The code is apple."), ("Who guards the gate?", "The owl guards it.")]
KEY = "k-test"


def records(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    .encode() + b"\n" for q, a in pairs)


class Server:
    """A real uvicorn server in this process (the jobs' workers are child processes of it)."""

    def __init__(self, tmp_path: Path, base: Path, extra: str = "", fine_tuning: bool = True,
                 retrievers: dict[str, Any] | None = None, serve_extra: str = ""):
        f = tmp_path / "serve.yaml"
        f.write_text(f"model:\n  path: {base}\n"
                     "data:\n  max_length: 128\n"
                     "train:\n  learning_rate: 0.01\n  batch_size: 2\n  lora:\n    dropout: 0.0\n  threads: 1\n"
                     "  logging_steps: 5\n  save_steps: 20\n  lr_scheduler: constant\n"
                     f"generation:\n  max_new_tokens: 12\n{extra}"
                     f"serve:\n  api_key: {KEY}\n  fine_tuning: {str(fine_tuning).lower()}\n"
                     f"  deployments:\n    - {{name: base}}\n{serve_extra}")
        self.app = create_app(load_config(f), retrievers=retrievers)
        self.server, self.thread, port = start_server(self.app, wait=60)
        self.url = f"http://127.0.0.1:{port}/v1"

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(90)
        assert not self.thread.is_alive()


@pytest.fixture
def server(tmp_path: Path, trainable_llama: Path) -> Any:  # noqa: F811
    from tests.serve.conftest import FakeRetriever

    s = Server(tmp_path, trainable_llama, retrievers={"default": FakeRetriever()})  # the config's index.name
    yield s
    s.stop()


def wait_for(client: Any, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s; events: "
                         f"{[e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]}")


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def upload(client: Any, data: bytes, name: str = "training.jsonl") -> Any:
    return client.files.create(file=(name, data), purpose="fine-tune")


def test_tutorial_flow_trains_and_serves_the_fine_tuned_model(server: Server, ragtune_home: Path) -> None:
    client = server.client()
    f = upload(client, records(FACTS))
    job = client.fine_tuning.jobs.create(training_file=f.id, model="base", suffix="facts", seed=7,
                                         hyperparameters={"n_epochs": 40, "learning_rate_multiplier": "auto"})
    assert (job.object, job.status, job.model, job.training_file, job.seed) == (
        "fine_tuning.job", "validating_files", "base", f.id, 7)
    assert job.hyperparameters.n_epochs == 40 and job.hyperparameters.batch_size == 2
    assert job.hyperparameters.learning_rate_multiplier == 1.0 and job.fine_tuned_model is None

    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:base:facts:{job.id.removeprefix('ftjob-')}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.error is None

    # the run folder is `ragtune train`'s: adapter, run card, metrics, loss plot, no pickles
    run = ragtune_home / "jobs" / job.id / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "ragtune.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    card = json.loads((run / "ragtune.json").read_text())
    assert card["config"]["train"]["epochs"] == 40 and card["config"]["train"]["seed"] == 7
    assert KEY not in (ragtune_home / "jobs" / job.id / "config.yaml").read_text()  # the API key stays out

    # events: newest first, the run's losses among them; checkpoints of the run
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1] == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["train_loss"] is not None for e in metrics if e.data["valid_loss"] is None)
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(first.data) == 2 and first.has_more
    rest = client.fine_tuning.jobs.list_events(job.id, limit=100, after=first.data[-1].id)
    assert [e.id for e in first.data + rest.data] == [e.id for e in events]
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].fine_tuning_job_id == job.id and ckpts[0].step_number >= ckpts[-1].step_number
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{ckpts[0].step_number}"
    result = client.files.content(done.result_files[0]).text
    assert result.splitlines()[0] == "step,epoch,train_loss,valid_loss" and len(result.splitlines()) > 2

    # the fine-tuned model is served at once (no restart) and answers its trained facts
    served = [m.id for m in client.models.list().data]
    assert served == ["base", done.fine_tuned_model, done.fine_tuned_model + "+rag"]  # and its twin over the index
    rag = client.chat.completions.create(model=done.fine_tuned_model + "+rag", max_tokens=4,
                                         messages=[{"role": "user", "content": FACTS[0][0]}])
    assert rag.model_extra["sources"][0]["source"] == "policies/remote.md"
    for q, a in FACTS:
        r = client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": q}],
                                           temperature=0)
        assert r.choices[0].message.content == a
    stream = client.chat.completions.create(model=done.fine_tuned_model, stream=True, temperature=0,
                                            messages=[{"role": "user", "content": FACTS[0][0]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == FACTS[0][1]
    base = client.chat.completions.create(model="base", messages=[{"role": "user", "content": FACTS[0][0]}],
                                          temperature=0)
    assert base.choices[0].message.content != FACTS[0][1]  # the base model stays as it was

    with pytest.raises(Exception) as e:
        client.fine_tuning.jobs.cancel(job.id)
    assert e.value.status_code == 400 and "already succeeded" in e.value.message


def test_bad_training_data_fails_the_job_with_the_lines_and_the_fix(server: Server) -> None:
    client = server.client()
    bad = records(FACTS[:1]) + b'{"messages": [{"role": "user", "content": "hi"}]}\n' + b"{not json\n"
    f = upload(client, bad, "mine.jsonl")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="base")
    done = wait_for(client, job.id, ("failed", "succeeded", "queued", "running"), timeout=120)
    assert done.status == "failed" and done.fine_tuned_model is None
    err = done.error
    assert (err.code, err.param) == ("invalid_training_file", "training_file")
    assert f"mine.jsonl ({f.id}): 3 records, 1 valid, 2 invalid" in err.message
    assert "line 2: " in err.message and "line 3: " in err.message and "ragtune data check mine.jsonl" in err.message
    assert not (Path(os.environ["RAGTUNE_HOME"]) / "jobs" / job.id / "worker.log").exists()  # nothing trained

    # refused at once: unknown file, unknown model, unsupported method, bad hyperparameters
    import openai

    with pytest.raises(openai.BadRequestError, match="not an uploaded file"):
        client.fine_tuning.jobs.create(training_file="file-nope", model="base")
    with pytest.raises(openai.BadRequestError, match="model 'gpt-4o-mini' is not served here; fine-tune one of"):
        client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError, match="method type 'dpo' is not supported"):
        client.fine_tuning.jobs.create(training_file=f.id, model="base", method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(training_file=f.id, model="base", hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.NotFoundError, match="no fine-tuning job 'ftjob-nope'"):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_list_pagination_queue_order_and_cancel(server: Server, ragtune_home: Path, capsys: Any) -> None:
    client = server.client()
    # 100 records at batch 1: 100k steps, so no job can finish before the test cancels it (2 records were
    # 1,000 tiny steps, which an idle machine trained in the moment between "running" and the cancel)
    f = upload(client, records(FACTS * 50))
    long = client.fine_tuning.jobs.create(training_file=f.id, model="base",
                                          hyperparameters={"n_epochs": 1000, "batch_size": 1})
    waiting = [client.fine_tuning.jobs.create(training_file=f.id, model="base",
                                              hyperparameters={"n_epochs": 1000, "batch_size": 1})
               for _ in range(2)]
    listed = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in listed.data] == [waiting[1].id, waiting[0].id] and listed.has_more  # newest first
    rest = client.fine_tuning.jobs.list(limit=2, after=listed.data[-1].id)
    assert [j.id for j in rest.data] == [long.id] and not rest.has_more
    paged = [j.id for j in client.fine_tuning.jobs.list(limit=1)]  # the client follows `after` page by page
    assert paged == [waiting[1].id, waiting[0].id, long.id]

    # one job at a time, oldest first: the long one trains, the others wait in the queue
    wait_for(client, long.id, ("running",), timeout=120)
    assert [client.fine_tuning.jobs.retrieve(j.id).status for j in waiting] == ["queued", "queued"]
    cancelled = client.fine_tuning.jobs.cancel(waiting[1].id)  # a queued job is cancelled at once
    assert cancelled.status == "cancelled"
    assert main(["-q", "jobs", "cancel", waiting[1].id]) == 2  # from the shell: it has already ended

    # cancel the training job once it has trained a few steps: it stops, leaving no adapter
    deadline = time.time() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id).data):
        assert time.time() < deadline, "no training step was logged"
        time.sleep(0.3)
    job_dir = ragtune_home / "jobs" / long.id
    stopped = client.fine_tuning.jobs.cancel(long.id)
    assert stopped.status == "cancelled" and stopped.fine_tuned_model is None
    assert not (job_dir / "run" / "adapter_config.json").exists()
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".run.")]  # no half-written adapter either
    assert "Fine-tuning job cancelled" in client.fine_tuning.jobs.list_events(long.id).data[0].message
    assert not any(m.id.startswith("ft:") for m in client.models.list().data)

    # the next queued job starts after it
    wait_for(client, waiting[0].id, ("running",), timeout=120)
    # from the shell: the server schedules the jobs, so the cancel goes through it and stops its worker
    assert main(["-q", "jobs", "cancel", waiting[0].id, "--server", server.url.removesuffix("/v1"),
                 "--api-key", KEY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert client.fine_tuning.jobs.retrieve(waiting[0].id).status == "cancelled"


def test_a_killed_worker_and_a_restart_leave_consistent_states(tmp_path: Path, trainable_llama: Path,  # noqa: F811
                                                                ragtune_home: Path, capsys: Any) -> None:
    first = Server(tmp_path, trainable_llama)
    try:
        client = first.client()
        f = upload(client, records(FACTS))
        big = upload(client, records(FACTS * 50))  # 100k steps: these two never finish before the kill and the stop
        killed = client.fine_tuning.jobs.create(training_file=big.id, model="base",
                                                hyperparameters={"n_epochs": 1000, "batch_size": 1})
        running = wait_for(client, killed.id, ("running",), timeout=120)
        assert running.status == "running"
        pid = first.app.state.jobs.proc.pid
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-training
        failed = wait_for(client, killed.id, ("failed",), timeout=60)
        assert failed.error.code == "worker_died" and "killed by signal 9" in failed.error.message
        assert not (ragtune_home / "jobs" / killed.id / "run" / "adapter_config.json").exists()

        interrupted = client.fine_tuning.jobs.create(training_file=big.id, model="base",
                                                     hyperparameters={"n_epochs": 1000, "batch_size": 1})
        wait_for(client, interrupted.id, ("running",), timeout=120)
        queued = client.fine_tuning.jobs.create(training_file=f.id, model="base", hyperparameters={"n_epochs": 1})
        dropped = client.fine_tuning.jobs.create(training_file=f.id, model="base", hyperparameters={"n_epochs": 1})
        wait_for(client, dropped.id, ("queued",), timeout=120)
    finally:
        first.stop()  # the server stops while a job trains and others wait
    assert main(["-q", "jobs", "cancel", dropped.id, "--json"]) == 0  # no server: cancelled on disk
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert main(["-q", "jobs", "show", interrupted.id]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"{interrupted.id}: failed") and "error (server_stopped)" in shown
    assert main(["-q", "jobs", "list", "--json"]) == 0
    assert [j["status"] for j in json.loads(capsys.readouterr().out)["data"]] == [
        "cancelled", "queued", "failed", "failed"]
    assert main(["-q", "jobs", "show", "ftjob-nope"]) == 2

    second = Server(tmp_path, trainable_llama)
    try:
        client = second.client()
        assert client.fine_tuning.jobs.retrieve(killed.id).status == "failed"
        assert client.fine_tuning.jobs.retrieve(dropped.id).status == "cancelled"
        was = client.fine_tuning.jobs.retrieve(interrupted.id)
        assert was.status == "failed" and was.error.code == "server_stopped"
        assert "the server stopped while this job was training" in was.error.message
        done = wait_for(client, queued.id, ("succeeded", "failed"))  # the queue carries on after the restart
        assert done.status == "succeeded" and done.fine_tuned_model in [m.id for m in client.models.list().data]
    finally:
        second.stop()
    third = Server(tmp_path, trainable_llama)  # a succeeded job's model is served after a restart too
    try:
        assert done.fine_tuned_model in [m.id for m in third.client().models.list().data]
    finally:
        third.stop()


def test_jobs_need_the_api_key_and_fine_tuning_on(tmp_path: Path, trainable_llama: Path) -> None:  # noqa: F811
    import httpx

    on = Server(tmp_path, trainable_llama)
    try:
        r = httpx.get(f"{on.url}/fine_tuning/jobs")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{on.url}/fine_tuning/jobs", json={"model": "base", "training_file": "file-x"})
        assert r.status_code == 401
        from ragtune.errors import UsageError

        with pytest.raises(UsageError, match="another 'ragtune serve' with serve.fine_tuning runs its jobs"):
            create_app(load_config(tmp_path / "serve.yaml"))  # a second server on the same jobs, before its port opens
    finally:
        on.stop()
    off = Server(tmp_path, trainable_llama, fine_tuning=False)
    try:
        r = httpx.get(f"{off.url}/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404
    finally:
        off.stop()


def serve_process_with_a_running_job(tmp_path: Path, base: Path, ragtune_home: Path, launch: list[str] | None = None,
                                     env: dict[str, str] | None = None) -> tuple[Any, str]:
    """`ragtune serve` in a process of its own (`launch` runs before its argv), with a long job running."""
    import subprocess
    import sys

    import httpx

    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {base}\ntrain:\n  learning_rate: 0.01\n  batch_size: 2\n  threads: 1\n"
                 f"serve:\n  api_key: {KEY}\n  fine_tuning: true\n  deployments:\n    - {{name: base}}\n")
    port = free_port()
    proc = subprocess.Popen([*(launch or [sys.executable, "-m", "ragtune"]), "serve", "--config", str(f), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAGTUNE_HOME": str(ragtune_home), "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.2)
        import openai

        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        job = client.fine_tuning.jobs.create(training_file=upload(client, records(FACTS)).id, model="base",
                                             hyperparameters={"n_epochs": 1000})
        wait_for(client, job.id, ("running",), timeout=120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, job.id


def test_a_server_killed_mid_job_stops_its_worker_and_the_next_server_reports_it(
        tmp_path: Path, trainable_llama: Path, ragtune_home: Path) -> None:  # noqa: F811
    proc, job_id = serve_process_with_a_running_job(tmp_path, trainable_llama, ragtune_home)
    proc.kill()  # no shutdown: the worker is left without its server
    proc.wait()
    state = ragtune_home / "jobs" / job_id / "job.json"
    pid = json.loads(state.read_text())["ragtune"]["worker_pid"]
    deadline = time.time() + 60
    while running(pid):
        assert time.time() < deadline, "the worker kept training after its server died"
        time.sleep(0.2)
    s = Server(tmp_path, trainable_llama)
    try:
        was = s.client().fine_tuning.jobs.retrieve(job_id)
        assert was.status == "failed" and was.error.code == "server_stopped"
        assert not (ragtune_home / "jobs" / job_id / "run" / "adapter_config.json").exists()
    finally:
        s.stop()


def test_a_worker_whose_stop_is_lost_still_ends_within_the_grace_after_its_server_dies(
        tmp_path: Path, trainable_llama: Path, ragtune_home: Path) -> None:  # noqa: F811
    """The watchdog's last resort (serve/job_worker.py, STOP_GRACE_S): the server dies and the SIGTERM the
    worker sends itself never arrives (blocked here, as a stop swallowed by a library or a main thread stuck
    in native code is lost); the worker still marks the job failed and exits, rather than train on."""
    import sys

    from ragtune.serve.job_worker import GRACE_ENV

    grace = 3.0
    block = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "  # inherited
             "os.execv(sys.executable, [sys.executable, '-m', 'ragtune', *sys.argv[1:]])")
    proc, job_id = serve_process_with_a_running_job(tmp_path, trainable_llama, ragtune_home,
                                                    launch=[sys.executable, "-c", block], env={GRACE_ENV: str(grace)})
    job_dir = ragtune_home / "jobs" / job_id
    pid = json.loads((job_dir / "job.json").read_text())["ragtune"]["worker_pid"]
    try:
        blocked = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked & (1 << (signal.SIGTERM - 1)), "the worker's SIGTERM is not blocked: this test tests nothing"
    finally:
        t0 = time.time()
        proc.kill()  # no shutdown, and the worker's own stop is lost
        proc.wait()
    try:
        while running(pid):
            assert time.time() - t0 < grace + 30, "the worker trained on after its server died and its stop was lost"
            time.sleep(0.1)
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    took = time.time() - t0
    log = (job_dir / "worker.log").read_text(errors="replace")
    assert took >= grace and f"did not stop within {grace:.0f} s" in log, (took, log[-2000:])
    state = json.loads((job_dir / "job.json").read_text())
    assert state["status"] == "failed" and state["error"]["code"] == "server_stopped", state
    assert not (job_dir / "run" / "adapter_config.json").exists()


def test_openai_model_names_kept_through_serve_model_aliases(tmp_path: Path, trainable_llama: Path) -> None:  # noqa: F811
    """The tutorial's own model names work unchanged once serve.model_aliases maps them to deployments."""
    import openai

    s = Server(tmp_path, trainable_llama, serve_extra="  model_aliases: ['gpt-4o-mini-2024-07-18=base']\n")
    try:
        client = s.client()
        ask = [{"role": "user", "content": FACTS[0][0]}]
        by_alias = client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=ask, temperature=0)
        by_name = client.chat.completions.create(model="base", messages=ask, temperature=0)
        assert by_alias.choices[0].message.content == by_name.choices[0].message.content
        assert client.models.retrieve("gpt-4o-mini-2024-07-18").id == "gpt-4o-mini-2024-07-18"
        job = client.fine_tuning.jobs.create(training_file=upload(client, records(FACTS)).id,
                                             model="gpt-4o-mini-2024-07-18", hyperparameters={"n_epochs": 1000})
        assert job.model == "gpt-4o-mini-2024-07-18"
        assert client.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "validating_files", "queued", "running")
        wait_for(client, job.id, ("cancelled",))
        with pytest.raises(openai.NotFoundError, match="aliases: gpt-4o-mini-2024-07-18.*serve.model_aliases"):
            client.chat.completions.create(model="gpt-4o", messages=ask)
    finally:
        s.stop()
    from ragtune.errors import UsageError

    bad = tmp_path / "bad"
    bad.mkdir()
    for item, why in (("gpt-4o", "write it as ALIAS=DEPLOYMENT"), ("gpt-4o=nope", "'nope' is not a deployment"),
                      ("base=base", "already a deployment's own name")):
        with pytest.raises(UsageError, match=why):
            Server(bad, trainable_llama, serve_extra=f"  model_aliases: ['{item}']\n")


class Records(list):
    """Log records of one logger, kept by a handler of its own (the CLI's logging set-up leaves it alone)."""

    def __init__(self, name: str):
        import logging

        super().__init__()
        self.logger = logging.getLogger(name)
        self.handler = logging.Handler()
        self.handler.emit = self.append  # type: ignore[method-assign]
        self.logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


def test_damaged_job_records_and_torn_event_lines_do_not_stop_the_other_jobs(server: Server, ragtune_home: Path,
                                                                            capsys: Any) -> None:
    import openai

    jobs = ragtune_home / "jobs"
    damaged = {"ftjob-0000000000000000000000aa": '{"id": "ftjob-0000000000000000000000aa"}',
               "ftjob-0000000000000000000000bb": "[]"}
    for job_id, text in damaged.items():
        (jobs / job_id).mkdir(parents=True)
        (jobs / job_id / "job.json").write_text(text)
    logged = Records("ragtune.serve.job_store")
    try:
        client = server.client()
        job = client.fine_tuning.jobs.create(training_file=upload(client, records(FACTS)).id, model="base",
                                             hyperparameters={"n_epochs": 1000})
        wait_for(client, job.id, ("running",), timeout=60)  # the scheduler validated and started it all the same
        time.sleep(3 * 0.5)  # a few more scheduler rounds
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
    finally:
        logged.close()
    warned = [r.getMessage() for r in logged if "is damaged" in r.getMessage()]
    assert len(warned) == 2 and all(any(i in w for w in warned) for i in damaged), warned  # once per file
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.retrieve("ftjob-0000000000000000000000bb")
    assert e.value.body["code"] == "job_damaged" and e.value.body["param"] == "fine_tuning_job_id"
    assert str(jobs / "ftjob-0000000000000000000000bb" / "job.json") in e.value.message
    assert "an array" in e.value.message
    with pytest.raises(openai.NotFoundError, match="is damaged"):
        client.fine_tuning.jobs.cancel("ftjob-0000000000000000000000aa")

    with open(jobs / job.id / "events.jsonl", "ab") as fh:  # a torn, undecodable line among the events
        fh.write(b'{"torn\xff\n')
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[-1].message == f"Created fine-tuning job: {job.id}" and all(e.id for e in events)
    assert main(["-q", "jobs", "show", job.id]) == 0
    assert f"Created fine-tuning job: {job.id}" in capsys.readouterr().out
    assert main(["-q", "jobs", "list", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["data"]] == [job.id]
    assert main(["-q", "jobs", "show", "ftjob-0000000000000000000000aa"]) == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and str(jobs / "ftjob-0000000000000000000000aa") in err and "Traceback" not in err

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match=f"job {job.id} is already cancelled; only"):
        client.fine_tuning.jobs.cancel(job.id)


def test_job_requests_are_strict_and_the_data_checks_notes_become_events(server: Server) -> None:
    import httpx
    import openai

    client = server.client()
    long_answer = " ".join(f"word{i}" for i in range(400))  # past data.max_length 128: its end is not trained
    data = records(FACTS + [("Describe the gate.", long_answer), (FACTS[0][0], "The code is pear.")])
    f = upload(client, data, "notes.jsonl")

    def refused(match: str, param: str, **kw: Any) -> None:
        with pytest.raises(openai.BadRequestError, match=match) as e:
            client.fine_tuning.jobs.create(**{"training_file": f.id, "model": "base", **kw})
        assert e.value.body["param"] == param, e.value.body

    refused("valid integer", "hyperparameters.n_epochs", hyperparameters={"n_epochs": True})
    refused("valid integer", "hyperparameters.batch_size", hyperparameters={"batch_size": "4"})
    refused("between 0.001 and 100", "hyperparameters.learning_rate_multiplier",
            hyperparameters={"learning_rate_multiplier": 1e-300})
    refused("valid integer", "seed", seed=True)
    refused("at most 16 items", "metadata", metadata={f"k{i}": "v" for i in range(17)})
    refused("at most 64 characters", "metadata." + "k" * 65, metadata={"k" * 65: "v"})
    refused("at most 512 characters", "metadata.k", metadata={"k": "v" * 513})
    refused("valid string", "metadata.k", metadata={"k": 1})
    refused("validation_file is empty", "validation_file", validation_file="")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(training_file=f.id, model="ft:base:x:0123")
    assert "is not served here; fine-tune one of the served base models: base" in e.value.message
    assert "+rag" not in e.value.message
    h = {"Authorization": f"Bearer {KEY}"}
    for query, param in (("limit=abc", "limit"), ("limit=0", "limit"), ("after=ftjob-nope", "after")):
        r = httpx.get(f"{server.url}/fine_tuning/jobs?{query}", headers=h)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (query, r.text)

    job = client.fine_tuning.jobs.create(training_file=f.id, validation_file=f.id, model="base",
                                         hyperparameters={"n_epochs": 1000, "learning_rate_multiplier": 2},
                                         metadata={"team": "policies"})
    assert job.metadata == {"team": "policies"} and job.hyperparameters.learning_rate_multiplier == 2.0
    wait_for(client, job.id, ("queued", "running"), timeout=120)
    warns = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.level == "warn"]
    assert len(warns) == 3, warns  # the same file as both: checked once
    assert any("validation_file is the training file" in w and "measures the training data" in w for w in warns)
    assert any(f"notes.jsonl ({f.id}): the answers of 1 record(s) are cut at data.max_length 128" in w
               and "(lines 3)" in w for w in warns)
    assert any("asked with different answers" in w and "lines 1, 4" in w for w in warns)
    client.fine_tuning.jobs.cancel(job.id)


def test_jobs_cancel_from_the_shell_finds_the_server_by_its_lock(server: Server, ragtune_home: Path,
                                                                capsys: Any) -> None:
    lock = ragtune_home / "jobs" / ".server.lock"
    recorded = json.loads(lock.read_text())
    assert recorded["pid"] == os.getpid() and recorded["url"] == "http://127.0.0.1:8000"  # the config's host:port
    client = server.client()
    job = client.fine_tuning.jobs.create(training_file=upload(client, records(FACTS)).id, model="base",
                                         hyperparameters={"n_epochs": 1000})
    wait_for(client, job.id, ("queued", "running"), timeout=120)
    lock.write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}"}))  # the same file: the server's lock holds
    assert main(["-q", "jobs", "cancel", job.id, "--api-key", KEY, f"serve.port={free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a ragtune server holds the jobs folder" in err and "pass --server URL" in err and "--config" in err
    assert len(err.splitlines()) == 1
    lock.write_text(json.dumps({"url": server.url.removesuffix("/v1")}))
    assert main(["-q", "jobs", "cancel", job.id, "--api-key", KEY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
