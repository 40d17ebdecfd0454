"""A LangChain retriever over a ragtune index (needs `pip install 'ragtune[langchain]'`: langchain-core).

    from langchain_classic.chains import RetrievalQA
    from langchain_openai import ChatOpenAI
    from ragtune.integrations.langchain import RagtuneRetriever

    llm = ChatOpenAI(model="base", base_url="http://127.0.0.1:8000/v1", api_key=KEY, temperature=0)
    qa = RetrievalQA.from_chain_type(llm=llm, retriever=RagtuneRetriever(index="policies", k=5),
                                     return_source_documents=True)
    result = qa.invoke({"query": "How many days can I work remotely?"})
    result["source_documents"][0].metadata    # {"source", "title", "page", "heading", "score", "n"}

The retriever opens the index in this process (the index, embedder and search settings of `config`,
a ragtune YAML; the defaults otherwise), reading a private copy so a running `ragtune serve` or
`index sync` is never blocked. With `server="http://127.0.0.1:8000"` it asks that server's
`POST /v1/search` instead and loads nothing here. Each hit becomes a `Document` whose
`page_content` is the chunk's text and whose `metadata` holds ragtune's sources shape (minus the
text): `source` (path relative to the indexed root), `title`, `page` (PDF pages, else None),
`heading`, `score` (the relevance a reader can judge: reranker score, else dense cosine) and `n`.
"""

from __future__ import annotations

from typing import Any, Literal

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(f"ragtune.integrations.langchain needs langchain-core ({exc}); install it with "
                      "pip install 'ragtune[langchain]'") from exc
from pydantic import ConfigDict, PrivateAttr

__all__ = ["RagtuneRetriever", "to_document"]


def to_document(source: dict[str, Any]) -> Document:
    """One source `{"n", "source", "title", "page", "heading", "score", "text"}` as a LangChain Document."""
    meta = {k: source.get(k) for k in ("source", "title", "page", "heading", "score", "n")}
    return Document(page_content=source.get("text", ""), metadata=meta)


class RagtuneRetriever(BaseRetriever):
    """Top-`k` chunks of a ragtune index for a query, as Documents with their sources."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: str = ""
    """Index name ($RAGTUNE_HOME/indexes/NAME); "" = the config's index.name."""
    k: int = 4
    """How many chunks to return."""
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    """Search mode; None = the config's search.mode."""
    filters: dict[str, Any] | None = None
    """Payload filters, as `ragtune search --filter` takes them (e.g. {"source": "hr.md"})."""
    config: str = ""
    """A ragtune YAML whose embedder, store, index and search settings to use ("" = defaults)."""
    overrides: tuple[str, ...] = ()
    """`key.sub=value` overrides on top of `config`."""
    server: str = ""
    """A running `ragtune serve` (its base URL, with or without /v1): search there instead of here."""
    api_key: str = ""
    """The server's API key, if it has one."""

    _retriever: Any = PrivateAttr(default=None)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [to_document(s) for s in self.search(query)]

    def search(self, query: str) -> list[dict[str, Any]]:
        """The sources for `query` in ragtune's shape."""
        from ragtune.errors import UsageError

        if self.k < 1:
            raise UsageError(f"RagtuneRetriever: k must be at least 1, got {self.k}")
        if self.server:
            return self._search_server(query)
        from ragtune.serve.answer import to_source

        hits = self._local().search(query, self.k, self.mode, self.filters)
        return [to_source(h, i) for i, h in enumerate(hits, 1)]

    def _search_server(self, query: str) -> list[dict[str, Any]]:
        from ragtune.client import post_json, server_url

        url = server_url(self.server).removesuffix("/v1")
        body: dict[str, Any] = {"query": query, "top_k": self.k}
        if self.index:
            body["index"] = self.index
        if self.mode:
            body["mode"] = self.mode
        if self.filters:
            body["filters"] = self.filters
        return post_json(url, "/v1/search", body, self.api_key)["sources"]

    def _local(self) -> Any:
        if self._retriever is None:
            from ragtune.config import load_config
            from ragtune.modeling import set_offline_env
            from ragtune.serve.answer import open_retriever

            set_offline_env()
            cfg = load_config(self.config or None, list(self.overrides))
            self._retriever = open_retriever(cfg, self.index or cfg.index.name, read_copy=True)
        return self._retriever

    def close(self) -> None:
        """Release the index (the retriever opens it again on the next query)."""
        if self._retriever is not None:
            self._retriever.close()
            self._retriever = None
