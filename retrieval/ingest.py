"""add / sync: make an index hold exactly the chunks of the documents it was given.

    res = ingest(cfg, ["docs/"], index="default", delete_missing=True)   # `ragtune index sync docs/`
    res.to_dict()   # added, replaced, reread, deleted, unchanged, skipped, chunks written and deleted

Under the index's writer lock, `ingest` checks the index's embedder and chunking, plans the run
(ingest_plan.py: which documents to add, replace, re-read and delete) and writes it in an order that
survives any interruption (ingest_write.py). remove, list, drop, stats and migrate live in
index_manage.py and are importable from here too.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.config import ChunkConfig, Config
from ragtune.errors import UsageError
from ragtune.retrieval.index_manage import drop, list_documents, list_indexes, migrate, remove, stats  # noqa: F401
from ragtune.retrieval.ingest_plan import (  # noqa: F401  (DocRef, chunk_id, doc_id_for, outdated_reader: re-exported)
    CHUNK_NS,
    DocRef,
    Plan,
    chunk_id,
    collect,
    doc_id_for,
    outdated_reader,
    plan_ingest,
    state_file,
)
from ragtune.retrieval.ingest_write import (  # noqa: F401  (the lexical statistics: re-exported)
    REWEIGH_DRIFT,
    lexical_settings,
    update_lexical_stats,
    write_plan,
)
from ragtune.retrieval.store import SCHEMA_VERSION, IndexLock, Store, index_dir, open_store

log = logging.getLogger(__name__)


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
    chunks_reused: int = 0  # of those written, chunks that kept their previous version's vector (not embedded)
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
            "chunks_written": self.chunks_written, "chunks_reused": self.chunks_reused,
            "chunks_deleted": self.chunks_deleted,
            "seconds": round(self.seconds, 3), "embed_seconds": round(self.embed_seconds, 3),
            "embed_precision": self.embed_precision or None,
        }


_SIZE_CUT_SAID: set[tuple[int, int, int]] = set()


def _index_chunking(meta: dict[str, Any], states: dict[str, dict[str, Any]]) -> tuple[int, int] | None:
    """The (size, overlap) an existing index was cut with, which unset chunk settings keep: its meta's chunker,
    unless none of its documents holds that one (meta written before it followed the chunks), then the one
    most of them hold; None when neither says (unset settings then cut as for a new index). The version is
    left out: a newer chunker cuts with the index's size and overlap."""
    from collections import Counter

    from ragtune.retrieval.chunking import parse_signature

    held = Counter(st.get("chunker") for st in states.values() if parse_signature(st.get("chunker")))
    sig = meta.get("chunker")
    if parse_signature(sig) is None or (held and sig not in held):
        sig = held.most_common(1)[0][0] if held else None
    parsed = parse_signature(sig)
    return (parsed[1], parsed[2]) if parsed else None


def _fit_chunk_size(cfg: Config, max_tokens: int, index_cut: tuple[int, int] | None = None) -> int:
    """The size this run cuts with (chunk.size, else the index's own `index_cut`, else a new index's 256), cut
    to what the embedder reads; a size the user chose is said to be cut (once), the default's cut to MiniLM's
    254 is expected and only logged at debug. An index's own size was cut when it was built: reused, it gives
    the same signature."""
    want, want_overlap = cfg.chunk.resolve(index_cut)
    size = min(want, max_tokens)
    said = (want, max_tokens, want_overlap)
    if size < want and said not in _SIZE_CUT_SAID:
        _SIZE_CUT_SAID.add(said)
        cut = want_overlap > size // 2
        overlap = f", and chunk.overlap {want_overlap} to {size // 2}" if cut else ""
        fix = f"chunk.size={size}" + (f" chunk.overlap={size // 2}" if cut else "")
        chosen = cfg.chunk.size > 0
        (log.warning if chosen else log.debug)(
            "chunk.size %d is more than the embedder reads: chunks are cut to %d tokens, its maximum%s; set "
            "'%s' (or less) to choose the size yourself", want, size, overlap, fix)
    return size


