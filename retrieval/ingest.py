"""add / sync / remove: make an index hold exactly the chunks of the documents it was given.

    res = ingest(cfg, ["docs/"], index="default", delete_missing=True)   # `ragtune index sync docs/`

Identity: a document's id hashes its root, its path relative to that root, and its bytes (JSONL:
each line is a document, keyed by its "id" or line number); a chunk's id is a UUID derived from
(doc id, chunker signature, chunk number). Unchanged documents are never embedded again, unless
the reader of their format is newer (loaders.READER_VERSIONS) than the one stored with their chunks:
those are read again, in place. Re-writing the same chunk overwrites the same point, so nothing is
duplicated.

The store itself is the manifest: every chunk carries doc_id, root, file, n_chunks; a document is
complete when the store holds n_chunks points for it. The order of writes makes any interruption
(kill -9 included) safe: new chunks are written first, then the replaced and removed documents'
chunks are deleted; the next run re-writes incomplete documents and deletes leftovers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ragtune.config import ChunkConfig, Config
from ragtune.errors import UsageError
from ragtune.retrieval import loaders
from ragtune.retrieval.loaders import Document, Skip, is_supported, iter_jsonl, load_file, reader_format
from ragtune.retrieval.store import (
    SCHEMA_VERSION,
    IndexLock,
    PointData,
    Store,
    missing_index,
    open_for_reading,
    open_store,
)

log = logging.getLogger(__name__)

CHUNK_NS = uuid.UUID("6f1c9a52-3b7e-4c8e-9d51-2a7f0e4b8c11")
EMBED_GROUP = 512  # chunks per embedding call (sentence-transformers sorts them by length inside)


@dataclass
class DocRef:
    doc_id: str
    root: str  # absolute folder the source is relative to
    file: str  # relative path of the file
    source: str  # file, or file#key for a JSONL line
    doc_hash: str  # sha256 of the bytes (the file, or the JSONL line)
    document: Document | None = None  # JSONL lines are parsed while planning
    reader: str = "text"  # the loaders.READER_VERSIONS key of the reader its bytes go to


@dataclass
class Plan:
    add: list[DocRef] = field(default_factory=list)  # new or changed (or incomplete) documents
    unchanged: list[DocRef] = field(default_factory=list)
    stale: dict[str, list[str]] = field(default_factory=dict)  # abs file -> doc ids it replaces
    removed: list[dict[str, Any]] = field(default_factory=list)  # states of files gone from disk
    orphans: list[str] = field(default_factory=list)  # doc ids of interrupted writes, no longer wanted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    replaced_files: set[str] = field(default_factory=set)
    rewritten: list[str] = field(default_factory=list)  # doc ids in `add` the store already has points of
    reread: dict[str, str] = field(default_factory=dict)  # doc id in `add` -> why (its reader is newer)


@dataclass
class IngestResult:
    index: str
    added: list[str] = field(default_factory=list)  # sources of new documents (replaced and re-read ones apart)
    replaced: list[str] = field(default_factory=list)
    reread: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): unchanged, read again
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks_written: int = 0
    chunks_deleted: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    embed_precision: str = ""  # "bf16" or "fp32" when documents were embedded (embedder.mixed_precision)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "dry_run": self.dry_run, "added": self.added, "replaced": self.replaced,
            "reread": [{"source": s, "reason": r} for s, r in self.reread],
            "deleted": self.deleted, "unchanged": self.unchanged,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "chunks_written": self.chunks_written, "chunks_deleted": self.chunks_deleted,
            "seconds": round(self.seconds, 3), "embed_seconds": round(self.embed_seconds, 3),
            "embed_precision": self.embed_precision or None,
        }


def doc_id_for(root: str, source: str, data: bytes) -> tuple[str, str]:
    content = hashlib.sha256(data).hexdigest()
    # 40 hex digits: never mistaken for a UUID (qdrant-client's local mode re-formats those in facets)
    ident = hashlib.sha256(f"{root}\0{source}\0{content}".encode()).hexdigest()[:40]
    return ident, content


def chunk_id(doc_id: str, chunker: str, i: int) -> str:
    return str(uuid.uuid5(CHUNK_NS, f"{doc_id}:{chunker}:{i}"))


# --- walking and planning ---------------------------------------------------------------------


def collect(paths: Iterable[str | Path], follow_links: bool = False
            ) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(root, file) for every file under the given paths, and (path, reason) for links not followed.

    Hidden files and folders are ignored. A symbolic link whose target lies outside its root is not
    followed unless `follow_links` (`index.follow_links`, `--follow-links`): a link to /etc/passwd in a
    documents folder must not end up in the index and in answers."""
    out: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UsageError(f"path '{raw}' does not exist; give files or folders of documents to index")
        p = p.resolve()
        if p.is_file():
            out.append((p.parent, p))
            continue
        seen_dirs = {p}
        for dirpath, dirnames, filenames in os.walk(p, followlinks=follow_links):
            here = Path(dirpath)
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                target = (here / d).resolve()
                if (here / d).is_symlink() and not _link_allowed(p, here / d, target, follow_links, skipped):
                    continue
                if target in seen_dirs:  # a link back into a folder already walked: no loop, no duplicate
                    continue
                seen_dirs.add(target)
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                f = here / name
                if name.startswith("."):
                    continue
                if f.is_symlink() and not _link_allowed(p, f, f.resolve(), follow_links, skipped):
                    continue
                out.append((p, f))
    return out, skipped


