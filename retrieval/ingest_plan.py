"""What an add or sync run must do: walk the given paths, give every document its identity, and sort
the documents into new or changed, unchanged, re-read, replaced, removed and orphaned ones.

    files, links_skipped = collect(["docs/"])          # (root, file) for every file; links not followed
    plan = plan_ingest(store.doc_states(), files, chunker_sig, SPARSE_VERSION, sync_roots=[Path("docs").resolve()])
    plan.add, plan.unchanged, plan.stale, plan.removed, plan.reread

Identity: a document's id hashes its root, its path relative to that root, and its bytes (JSONL:
each line is a document, keyed by its "id" or line number); a chunk's id is a UUID derived from
(doc id, chunker signature, chunk number). Unchanged documents are never embedded again, unless
the reader of their format is newer (loaders.READER_VERSIONS) than the one stored with their chunks:
those are read again, in place. Re-writing the same chunk overwrites the same point, so nothing is
duplicated.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ragtune.errors import UsageError
from ragtune.retrieval import loaders
from ragtune.retrieval.file_formats import file_type, peek_binary
from ragtune.retrieval.loaders import Document, is_supported, iter_jsonl, reader_format
from ragtune.text import escape_controls, is_control

CHUNK_NS = uuid.UUID("6f1c9a52-3b7e-4c8e-9d51-2a7f0e4b8c11")


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


def doc_id_for(root: str, source: str, data: bytes) -> tuple[str, str]:
    content = hashlib.sha256(data).hexdigest()
    # 40 hex digits: never mistaken for a UUID (qdrant-client's local mode re-formats those in facets)
    ident = hashlib.sha256(f"{root}\0{source}\0{content}".encode()).hexdigest()[:40]
    return ident, content


def chunk_id(doc_id: str, chunker: str, i: int) -> str:
    return str(uuid.uuid5(CHUNK_NS, f"{doc_id}:{chunker}:{i}"))


# --- walking and planning ---------------------------------------------------------------------


def collect(paths: Iterable[str | Path], follow_links: bool = False, unlisted: list[Path] | None = None
            ) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(root, file) for every regular file under the given paths, and (path, reason) for what was
    passed over: links not followed, link loops, named pipes and devices (reading one would hang), and
    folders that cannot be listed (their absolute paths also go to `unlisted`, so that a sync does not
    take their documents for deleted ones).

    Hidden files and folders are ignored. A symbolic link whose target lies outside its root is not
    followed unless `follow_links` (`index.follow_links`, `--follow-links`): a link to /etc/passwd in a
    documents folder must not end up in the index and in answers."""
    out: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    unlisted = unlisted if unlisted is not None else []
    for raw in paths:
        if not str(raw).strip():  # Path("") is the working folder: an unset variable would index all of it
            raise UsageError("a PATH to index is empty (an unset shell variable?); give files or folders of "
                             "documents to index ('.' for the working folder)")
        p = Path(raw).expanduser()
        if not p.exists():
            if _resolve(p) is None:
                raise UsageError(f"path '{raw}' is a symbolic link loop; give files or folders of documents to index")
            raise UsageError(f"path '{raw}' does not exist; give files or folders of documents to index (to take "
                             f"a deleted file out of an index: 'ragtune index remove {raw}', or sync its folder)")
        p = p.resolve()
        if not _utf8(str(p)):
            raise UsageError(f"path '{_shown(str(p))}' is not valid UTF-8, which sources in an index and citations "
                             "must be; rename it (or the folder it is in)")
        kind = _special_kind(p)
        if kind:
            raise UsageError(f"path '{raw}' is {kind}, not a file or folder of documents; give files or folders "
                             "of documents to index")
        if p.is_file():
            if _has_control(p.name):
                skipped.append((_escaped(p.name), _CONTROL))
            else:
                out.append((p.parent, p))
            continue
        seen_dirs = {p}

        def unreadable(exc: OSError, root: Path = p) -> None:
            where = Path(exc.filename) if exc.filename else root
            unlisted.append(where)
            rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
            skipped.append((f"{rel}/", f"cannot list this folder ({exc.strerror or exc}); its files were not "
                                       "indexed, nor deleted by a sync: make it readable (chmod +rx) and run "
                                       "the command again"))

        for dirpath, dirnames, filenames in os.walk(p, onerror=unreadable, followlinks=follow_links):
            here = Path(dirpath)
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                target = _resolve(here / d)
                if target is None:
                    skipped.append(((here / d).relative_to(p).as_posix(), _LOOP))
                    continue
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
                target = _resolve(f)
                if target is None:
                    skipped.append((f.relative_to(p).as_posix(), _LOOP))
                    continue
                if f.is_symlink() and not _link_allowed(p, f, target, follow_links, skipped):
                    continue
                kind = _special_kind(target)
                if kind:
                    skipped.append((f.relative_to(p).as_posix(), f"{kind}, not a regular file: not read"))
                    continue
                rel = f.relative_to(p).as_posix()
                if not _utf8(rel):
                    skipped.append((_shown(rel), "its name is not valid UTF-8, which sources in an index and "
                                                 "citations must be: not read; rename it"))
                    continue
                if _has_control(rel):
                    skipped.append((_escaped(rel), _CONTROL))
                    continue
                out.append((p, f))
    return _once(out), [(_shown(path), _shown(why)) for path, why in skipped]