def _chunk_overlap(cfg: Config, max_tokens: int, index_cut: tuple[int, int] | None, name: str) -> int:
    """The overlap this run cuts with (chunk.overlap, else the index's own, else a new index's 128; the chunker
    cuts it to half a chunk). One set without chunk.size is judged against the size the run keeps, as the
    config check judges a pair: more than half of it is refused, unless that size is the embedder's maximum
    (an index's size cut to it from a larger one: the overlap is cut with it, as when the index was built)."""
    size, overlap = cfg.chunk.resolve(index_cut)
    if cfg.chunk.overlap < 0 or cfg.chunk.size or overlap <= size // 2 or (index_cut and size >= max_tokens):
        return overlap
    whose = (f"index '{name}''s chunk.size {size} ({size // 2}), which it keeps while chunk.size is unset"
             if index_cut else f"chunk.size {size} ({size // 2}), a new index's while chunk.size is unset")
    raise UsageError(f"chunk.overlap {overlap} is more than half of {whose}; set chunk.overlap to at most "
                     f"{size // 2}, or set chunk.size too")


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
    unlisted: list[Path] = []  # folders that could not be listed: a sync keeps their documents
    files, links_skipped = collect(paths, cfg.index.follow_links, unlisted)
    roots = sorted({str(Path(p).expanduser().resolve()) for p in paths if Path(p).expanduser().is_dir()})
    store = open_store(cfg, name)
    res = IngestResult(name, dry_run=dry_run)
    cmd = "ragtune index " + ("sync " if delete_missing else "add ") + " ".join(str(p) for p in paths)
    fresh = not index_dir(name).exists()  # a run that fails before the index is made leaves no folder
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
            elif exists:
                max_tokens = embedder.load().max_tokens
            else:  # a new index loads the model once the plan has documents to embed
                max_tokens = cfg.chunk.resolve()[0]
            index_cut = _index_chunking(meta, states) if exists else None  # what unset chunk settings keep
            size = _fit_chunk_size(cfg, max_tokens, index_cut)
            overlap = _chunk_overlap(cfg, max_tokens, index_cut, name)
            # a new index has no stored chunks for the plan to compare a chunking with: "?" until it is known
            sig = chunker_signature(size, overlap) if exists else "?"
            plan = plan_ingest(states, files, sig, SPARSE_VERSION,
                               [Path(r) for r in roots] if delete_missing else None, cfg.index.text_suffixes)
            plan.removed = [st for st in plan.removed
                            if not any(Path(state_file(st) or "").is_relative_to(d) for d in unlisted)]
            if exists and sig != "?":
                _check_one_chunking(name, meta, states, plan, sig, cfg.chunk)
            res.skipped = links_skipped + list(plan.skipped)
            res.unchanged = len(plan.unchanged)
            if delete_missing and not dry_run:
                _refuse_emptying(name, roots, files, plan)
            if dry_run:
                _fill_dry_run(res, plan)
                return res
            if not plan.add and (not exists or not (delete_missing or plan.unchanged)):
                from ragtune.retrieval.file_formats import readable

                why = ""
                if res.skipped:
                    first = f"{res.skipped[0][0]}: {res.skipped[0][1]}"
                    why = f" ({len(res.skipped)} skipped, the first {first})"
                done = f"nothing was added to index '{name}'" if exists else f"index '{name}' was not created"
                raise UsageError(f"no documents to index in {' '.join(str(p) for p in paths)}{why}; {done} "
                                 f"(ragtune reads {readable()}; index.text_suffixes=[.py,.log] reads more as "
                                 "text)")
            stemmer = _stemmer(cfg)  # checked before anything is written
            if not exists:
                size = _fit_chunk_size(cfg, embedder.load().max_tokens, None)
                sig = chunker_signature(size, overlap)
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
            chunker = Chunker(embedder.tokenizer, size, overlap) if plan.add else None
            write_plan(cfg, store, embedder, chunker, plan, res, progress)
        except BaseException:
            if fresh:
                _forget_unmade(store, name)
            raise
        finally:
            store.close()
    res.seconds = time.perf_counter() - t0
    return res


def _forget_unmade(store: Store, name: str) -> None:
    """After a run that failed before the index was made (no documents, a refusal): delete the folder
    its lock made, so no empty index folder stays behind."""
    try:
        if store.exists():
            return
        store.close()
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        return
    shutil.rmtree(index_dir(name), ignore_errors=True)


