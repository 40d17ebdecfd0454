"""ServerStore: an index as a collection on a Qdrant server (or qdrant-client's local mode).

    from ragtune.retrieval.server_store import ServerStore

    store = ServerStore("policies", "http://localhost:6333", api_key="", prefix="ragtune_").open(create_dim=384)
    ServerStore("policies", ":memory:")                 # qdrant-client's local mode: tests and benchmarks
    ServerStore.index_names("http://localhost:6333")    # the ragtune indexes on that server

Implements `ragtune.retrieval.store_base.Store`; `ragtune.retrieval.store.open_store` makes one when
store.url is set. An unreachable server is said as such (RagtuneError naming store.url).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ragtune.errors import RagtuneError, UsageError
from ragtune.retrieval.index_dirs import IndexBusy
from ragtune.retrieval.store_base import DENSE, INTEGER_FIELDS, KEYWORD_FIELDS, SPARSE, Hit, PointData, Store


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

    def __init__(self, name: str, url: str, api_key: str = "", prefix: str = "ragtune_",
                 setting: str = "store.url") -> None:
        super().__init__(name)
        self.url = url
        self.setting = setting  # where the URL came from, for errors ('--to' of index migrate)
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
                f"cannot reach the Qdrant server at {self.setting} '{self.url}': {exc}; start it or fix {self.setting}"
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
