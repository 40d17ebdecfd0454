"""One small store interface over Qdrant: Edge in-process (default) or a server via qdrant-client.

    store = open_store(cfg, "default")         # EdgeStore, or ServerStore when store.url is set
    store.open(create_dim=384)                 # create if missing (writers) / store.open() (readers)
    store.upsert([PointData(id, dense, (idx, val), payload), ...])
    hits = store.query(dense=q, sparse=(idx, val), mode="hybrid", limit=5)
    store.close()

Both hold the same schema: named vectors "dense" (cosine) and "sparse" (IDF modifier), one point
per chunk with its payload, payload indexes on the fields filters and sync use, and one vectorless
meta point (schema_version, embedder identity, chunker) that travels with the data on migrate.
`store.url` = "http(s)://host:port" for a server; "local:PATH" or ":memory:" for qdrant-client's
local mode, which speaks the server API (tests and benchmarks; too slow as a product default).

Writers take an exclusive fcntl lock on $RAGTUNE_HOME/indexes/NAME/.lock (IndexLock) and bump
NAME/generation when they let go; a second writer gets IndexBusy with a clear message instead of a
stack trace. Edge also locks its files for whoever has them open, reader or writer, so readers share:
- a short reader (`search`, `ask`) holds the lock shared while it opens the live index; when another
  reader has that open, it reads a private copy instead (`EdgeStore.open_copy`);
- a long-lived reader (`serve`, `chat`) always reads a private copy, taken under the shared lock, and
  takes a new one when the generation changes (`Retriever.refresh`), so `index sync` runs while a
  server answers and the server sees the new documents after it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ragtune.errors import RagtuneError, UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "ragtune:index-meta"))
DENSE = "dense"
SPARSE = "sparse"
KEYWORD_FIELDS = ("doc_id", "source", "file", "root", "kind", "title")
INTEGER_FIELDS = ("chunk_index", "page")
STATE_FIELDS = ["doc_id", "doc_hash", "root", "file", "source", "title", "n_chunks", "chunker", "sparse"]


class IndexBusy(RagtuneError):
    """The index is open in another process (a writer, or a reader of an Edge index)."""


@dataclass
class PointData:
    id: str
    dense: Any  # sequence of floats (None for the meta point)
    sparse: tuple[list[int], list[float]] | None
    payload: dict[str, Any] = field(default_factory=dict)

    def vectors(self, make_sparse: Any) -> dict[str, Any]:
        """Named vectors in the shared schema; `make_sparse(indices, values)` builds the backend's type."""
        vec: dict[str, Any] = {}
        if self.dense is not None:
            vec[DENSE] = [float(x) for x in self.dense]
        if self.sparse is not None and self.sparse[0]:
            vec[SPARSE] = make_sparse(list(self.sparse[0]), [float(v) for v in self.sparse[1]])
        return vec


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    vector: list[float] | None = None  # the stored (normalised) dense vector, when asked for


def indexes_root() -> Path:
    """$RAGTUNE_HOME/indexes: one folder per edge index."""
    from ragtune.modeling import ragtune_home

    return ragtune_home() / "indexes"


def index_dir(name: str) -> Path:
    return indexes_root() / name


def check_index_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
        raise UsageError(
            f"index name '{name}' is not valid; use letters, digits, '_', '.', '-' (up to 64, starting with a letter or digit)"
        )
    return name


# --- the index lock ---------------------------------------------------------------------------