def _link_allowed(root: Path, link: Path, target: Path, follow: bool, skipped: list[tuple[str, str]]) -> bool:
    rel = link.relative_to(root).as_posix()
    if not target.exists():
        skipped.append((rel, f"broken symbolic link (to {target})"))
        return False
    if follow or target.is_relative_to(root):
        return True
    skipped.append((rel, f"symbolic link to {target}, outside {root}: not followed "
                         "(pass --follow-links or set index.follow_links=true to index what it points to)"))
    return False


def _state_file(state: dict[str, Any]) -> str | None:
    if not state.get("root") or state.get("file") is None:
        return None
    return str(Path(state["root"]) / state["file"])


def outdated_reader(state: dict[str, Any], reader: str) -> str:
    """Why a stored document must be read again: its chunks come from an older version of its
    format's reader ("PDF reader updated"), or "" when they are current. A document stored
    without a reader version (indexed before they were kept) counts as read by version 1."""
    if int(state.get("reader_version") or 1) < loaders.READER_VERSIONS.get(reader, 1):
        return f"{loaders.READER_NAMES.get(reader, reader)} reader updated"
    return ""


def plan_ingest(store_states: dict[str, dict[str, Any]], files: list[tuple[Path, Path]], chunker_sig: str,
                sparse_version: int, sync_roots: list[Path] | None = None) -> Plan:
    plan = Plan()
    current_ids: set[str] = set()
    by_file: dict[str, list[dict[str, Any]]] = {}
    for st in store_states.values():
        f = _state_file(st)
        if f:
            by_file.setdefault(f, []).append(st)
    seen_files: set[str] = set()
    for root, path in files:
        abs_file = str(path)
        seen_files.add(abs_file)
        rel = path.relative_to(root).as_posix()
        if not is_supported(path):
            plan.skipped.append((rel, f"unsupported file type '{path.suffix or path.name}'"))
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            plan.skipped.append((rel, f"cannot read: {exc.strerror or exc}"))
            continue
        if not data.strip():
            plan.skipped.append((rel, "empty file"))
            continue
        refs: list[DocRef] = []
        reader = reader_format(path, data)
        if path.suffix.lower() == ".jsonl" and data.strip():
            good, problems = iter_jsonl(data, rel)  # bad lines are reported, the good ones indexed
            plan.skipped.extend((rel, problem) for problem in problems)
            if not good:
                continue
            for line, doc in good:
                d, h = doc_id_for(str(root), doc.source, line)
                refs.append(DocRef(d, str(root), rel, doc.source, h, doc, "jsonl"))
        else:
            d, h = doc_id_for(str(root), rel, data)
            refs.append(DocRef(d, str(root), rel, rel, h, reader=reader))
        ids = {r.doc_id for r in refs}
        current_ids |= ids
        for r in refs:
            st = store_states.get(r.doc_id)
            complete = (st is not None and st.get("count") == st.get("n_chunks")
                        and st.get("chunker") == chunker_sig and st.get("sparse") == sparse_version)
            why = outdated_reader(st, r.reader) if st is not None else ""
            (plan.unchanged if complete and not why else plan.add).append(r)
            if st is not None and (why or not complete):
                plan.rewritten.append(r.doc_id)
            if why:
                plan.reread[r.doc_id] = why
        old = [st["doc_id"] for st in by_file.get(abs_file, []) if st["doc_id"] not in ids]
        if old:
            plan.stale[abs_file] = old
            plan.replaced_files.add(abs_file)
    for st in store_states.values():
        f = _state_file(st)
        if f is None:
            if st["doc_id"] not in current_ids:
                plan.orphans.append(st["doc_id"])
            continue
        if sync_roots and f not in seen_files and any(Path(f).is_relative_to(r) for r in sync_roots):
            plan.removed.append(st)
    return plan


