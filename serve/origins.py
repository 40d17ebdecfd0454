"""Which web pages may call `ragtune serve` from a browser: its own chat page, the origins listed in
`serve.allowed_origins`, and no others.

    allowed = parse_origins(cfg.serve.allowed_origins)    # UsageError naming every bad entry
    app.add_middleware(Origins, allowed=allowed)           # outside the API-key check

A browser lets any page send a "simple" cross-site POST (Content-Type text/plain or a form) without
asking first; it hides the answer from the page, but the server has already acted: a chat request,
an uploaded file, a fine-tuning job. Every such request carries the page's `Origin`, so:

- no `Origin` (curl, SDKs, ragtune's own client): passes untouched;
- `Origin` equal to the request's own `Host` (the chat page at `/`): passes untouched;
- `Origin` in serve.allowed_origins (or "*"): passes, with CORS headers on the answer (streams
  included); its preflight (`OPTIONS` with Access-Control-Request-Method) is answered here, 204;
- any other `Origin`: 403 in OpenAI's error shape, code `origin_not_allowed`, before any route runs.

DNS rebinding defeats the Origin check (the attacker's name, resolved to 127.0.0.1, makes Origin and
Host agree), so on a loopback connection the `Host` must also be a name only this machine answers to:
an IP address, localhost (or *.localhost), this machine's hostname, or the host of an allowed origin;
otherwise 403, code `host_not_allowed`. A server on a network address relies on its API key there.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ragtune.errors import UsageError

log = logging.getLogger(__name__)

SETTING = "serve.allowed_origins"
DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOW_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type"  # when a preflight names none
EXPOSE_HEADERS = "Retry-After"
MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


@dataclass(frozen=True)
class Allowed:
    """serve.allowed_origins, normalised: `any` for "*", else the exact origins and their hosts."""

    any: bool = False
    origins: frozenset[str] = field(default_factory=frozenset)
    hosts: frozenset[str] = field(default_factory=frozenset)


def normalize_origin(text: str) -> str | None:
    """`scheme://host[:port]` in lower case without a default port ("null" stays "null"); None when
    `text` is not an origin (a path, query, user name or bad port)."""
    text = text.strip()
    if text == "null":
        return text
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError:
        return None
    if not u.scheme or not u.hostname or u.path not in ("", "/") or u.query or u.fragment or "@" in u.netloc:
        return None
    scheme, host = u.scheme.lower(), u.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port is None or DEFAULT_PORTS.get(scheme) == port else f":{port}")


def parse_origins(items: tuple[str, ...]) -> Allowed:
    """serve.allowed_origins checked: each "*" or an origin as a browser writes it; every bad one is named."""
    problems: list[str] = []
    origins: set[str] = set()
    for i, item in enumerate(items):
        text = str(item).strip()
        if text == "*":
            continue
        norm = normalize_origin(text)
        if norm is None:
            problems.append(f"{SETTING}[{i}] '{item}': not an origin; write scheme://host[:port] as the browser's "
                            "address bar shows it, without a path (e.g. https://intranet.example:8443), or \"*\"")
        else:
            origins.add(norm)
    if problems:
        raise UsageError("\n".join(problems))
    hosts = {split_host(o.partition("://")[2])[0] for o in origins if o != "null"}
    return Allowed(any=any(str(x).strip() == "*" for x in items), origins=frozenset(origins), hosts=frozenset(hosts))


def split_host(host: str) -> tuple[str, int | None]:
    """A Host header's name (lower case, IPv6 without brackets) and port (None when absent or bad)."""
    name, port = host.strip().lower(), None
    if name.startswith("["):
        end = name.find("]")
        rest = name[end + 1:] if end > 0 else ""
        name = name[1:end] if end > 0 else ""
    else:
        name, _, rest = name.partition(":")
        rest = ":" + rest if _ else ""
    if rest.startswith(":") and rest[1:].isdigit():
        port = int(rest[1:])
    return name, port


