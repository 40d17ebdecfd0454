"""ragtune.retrieval: documents -> chunks -> embeddings -> Qdrant -> hybrid search."""
