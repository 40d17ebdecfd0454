"""`ragtune index ...` and `ragtune search ...` (argument parsing only; work happens on demand).

    ragtune index add docs/ manual.pdf [--index NAME]     ingest files and folders
    ragtune index sync docs/ [--dry-run]                  make the index match the folder
    ragtune index remove SOURCE | list | stats | migrate --to URL
    ragtune search "QUERY" [--top-k K] [--mode dense|sparse|hybrid] [--filter source=x.md] [--json]

Exit codes: 0 ok, 2 usage error, 3 partial (some files skipped; the summary says why).
"""

from __future__ import annotations

import argparse
from typing import Any

from ragtune.errors import EXIT_OK, EXIT_PARTIAL


def _index_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, metavar="NAME", help="index name (default: index.name, 'default')")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="add, sync, remove, list documents in an index",
        description="Build and maintain a retrieval index (Qdrant Edge in-process by default; a Qdrant server "
                    "when store.url is set). Supported files: .txt .md .html .htm .pdf .docx .jsonl.",
    )
    isub = p.add_subparsers(dest="index_cmd", metavar="{add,sync,remove,list,stats,migrate}")
    pa = isub.add_parser("add", help="ingest files and folders (changed files replace their own chunks)")
    pa.add_argument("paths", nargs="+", metavar="PATH")
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.add_argument("--follow-links", action="store_true",
                    help="follow symbolic links that point outside the folder (index.follow_links)")
    _index_arg(pa)
    ps = isub.add_parser("sync", help="make the index match a folder: add new, replace changed, delete removed")
    ps.add_argument("paths", nargs="+", metavar="PATH")
    ps.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    ps.add_argument("--no-progress", action="store_true", help="no progress bar")
    ps.add_argument("--follow-links", action="store_true",
                    help="follow symbolic links that point outside the folder (index.follow_links)")
    _index_arg(ps)
    pr = isub.add_parser("remove", help="delete documents by source (as listed), file or folder path")
    pr.add_argument("sources", nargs="+", metavar="SOURCE")
    _index_arg(pr)
    pl = isub.add_parser("list", help="documents in the index")
    _index_arg(pl)
    pt = isub.add_parser("stats", help="counts, embedder, store location and size")
    _index_arg(pt)
    pm = isub.add_parser("migrate", help="copy an index to a Qdrant server (or back with --to edge)")
    pm.add_argument("--to", required=True, metavar="URL", help="http(s)://host:6333, local:PATH, or 'edge'")
    pm.add_argument("--api-key", default="", help="API key of the destination server")
    pm.add_argument("--replace", action="store_true", help="overwrite a destination that holds chunks")
    _index_arg(pm)
    p.set_defaults(func=_run_index, index_cmd=None, parser=p)

    s = sub.add_parser(
        "search", help="hybrid search over an index",
        description="Ranked chunks for a query: dense, sparse (BM25 with IDF; Korean through Kiwi) or hybrid "
                    "(reciprocal rank fusion of both).",
    )
    s.add_argument("query", metavar="QUERY")
    s.add_argument("--top-k", type=int, default=None, metavar="K", help="hits to return (default search.top_k)")
    s.add_argument("--mode", choices=["dense", "sparse", "hybrid"], default=None, help="default search.mode (hybrid)")
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="exact match on source, file, root, title, doc_id, page or meta.KEY; repeatable")
    _index_arg(s)
    s.set_defaults(func=_run_search)


def _run_index(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json, print_table

    if not args.index_cmd:
        args.parser.print_help()
        return 2
    from ragtune.retrieval import ingest as ing

    if args.index_cmd in ("add", "sync"):
        if args.follow_links:
            import dataclasses

            cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, follow_links=True))
        res = ing.ingest(cfg, args.paths, args.index, delete_missing=args.index_cmd == "sync",
                         dry_run=getattr(args, "dry_run", False), progress=not args.no_progress and not args.json)
        if args.json:
            print_json(res.to_dict())
        else:
            _print_ingest(res)
        return EXIT_PARTIAL if res.skipped else EXIT_OK
    if args.index_cmd == "remove":
        out = ing.remove(cfg, args.sources, args.index)
        if args.json:
            print_json(out)
        else:
            print(f"removed {len(out['removed'])} documents ({out['chunks_deleted']} chunks) from index '{out['index']}'")
            for s in out["removed"]:
                print(f"  {s}")
        return EXIT_OK
    if args.index_cmd == "list":
        rows = ing.list_documents(cfg, args.index)
        if args.json:
            print_json(rows)
        else:
            for r in rows:
                r["complete"] = "" if r["complete"] else "incomplete"
            print_table(rows, ["source", "chunks", "title", "root", "complete"])
        return EXIT_OK
    if args.index_cmd == "stats":
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
            for r in st["roots"]:
                print(f"root       {r}")
        return EXIT_OK
    if args.index_cmd == "migrate":
        out = ing.migrate(cfg, args.to, args.index, api_key=args.api_key, replace=args.replace)
        if args.json:
            print_json(out)
        else:
            print(f"copied {out['chunks']} chunks of index '{out['index']}' from {out['from']} to {out['to']} "
                  f"in {out['seconds']:.1f}s; set store.url={args.to} to use it")
        return EXIT_OK
    return 2


def _print_ingest(res: Any) -> None:
    if res.dry_run:
        print(f"dry run for index '{res.index}' (nothing changed):")
        for label, items in (("add", res.added), ("replace", res.replaced), ("delete", res.deleted)):
            for s in items:
                print(f"  {label:8s}{s}")
        print(f"  would add {len(res.added)}, replace {len(res.replaced)}, delete {len(res.deleted)}, "
              f"keep {res.unchanged} unchanged")
    else:
        embed_share = (res.embed_seconds / res.seconds * 100) if res.seconds else 0.0
        print(f"index '{res.index}': added {len(res.added)}, "
              f"replaced {len(res.replaced)}, deleted {len(res.deleted)}, unchanged {res.unchanged} documents; "
              f"{res.chunks_written} chunks written, {res.chunks_deleted} deleted in {res.seconds:.1f}s "
              f"({embed_share:.0f}% embedding)")
    if res.skipped:
        print(f"skipped {len(res.skipped)} files:")
        for path, reason in res.skipped:
            print(f"  {path}: {reason}")


def _run_search(args: argparse.Namespace, cfg: Any) -> int:
    from ragtune.cli import print_json
    from ragtune.retrieval.search import Retriever, parse_filters

    filters = parse_filters(args.filter)
    with Retriever(cfg, args.index) as r:
        hits = r.search(args.query, top_k=args.top_k, mode=args.mode, filters=filters or None)
    if args.json:
        print_json(hits)
        return EXIT_OK
    if not hits:
        print("no results")
        return EXIT_OK
    for h in hits:
        where = h["source"] or "?"
        if h.get("page"):
            where += f" p.{h['page']}"
        if h.get("heading"):
            where += f" > {h['heading']}"
        dense = f"  cos {h['dense_score']:.3f}" if h.get("dense_score") is not None else ""
        text = " ".join(str(h["text"]).split())
        print(f"[{h['n']}] {h['score']:.4f}{dense}  {where}")
        print(f"    {text[:200]}{'...' if len(text) > 200 else ''}")
    return EXIT_OK