class IndexLock:
    """fcntl lock on the index folder, released when the process dies: exclusive for a writer (which
    bumps the index's generation when it lets go), shared for readers. A writer that finds only
    readers there waits up to `wait` seconds for them; one that finds a writer fails at once."""

    def __init__(self, name: str, what: str = "", shared: bool = False, wait: float = 10.0) -> None:
        self.name = name
        self.path = index_dir(name) / ".lock"
        self.what = what or "ragtune"
        self.shared = shared
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> "IndexLock":
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = ""
                try:
                    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                except OSError:
                    pass
                if not self.shared and not holder and time.monotonic() < deadline:
                    time.sleep(0.1)  # only readers: they let go within moments
                    continue
                os.close(fd)
                if self.shared:
                    raise IndexBusy(
                        f"index '{self.name}' is being written by another process{f' ({holder})' if holder else ''}; "
                        "wait for it to finish and run the command again"
                    ) from None
                raise IndexBusy(
                    f"index '{self.name}' is in use by another process ({holder or 'a reader'}); "
                    "wait for it to finish and run the command again"
                ) from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {self.what}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        if self.fd is not None:
            try:
                if not self.shared and self.path.parent.is_dir():  # gone when `index drop` took it
                    from ragtune.io import atomic_write_text

                    atomic_write_text(self.path.parent / "generation", uuid.uuid4().hex + "\n")
                    os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def generation(name: str) -> str:
    """Changes whenever a writer has had the index (readers of a copy compare it to theirs)."""
    try:
        return (index_dir(name) / "generation").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def remove_stale_copies(name: str) -> None:
    """Read copies whose process is gone (killed servers) are deleted by the next reader."""
    root = index_dir(name) / ".readers"
    if not root.is_dir():
        return
    for d in root.iterdir():
        try:
            os.kill(int(d.name.split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def live_readers(name: str) -> list[int]:
    """Process ids of the running processes (servers, chats) that read a private copy of the index."""
    root = index_dir(name) / ".readers"
    pids = set()
    if root.is_dir():
        for d in root.iterdir():
            try:
                pid = int(d.name.split("-", 1)[0])
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                continue
            except PermissionError:  # alive, another user's
                pass
            pids.add(pid)
    return sorted(pids)


def lock_holder(name: str) -> str:
    try:
        return (index_dir(name) / ".lock").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


# --- interface --------------------------------------------------------------------------------


class Store(ABC):
    kind = ""

    def __init__(self, name: str) -> None:
        self.name = check_index_name(name)

    @abstractmethod
    def exists(self) -> bool: ...

    @abstractmethod
    def open(self, create_dim: int | None = None) -> "Store":
        """Open an existing index; with create_dim, create it first when it does not exist."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def location(self) -> str: ...

    @abstractmethod
    def upsert(self, points: list[PointData]) -> None: ...

    @abstractmethod
    def delete_docs(self, doc_ids: list[str]) -> None: ...

    @abstractmethod
    def delete_points(self, ids: list[str]) -> None:
        """Delete these points (absent ids are ignored)."""

    @abstractmethod
    def update_sparse(self, items: list[tuple[str, tuple[list[int], list[float]]]]) -> None:
        """Replace the lexical vector of existing points, their dense vectors and payloads kept."""
        ...

    @abstractmethod
    def retrieve(self, ids: list[str], with_vector: bool = False) -> list[Hit]: ...

    @abstractmethod
    def facet_doc_ids(self, limit: int) -> dict[str, int]: ...

    @abstractmethod
    def scroll(self, filters: dict[str, Any] | None, fields: list[str] | bool, with_vectors: bool,
               batch: int = 1000) -> Iterator[tuple[str, dict[str, Any], Any]]: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def query(self, dense: Any = None, sparse: tuple[list[int], list[float]] | None = None,
              mode: str = "hybrid", limit: int = 5, candidates: int = 50, rrf_k: int = 60,
              filters: dict[str, Any] | None = None, hnsw_ef: int = 0, exact: bool = False,
              with_vector: bool = False, fusion: str = "rrf",
              weights: tuple[float, float] | None = None) -> list[Hit]: ...

    def optimize(self) -> None:
        """Build indexes (HNSW) where the backend needs it to be asked; a no-op elsewhere."""

    def flush(self) -> None:
        """Make written points durable where the backend buffers them."""

    def disk_bytes(self) -> int | None:
        return None

    @abstractmethod
    def drop(self) -> None: ...

    # --- shared on top of the primitives ------------------------------------------------------

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read_meta(self) -> dict[str, Any]:
        hits = self.retrieve([META_ID])
        return dict(hits[0].payload) if hits else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.upsert([PointData(META_ID, None, None, {**meta, "kind": "meta"})])

    def doc_states(self) -> dict[str, dict[str, Any]]:
        """doc_id -> first chunk's identity fields plus `count` (points stored for it).

        A document is complete when count == n_chunks; ids with points but no first chunk are
        leftovers of an interrupted write (state without 'file')."""
        total = self.count()
        counts = self.facet_doc_ids(limit=total + 1) if total else {}
        states: dict[str, dict[str, Any]] = {d: {"doc_id": d, "count": c} for d, c in counts.items() if c > 0}
        for _pid, payload, _vec in self.scroll({"chunk_index": 0}, STATE_FIELDS, with_vectors=False):
            d = payload.get("doc_id")
            if d in states:
                states[d].update(payload)
        return states


def open_store(cfg: Any, name: str) -> Store:
    """The backend the config asks for: Edge by default, qdrant-client when store.url is set."""
    url = cfg.store.url
    if not url:
        return EdgeStore(name)
    return ServerStore(name, url, cfg.store.api_key, cfg.store.collection_prefix)


def data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each written region of the open file `fd` of `size` bytes, holes left out
    (SEEK_DATA / SEEK_HOLE); from where the file system cannot say on, the rest as one region."""
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    return
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, pos
    except (AttributeError, OSError):  # no SEEK_DATA here: the rest as written
        if pos < size:
            yield pos, size


def copy_sparse(src: str | Path, dst: str | Path) -> None:
    """Copy a file holding its holes as holes: Qdrant Edge preallocates its mmap files (32 MB pages, a
    WAL segment) that stay mostly unwritten, so a plain copy of a 1 MB index writes 220 MB. Only the
    data regions are copied; the size is set to the source's."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end in data_regions(fin.fileno(), size):
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left > 0 and (block := fin.read(min(left, 1 << 20))):
                fout.write(block)
                left -= len(block)
        fout.truncate(size)
    shutil.copystat(src, dst)


def data_end(path: str | Path) -> int:
    """Where a file's last written byte ends: its size less a trailing hole."""
    with open(path, "rb") as f:
        return max((end for _, end in data_regions(f.fileno(), os.fstat(f.fileno()).st_size)), default=0)


def local_indexes() -> list[str]:
    """The names of the edge indexes under $RAGTUNE_HOME/indexes that hold a store."""
    root = indexes_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "shard" / "edge_config.json").is_file())


