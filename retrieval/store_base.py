"""The Store interface both backends implement, and the schema they share.

    from ragtune.retrieval.store_base import DENSE, META_ID, Hit, PointData, Store

    PointData(id, dense, (indices, values), payload)       # one chunk: named vectors "dense" and "sparse"
    hits: list[Hit] = store.query(dense=q, sparse=(idx, val), mode="hybrid", limit=5)
    store.read_meta(); store.write_meta({...})             # the vectorless meta point (META_ID)
    store.doc_states()                                     # doc_id -> identity fields and points stored

The backends: `ragtune.retrieval.edge_store.EdgeStore` (Qdrant Edge in-process) and
`ragtune.retrieval.server_store.ServerStore` (a Qdrant server via qdrant-client); `open_store` in
`ragtune.retrieval.store` picks one from the config.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

from ragtune.retrieval.index_dirs import check_index_name

SCHEMA_VERSION = 1
META_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "ragtune:index-meta"))
DENSE = "dense"
SPARSE = "sparse"
KEYWORD_FIELDS = ("doc_id", "source", "file", "root", "kind", "title")
INTEGER_FIELDS = ("chunk_index", "page")
STATE_FIELDS = ["doc_id", "doc_hash", "root", "file", "source", "title", "n_chunks", "chunker", "sparse", "reader",
                "reader_version"]


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
