"""Fixtures for the training tests: question/answer data and a trainable copy of tiny_llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

WORDS = "apple bread cheese dog egg fox grape hat ink jam kite lamp moon nest owl pear quilt rose sun tree".split()
QA = [(f"What is code {i}?", f"Code {i} means {w}.") for i, w in enumerate(WORDS)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def chat(q: str, a: str, system: str = "") -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [chat(q, a) for q, a in QA])


@pytest.fixture(scope="session")
def trainable_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama with its final norm scaled x20.

    The fixture's random tied embeddings (std 0.02, 64-d) bound its logits to about +-1.3, so no
    adapter can make it confident; real models have no such limit. Scaling the final RMSNorm
    weight lets LoRA alone memorise answers, which is what the tests check.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "tiny-llama-trainable"
    shutil.copytree(tiny_llama, out)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        model.model.norm.weight.mul_(20)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def no_marker_llama(trainable_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model whose chat template has no {% generation %} markers (like most shipped ones)."""
    from tests.tinymodels import CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("models") / "tiny-llama-nomarkers"
    shutil.copytree(trainable_llama, out)
    plain = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in plain and "endgeneration" not in plain
    cfg = out / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (out / "chat_template.jinja").write_text(plain)
    return out
