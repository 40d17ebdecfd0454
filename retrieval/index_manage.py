"""The index commands besides add and sync: remove documents, list documents and indexes, drop an
index, its stats, and migrate it into another store.

    remove(cfg, ["docs/old.pdf"], index="default")           # `ragtune index remove docs/old.pdf`
    list_documents(cfg, "default"); list_indexes(cfg); stats(cfg, "default")
    drop(cfg, "default")                                      # `ragtune index drop default`
    migrate(cfg, "http://localhost:6333", index="default")    # `ragtune index migrate --to URL`
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ragtune.config import Config
from ragtune.errors import UsageError
from ragtune.retrieval.ingest_plan import outdated_reader, state_file
from ragtune.retrieval.ingest_write import lexical_settings, update_lexical_stats
from ragtune.retrieval.loaders import reader_format
from ragtune.retrieval.store import IndexLock, PointData, Store, missing_index, open_for_reading, open_store


def remove(cfg: Config, sources: list[str], index: str | None = None) -> dict[str, Any]:
    """Delete the documents whose source, file, or absolute path (file or folder) matches. A source
    name that documents under two roots share (each folder's 'a.txt') is refused unless its path tells
    which; `removed` has one entry a document (a shared source with its root)."""
    name = index or cfg.index.name
    if any(not want.strip() for want in sources):  # "" resolves to the working folder: every document under it
        raise UsageError(f"a SOURCE to remove is empty (an unset shell variable?), nothing was removed; name "
                         f"documents as 'ragtune index list --index {name}' shows them, or a file or folder path")
    store = open_store(cfg, name)
    if not store.exists():
        raise missing_index(name)
    with IndexLock(name, "ragtune index remove " + " ".join(sources)):
        store.open()
        try:
            states = store.doc_states()
            doomed: dict[str, dict[str, Any]] = {}
            for want in sources:
                for st in _remove_matches(states, want, name):
                    doomed[st["doc_id"]] = st
            before = store.count()
            store.delete_docs(sorted(doomed))
            after = store.count()
            update_lexical_stats(store, lexical_settings(cfg, store.read_meta())["stemmer"])
            store.flush()
        finally:
            store.close()
    return {"index": name, "removed": _removed_names(list(doomed.values())), "chunks_deleted": before - after}


def _remove_matches(states: dict[str, dict[str, Any]], want: str, name: str) -> list[dict[str, Any]]:
    """The documents `index remove WANT` means: by source or file name, or under WANT as a path."""
    # a path as the shell gives it, also of a file already deleted (the usual reason to remove it)
    absolute = str(Path(want).expanduser().resolve())
    named = [st for st in states.values() if want in (st.get("source"), st.get("file"))]
    under = [st for st in states.values()
             if (f := state_file(st)) and (f == absolute or Path(f).is_relative_to(absolute))]
    roots = sorted({str(st.get("root", "")) for st in named})
    if len(roots) > 1:
        if under:
            return under  # the path says which of them
        examples = " or ".join(f"'{Path(r) / want}'" for r in roots[:2])
        raise UsageError(f"'{want}' names documents under {len(roots)} roots of index '{name}' ({', '.join(roots)}), "
                         f"nothing was removed; give the path of the one to remove ({examples}), or each path "
                         "to remove them all")
    hits = {st["doc_id"]: st for st in named + under}
    if not hits:
        raise UsageError(f"no document in index '{name}' matches '{want}'; see 'ragtune index list --index {name}'")
    return list(hits.values())


def _removed_names(states: list[dict[str, Any]]) -> list[str]:
    """One entry a removed document: its source, with its root where another removed one has the same."""
    seen: dict[str, int] = {}
    for st in states:
        seen[str(st.get("source", st["doc_id"]))] = seen.get(str(st.get("source", st["doc_id"])), 0) + 1
    out = []
    for st in states:
        src = str(st.get("source", st["doc_id"]))
        out.append(f"{src} (in {st.get('root')})" if seen[src] > 1 else src)
    return sorted(out)


def list_documents(cfg: Config, index: str | None = None) -> list[dict[str, Any]]:
    name = index or cfg.index.name
    with open_for_reading(cfg, name) as store:
        states = store.doc_states()
    rows = []
    for st in states.values():
        rows.append({
            "source": st.get("source", "?"), "title": st.get("title", ""), "chunks": st["count"],
            "root": st.get("root", ""), "complete": st["count"] == st.get("n_chunks"),
        })
    return sorted(rows, key=lambda r: (r["root"], r["source"]))


def drop(cfg: Config, name: str) -> dict[str, Any]:
    """Delete a whole index (`ragtune index drop NAME`): its chunks, vectors and metadata; the
    documents it was built from are not touched. Refused while a process writes it or a running
    server or chat reads a copy of it."""
    from ragtune.errors import RagtuneError
    from ragtune.retrieval.store import EdgeStore, IndexBusy, live_readers

    store = open_store(cfg, name)
    if not store.exists():
        raise missing_index(name, store.location(), how="nothing to drop", others=isinstance(store, EdgeStore))
    with IndexLock(name, "ragtune index drop " + name):
        if isinstance(store, EdgeStore):
            pids = live_readers(name)
            if pids:
                raise IndexBusy(
                    f"index '{name}' is open in running process {', '.join(map(str, pids))} (a 'ragtune serve' "
                    "or 'ragtune chat' reading it); stop it and run 'ragtune index drop' again"
                )
        try:
            chunks = store.open().count()
        except RagtuneError:
            chunks = -1
        location = store.location()
        if isinstance(store, EdgeStore):
            store.remove_folder()
        else:
            try:
                store.drop()
            finally:
                store.close()
    return {"index": name, "dropped": True, "chunks": chunks, "location": location}


def list_indexes(cfg: Config) -> list[dict[str, Any]]:
    """Every index in the configured store (the local folder, or the server's ragtune collections),
    each with its counts and embedder; one that cannot be read right now says why in `error`."""
    from ragtune.errors import RagtuneError
    from ragtune.retrieval.store import ServerStore, local_indexes

    if cfg.store.url:
        names = ServerStore.index_names(cfg.store.url, cfg.store.api_key, cfg.store.collection_prefix)
    else:
        names = local_indexes()
    rows = []
    for name in names:
        try:
            st = stats(cfg, name)
        except RagtuneError as exc:
            rows.append({"index": name, "documents": None, "chunks": None, "embedder": "", "disk_bytes": None,
                         "updated": None, "error": str(exc)})
            continue
        rows.append({"index": name, "documents": st["documents"], "chunks": st["chunks"],
                     "embedder": (st.get("embedder") or {}).get("path", ""), "disk_bytes": st["disk_bytes"],
                     "updated": st["updated"], "error": ""})
    return rows


def stats(cfg: Config, index: str | None = None) -> dict[str, Any]:
    name = index or cfg.index.name
    with open_for_reading(cfg, name) as store:
        meta = store.read_meta()
        states = store.doc_states()
        out = {
            "index": name, "store": store.kind, "location": store.location(),
            "documents": sum(1 for s in states.values() if s.get("file") is not None),
            "chunks": store.count(), "incomplete": sum(1 for s in states.values() if s["count"] != s.get("n_chunks")),
            "disk_bytes": store.disk_bytes(), "schema_version": meta.get("schema_version"),
            "embedder": meta.get("embedder"), "chunker": meta.get("chunker"), "roots": meta.get("roots", []),
            "created": meta.get("created"), "updated": meta.get("updated"),
            "reread_pending": _reread_pending(states),
        }
    return out


def _reread_pending(states: dict[str, dict[str, Any]]) -> dict[str, int]:
    """reason -> number of documents the next `sync`/`add` of their folder re-reads (outdated_reader);
    a document stored without its reader is taken for what its extension says."""
    out: dict[str, int] = {}
    for st in states.values():
        if st.get("file") is None:
            continue
        why = outdated_reader(st, st.get("reader") or reader_format(Path(st["file"]), b""))
        if why:
            out[why] = out.get(why, 0) + 1
    return out


def migrate(cfg: Config, to_url: str, index: str | None = None, api_key: str = "", replace: bool = False,
            batch: int = 512) -> dict[str, Any]:
    """Copy every point (vectors, payloads, meta) of an index into another store."""
    from ragtune.retrieval.store import META_ID, EdgeStore, ServerStore

    name = index or cfg.index.name
    src = open_store(cfg, name)
    if not src.exists():
        raise UsageError(f"index '{name}' does not exist at {src.location()}; nothing to migrate")
    if to_url in ("edge", ""):
        dst: Store = EdgeStore(name)
    elif to_url.startswith(("http://", "https://", "local:")) and to_url.split(":", 1)[1].strip("/ "):
        dst = ServerStore(name, to_url, api_key or cfg.store.api_key, cfg.store.collection_prefix, setting="--to")
    else:
        raise UsageError(f"--to '{to_url}' is not a place to migrate to; give a Qdrant server's URL "
                         "(http://HOST:6333 or https://...), local:PATH for qdrant-client's local mode, or 'edge'")
    if dst.location() == src.location():
        raise UsageError(f"index '{name}' is already at {src.location()}")
    t0 = time.perf_counter()
    with IndexLock(name, f"ragtune index migrate --to {to_url}"):
        src.open()
        try:
            meta = src.read_meta()
            dim = int(meta.get("embedder", {}).get("dim") or 0)
            if not dim:
                raise UsageError(f"index '{name}' has no metadata (embedder dimension); re-create it with 'ragtune index add'")
            if dst.exists():
                dst.open()
                if dst.count() and not replace:
                    dst.close()
                    raise UsageError(
                        f"the destination {dst.location()} already holds {dst.count()} chunks; pass --replace to overwrite it"
                    )
                dst.drop()
            dst.open(create_dim=dim)
            n = 0
            buf: list[PointData] = []
            for pid, payload, vec in src.scroll(None, True, with_vectors=True, batch=batch):
                if pid == META_ID:
                    continue
                vec = vec or {}
                sp = vec.get("sparse")
                buf.append(PointData(pid, vec.get("dense"), (list(sp.indices), list(sp.values)) if sp else None, payload))
                if len(buf) >= batch:
                    dst.upsert(buf)
                    n += len(buf)
                    buf = []
            dst.upsert(buf)
            n += len(buf)
            dst.write_meta({**meta, "migrated_from": src.location()})
            dst.flush()
            dst.optimize()
            copied = dst.count()
        finally:
            src.close()
            dst.close()
    if copied != n:
        raise UsageError(f"migration copied {n} chunks but the destination holds {copied}; run it again with --replace")
    return {"index": name, "from": src.location(), "to": dst.location(), "chunks": n,
            "seconds": round(time.perf_counter() - t0, 3)}
