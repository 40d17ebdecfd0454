"""OpenAI's fine-tuning jobs API on `ragtune serve` (with `serve.fine_tuning: true`):

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="base", hyperparameters={"n_epochs": 3})
    client.fine_tuning.jobs.retrieve(job.id).status      # validating_files, queued, running, succeeded, ...
    client.chat.completions.create(model=client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model, ...)

    POST /v1/fine_tuning/jobs                       create (model: a served deployment without adapter or index)
    GET  /v1/fine_tuning/jobs?after=&limit=         newest first
    GET  /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel
    GET  /v1/fine_tuning/jobs/{id}/events?after=&limit=
    GET  /v1/fine_tuning/jobs/{id}/checkpoints?after=&limit=

Request bodies are checked here (JobRequest, strict Hyperparameters); the jobs themselves are made,
validated, queued, trained one at a time and served by JobManager (serve/job_manager.py: how
scheduling and restarts work), on the records of serve/job_store.py. Mounted by create_app:

    manager = JobManager(runtime).claim()       # before the port opens
    app.include_router(jobs_router(manager))
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from fastapi import Request  # module level: FastAPI resolves the routes' annotations here
from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints, ValidationInfo,
                      field_validator)

from ragtune.serve.job_manager import JobManager
from ragtune.serve.job_store import DamagedRecord, page, public

__all__ = ["JobManager", "JobRequest", "Hyperparameters", "jobs_router"]


RANGES = {"n_epochs": (1, 1000), "batch_size": (1, 4096),
          # below 1/1000 of train.learning_rate a LoRA run barely moves off the base model
          "learning_rate_multiplier": (0.001, 100)}


class Hyperparameters(BaseModel):
    """Strict numbers: `true` is not 1 and "3" is not 3 (the job would train with a value nobody sent)."""
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Literal["auto"], StrictInt] = "auto"
    batch_size: Union[Literal["auto"], StrictInt] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], StrictFloat] = "auto"

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier")
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        lo, hi = RANGES[info.field_name or ""]
        if value != "auto" and not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"must be between {lo} and {hi}, or \"auto\"")
        return value


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, strict=True)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = None
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512, strings only
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(default=None, max_length=16)


def jobs_router(manager: JobManager) -> Any:
    """The /v1/fine_tuning/jobs routes (mounted by create_app behind the same API key as the rest of /v1)."""
    from fastapi import APIRouter
    from starlette.concurrency import run_in_threadpool

    from ragtune.serve.files import query_limit
    from ragtune.serve.server import APIError, parse_body, read_body

    router = APIRouter()
    store = manager.store
    body_limit = manager.cfg.serve.max_body_bytes

    def get(job_id: str) -> dict[str, Any]:
        try:
            return store.get(job_id)
        except DamagedRecord as exc:
            raise APIError(404, f"fine-tuning job '{job_id}' cannot be read: its record {exc}; create the job again "
                           "(the server's operator can remove that folder)", param="fine_tuning_job_id",
                           code="job_damaged") from None
        except KeyError:
            raise APIError(404, f"no fine-tuning job '{job_id}' (GET /v1/fine_tuning/jobs lists them)",
                           param="fine_tuning_job_id", code="job_not_found") from None

    def listing(rows: list[dict[str, Any]], after: str, raw_limit: str, what: str) -> dict[str, Any]:
        limit = query_limit(raw_limit, 100)
        got = page(rows, after, limit)
        if got is None:
            raise APIError(404, f"after: no {what} '{after}' in this list", param="after", code="not_found")
        return {"object": "list", "data": got[0], "has_more": got[1]}

    @router.post("/v1/fine_tuning/jobs")
    async def create(request: Request) -> Any:
        req = parse_body(await read_body(request, body_limit), JobRequest)
        return public(await run_in_threadpool(manager.create, req))

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str = "", limit: str = "20") -> Any:
        return listing([public(j) for j in store.list()], after, limit, "job")

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str) -> Any:
        return public(get(job_id))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> Any:
        get(job_id)
        return public(await run_in_threadpool(manager.cancel, job_id))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: str = "", limit: str = "20") -> Any:
        get(job_id)
        return listing(store.events(job_id), after, limit, "event")

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, after: str = "", limit: str = "10") -> Any:
        get(job_id)
        return listing(store.checkpoints(job_id), after, limit, "checkpoint")

    return router

