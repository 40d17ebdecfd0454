"""LangChain's RetrievalQA (langchain-classic) over ragtune: RagtuneRetriever on a real index, ChatOpenAI
(langchain-openai) pointed at a real `ragtune serve` started here. Needs the test extra: no skip."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.config import load_config
from tests.conftest import start_server
from tests.retrieval.conftest import make_pdf

KEY = "k-lc"
HANDBOOK = """# HR Handbook

## Remote work

Employees may work remotely up to three days per week with manager approval.
"""
EXPENSES = ["Travel policy. Book trains for trips under four hours.",
            "Expense reports must be submitted within thirty days of purchase, with receipts."]


@pytest.fixture(scope="module")
def _server(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, tiny_llama: Path) -> Any:
    """An index `policies` (a Markdown file and a two-page PDF) and a ragtune server over it, made once."""
    from ragtune.serve.server import create_app

    root = tmp_path_factory.mktemp("langchain")
    docs = root / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text(HANDBOOK, encoding="utf-8")
    make_pdf(docs / "expenses.pdf", EXPENSES)
    emb = [f"embedder.path={minilm_dir}", "embedder.device=cpu", "index.name=policies"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(root / "home"))
        assert main(["-q", "index", "add", str(docs), "--no-progress", *emb]) == 0
        cfg = load_config(None, [f"model.path={tiny_llama}", f"serve.api_key={KEY}", "generation.max_new_tokens=8",
                                 *emb])
        app = create_app(cfg)
    server, t, port = start_server(app, wait=60)
    yield {"url": f"http://127.0.0.1:{port}", "emb": emb, "home": root / "home"}
    server.should_exit = True
    t.join(30)


@pytest.fixture
def served(_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The module's server, with RAGTUNE_HOME at its index for retrievers opened in this process."""
    monkeypatch.setenv("RAGTUNE_HOME", str(_server["home"]))
    return _server


class Prompts:
    """Records what the chain sent to the chat model and what came back (a LangChain callback)."""

    def __new__(cls) -> Any:
        from langchain_core.callbacks import BaseCallbackHandler

        class Handler(BaseCallbackHandler):
            def __init__(self) -> None:
                self.sent: list[str] = []
                self.models: list[str] = []

            def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
                self.sent += [m.content for batch in messages for m in batch]

            def on_llm_end(self, response: Any, **kw: Any) -> None:
                self.models += [g.message.response_metadata.get("model_name") for gs in response.generations for g in gs]

        return Handler()


def test_retrieval_qa_returns_source_documents_with_source_and_page(served: dict[str, Any]) -> None:
    from langchain_classic.chains import RetrievalQA
    from langchain_openai import ChatOpenAI

    from ragtune.integrations.langchain import RagtuneRetriever

    llm = ChatOpenAI(model="base", base_url=served["url"] + "/v1", api_key=KEY, temperature=0, max_retries=0)
    retriever = RagtuneRetriever(index="policies", k=2, overrides=tuple(served["emb"]))
    qa = RetrievalQA.from_chain_type(llm=llm, retriever=retriever, return_source_documents=True)
    seen = Prompts()
    try:
        result = qa.invoke({"query": "When must expense reports be submitted?"}, config={"callbacks": [seen]})
    finally:
        retriever.close()
    docs = result["source_documents"]
    assert len(docs) == 2
    top = docs[0]
    assert top.metadata["source"] == "expenses.pdf" and top.metadata["page"] == 2
    assert "thirty days" in top.page_content and top.metadata["n"] == 1
    assert set(top.metadata) == {"source", "title", "page", "heading", "score", "n"} and top.metadata["score"] > 0.3
    # the chain stuffed the retrieved chunks into the prompt it sent to the ragtune server, which answered
    assert any("thirty days of purchase" in m for m in seen.sent) and seen.models == ["base"]
    assert isinstance(result["result"], str) and result["query"] == "When must expense reports be submitted?"


def test_the_retriever_can_search_through_the_server(served: dict[str, Any]) -> None:
    from ragtune.errors import RagtuneError
    from ragtune.integrations.langchain import RagtuneRetriever

    local = RagtuneRetriever(index="policies", k=2, overrides=tuple(served["emb"]))
    try:
        here = local.invoke("How many days can I work remotely?")
    finally:
        local.close()
    remote = RagtuneRetriever(server=served["url"] + "/v1", api_key=KEY, index="policies", k=2)
    there = remote.invoke("How many days can I work remotely?")
    assert [d.metadata["source"] for d in there] == [d.metadata["source"] for d in here]
    assert there[0].metadata["source"] == "handbook.md" and there[0].metadata["page"] is None
    assert there[0].metadata["heading"] == "HR Handbook > Remote work"
    with pytest.raises(RagtuneError, match="401"):
        RagtuneRetriever(server=served["url"], index="policies").invoke("remote work")


def test_the_documented_retriever_without_ragtune_works(served: dict[str, Any]) -> None:
    """docs/serving.md's LangChain snippet that needs no ragtune install, run as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    snippet = re.search(r"<!-- langchain-without-ragtune -->\n```python\n(.*?)```", text, re.S)
    assert snippet, "docs/serving.md lost its LangChain snippet"
    code = snippet.group(1).replace("http://127.0.0.1:8000", served["url"]).replace('"YOUR-KEY"', repr(KEY))
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/serving.md", "exec"), scope)  # noqa: S102  (our own documentation)
    from langchain_classic.chains import RetrievalQA
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="base", base_url=served["url"] + "/v1", api_key=KEY, temperature=0, max_retries=0)
    qa = RetrievalQA.from_chain_type(llm=llm, retriever=scope["retriever"], return_source_documents=True)
    docs = qa.invoke({"query": "When must expense reports be submitted?"})["source_documents"]
    assert docs[0].metadata["source"] == "expenses.pdf" and docs[0].metadata["page"] == 2


def test_missing_langchain_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "langchain_core.retrievers", None)  # as if langchain-core were absent
    monkeypatch.delitem(sys.modules, "ragtune.integrations.langchain", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ragtune\[langchain\]'"):
        import ragtune.integrations.langchain  # noqa: F401
