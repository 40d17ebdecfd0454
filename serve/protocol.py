"""What every route shares: OpenAI's error shape, and reading and checking a request body.

    add_error_handlers(app)        # every error as {"error": {"message", "type", "param", "code"}}
    raise APIError(404, "index 'x' is not served here", param="index", code="index_not_found")
    body = await read_body(request, cfg.serve.max_body_bytes)   # 413 past the limit, declared or not
    req = parse_body(body, SearchRequest)   # a JSON object of valid Unicode that fits the schema, else a 400
    await json_error(APIError(401, "invalid API key"))(scope, receive, send)   # from an ASGI middleware

`validation_error` turns pydantic's errors into one 400 naming each field by its path in the body.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import ValidationError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


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


def parse_body(body: bytes, schema: Any) -> Any:
    return validate(read_json(body), schema)


def validate(data: dict[str, Any], schema: Any) -> Any:
    """A body already read as JSON, checked against `schema` (a 400 naming the field otherwise)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def read_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; too deep, malformed, not an object, or holding text that is not
    valid Unicode anywhere (a lone surrogate such as \\ud800 from a JSON escape) is a 400."""
    try:
        data = json.loads(body)
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply to parse", code="invalid_json") from exc
    except UnicodeDecodeError as exc:  # a ValueError too: first, for its own fix
        raise APIError(400, f"request body is not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                       f"({exc.reason}); send the JSON encoded as UTF-8 (Latin-1 or another code page is not read)",
                       code="invalid_json") from exc
    except ValueError as exc:
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