# --- running ----------------------------------------------------------------------------------


class _Writer:
    """Buffers chunks, embeds them in groups, upserts dense + sparse vectors with payloads."""

    def __init__(self, store: Store, embedder: Any, sparse: Any, batch_size: int, progress: Any) -> None:
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.batch_size = batch_size
        self.progress = progress
        self.pending: list[tuple[str, str, dict[str, Any]]] = []  # (id, text, payload)
        self.written = 0
        self.embed_seconds = 0.0

    def add(self, pid: str, text: str, payload: dict[str, Any]) -> None:
        self.pending.append((pid, text, payload))
        if len(self.pending) >= EMBED_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        texts = [t for _, t, _ in self.pending]
        t0 = time.perf_counter()
        dense = self.embedder.embed_documents(texts, batch_size=self.batch_size)
        self.embed_seconds += time.perf_counter() - t0
        counted = [self.sparse.counts(text) for text in texts]
        if self.sparse.avg_len is None:  # a new index: weigh with this group's mean, re-weighed at the end
            self.sparse.avg_len = max(1.0, sum(n for _, n in counted) / len(counted))
        points = []
        for i, (pid, _text, payload) in enumerate(self.pending):
            tf, n_terms = counted[i]
            payload["n_terms"] = n_terms
            points.append(PointData(pid, dense[i], self.sparse.weigh(tf, n_terms), payload))
        for i in range(0, len(points), 256):
            self.store.upsert(points[i : i + 256])
        self.written += len(points)
        if self.progress is not None:
            self.progress.update(len(points))
        self.pending = []


_SIZE_CUT_SAID: set[tuple[int, int, int]] = set()


def _fit_chunk_size(cfg: Config, max_tokens: int) -> int:
    """chunk.size, cut to what the embedder reads; a size the user chose is said to be cut (once), the
    default's cut to MiniLM's 254 is expected and only logged at debug."""
    size = min(cfg.chunk.size, max_tokens)
    said = (cfg.chunk.size, max_tokens, cfg.chunk.overlap)
    if size < cfg.chunk.size and said not in _SIZE_CUT_SAID:
        _SIZE_CUT_SAID.add(said)
        cut = cfg.chunk.overlap > size // 2
        overlap = f", and chunk.overlap {cfg.chunk.overlap} to {size // 2}" if cut else ""
        fix = f"chunk.size={size}" + (f" chunk.overlap={size // 2}" if cut else "")
        chosen = cfg.chunk.size != ChunkConfig().size
        (log.warning if chosen else log.debug)(
            "chunk.size %d is more than the embedder reads: chunks are cut to %d tokens, its maximum%s; set "
            "'%s' (or less) to choose the size yourself", cfg.chunk.size, size, overlap, fix)
    return size