def same_origin(origin: str, host: str) -> bool:
    """Whether a page on `origin` is this server as the browser reached it (its Host header)."""
    norm = normalize_origin(origin)
    if not norm or norm == "null" or not host:
        return False
    scheme, _, netloc = norm.partition("://")
    o_name, o_port = split_host(netloc)
    h_name, h_port = split_host(host)
    default = DEFAULT_PORTS.get(scheme)
    return bool(h_name) and o_name == h_name and (o_port or default) == (h_port or default)


def is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def host_allowed(host: str, allowed: Allowed) -> bool:
    """Whether a Host header on a loopback connection is one a rebound name cannot fake."""
    name, _ = split_host(host)
    name = name[:-1] if name.endswith(".") else name  # "localhost." is the same name, fully qualified
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True  # the page was opened by address: rebinding needs a name
    except ValueError:
        pass
    return (name == "localhost" or name.endswith(".localhost") or name in allowed.hosts
            or name == socket.gethostname().lower())


class Origins:
    """The ASGI middleware (a plain one: Starlette's BaseHTTPMiddleware would hide a client's disconnect)."""

    def __init__(self, app: Any, allowed: Allowed):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"").decode("latin-1")
        server = scope.get("server")
        if (b"host" in headers and server and is_loopback(str(server[0])) and not self.allowed.any
                and not host_allowed(host, self.allowed)):
            await self.refuse(scope, receive, send, "host_not_allowed", host_refusal(host, server))
            return
        raw = headers.get(b"origin")
        if raw is None:
            await self.app(scope, receive, send)
            return
        origin = raw.decode("latin-1")
        if same_origin(origin, host):
            await self.app(scope, receive, send)
            return
        if not (self.allowed.any or normalize_origin(origin) in self.allowed.origins):
            await self.refuse(scope, receive, send, "origin_not_allowed", origin_refusal(origin))
            return
        cors = [(b"access-control-allow-origin", b"*" if self.allowed.any else raw), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await preflight(send, cors, headers.get(b"access-control-request-headers", b"").decode("latin-1"))
            return

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), *cors,
                                                 (b"access-control-expose-headers", EXPOSE_HEADERS.encode())])
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def refuse(self, scope: Any, receive: Any, send: Any, code: str, message: str) -> None:
        from ragtune.serve.server import APIError, json_error

        log.warning("refused %s %s: %s", scope["method"], scope["path"], message)
        await json_error(APIError(403, message, code=code))(scope, receive, send)


async def preflight(send: Any, cors: list[tuple[bytes, bytes]], requested: str) -> None:
    """204 naming the methods and headers a page on an allowed origin may use (those it asked for)."""
    asked = requested.strip()
    headers = [*cors, (b"access-control-allow-methods", ALLOW_METHODS.encode()),
               (b"access-control-allow-headers", (asked if HEADER_LIST.fullmatch(asked) else ALLOW_HEADERS).encode()),
               (b"access-control-max-age", str(MAX_AGE_S).encode()),
               (b"vary", b"Access-Control-Request-Method, Access-Control-Request-Headers")]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def shown(text: str) -> str:
    return text if len(text) <= 100 else text[:100] + "..."


def origin_refusal(origin: str) -> str:
    norm = normalize_origin(origin)
    fix = (f"if that page is yours, add it to {SETTING} (e.g. {SETTING}={norm}) or \"*\" to allow any"
           if norm and norm != "null" else
           f"a page without a web origin (a file or a sandboxed frame) is allowed only when {SETTING} lists "
           "\"null\" or \"*\"")
    return (f"origin '{shown(origin)}' may not call this server: the browser sent this request for a page on "
            f"another site, and such pages cannot use its models, files or jobs; {fix}")


def host_refusal(host: str, server: Any) -> str:
    addr = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
    port = f":{server[1]}" if len(server) > 1 and server[1] else ""
    return (f"Host '{shown(host)}' is not a name of this server: it is reached on its loopback address, where a "
            f"page on another site can rename it through DNS (rebinding); open http://{addr}{port}/ or "
            f"http://localhost{port}/, or if a proxy on this machine forwards that name, add its origin "
            f"(e.g. https://{shown(split_host(host)[0])}) to {SETTING}")
