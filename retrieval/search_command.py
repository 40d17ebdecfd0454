"""`ragtune search`: one query or a batch (--queries) against the index in this process or a running
server (--server), printed as a list of hits or JSON; --explain says why each hit ranks where it does.

    rc = run_search(args, cfg)     # args from the parser retrieval/cli.py registers
    add_explain(hits, cfg, "hybrid")   # each hit gets "explain": its dense and lexical rank, fused score

Exit codes: 0 ok, 2 usage error, 3 some queries of a batch failed (each failed line says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ragtune.errors import EXIT_OK, EXIT_PARTIAL


def run_search(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.client import api_key, read_batch, server_url
    from ragtune.errors import UsageError
    from ragtune.retrieval.filters import parse_filters

    if (args.query is None) == (args.queries is None):
        raise UsageError("give one QUERY or --queries FILE (JSONL with a \"query\" field, or one query a line; "
                         "'-' reads stdin)")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: give the number of hits to return, 1 or more "
                         "(leave it out for search.top_k)")
    filters = parse_filters(args.filter)
    url = server_url(args.server)
    if args.explain and url:
        raise UsageError(f"--explain needs the index in this process, but the search would go to the server {url} "
                         "(--server or RAGTUNE_SERVER), whose /v1/search answers without per-channel ranks; "
                         "drop --server and unset RAGTUNE_SERVER to explain")
    searcher = _RemoteSearch(url, api_key(args.api_key), args.index) if url else _LocalSearch(cfg, args.index)
    try:
        if args.queries is None:
            query = sys.stdin.read().strip() if args.query == "-" else args.query
            hits = searcher.search(query, args.top_k, args.mode, filters or None)
            if args.explain:
                add_explain(hits, cfg, args.mode)
            _print_hits(hits, args.json, args.explain)
            return EXIT_OK
        return _search_batch(searcher, read_batch(args.queries, "query"), args, filters)
    finally:
        searcher.close()


def _search_batch(searcher: Any, rows: list[Any], args: argparse.Namespace, filters: dict[str, Any]) -> int:
    """One JSON line per input line, in order; a bad line gets {"line", "error"} and the rest go on."""
    from ragtune.errors import RagtuneError
    from ragtune.retrieval.filters import parse_filters

    failed = 0
    for n, obj, why in rows:
        if obj is not None:
            try:
                f = dict(filters)
                if isinstance(obj.get("filters"), dict):
                    f.update(obj["filters"])
                elif obj.get("filter") is not None:
                    f.update(parse_filters(obj["filter"] if isinstance(obj["filter"], list) else [obj["filter"]]))
                hits = searcher.search(obj["query"], obj.get("top_k", args.top_k), obj.get("mode", args.mode),
                                       f or None)
                if args.explain:
                    add_explain(hits, searcher.retriever.cfg, obj.get("mode", args.mode))
                out: dict[str, Any] = {"line": n, "query": obj["query"], "hits": hits}
            except RagtuneError as exc:
                why = str(exc)
        if obj is None or why:
            failed += 1
            out = {"line": n, "error": why}
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return EXIT_PARTIAL if failed else EXIT_OK


class _LocalSearch:
    """The index in this process; the exported query encoder is written after the first search that
    had to load sentence-transformers, so the next process starts without torch."""

    def __init__(self, cfg: Any, index: str | None) -> None:
        from ragtune.retrieval.search import Retriever

        self.retriever = Retriever(cfg, index).load()

    def search(self, query: str, top_k: Any, mode: Any, filters: Any) -> list[dict[str, Any]]:
        from ragtune.errors import UsageError

        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise UsageError(f"top_k must be an integer of 1 or more, got {top_k!r}")
        return self.retriever.search(query, top_k=top_k, mode=mode, filters=filters)

    def close(self) -> None:
        emb = self.retriever.embedder
        self.retriever.close()
        if emb is not None:
            emb.ensure_export()


class _RemoteSearch:
    """POST /v1/search on a running `ragtune serve` (the sources shape comes back)."""

    def __init__(self, url: str, key: str, index: str | None) -> None:
        self.url, self.key, self.index = url, key, index

    def search(self, query: str, top_k: Any, mode: Any, filters: Any) -> list[dict[str, Any]]:
        from ragtune.client import post_json

        body: dict[str, Any] = {"query": query}
        for k, v in (("index", self.index), ("top_k", top_k), ("mode", mode), ("filters", filters)):
            if v is not None:
                body[k] = v
        return list(post_json(self.url, "/v1/search", body, self.key).get("sources") or [])

    def close(self) -> None:
        pass


def add_explain(hits: list[dict[str, Any]], cfg: Any, mode: str | None) -> None:
    """Each hit gets `explain`: {"mode", "dense": {rank, score}, "lexical": {rank, score}, "fused",
    "fusion", "rerank", "why"}, a rank of None meaning that channel did not return the hit, a channel
    that was not searched None as a whole; `why` is the line `--explain` prints."""
    s = cfg.search
    mode = mode or s.mode
    hybrid = any(h.get("fused_score") is not None for h in hits)
    reranked = any(h.get("rerank_score") is not None for h in hits)
    n = max(s.candidates if hybrid else 0, s.rerank_candidates if reranked else 0, len(hits))
    fusion = {"method": s.fusion, "weights": [s.dense_weight, s.sparse_weight]} if hybrid else None
    if fusion and s.fusion == "rrf":
        fusion["k"] = s.rrf_k
    for h in hits:
        dense = {"rank": h.get("dense_rank"), "score": h.get("dense_score")}
        lexical = None if mode == "dense" or (mode == "hybrid" and not hybrid) else \
            {"rank": h.get("sparse_rank"), "score": h.get("sparse_score")}
        parts = [_channel("dense", dense["rank"], dense["score"], "cos", n, mode != "sparse")]
        if lexical is not None:
            parts.append(_channel("lexical", lexical["rank"], lexical["score"], "bm25", n, True))
        elif mode == "hybrid":
            parts.append("lexical: no terms left in the query (stop-words only), dense alone")
        else:
            parts.append("lexical: not searched (mode dense)")
        why = "; ".join(parts)
        if hybrid:
            w = fusion["weights"]  # type: ignore[index]
            why += f" -> fused {h['fused_score']:.4f} ({s.fusion}, dense:lexical weights {w[0]:g}:{w[1]:g})"
        if h.get("rerank_score") is not None:
            why += f" -> reranked {h['rerank_score']:.4f}"
        h["explain"] = {"mode": mode, "dense": dense, "lexical": lexical,
                        "fused": h.get("fused_score") if hybrid else None, "fusion": fusion,
                        "rerank": h.get("rerank_score"), "why": why}


def _channel(name: str, rank: Any, score: Any, unit: str, n: int, searched: bool) -> str:
    sc = f"{unit} {score:.4f}" if score is not None else ""
    if rank is not None:
        return f"{name} #{rank} ({sc})"
    if not searched:  # sparse mode: the cosine is computed for abstention, there was no dense ranking
        return f"{name}: not searched ({sc})" if sc else f"{name}: not searched"
    return f"{name}: not in its top {n}" + (f" ({sc})" if sc else "")


def _print_hits(hits: list[dict[str, Any]], as_json: bool, explain: bool = False) -> None:
    from ragtune.cli import print_json

    if as_json:
        print_json(hits)
        return
    if not hits:
        print("no results")
        return
    for h in hits:
        where = h["source"] or "?"
        if h.get("page"):
            where += f" p.{h['page']}"
        if h.get("heading"):
            where += f" > {h['heading']}"
        dense = f"  cos {h['dense_score']:.3f}" if h.get("dense_score") is not None else ""
        text = " ".join(str(h["text"]).split())
        print(f"[{h['n']}] {h['score']:.4f}{dense}  {where}")
        if explain:
            print(f"    why: {h['explain']['why']}")
        print(f"    {text[:200]}{'...' if len(text) > 200 else ''}")
        if h.get("duplicates"):
            print("    the same text in: " + ", ".join(
                str(d["source"]) + (f" p.{d['page']}" if d.get("page") else "") for d in h["duplicates"]))