def _check_meta(store: Store, meta: dict[str, Any], identity: dict[str, Any], name: str) -> None:
    if not meta:
        return
    version = int(meta.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"index '{name}' has schema_version {version}, newer than this ragtune reads ({SCHEMA_VERSION}); "
            "upgrade ragtune"
        )
    built = meta.get("embedder", {})
    if built.get("hash") and built["hash"] != identity["hash"]:
        raise UsageError(
            f"index '{name}' was built with the embedder at '{built.get('path')}' (hash {built['hash'][:12]}), "
            f"but embedder.path is '{identity['path']}' (hash {identity['hash'][:12]}); set "
            f"embedder.path={built.get('path')}, or index into a new index with --index NEW"
        )


def ingest(cfg: Config, paths: list[str], index: str | None = None, delete_missing: bool = False,
           dry_run: bool = False, progress: bool = True) -> IngestResult:
    """`index add` (delete_missing=False) and `index sync` (True) under the index's writer lock."""
    from ragtune.retrieval.sparse import SPARSE_VERSION

    name = index or cfg.index.name
    t0 = time.perf_counter()
    files, links_skipped = collect(paths, cfg.index.follow_links)
    roots = sorted({str(Path(p).expanduser().resolve()) for p in paths if Path(p).expanduser().is_dir()})
    store = open_store(cfg, name)
    res = IngestResult(name, dry_run=dry_run)
    cmd = "ragtune index " + ("sync " if delete_missing else "add ") + " ".join(str(p) for p in paths)
    with IndexLock(name, cmd):
        from ragtune.retrieval.chunking import Chunker, chunker_signature
        from ragtune.retrieval.embedder import Embedder, index_embedder

        embedder = Embedder(cfg.embedder)
        identity = embedder.identity()  # content hash without loading the model
        exists = store.exists()
        meta: dict[str, Any] = {}
        states: dict[str, dict[str, Any]] = {}
        try:
            if exists:
                store.open()
                meta = store.read_meta()
                if not cfg.embedder.path:  # none chosen: the index keeps the embedder it was built with
                    embedder = index_embedder(cfg.embedder, meta, name)
                    identity = embedder.identity()
                _check_meta(store, meta, identity, name)
                states = store.doc_states()
            built = meta.get("embedder", {})
            if built.get("hash") == identity["hash"] and built.get("max_tokens"):
                max_tokens = int(built["max_tokens"])  # a no-op sync never loads the model
            elif exists or not dry_run:
                max_tokens = embedder.load().max_tokens
            else:
                max_tokens = cfg.chunk.size
            size = _fit_chunk_size(cfg, max_tokens)
            sig = chunker_signature(size, cfg.chunk.overlap) if (exists or not dry_run) else "?"
            plan = plan_ingest(states, files, sig, SPARSE_VERSION,
                               [Path(r) for r in roots] if delete_missing else None)
            if exists and sig != "?":
                _check_one_chunking(name, meta, states, plan, sig)
            res.skipped = links_skipped + list(plan.skipped)
            res.unchanged = len(plan.unchanged)
            if delete_missing and not dry_run:
                _refuse_emptying(name, roots, files, plan)
            if dry_run:
                _fill_dry_run(res, plan)
                return res
            if not exists and not plan.add:
                from ragtune.retrieval.loaders import SUPPORTED

                why = ""
                if res.skipped:
                    first = f"{res.skipped[0][0]}: {res.skipped[0][1]}"
                    why = f" ({len(res.skipped)} skipped, the first {first})"
                raise UsageError(f"no documents to index in {' '.join(str(p) for p in paths)}{why}; index '{name}' "
                                 f"was not created (ragtune reads {', '.join(sorted(SUPPORTED))} files)")
            stemmer = _stemmer(cfg)  # checked before anything is written
            if plan.add or not exists:
                embedder.load()
            if not exists:
                store.open(create_dim=embedder.dim)
            new_roots = set(roots) | ({str(r) for r, _ in files} if not roots else set())
            if not meta or not new_roots <= set(meta.get("roots", [])) or plan.add or plan.removed:
                meta = meta or _new_meta(embedder, sig, stemmer)
                if plan.add:
                    meta["chunker"] = sig  # what every chunk now has (_check_one_chunking)
                meta["roots"] = sorted(set(meta.get("roots", [])) | new_roots)
                meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                store.write_meta(meta)
            chunker = Chunker(embedder.tokenizer, size, cfg.chunk.overlap) if plan.add else None
            _run(cfg, store, embedder, chunker, plan, res, progress)
        finally:
            store.close()
    res.seconds = time.perf_counter() - t0
    return res