def other_indexes(name: str, most: int = 10) -> str:
    """The local indexes other than `name`, for an error about a missing one ("" when there are none)."""
    others = [n for n in local_indexes() if n != name]
    return ", ".join(others[:most]) + (" ..." if len(others) > most else "")


def missing_index(name: str, where: str = "", also: str = "", how: str = "", others: bool = True) -> UsageError:
    """The one message for an index that is not there: where it was looked for (`where`), what to do
    (`how`: create it, by default; `also`: another way out), and the local indexes that do exist."""
    how = how or f"create it with 'ragtune index add PATH --index {name}'"
    msg = f"index '{name}' does not exist" + (f" at {where}" if where else "") + f"; {how}" + (f", or {also}" if also else "")
    names = other_indexes(name) if others else ""
    return UsageError(msg + (f"; the indexes here are {names} (pick one with --index NAME)" if names else ""))


def open_for_reading(cfg: Any, name: str, copy: bool = False) -> Store:
    """An existing index, opened to read: an Edge index shared with other short readers, or as a
    private copy (`copy`, for long-lived readers); a server collection as usual."""
    store = open_store(cfg, name)
    if not store.exists():
        raise missing_index(name)
    if isinstance(store, EdgeStore):
        return store.open_copy() if copy else store.open_reader()
    return store.open()


# --- Qdrant Edge ------------------------------------------------------------------------------