def _refuse_emptying(name: str, roots: list[str], files: list[tuple[Path, Path]], plan: Plan) -> None:
    """`index sync` of a folder that holds no documents at all would delete every document the index
    has from it: refused, since an unmounted share or a mistyped path looks exactly like that."""
    found = {str(root) for root, _ in files}
    # a folder given inside another given one has its files under the outer root (collect)
    empty = [r for r in roots if r not in found and not any(f.is_relative_to(r) for _, f in files)]
    doomed = [st for st in plan.removed if any(Path(state_file(st) or "").is_relative_to(r) for r in empty)]
    if doomed:
        where = " and ".join(f"'{r}'" for r in empty)
        raise UsageError(
            f"{where} holds no documents, so syncing it would delete all {len(doomed)} documents index '{name}' has "
            "from it; if the folder is not mounted or the path is wrong, fix that and sync again. To delete "
            f"them, run 'ragtune index remove SOURCE... --index {name}' or 'ragtune index drop {name}' "
            "('--dry-run' lists them)")


def _describe_chunker(sig: str) -> str:
    from ragtune.retrieval.chunking import parse_signature

    parsed = parse_signature(sig)
    if not parsed:
        return f"chunker '{sig}'"
    return f"chunk.size {parsed[1]} / chunk.overlap {parsed[2]} (chunker version {parsed[0]})"


def _check_one_chunking(name: str, meta: dict[str, Any], states: dict[str, dict[str, Any]], plan: Plan,
                        sig: str, chosen: ChunkConfig) -> None:
    """Refuse a run that would leave the index holding chunks of two chunkings (documents this run
    writes with `sig` beside documents it leaves as another chunker cut them): search would compare
    chunks of different sizes. A run that re-chunks every document the index holds is fine. With
    chunk settings unset, `sig` is the index's own, so only a newer chunker version (or an index that
    already mixed two) meets this."""
    from ragtune.retrieval.chunking import parse_signature

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
    old, new = parse_signature(olds[0]), parse_signature(sig)
    # the settings this run chose: the re-chunking sync needs them too (unset, it keeps the index's chunking)
    settings = ([f"chunk.size={chosen.size}"] if chosen.size > 0 else []) + (
        [f"chunk.overlap={chosen.overlap}"] if chosen.overlap >= 0 else [])
    if settings and len(olds) == 1 and old and new and old[0] == new[0]:
        keep = (f"keep the index's chunking by leaving chunk.size and chunk.overlap unset (drop them from the "
                f"command and your config) or setting 'chunk.size={old[1]} chunk.overlap={old[2]}', or ")
    raise UsageError(
        f"index '{name}' holds {len(left)} document(s) cut with {' and '.join(_describe_chunker(o) for o in olds)}, "
        f"which this run would not re-chunk, and this configuration cuts new ones with {_describe_chunker(sig)}: "
        f"the index would mix two chunkings. Either {keep}re-chunk the whole index with "
        f"'ragtune index sync {roots} --index {shlex.quote(name)}{''.join(' ' + s for s in settings)}' (every "
        "folder it holds, in one command; it re-embeds every document)")


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
    """What the run would do, each file to be written read as the run reads it (no chunking, no
    embedding): one its reader refuses (corrupt, binary, no text) is listed as skipped, with the reason
    and exit code the run gives, not as a document it would add."""
    from ragtune.retrieval.ingest_plan import KEPT_OLD
    from ragtune.retrieval.ingest_write import read_docs
    from ragtune.retrieval.loaders import Skip

    by_file: dict[str, list[DocRef]] = {}
    for r in plan.add:
        by_file.setdefault(str(Path(r.root) / r.file), []).append(r)
    for abs_file, refs in by_file.items():
        try:
            read_docs(Path(abs_file), refs)
        except Skip as exc:
            res.skipped.append((refs[0].file, f"{exc}{KEPT_OLD if plan.stale.get(abs_file) else ''}"))
            continue
        for r in refs:
            if r.doc_id in plan.reread:
                res.reread.append((r.source, plan.reread[r.doc_id]))
            else:
                (res.replaced if abs_file in plan.replaced_files else res.added).append(r.source)
    res.deleted = sorted({st.get("source", st["doc_id"]) for st in plan.removed})