def _refuse_emptying(name: str, roots: list[str], files: list[tuple[Path, Path]], plan: Plan) -> None:
    """`index sync` of a folder that holds no documents at all would delete every document the index
    has from it: refused, since an unmounted share or a mistyped path looks exactly like that."""
    found = {str(root) for root, _ in files}
    empty = [r for r in roots if r not in found]
    doomed = [st for st in plan.removed if any(Path(_state_file(st) or "").is_relative_to(r) for r in empty)]
    if doomed:
        where = " and ".join(f"'{r}'" for r in empty)
        raise UsageError(
            f"{where} holds no documents, so syncing it would delete all {len(doomed)} documents index '{name}' has "
            "from it; if the folder is not mounted or the path is wrong, fix that and sync again. To delete "
            f"them, run 'ragtune index remove SOURCE... --index {name}' or 'ragtune index drop {name}' "
            "('--dry-run' lists them)")


def _describe_chunker(sig: str) -> str:
    m = re.fullmatch(r"v(\d+)-s(\d+)-o(\d+)", sig or "")
    if not m:
        return f"chunker '{sig}'"
    return f"chunk.size {m[2]} / chunk.overlap {m[3]} (chunker version {m[1]})"


def _check_one_chunking(name: str, meta: dict[str, Any], states: dict[str, dict[str, Any]], plan: Plan,
                        sig: str) -> None:
    """Refuse a run that would leave the index holding chunks of two chunkings (documents this run
    writes with `sig` beside documents it leaves as another chunker cut them): search would compare
    chunks of different sizes. A run that re-chunks every document the index holds is fine."""
    if not plan.add:
        return
    rewritten = {r.doc_id for r in plan.add}
    rewritten |= {st["doc_id"] for st in plan.removed} | set(plan.orphans)
    rewritten |= {d for ids in plan.stale.values() for d in ids}
    left = [st for st in states.values() if st.get("chunker") != sig and st["doc_id"] not in rewritten]
    if not left:
        recut = sorted({str(st.get("chunker")) for st in states.values() if st.get("chunker") not in (sig, None)})
        if recut:
            log.warning("index %s: re-chunking (and re-embedding) its documents cut with %s: this configuration "
                        "cuts with %s", name, " and ".join(_describe_chunker(o) for o in recut), _describe_chunker(sig))
        return
    olds = sorted({str(st.get("chunker")) for st in left})
    roots = " ".join(shlex.quote(r) for r in meta.get("roots", [])) or "ROOT..."
    keep = ""
    m = re.fullmatch(r"v(\d+)-s(\d+)-o(\d+)", olds[0])
    if len(olds) == 1 and m and int(m[1]) == int(sig.split("-")[0][1:]):
        keep = (f"keep the index's chunking by adding 'chunk.size={m[2]} chunk.overlap={m[3]}' to the command "
                "(or setting them in your config), or ")
    raise UsageError(
        f"index '{name}' holds {len(left)} document(s) cut with {' and '.join(_describe_chunker(o) for o in olds)}, "
        f"which this run would not re-chunk, and this configuration cuts new ones with {_describe_chunker(sig)}: "
        f"the index would mix two chunkings. Either {keep}re-chunk the whole index with "
        f"'ragtune index sync {roots} --index {shlex.quote(name)}' (every folder it holds, in one command; it "
        "re-embeds every document)")