def _edge_filter(filters: dict[str, Any] | None) -> Any:
    if not filters:
        return None
    from qdrant_edge import FieldCondition, Filter, MatchAny, MatchValue

    conds = []
    for key, value in filters.items():
        if isinstance(value, (list, tuple)):
            conds.append(FieldCondition(key, match=MatchAny(list(value))))
        else:
            conds.append(FieldCondition(key, match=MatchValue(value)))
    return Filter(must=conds)


class EdgeStore(Store):
    """Qdrant Edge in-process: one folder ($RAGTUNE_HOME/indexes/NAME/shard), HNSW + payload indexes."""

    kind = "edge"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.dir = index_dir(name)
        self.shard_dir = self.dir / "shard"
        self.shard: Any = None
        self.copy_dir: Path | None = None  # set when this reads a private copy
        self.copy_generation = ""
        self._reader_lock: IndexLock | None = None

    def location(self) -> str:
        return str(self.shard_dir)

    def exists(self) -> bool:
        return (self.shard_dir / "edge_config.json").is_file()

    def _busy(self, exc: Exception) -> IndexBusy:
        holder = lock_holder(self.name)
        return IndexBusy(
            f"index '{self.name}' is in use by another process ({holder or 'a writer, or a server that has it open'}); "
            "wait for it to finish (or stop the server) and run the command again"
        )

    def open(self, create_dim: int | None = None) -> "EdgeStore":
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeShard,
            EdgeSparseVectorParams,
            EdgeVectorParams,
            Modifier,
            PayloadSchemaType,
            UpdateOperation,
        )

        try:
            if self.exists():
                self.shard = EdgeShard.load(str(self.shard_dir))
                return self
            if create_dim is None:
                raise missing_index(self.name)
            if self.shard_dir.exists():  # a creation killed before its config landed
                shutil.rmtree(self.shard_dir)
            config = EdgeConfig(
                vectors={DENSE: EdgeVectorParams(size=create_dim, distance=Distance.Cosine)},
                sparse_vectors={SPARSE: EdgeSparseVectorParams(modifier=Modifier.Idf)},
            )
            self.shard = EdgeShard.create(str(self.shard_dir), config)
        except UsageError:
            raise
        except Exception as exc:  # the bindings raise plain Exception
            if "WouldBlock" in str(exc) or "lock" in str(exc).lower():
                raise self._busy(exc) from None
            raise RagtuneError(f"cannot open index '{self.name}' at {self.shard_dir}: {exc}") from exc
        for f in KEYWORD_FIELDS:
            self.shard.update(UpdateOperation.create_field_index(f, PayloadSchemaType.Keyword))
        for f in INTEGER_FIELDS:
            self.shard.update(UpdateOperation.create_field_index(f, PayloadSchemaType.Integer))
        return self

    def open_reader(self) -> "EdgeStore":
        """Open for a short read: the live index when no one else has it open, else a private copy.
        The shared lock is held until close(), so a writer waits for this reader instead of failing."""
        lock = IndexLock(self.name, shared=True).__enter__()
        try:
            try:
                self.open()
            except IndexBusy:
                log.info("index '%s' is open in another reader; reading a copy of it", self.name)
                self._copy_and_open()
        except BaseException:
            lock.__exit__()
            raise
        self._reader_lock = lock
        return self

    def open_copy(self) -> "EdgeStore":
        """Open a private copy of the index (for long-lived readers: writers are never blocked)."""
        with IndexLock(self.name, shared=True):
            return self._copy_and_open()

    def _copy_and_open(self) -> "EdgeStore":
        import time

        if not self.exists():
            raise missing_index(self.name)
        remove_stale_copies(self.name)
        t0 = time.perf_counter()
        dest = self.dir / ".readers" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        gen = generation(self.name)
        try:
            shutil.copytree(self.shard_dir, dest / "shard", copy_function=copy_sparse)
            from qdrant_edge import EdgeShard

            self.shard = EdgeShard.load(str(dest / "shard"))
        except BaseException as exc:
            shutil.rmtree(dest, ignore_errors=True)
            if isinstance(exc, Exception):
                raise RagtuneError(f"cannot open a copy of index '{self.name}': {exc}") from exc
            raise
        self.copy_dir, self.copy_generation = dest, gen
        log.info("reading a copy of index '%s' (%.1f MB, %.2fs)", self.name,
                 sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 1e6, time.perf_counter() - t0)
        return self

    def is_stale(self) -> bool:
        """A copy is stale once a writer has had the index since it was taken."""
        return self.copy_dir is not None and generation(self.name) != self.copy_generation

    def close(self) -> None:
        if self.shard is not None:
            try:
                if self.copy_dir is None:
                    self.shard.flush()
            finally:
                self.shard.close()
                self.shard = None
        if self.copy_dir is not None:
            shutil.rmtree(self.copy_dir, ignore_errors=True)
            try:
                self.copy_dir.parent.rmdir()  # only when no other reader has a copy there
            except OSError:
                pass
            self.copy_dir = None
        if self._reader_lock is not None:
            self._reader_lock.__exit__()
            self._reader_lock = None

    def upsert(self, points: list[PointData]) -> None:
        from qdrant_edge import Point, SparseVector, UpdateOperation

        out = [Point(p.id, p.vectors(SparseVector), p.payload) for p in points]
        if out:
            self.shard.update(UpdateOperation.upsert_points(out))

    def update_sparse(self, items: list[tuple[str, tuple[list[int], list[float]]]]) -> None:
        from qdrant_edge import PointVectors, SparseVector, UpdateOperation

        for i in range(0, len(items), 256):
            pv = [PointVectors(pid, {SPARSE: SparseVector(list(sp[0]), [float(v) for v in sp[1]])})
                  for pid, sp in items[i : i + 256]]
            self.shard.update(UpdateOperation.update_vectors(pv))

    def delete_docs(self, doc_ids: list[str]) -> None:
        from qdrant_edge import UpdateOperation

        for i in range(0, len(doc_ids), 256):
            self.shard.update(UpdateOperation.delete_points_by_filter(_edge_filter({"doc_id": doc_ids[i : i + 256]})))

    def delete_points(self, ids: list[str]) -> None:
        from qdrant_edge import UpdateOperation

        for i in range(0, len(ids), 256):
            self.shard.update(UpdateOperation.delete_points(list(ids[i : i + 256])))

    def retrieve(self, ids: list[str], with_vector: bool = False) -> list[Hit]:
        recs = self.shard.retrieve(list(ids), with_payload=True, with_vector=[DENSE] if with_vector else False)
        return [Hit(str(r.id), 0.0, dict(r.payload or {}), r.vector.get(DENSE) if isinstance(r.vector, dict) else None)
                for r in recs]

    def facet_doc_ids(self, limit: int) -> dict[str, int]:
        from qdrant_edge import FacetRequest

        res = self.shard.facet(FacetRequest(key="doc_id", limit=max(1, limit), exact=True))
        return {str(h.value): int(h.count) for h in res.hits}

    def scroll(self, filters: dict[str, Any] | None, fields: list[str] | bool, with_vectors: bool,
               batch: int = 1000) -> Iterator[tuple[str, dict[str, Any], Any]]:
        from qdrant_edge import PayloadSelector, ScrollRequest

        with_payload: Any = PayloadSelector.Include(list(fields)) if isinstance(fields, list) else fields
        offset = None
        while True:
            recs, offset = self.shard.scroll(ScrollRequest(
                offset=offset, limit=batch, filter=_edge_filter(filters), with_payload=with_payload,
                with_vector=with_vectors,
            ))
            for r in recs:
                yield str(r.id), dict(r.payload or {}), r.vector
            if offset is None or not recs:
                return

    def count(self) -> int:
        from qdrant_edge import CountRequest

        return int(self.shard.count(CountRequest(filter=_edge_filter({"kind": "chunk"}), exact=True)))

    def query(self, dense: Any = None, sparse: tuple[list[int], list[float]] | None = None,
              mode: str = "hybrid", limit: int = 5, candidates: int = 50, rrf_k: int = 60,
              filters: dict[str, Any] | None = None, hnsw_ef: int = 0, exact: bool = False,
              with_vector: bool = False, fusion: str = "rrf",
              weights: tuple[float, float] | None = None) -> list[Hit]:
        from qdrant_edge import Fusion, Prefetch, Query, QueryRequest, SearchParams, SparseVector

        flt = _edge_filter(filters)
        params = SearchParams(hnsw_ef=hnsw_ef or None, exact=exact) if (hnsw_ef or exact) else None
        dense_q = Query.Nearest([float(x) for x in dense], using=DENSE) if dense is not None else None
        sparse_q = (Query.Nearest(SparseVector(list(sparse[0]), [float(v) for v in sparse[1]]), using=SPARSE)
                    if sparse is not None and sparse[0] else None)
        wv: Any = [DENSE] if with_vector else False
        if mode == "hybrid" and dense_q is not None and sparse_q is not None:
            req = QueryRequest(
                limit=limit,
                prefetches=[Prefetch(limit=max(candidates, limit), query=dense_q, filter=flt, params=params),
                            Prefetch(limit=max(candidates, limit), query=sparse_q, filter=flt)],
                query=(Fusion.Dbsf() if fusion == "dbsf" else
                       Fusion.Rrf(k=rrf_k, weights=list(weights) if weights else None)),
                with_payload=True, with_vector=wv,
            )
        else:
            q = sparse_q if mode == "sparse" else dense_q
            if q is None:
                return []
            req = QueryRequest(limit=limit, query=q, filter=flt, params=params if q is dense_q else None,
                               with_payload=True, with_vector=wv)
        return [_edge_hit(p) for p in self.shard.query(req)]

    def optimize(self) -> None:
        self.shard.optimize()

    def flush(self) -> None:
        self.shard.flush()

    def disk_bytes(self) -> int | None:
        return sum(f.stat().st_blocks * 512 for f in self.shard_dir.rglob("*") if f.is_file())  # allocated

    def drop(self) -> None:
        """Delete the index's data (the shard); the folder, its lock and generation stay."""
        self.close()
        shutil.rmtree(self.shard_dir, ignore_errors=True)

    def remove_folder(self) -> None:
        """Delete the whole index folder (`index drop`, under the index lock): renamed aside first,
        one atomic step, so the index is there or gone, never half-deleted under its name."""
        self.close()
        if not self.dir.exists():
            return
        trash = self.dir.parent / f".dropped-{self.name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _edge_hit(p: Any) -> Hit:
    vec = p.vector.get(DENSE) if isinstance(p.vector, dict) else None
    return Hit(str(p.id), float(p.score), dict(p.payload or {}), vec)


