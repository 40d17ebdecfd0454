"""`ragtune serve`: an OpenAI-compatible HTTP server over configured deployments.

    ragtune serve --port 8000 --config configs/serve/local.yaml

    GET  /v1/models               the deployments (`base`, `policies`, `policies+rag`, ...); /v1/models/{id} one
    POST /v1/chat/completions     OpenAI chat completions, streaming (SSE, ends with [DONE]) or not;
                                  the answer's sources come back in the extra field `sources`;
                                  response_format (serve/constrained.py) and tools (serve/tools.py)
    POST /v1/embeddings           OpenAI embeddings with the configured embedder (the query vectors); an input
                                  over its maximum is a 400 unless truncate_prompt_tokens asks for the cut
    POST /v1/search               {"query", "index"?, "top_k"?, "mode"?, "filters"?} -> {"sources": [...]}
    GET  /health                  liveness and the deployments (no API key needed)
    GET  /                        a small chat page
    (HEAD works as GET on /health, / and /v1/models[/{id}], for load balancers and probes)

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

Here: create_app (the wiring, API key, origins) and run_serve. The routes and their parts:
serve/chat_route.py (chat completions; the request in serve/chat_request.py), serve/retrieval_routes.py
(embeddings, search), serve/deployments.py (Deployment, Runtime), serve/protocol.py (errors, bodies).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from ragtune.errors import UsageError
from ragtune.serve.chat_route import add_chat_route
from ragtune.serve.chat_request import MAX_STOP_CHARS  # noqa: F401 - imported from here by tests
from ragtune.serve.deployments import (  # noqa: F401 - Deployment, plan_deployments: imported from here
    Deployment, Runtime, plan_deployments, unknown_model)
from ragtune.serve.protocol import (  # noqa: F401 - parse_body, read_body, limited_stream: imported from here
    APIError, add_error_handlers, json_error, limited_stream, parse_body, read_body)
from ragtune.serve.retrieval_routes import Embeddings, add_retrieval_routes  # noqa: F401 - Embeddings: tests

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "RAGTUNE_API_KEY"


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
    """/health, the chat page and the model list (GET and HEAD: load balancers and probes send HEAD)."""
    from fastapi.responses import HTMLResponse

    from ragtune import __version__

    created = int(time.time())

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Any:
        return {"status": "ok", "version": __version__, "deployments": list(runtime.deployments),
                "queued": runtime.pending, "auth": bool(key)}

    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": page_policy(html), "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page() -> Any:
        return HTMLResponse(html, headers=page_headers)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])  # HEAD as GET, as /health: probes and SDK checks
    async def models() -> Any:
        return {"object": "list", "data": [model_card(d, created) for d in runtime.deployments.values()]}

    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def model(name: str) -> Any:
        d = runtime.find(name)
        if d is None:
            raise unknown_model(name, runtime)
        return {**model_card(d, created), "id": name}


def page_policy(html: str) -> str:
    """The chat page's Content-Security-Policy: its own inline script (by hash) and nothing else runs, so text
    from a model or a document that ever reached the page as markup could not run script; it calls only
    this server and cannot be framed by another site (clickjacking with the stored API key)."""
    import base64
    import hashlib
    import re

    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
                      for m in re.findall(r"<script>(.*?)</script>", html, flags=re.S))
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def model_card(d: Deployment, created: int) -> dict[str, Any]:
    return {"id": d.name, "object": "model", "created": created, "owned_by": "ragtune", "ragtune": d.describe()}


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
    sock = listen_socket(host, port)  # before any model loads: a taken port is said at once, as a usage error
    try:
        quiet_libraries()
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key_of(cfg):
            log.warning("binding to %s without an API key: anyone who can reach this port can use the models; "
                        "set serve.api_key or %s", host, API_KEY_ENV)
        app = create_app(cfg, warmup=True)
        shown = f"[{host}]" if ":" in host else host
        print(f"ragtune serve: http://{shown}:{port}/  (OpenAI base_url http://{shown}:{port}/v1; "
              f"models: {', '.join(app.state.runtime.deployments)})", flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level="info" if args.verbose else "warning")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def listen_socket(host: str, port: int) -> Any:
    """The server's socket, bound to host:port; a UsageError that says why and what to do when it cannot be
    (uvicorn's own bind would fail after the models load, log one line and exit 3, 'partial success')."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not an address or a name this machine resolves ({exc.strerror}); give "
                         "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a port in TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port}: {host}:{port} is already in use (another 'ragtune serve', or another "
                             "program); stop it, or pick a free port with --port N") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"--port {port}: not allowed to listen on {host}:{port} ({exc.strerror}; ports below "
                             "1024 need root); pick a port above 1023 with --port N") from None
        raise UsageError(f"--host {host}: cannot listen on {host}:{port} ({exc.strerror or exc}); give an address "
                         "of this machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sock.set_inheritable(True)
    return sock
