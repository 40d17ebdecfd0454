"""The server's deployments and the Runtime that loads and holds them.

    runtime = Runtime(cfg, generator=None, retrievers=None, warmup=False).load()
    d = runtime.find("policies+rag")   # a deployment by its name or a serve.model_aliases alias
    runtime.enter()                    # a queue slot, or a 429 past serve.max_queue
    try: ... d.generator.stream(messages, adapter=d.adapter_name, retriever=d.retriever, ...)
    finally: runtime.leave()
    runtime.close()                    # remote clients and the indexes it opened

`plan_deployments(cfg)` is the plan alone (config `serve.deployments`, or `base` (+ the model.adapter one)
and their `+rag` twins), checked at once; `model_aliases` checks serve.model_aliases against it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError, UsageError
from ragtune.serve.protocol import APIError

log = logging.getLogger(__name__)


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


def unknown_model(name: str, runtime: Runtime) -> APIError:
    aliases = f"; aliases: {', '.join(runtime.aliases)}" if runtime.aliases else ""
    shown = name if len(name) <= 80 else name[:80] + "..."  # a 200 KB name is not echoed back whole
    return APIError(404, f"model '{shown}' is not a deployment of this server (available: "
                    f"{', '.join(runtime.deployments)}{aliases}); see GET /v1/models, or name it in "
                    "serve.model_aliases", param="model", code="model_not_found")
