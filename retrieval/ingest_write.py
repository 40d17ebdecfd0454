"""Write a plan into the store: read and chunk its documents, embed them in groups, upsert dense +
sparse vectors with their payloads, then delete what they replace, and keep the index's lexical
statistics current. A chunk whose text the file's previous version (or an older reader's reading of
it, or the same file under the name it had before a move) already holds keeps that chunk's dense
vector instead of being embedded again: chunks never cross a heading or a page, so editing one section
of a long document re-embeds that section only.

    write_plan(cfg, store, embedder, chunker, plan, res, progress=True)   # ingest does this under the writer lock
    update_lexical_stats(store, stemmer)                                   # after deleting points (index remove)

The store itself is the manifest: every chunk carries doc_id, root, file, n_chunks; a document is
complete when the store holds n_chunks points for it. The order of writes makes any interruption
(kill -9 included) safe: new chunks are written first, then the replaced and removed documents'
chunks are deleted; the next run re-writes incomplete documents and deletes leftovers.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.config import Config
from ragtune.retrieval import loaders
from ragtune.retrieval.ingest_plan import KEPT_OLD, DocRef, Plan, chunk_id
from ragtune.retrieval.loaders import Document, Skip, load_file
from ragtune.retrieval.store import PointData, Store

if TYPE_CHECKING:
    from ragtune.retrieval.ingest import IngestResult

EMBED_GROUP = 512  # chunks per embedding call (sentence-transformers sorts them by length inside)


class _Writer:
    """Buffers chunks, embeds them in groups, upserts dense + sparse vectors with payloads."""

    def __init__(self, store: Store, embedder: Any, sparse: Any, batch_size: int, progress: Any) -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.batch_size = batch_size
        self.progress = progress
        self.pending: list[tuple[str, str, dict[str, Any], Any]] = []  # (id, text, payload, kept vector)
        self.written = 0
        self.reused = 0  # chunks written with a vector kept from the document's previous version
        self.embed_seconds = 0.0

    def add(self, pid: str, text: str, payload: dict[str, Any], vector: Any = None) -> None:
        self.pending.append((pid, text, payload, vector))
        if len(self.pending) >= EMBED_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        texts = [t for _, t, _, _ in self.pending]
        dense = [v for _, _, _, v in self.pending]
        todo = [i for i, v in enumerate(dense) if v is None]
        if todo:
            t0 = time.perf_counter()
            fresh = self.embedder.embed_documents([texts[i] for i in todo], batch_size=self.batch_size)
            self.embed_seconds += time.perf_counter() - t0
            for i, vec in zip(todo, fresh):
                dense[i] = vec
        self.reused += len(texts) - len(todo)
        counted = [self.sparse.counts(text) for text in texts]
        if self.sparse.avg_len is None:  # a new index: weigh with this group's mean, re-weighed at the end
            self.sparse.avg_len = max(1.0, sum(n for _, n in counted) / len(counted))
        points = []
        for i, (pid, _text, payload, _kept) in enumerate(self.pending):
            tf, n_terms = counted[i]
            payload["n_terms"] = n_terms
            points.append(PointData(pid, dense[i], self.sparse.weigh(tf, n_terms), payload))
        for i in range(0, len(points), 256):
            self.store.upsert(points[i : i + 256])
        self.written += len(points)
        if self.progress is not None:
            self.progress.update(len(points))
        self.pending = []


def write_plan(cfg: Config, store: Store, embedder: Any, chunker: Any, plan: Plan, res: IngestResult,
               progress: bool) -> None:
    from ragtune.retrieval.sparse import SPARSE_VERSION, SparseEncoder

    bar = None
    if progress and plan.add:
        from tqdm import tqdm

        bar = tqdm(unit="chunk", desc=f"indexing {len(plan.add)} documents", disable=None, leave=False)
    sig = chunker.signature() if chunker is not None else ""
    lex = lexical_settings(cfg, store.read_meta())
    sparse = SparseEncoder(avg_len=lex["avg_len"] or 1.0, stemmer=lex["stemmer"]) if chunker is not None else None
    if sparse is not None and not lex["avg_len"]:
        sparse.avg_len = None  # type: ignore[assignment]  # set from the first group the writer weighs
    writer = _Writer(store, embedder, sparse, cfg.embedder.batch_size, bar)
    failed_files: set[str] = set()
    cut: dict[str, int] = {}  # doc id chunked in this run -> its number of chunks
    rewritten = set(plan.rewritten)
    by_file: dict[str, list[DocRef]] = {}
    for r in plan.add:
        by_file.setdefault(str(Path(r.root) / r.file), []).append(r)
    moved = _moved(plan)
    try:
        for abs_file, refs in by_file.items():
            try:
                docs = read_docs(Path(abs_file), refs)
            except Skip as exc:
                kept_old = KEPT_OLD if plan.stale.get(abs_file) else ""
                res.skipped.append((refs[0].file, f"{exc}{kept_old}"))
                failed_files.add(abs_file)
                continue
            old_ids = plan.stale.get(abs_file, []) + [r.doc_id for r in refs if r.doc_id in rewritten]
            old_ids += [d for r in refs for d in moved.get(r.doc_hash, [])]
            kept = kept_vectors(store, old_ids)
            for ref, doc in docs:
                chunks = chunker.chunk(doc)
                # the first chunk carries the document's state (doc_states): over a document's own
                # points it is written last, so an interrupted re-read is never taken for a finished one
                order = [*range(1, len(chunks)), 0] if ref.doc_id in rewritten else range(len(chunks))
                for i in order:
                    ch = chunks[i]
                    payload = {
                        "kind": "chunk", "doc_id": ref.doc_id, "doc_hash": ref.doc_hash, "root": ref.root,
                        "file": ref.file, "source": ref.source, "title": doc.title,
                        "heading": " > ".join(ch.heading), "heading_path": list(ch.heading), "page": ch.page,
                        "start": ch.start, "end": ch.end, "text": ch.text, "tokens": ch.tokens,
                        "chunk_index": i, "n_chunks": len(chunks), "chunker": sig, "sparse": SPARSE_VERSION,
                        "reader": ref.reader, "reader_version": loaders.READER_VERSIONS.get(ref.reader, 1),
                        "meta": doc.meta,
                    }
                    writer.add(chunk_id(ref.doc_id, sig, i), ch.text, payload, kept.get(ch.text))
                cut[ref.doc_id] = len(chunks)
                if ref.doc_id in plan.reread:
                    res.reread.append((ref.source, plan.reread[ref.doc_id]))
                else:
                    (res.replaced if abs_file in plan.replaced_files else res.added).append(ref.source)
        writer.flush()
    finally:
        if bar is not None:
            bar.close()
    res.chunks_written = writer.written
    res.chunks_reused = writer.reused
    res.embed_seconds = writer.embed_seconds
    if writer.written and embedder.model is not None:
        res.embed_precision = embedder.doc_precision()
    # only now: delete what the new chunks replace, what left the folder, and interrupted leftovers
    recut = _drop_leftovers(store, {d: cut[d] for d in plan.rewritten if d in cut}, sig)
    doomed: list[str] = []
    for abs_file, ids in plan.stale.items():
        if abs_file not in failed_files:
            doomed.extend(ids)
    doomed.extend(st["doc_id"] for st in plan.removed)
    doomed.extend(plan.orphans)
    if doomed:
        before = store.count()
        store.delete_docs(sorted(set(doomed)))
        res.chunks_deleted = before - store.count()
    res.chunks_deleted += recut
    res.deleted = sorted({st.get("source", st["doc_id"]) for st in plan.removed})
    if res.chunks_written or doomed or recut:
        update_lexical_stats(store, lex["stemmer"], sparse.avg_len if sparse is not None else None)
        store.optimize()  # build HNSW / merge segments now, not on the first query


def _moved(plan: Plan) -> dict[str, list[str]]:
    """Content hash -> doc ids of documents this sync removes whose bytes a new document has: a file
    moved or renamed within the folder keeps its vectors too."""
    wanted = {r.doc_hash for r in plan.add}
    out: dict[str, list[str]] = {}
    for st in plan.removed:
        if st.get("doc_hash") in wanted:
            out.setdefault(st["doc_hash"], []).append(st["doc_id"])
    return out


def kept_vectors(store: Store, doc_ids: list[str]) -> dict[str, Any]:
    """Chunk text -> dense vector over the points these documents hold: what a new version of their
    file can keep where its chunks did not change. The index has one embedder (checked before any
    write), so the same text would embed to the same vector."""
    from ragtune.retrieval.store_base import DENSE

    out: dict[str, Any] = {}
    for i in range(0, len(doc_ids), 256):
        for _pid, payload, vec in store.scroll({"doc_id": doc_ids[i : i + 256]}, ["text"], with_vectors=True):
            dense = vec.get(DENSE) if isinstance(vec, dict) else None
            text = payload.get("text")
            if dense is not None and isinstance(text, str):
                out[text] = dense
    return out


def _drop_leftovers(store: Store, n_chunks: dict[str, int], sig: str) -> int:
    """Delete the points of these (just rewritten) documents that this run did not write: a document
    keeps its doc id when it is re-chunked with new settings (its new chunks have new ids) or re-read
    by a newer reader into fewer chunks (chunks n.. keep their ids), so the old points would
    otherwise stay beside the new ones. Returns the number of points deleted."""
    doc_ids = sorted(n_chunks)
    old: list[str] = []
    for i in range(0, len(doc_ids), 256):
        for pid, payload, _vec in store.scroll({"doc_id": doc_ids[i : i + 256]}, ["doc_id", "chunk_index"],
                                               with_vectors=False):
            d, j = payload.get("doc_id"), payload.get("chunk_index")
            if d not in n_chunks:
                continue
            if j is None or int(j) >= n_chunks[d] or uuid.UUID(pid) != uuid.UUID(chunk_id(d, sig, int(j))):
                old.append(pid)
    store.delete_points(old)
    return len(old)


def lexical_settings(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """The stemmer and average length new chunks are weighed with: the index's own when it has
    current-format statistics, else search.stemmer and none yet (the first group's mean)."""
    from ragtune.retrieval.sparse import SPARSE_VERSION

    sp = meta.get("sparse") or {}
    if int(sp.get("version", 0) or 0) == SPARSE_VERSION and sp.get("avg_len"):
        return {"stemmer": sp.get("stemmer", "english"), "avg_len": float(sp["avg_len"])}
    if int(sp.get("version", 0) or 0) == SPARSE_VERSION and sp.get("stemmer"):
        return {"stemmer": sp["stemmer"], "avg_len": None}
    return {"stemmer": cfg.search.stemmer, "avg_len": None}


REWEIGH_DRIFT = 0.05  # re-weigh every chunk once the true average length moves this far from the one used


def update_lexical_stats(store: Store, stemmer: str, weighed_with: float | None = None) -> dict[str, Any]:
    """Recount the index's lexical statistics (chunks, terms, average length) from the chunks'
    stored lengths and write them to the meta point; when the average moved more than
    REWEIGH_DRIFT from the one the vectors were weighed with, re-weigh every chunk's BM25 vector
    from its text (dense vectors and payloads stay). A chunk of an older
    sparse format keeps the index's format at that version, so searches refuse it until a sync
    re-indexes it."""
    from ragtune.retrieval.sparse import SPARSE_VERSION, SparseEncoder, sparse_meta

    meta = store.read_meta()
    old = meta.get("sparse") or {}
    n_chunks = n_terms = 0
    versions: set[int] = set()
    for _pid, payload, _vec in store.scroll({"kind": "chunk"}, ["n_terms", "sparse"], with_vectors=False):
        n_chunks += 1
        n_terms += int(payload.get("n_terms") or 0)
        versions.add(int(payload.get("sparse") or 0))
    if not n_chunks:
        meta["sparse"] = sparse_meta(old.get("avg_len") or 0.0, 0, 0, stemmer)
        store.write_meta(meta)
        return meta["sparse"]
    avg = max(1.0, n_terms / n_chunks)
    used = float(old.get("avg_len") or 0.0) if int(old.get("version", 0) or 0) == SPARSE_VERSION else 0.0
    if versions != {SPARSE_VERSION}:
        block = {**sparse_meta(avg, n_chunks, n_terms, stemmer), "version": min(versions)}
        meta["sparse"] = block
        store.write_meta(meta)
        return block
    used = used or float(weighed_with or 0.0)  # a new index: this run weighed with its first group's mean
    if not used or abs(avg - used) > REWEIGH_DRIFT * used:
        enc = SparseEncoder(avg_len=avg, stemmer=stemmer)
        items = []
        for pid, payload, _vec in store.scroll({"kind": "chunk"}, ["text"], with_vectors=False):
            idx, val = enc.document(payload.get("text", ""))
            if idx:
                items.append((pid, (idx, val)))
        store.update_sparse(items)
        used = avg
    meta["sparse"] = {**sparse_meta(used, n_chunks, n_terms, stemmer), "avg_len_actual": avg}
    store.write_meta(meta)
    return meta["sparse"]


def read_docs(path: Path, refs: list[DocRef]) -> list[tuple[DocRef, Document]]:
    """The documents of one planned file (its JSONL lines were parsed while planning); raises Skip, also
    for a file whose bytes are no longer those the plan hashed: written, its new text would be stored
    under the old version's identity, which a later sync would take for unchanged."""
    import hashlib

    if all(r.document is not None for r in refs):  # JSONL lines, parsed while planning
        return [(r, r.document) for r in refs]  # type: ignore[misc]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Skip(f"cannot read: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != refs[0].doc_hash:
        raise Skip("changed while it was being indexed: not written; run the command again to index it")
    docs = load_file(path, refs[0].source, data, as_text=refs[0].reader == "text")  # index.text_suffixes too
    return [(refs[0], docs[0])]
