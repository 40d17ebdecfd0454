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

The parts: `ragtune.retrieval.store_base` (the Store interface, PointData, Hit, the schema),
`ragtune.retrieval.edge_store` (EdgeStore), `ragtune.retrieval.server_store` (ServerStore),
`ragtune.retrieval.index_dirs` (index names and folders, IndexLock, generations, reader copies) and
`ragtune.retrieval.sparse_files` (copying with holes kept). This module picks a backend from the
config and opens an index to read; every name above can be imported from it.
"""

from __future__ import annotations

from typing import Any

from ragtune.retrieval.edge_store import EdgeStore
from ragtune.retrieval.index_dirs import (
    IndexBusy,
    IndexLock,
    check_index_name,
    generation,
    index_dir,
    indexes_root,
    live_readers,
    local_indexes,
    lock_holder,
    missing_index,
    other_indexes,
    remove_stale_copies,
)
from ragtune.retrieval.server_store import ServerStore
from ragtune.retrieval.sparse_files import copy_sparse, data_end, data_regions
from ragtune.retrieval.store_base import (
    DENSE,
    INTEGER_FIELDS,
    KEYWORD_FIELDS,
    META_ID,
    SCHEMA_VERSION,
    SPARSE,
    STATE_FIELDS,
    Hit,
    PointData,
    Store,
)

__all__ = [
    "DENSE", "INTEGER_FIELDS", "KEYWORD_FIELDS", "META_ID", "SCHEMA_VERSION", "SPARSE", "STATE_FIELDS", "EdgeStore",
    "Hit", "IndexBusy", "IndexLock", "PointData", "ServerStore", "Store", "check_index_name", "copy_sparse",
    "data_end", "data_regions", "generation", "index_dir", "indexes_root", "live_readers", "local_indexes",
    "lock_holder", "missing_index", "open_for_reading", "open_store", "other_indexes", "remove_stale_copies",
]


def open_store(cfg: Any, name: str) -> Store:
    """The backend the config asks for: Edge by default, qdrant-client when store.url is set."""
    url = cfg.store.url
    if not url:
        return EdgeStore(name)
    return ServerStore(name, url, cfg.store.api_key, cfg.store.collection_prefix)


def open_for_reading(cfg: Any, name: str, copy: bool = False) -> Store:
    """An existing index, opened to read: an Edge index shared with other short readers, or as a
    private copy (`copy`, for long-lived readers); a server collection as usual."""
    store = open_store(cfg, name)
    if not store.exists():
        raise missing_index(name)
    if isinstance(store, EdgeStore):
        return store.open_copy() if copy else store.open_reader()
    return store.open()