# --- Qdrant server (and qdrant-client local mode) ----------------------------------------------


def _qc_filter(filters: dict[str, Any] | None) -> Any:
    if not filters:
        return None
    from qdrant_client import models as m

    conds = []
    for key, value in filters.items():
        if isinstance(value, (list, tuple)):
            conds.append(m.FieldCondition(key=key, match=m.MatchAny(any=list(value))))
        else:
            conds.append(m.FieldCondition(key=key, match=m.MatchValue(value=value)))
    return m.Filter(must=conds)


class ServerStore(Store):
    """A Qdrant server or cluster through qdrant-client: one collection per index."""

    kind = "server"

    def __init__(self, name: str, url: str, api_key: str = "", prefix: str = "ragtune_") -> None:
        super().__init__(name)
        self.url = url
        self.api_key = api_key
        self.collection = f"{prefix}{name}"
        self.client: Any = None

    def location(self) -> str:
        return f"{self.url} collection {self.collection}"

    def _connect(self) -> Any:
        if self.client is not None:
            return self.client
        try:
            from qdrant_client import QdrantClient
        except ImportError as exc:  # pragma: no cover - a dependency
            raise RagtuneError("the server store needs qdrant-client: pip install qdrant-client") from exc
        try:
            if self.url == ":memory:":
                self.client = QdrantClient(location=":memory:")
            elif self.url.startswith("local:"):
                self.client = QdrantClient(path=self.url[len("local:"):])
            else:
                self.client = QdrantClient(url=self.url, api_key=self.api_key or None, timeout=60)
        except RuntimeError as exc:
            if "already accessed" in str(exc):
                raise IndexBusy(
                    f"index '{self.name}' ({self.url}) is in use by another process; qdrant-client's local mode "
                    "allows one process at a time: wait for it to finish, or use a Qdrant server"
                ) from None
            raise
        return self.client

    def _ask(self, call: Any) -> Any:
        """call(client), with an unreachable server said as such."""
        try:
            return call(self._connect())
        except IndexBusy:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors of every kind
            raise RagtuneError(
                f"cannot reach the Qdrant server at store.url '{self.url}': {exc}; start it or fix store.url"
            ) from exc

    def exists(self) -> bool:
        return bool(self._ask(lambda c: c.collection_exists(self.collection)))

    def open(self, create_dim: int | None = None) -> "ServerStore":
        from qdrant_client import models as m

        if self.exists():
            return self
        if create_dim is None:
            raise UsageError(
                f"index '{self.name}' does not exist at {self.location()}; create it with "
                f"'ragtune index add PATH --index {self.name}'"
            )
        c = self._connect()
        c.create_collection(
            self.collection,
            vectors_config={DENSE: m.VectorParams(size=create_dim, distance=m.Distance.COSINE)},
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
        )
        if not self.url.startswith("local:") and self.url != ":memory:":  # local mode ignores indexes
            for f in KEYWORD_FIELDS:
                c.create_payload_index(self.collection, f, m.PayloadSchemaType.KEYWORD)
            for f in INTEGER_FIELDS:
                c.create_payload_index(self.collection, f, m.PayloadSchemaType.INTEGER)
        return self

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            finally:
                self.client = None

    def upsert(self, points: list[PointData]) -> None:
        from qdrant_client import models as m

        def sparse(indices: list[int], values: list[float]) -> Any:
            return m.SparseVector(indices=indices, values=values)

        out = [m.PointStruct(id=p.id, vector=p.vectors(sparse), payload=p.payload) for p in points]
        if out:
            self._connect().upsert(self.collection, out, wait=True)

    def update_sparse(self, items: list[tuple[str, tuple[list[int], list[float]]]]) -> None:
        from qdrant_client import models as m

        for i in range(0, len(items), 256):
            pv = [m.PointVectors(id=pid, vector={SPARSE: m.SparseVector(indices=list(sp[0]),
                                                                        values=[float(v) for v in sp[1]])})
                  for pid, sp in items[i : i + 256]]
            self._connect().update_vectors(self.collection, points=pv, wait=True)

    def delete_docs(self, doc_ids: list[str]) -> None:
        from qdrant_client import models as m

        for i in range(0, len(doc_ids), 256):
            self._connect().delete(
                self.collection, m.FilterSelector(filter=_qc_filter({"doc_id": doc_ids[i : i + 256]})), wait=True
            )

    def delete_points(self, ids: list[str]) -> None:
        from qdrant_client import models as m

        for i in range(0, len(ids), 256):
            self._connect().delete(self.collection, m.PointIdsList(points=list(ids[i : i + 256])), wait=True)

    def retrieve(self, ids: list[str], with_vector: bool = False) -> list[Hit]:
        recs = self._connect().retrieve(self.collection, ids, with_payload=True,
                                        with_vectors=[DENSE] if with_vector else False)
        return [Hit(str(r.id), 0.0, dict(r.payload or {}), r.vector.get(DENSE) if isinstance(r.vector, dict) else None)
                for r in recs]

    def facet_doc_ids(self, limit: int) -> dict[str, int]:
        res = self._connect().facet(self.collection, key="doc_id", limit=max(1, limit), exact=True)
        return {str(h.value): int(h.count) for h in res.hits}

    def scroll(self, filters: dict[str, Any] | None, fields: list[str] | bool, with_vectors: bool,
               batch: int = 1000) -> Iterator[tuple[str, dict[str, Any], Any]]:
        from qdrant_client import models as m

        with_payload: Any = m.PayloadSelectorInclude(include=list(fields)) if isinstance(fields, list) else fields
        offset = None
        while True:
            recs, offset = self._connect().scroll(
                self.collection, scroll_filter=_qc_filter(filters), limit=batch, offset=offset,
                with_payload=with_payload, with_vectors=with_vectors,
            )
            for r in recs:
                vec = r.vector
                if isinstance(vec, dict) and SPARSE in vec and hasattr(vec[SPARSE], "indices"):
                    vec = {**vec, SPARSE: _SparseView(vec[SPARSE].indices, vec[SPARSE].values)}
                yield str(r.id), dict(r.payload or {}), vec
            if offset is None or not recs:
                return

    def count(self) -> int:
        return int(self._connect().count(self.collection, count_filter=_qc_filter({"kind": "chunk"}), exact=True).count)

    def query(self, dense: Any = None, sparse: tuple[list[int], list[float]] | None = None,
              mode: str = "hybrid", limit: int = 5, candidates: int = 50, rrf_k: int = 60,
              filters: dict[str, Any] | None = None, hnsw_ef: int = 0, exact: bool = False,
              with_vector: bool = False, fusion: str = "rrf",
              weights: tuple[float, float] | None = None) -> list[Hit]:
        from qdrant_client import models as m

        flt = _qc_filter(filters)
        if self.url == ":memory:" or self.url.startswith("local:"):
            hnsw_ef, exact = 0, False  # local mode is always exact and warns about search params
        params = m.SearchParams(hnsw_ef=hnsw_ef or None, exact=exact) if (hnsw_ef or exact) else None
        dense_q = [float(x) for x in dense] if dense is not None else None
        sparse_q = (m.SparseVector(indices=list(sparse[0]), values=[float(v) for v in sparse[1]])
                    if sparse is not None and sparse[0] else None)
        wv: Any = [DENSE] if with_vector else False
        c = self._connect()
        if mode == "hybrid" and dense_q is not None and sparse_q is not None:
            res = c.query_points(
                self.collection,
                prefetch=[m.Prefetch(query=dense_q, using=DENSE, limit=max(candidates, limit), filter=flt, params=params),
                          m.Prefetch(query=sparse_q, using=SPARSE, limit=max(candidates, limit), filter=flt)],
                query=(m.FusionQuery(fusion=m.Fusion.DBSF) if fusion == "dbsf" else
                       m.RrfQuery(rrf=m.Rrf(k=rrf_k, weights=list(weights) if weights else None))),
                limit=limit, with_payload=True, with_vectors=wv,
            )
        else:
            q, using = (sparse_q, SPARSE) if mode == "sparse" else (dense_q, DENSE)
            if q is None:
                return []
            res = c.query_points(self.collection, query=q, using=using, query_filter=flt, limit=limit,
                                 search_params=params if using == DENSE else None, with_payload=True, with_vectors=wv)
        out = []
        for p in res.points:
            vec = p.vector.get(DENSE) if isinstance(p.vector, dict) else None
            out.append(Hit(str(p.id), float(p.score), dict(p.payload or {}), vec))
        return out

    def drop(self) -> None:
        c = self._connect()
        if c.collection_exists(self.collection):
            c.delete_collection(self.collection)

    @classmethod
    def index_names(cls, url: str, api_key: str = "", prefix: str = "ragtune_") -> list[str]:
        """The index names on the server at `url`: its collections that carry ragtune's prefix."""
        server = cls("listing", url, api_key, prefix)  # no index in particular: only its connection is used
        try:
            cols = server._ask(lambda c: c.get_collections().collections)
        finally:
            server.close()
        return sorted(c.name[len(prefix):] for c in cols if c.name.startswith(prefix) and c.name != prefix)


@dataclass
class _SparseView:
    indices: list[int]
    values: list[float]