def _stemmer(cfg: Config) -> str:
    from ragtune.retrieval.sparse import check_stemmer

    try:
        return check_stemmer(cfg.search.stemmer)
    except ValueError as exc:
        raise UsageError(f"search.stemmer: {exc}") from None


def _new_meta(embedder: Any, sig: str, stemmer: str) -> dict[str, Any]:
    from ragtune import __version__
    from ragtune.retrieval.sparse import SPARSE_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "ragtune_version": __version__,
        "embedder": {"path": str(embedder.path), "hash": embedder.hash, "dim": embedder.dim,
                     "max_tokens": embedder.max_tokens},
        "chunker": sig,
        "sparse": {"version": SPARSE_VERSION, "stemmer": stemmer, "avg_len": 0.0},  # stats set after the write
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "roots": [],
    }


def _fill_dry_run(res: IngestResult, plan: Plan) -> None:
    replaced_files = plan.replaced_files
    for r in plan.add:
        abs_file = str(Path(r.root) / r.file)
        if r.doc_id in plan.reread:
            res.reread.append((r.source, plan.reread[r.doc_id]))
        else:
            (res.replaced if abs_file in replaced_files else res.added).append(r.source)
    res.deleted = sorted({st.get("source", st["doc_id"]) for st in plan.removed})


def _run(cfg: Config, store: Store, embedder: Any, chunker: Any, plan: Plan, res: IngestResult,
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
    try:
        for abs_file, refs in by_file.items():
            try:
                docs = _load_docs(Path(abs_file), refs)
            except Skip as exc:
                res.skipped.append((refs[0].file, str(exc)))
                failed_files.add(abs_file)
                continue
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
                    writer.add(chunk_id(ref.doc_id, sig, i), ch.text, payload)
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


def _load_docs(path: Path, refs: list[DocRef]) -> list[tuple[DocRef, Document]]:
    if all(r.document is not None for r in refs):  # JSONL lines, parsed while planning
        return [(r, r.document) for r in refs]  # type: ignore[misc]
    docs = load_file(path, refs[0].source)
    return [(refs[0], docs[0])]


# --- remove, list, stats ----------------------------------------------------------------------


def remove(cfg: Config, sources: list[str], index: str | None = None) -> dict[str, Any]:
    """Delete the documents whose source, file, or absolute path (file or folder) matches."""
    name = index or cfg.index.name
    store = open_store(cfg, name)
    if not store.exists():
        raise missing_index(name)
    with IndexLock(name, "ragtune index remove " + " ".join(sources)):
        store.open()
        try:
            states = store.doc_states()
            doomed: dict[str, str] = {}
            for want in sources:
                p = Path(want).expanduser()
                absolute = str(p.resolve()) if p.exists() or p.is_absolute() else None
                hits = []
                for st in states.values():
                    f = _state_file(st)
                    if want in (st.get("source"), st.get("file")) or (
                        absolute and f and (f == absolute or Path(f).is_relative_to(absolute))
                    ):
                        hits.append(st)
                if not hits:
                    raise UsageError(
                        f"no document in index '{name}' matches '{want}'; see 'ragtune index list --index {name}'"
                    )
                for st in hits:
                    doomed[st["doc_id"]] = st.get("source", st["doc_id"])
            before = store.count()
            store.delete_docs(sorted(doomed))
            after = store.count()
            update_lexical_stats(store, lexical_settings(cfg, store.read_meta())["stemmer"])
            store.flush()
        finally:
            store.close()
    return {"index": name, "removed": sorted(set(doomed.values())), "chunks_deleted": before - after}


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
    else:
        dst = ServerStore(name, to_url, api_key or cfg.store.api_key, cfg.store.collection_prefix)
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
