"""The sources shape every part shares, and an index opened for reading.

    from ragtune.retrieval.sources import open_retriever, to_source
    r = open_retriever(cfg, "default")                       # a loaded Retriever; UsageError naming the fix
    sources = [to_source(h, n) for n, h in enumerate(r.search("remote days"), 1)]

A source is `{"n", "source", "title", "page", "heading", "score", "text"}` wherever it appears
(search, ask --json, the server's extra field, eval, retrieval-built training prompts). Its
`score` is the relevance a reader can judge (the reranker's score, else the dense cosine), never the
fused rank score. Serving (ragtune.serve.answer) and training on retrieved prompts (train/rag.py)
both read from here, so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from ragtune.errors import UsageError
from ragtune.retrieval.store import index_dir

SOURCE_KEYS = ("n", "source", "title", "page", "heading", "score", "text")
RELEVANCE_KEYS = ("rerank_score", "dense_score")  # first present, non-None wins


def to_source(hit: dict[str, Any], n: int) -> dict[str, Any]:
    """One hit in the shared sources shape `{"n","source","title","page","heading","score","text"}`.

    `score` is the relevance a reader can judge (the reranker's score, else the dense cosine), not
    the fused rank score (0.033 says nothing to a person); hits keep their fused order."""
    score = relevance(hit)
    score = hit.get("score") if score is None else score
    return {
        "n": n,
        "source": hit.get("source", ""),
        "title": hit.get("title", "") or "",
        "page": hit.get("page"),
        "heading": hit.get("heading", "") or "",
        "score": None if score is None else float(score),
        "text": hit.get("text", "") or "",
    }


def relevance(hit: dict[str, Any]) -> float | None:
    for key in RELEVANCE_KEYS:
        if hit.get(key) is not None:
            return float(hit[key])
    return None


def index_exists(cfg: Any, name: str) -> bool:
    """True when the index can be expected to open: a server URL is set, or its folder exists."""
    return bool(cfg.store.url) or index_dir(name).is_dir()


def open_retriever(cfg: Any, index_name: str, read_copy: bool = False,
                   without: str = "answer without retrieval (--no-rag)") -> Any:
    """A loaded `ragtune.retrieval.search.Retriever` for `index_name`; `read_copy` for long-lived
    readers (server, chat): they read a private copy, refreshed after each write, and never block writers.
    `without`: how this command does without an index, for the message when it does not exist."""
    try:
        from ragtune.retrieval.search import Retriever
    except ImportError as exc:
        raise UsageError(
            f"retrieval is not available in this installation ({exc}); answer without it with --no-rag "
            "or rag.enabled=false"
        ) from exc
    if not index_exists(cfg, index_name):
        from ragtune.retrieval.store import missing_index

        raise missing_index(index_name, str(index_dir(index_name)), also=without)
    r = Retriever(cfg, index_name=index_name, read_copy=read_copy)
    r.load()
    return r