def _once(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """Each file once, under the outermost of the given folders that holds it (`add docs docs/sub`, or a
    path given twice): under two roots it would be two documents, and each run would move it to the other."""
    root_of: dict[Path, Path] = {}
    for root, f in found:
        if f not in root_of or len(root.parts) < len(root_of[f].parts):
            root_of[f] = root
    return [(root_of.pop(f), f) for _root, f in found if f in root_of]


_LOOP = "symbolic link loop (a link that leads back to itself): not followed; fix or delete the link"


_CONTROL = ("its name has a control character (shown as \\xNN), which would break every listing, citation and "
            "prompt that names it: not read; rename it")


def _has_control(name: str) -> bool:
    """A newline, tab, escape or other control character in a name (a terminal escape sequence too)."""
    return any(map(is_control, name))


def _escaped(name: str) -> str:
    return escape_controls(_shown(name))


def _utf8(name: str) -> bool:
    """False for a name the file system gave with bytes that are not UTF-8 (Python's surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """A name with undecodable bytes as U+FFFD, printable and JSON-safe."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _resolve(path: Path) -> Path | None:
    """The path with its links resolved; None for a link loop (Python raises RuntimeError or OSError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def _special_kind(path: Path) -> str:
    """What a file that is not a regular file is ("" for a regular one): reading a named pipe blocks
    until something writes to it, a device may never end."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return ""  # reported when it is read
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return ""


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


def state_file(state: dict[str, Any]) -> str | None:
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


KEPT_OLD = "; the index keeps its previous version"  # said of a skipped file whose documents the index has


def plan_ingest(store_states: dict[str, dict[str, Any]], files: list[tuple[Path, Path]], chunker_sig: str,
                sparse_version: int, sync_roots: list[Path] | None = None, text_suffixes: Iterable[str] = ()) -> Plan:
    plan = Plan()
    current_ids: set[str] = set()
    by_file: dict[str, list[dict[str, Any]]] = {}
    for st in store_states.values():
        f = state_file(st)
        if f:
            by_file.setdefault(f, []).append(st)
    seen_files: set[str] = set()
    for root, path in files:
        abs_file = str(path)
        seen_files.add(abs_file)
        rel = path.relative_to(root).as_posix()
        if not is_supported(path, text_suffixes):
            plan.skipped.append((rel, f"unsupported file type '{file_type(path)}'"))
            continue
        kept_old = KEPT_OLD if by_file.get(abs_file) else ""
        try:
            if peek_binary(path):  # a name without a suffix is read as text: a program or image is not read whole
                plan.skipped.append((rel, f"binary content in a file without an extension (NUL bytes); not a text "
                                          f"file{kept_old}"))
                continue
            data = path.read_bytes()
        except OSError as exc:
            plan.skipped.append((rel, f"cannot read: {exc.strerror or exc}{kept_old}"))
            continue
        if not data.strip():
            plan.skipped.append((rel, f"empty file{kept_old}"))
            continue
        refs: list[DocRef] = []
        reader = reader_format(path, data, text_suffixes)
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
        f = state_file(st)
        if f is None:
            if st["doc_id"] not in current_ids:
                plan.orphans.append(st["doc_id"])
            continue
        if sync_roots and f not in seen_files and any(Path(f).is_relative_to(r) for r in sync_roots):
            plan.removed.append(st)
    return plan
