"""Retrieval for answering: the query, the numbered sources, and when to abstain.

    from ragtune.serve.answer import retrieve, open_retriever
    r = open_retriever(cfg, "default")          # None when no index and none was asked for
    got = retrieve(r, messages, cfg.rag)        # got.sources, got.abstain, got.best_score

The query is the last few user turns (`ragtune.chat.last_user_turns`), so follow-ups such as
"and for contractors?" still find the passage. Abstention compares the best *relevance* of the
hits with `rag.min_score`: the reranker's score when one was used, else the dense cosine
(`dense_score`). Fused RRF scores are ranks, not relevance, and are never compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ragtune.chat import last_user_turns
from ragtune.errors import UsageError
from ragtune.retrieval.store import index_dir

log = logging.getLogger(__name__)

SOURCE_KEYS = ("n", "source", "title", "page", "heading", "score", "text")
RELEVANCE_KEYS = ("rerank_score", "dense_score")  # first present, non-None wins


class SearchesIndex(Protocol):
    def search(self, query: str, top_k: int | None = None, mode: str | None = None,
               filters: Any = None) -> list[dict[str, Any]]: ...


@dataclass
class Retrieved:
    query: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # numbered, SOURCE_KEYS only
    best_score: float | None = None  # best relevance over the hits (None: no hits or no dense score)
    abstain: bool = False
    seconds: float = 0.0


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


def source_label(s: dict[str, Any]) -> str:
    """'Title > heading path (page N)' without repeating the title when the heading path starts with it."""
    title = s.get("title") or s.get("source") or ""
    heading = s.get("heading") or ""
    if heading == title:
        heading = ""
    elif heading.startswith(title + " > "):
        heading = heading[len(title) + 3:]
    return title + (f" > {heading}" if heading else "") + (f" (page {s['page']})" if s.get("page") else "")


def relevance(hit: dict[str, Any]) -> float | None:
    for key in RELEVANCE_KEYS:
        if hit.get(key) is not None:
            return float(hit[key])
    return None


def retrieve(retriever: SearchesIndex, messages: Sequence[dict[str, str]], top_k: int,
             min_score: float) -> Retrieved:
    """Search with the recent user turns; abstain when nothing scores at least `min_score`."""
    query = last_user_turns(messages)
    t0 = time.perf_counter()
    hits = retriever.search(query, top_k=top_k) if query.strip() else []
    secs = time.perf_counter() - t0
    scores = [s for s in (relevance(h) for h in hits) if s is not None]
    best = max(scores) if scores else None
    if not hits:
        abstain = True
    elif best is None:  # e.g. sparse-only search: no relevance to judge, keep the hits
        abstain = False
    else:
        abstain = best < min_score
    if abstain:
        log.info("retrieval found nothing above rag.min_score=%s (best %s): abstaining", min_score, best)
    sources = [] if abstain else [to_source(h, i) for i, h in enumerate(hits, 1)]
    return Retrieved(query=query, sources=sources, best_score=best, abstain=abstain, seconds=secs)


def index_exists(cfg: Any, name: str) -> bool:
    """True when the index can be expected to open: a server URL is set, or its folder exists."""
    return bool(cfg.store.url) or index_dir(name).is_dir()


def open_retriever(cfg: Any, index_name: str, read_copy: bool = False) -> Any:
    """A loaded `ragtune.retrieval.search.Retriever` for `index_name`; `read_copy` for long-lived
    readers (server, chat): they read a private copy, refreshed after each write, and never block writers."""
    try:
        from ragtune.retrieval.search import Retriever
    except ImportError as exc:
        raise UsageError(
            f"retrieval is not available in this installation ({exc}); answer without it with --no-rag "
            "or rag.enabled=false"
        ) from exc
    if not index_exists(cfg, index_name):
        raise UsageError(
            f"index '{index_name}' does not exist (looked in '{index_dir(index_name)}'); create it with "
            f"'ragtune index add DOCS --index {index_name}', or answer without retrieval (--no-rag)"
        )
    r = Retriever(cfg, index_name=index_name, read_copy=read_copy)
    r.load()
    return r


def retriever_for(cfg: Any, index: str | None = None, no_rag: bool = False, read_copy: bool = False) -> Any:
    """The retriever `ask`/`chat` use: none with --no-rag (or rag.enabled=false and no --index);
    the named index (which must exist); else the configured one when it exists, quietly none when not."""
    if no_rag or (not cfg.rag.enabled and not index):
        return None
    if index:
        return open_retriever(cfg, index, read_copy)
    name = cfg.index.name
    if not index_exists(cfg, name):
        log.info("no index '%s' yet (%s): answering without retrieval", name, index_dir(name))
        return None
    return open_retriever(cfg, name, read_copy)
