"""Serve fixtures: a LoRA adapter overfit on tiny_llama to a few QA pairs, a fake retriever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

QA = [
    ("How many days can I work remotely?", "Three days per week."),
    ("When are expense reports due?", "Within thirty days."),
]


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Any:
    from tests.tinymodels import torch_threads

    with torch_threads(1):
        yield


def train_adapter(base: Path, out: Path, qa: list[tuple[str, str]] = QA, steps: int = 120, seed: int = 0) -> Path:
    """Overfit a LoRA on `qa` with a plain torch loop (loss on the answer tokens) and write its run card."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before the package's one-thread fixture
    try:
        return _train(base, out, qa, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(base: Path, out: Path, qa: list[tuple[str, str]], steps: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tinymodels import write_adapter_card

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    rows = []
    for q, a in qa:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out), safe_serialization=True)
    write_adapter_card(out, base, tok.chat_template, config={}, data={},
                       metrics={"final_loss": float(loss.detach())}, exports=[])
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA on tiny_llama that answers QA greedily, with a ragtune.json run card."""
    home = tmp_path_factory.mktemp("adapter-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(home))
        return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "policies")


class FakeRetriever:
    """Same shape as ragtune.retrieval.search.Retriever.search: sources + dense_score + chunk_id."""

    def __init__(self, hits: list[dict[str, Any]] | None = None):
        self.hits = hits if hits is not None else [
            {"source": "policies/remote.md", "title": "Remote work", "page": None, "heading": "Remote > Days",
             "score": 0.033, "dense_score": 0.82, "chunk_id": "c1",
             "text": "Employees may work remotely up to three days per week with manager approval."},
            {"source": "policies/expenses.pdf", "title": "Expenses", "page": 2, "heading": "Deadlines",
             "score": 0.016, "dense_score": 0.41, "chunk_id": "c2",
             "text": "Expense reports must be submitted within thirty days of purchase."},
        ]
        self.queries: list[str] = []

    def search(self, query: str, top_k: int | None = None, mode: str | None = None, filters: Any = None) -> list[dict[str, Any]]:
        self.queries.append(query)
        return [dict(h) for h in self.hits[: top_k or len(self.hits)]]

    def close(self) -> None:
        pass


@pytest.fixture
def fake_retriever() -> FakeRetriever:
    return FakeRetriever()


QA_OTHER = [
    ("How many days can I work remotely?", "Two days only."),
    ("When are expense reports due?", "Before Friday."),
]


@pytest.fixture(scope="session")
def other_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second adapter over the same base with different answers (adapter switching)."""
    home = tmp_path_factory.mktemp("adapter-home2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(home))
        return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "other", qa=QA_OTHER, seed=1)


@pytest.fixture(scope="session")
def tiny_cfg_factory(tiny_llama: Path) -> Any:
    from ragtune.config import load_config

    def make(*overrides: str) -> Any:
        return load_config(None, [f"model.path={tiny_llama}", *overrides])

    return make


@pytest.fixture(scope="session")
def loaded_gen(tiny_cfg_factory: Any, tiny_adapter: Path, other_adapter: Path) -> Any:
    """One Generator over tiny_llama with both adapters, shared by tests that only read it."""
    from ragtune.serve.generator import Generator

    return Generator(tiny_cfg_factory()).load(adapters={"policies": str(tiny_adapter), "other": str(other_adapter)})
