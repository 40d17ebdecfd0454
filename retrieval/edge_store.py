"""EdgeStore: an index in-process with Qdrant Edge, one folder under $RAGTUNE_HOME/indexes.

    from ragtune.retrieval.edge_store import EdgeStore

    store = EdgeStore("policies").open(create_dim=384)   # a writer (holding IndexLock), creating it if missing
    store = EdgeStore("policies").open_reader()          # a short reader: the live index, or a copy when busy
    store = EdgeStore("policies").open_copy()            # a long-lived reader: always a private copy
    store.is_stale()                                     # a writer has had the index since the copy
    store.close()                                        # a copy is deleted, the reader lock let go

Implements `ragtune.retrieval.store_base.Store`; `ragtune.retrieval.store.open_store` makes one when
store.url is empty. Edge locks its files for whoever has them open, hence the copies: see
`ragtune.retrieval.store` for who reads what.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from ragtune.errors import RagtuneError, UsageError
from ragtune.retrieval.index_dirs import (
    IndexBusy,
    IndexLock,
    generation,
    index_dir,
    lock_holder,
    missing_index,
    remove_stale_copies,
)
from ragtune.retrieval.sparse_files import copy_sparse
from ragtune.retrieval.store_base import DENSE, INTEGER_FIELDS, KEYWORD_FIELDS, SPARSE, Hit, PointData, Store

log = logging.getLogger(__name__)


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
            raise RagtuneError(
                f"cannot open index '{self.name}' at {self.shard_dir}: {exc}. If its files are damaged (a disk "
                f"error, an interrupted copy), rebuild it with 'ragtune index drop {self.name}' and 'ragtune index "
                f"add PATH --index {self.name}'") from exc
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

        try:
            res = self.shard.facet(FacetRequest(key="doc_id", limit=max(1, limit), exact=True))
        except Exception as exc:  # the bindings raise plain Exception: a shard whose payload index is gone
            raise RagtuneError(
                f"cannot read the documents of index '{self.name}' at {self.shard_dir}: {exc}. The index is damaged "
                f"(a file of it was deleted or not copied?): rebuild it with 'ragtune index drop {self.name}' and "
                f"'ragtune index add PATH --index {self.name}'") from None
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
