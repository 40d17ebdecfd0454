"""CUDA-only training paths (bf16 by default, 4-bit QLoRA); skipped where torch sees no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUICK = ["train.max_steps=2", "train.batch_size=4", "train.save_steps=100000"]


def test_cuda_defaults_to_bf16(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda"
    assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                 f"train.output_dir={out}", *QUICK]) == 0
    t = json.loads((out / "ragtune.json").read_text())["training"]
    assert t["device"] == "cuda"
    assert t["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert t["gradient_checkpointing"] is False


def test_qlora_trains_on_cuda(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                 f"train.output_dir={out}", "train.qlora=true", *QUICK]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "ragtune.json").read_text())["training"]["dtype"].startswith("nf4 4-bit, ")


def test_liger_kernels_train_on_cuda(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("liger_kernel")
    out = tmp_path / "liger"
    assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                 f"train.output_dir={out}", "train.kernels=liger", *QUICK]) == 0
    t = json.loads((out / "ragtune.json").read_text())["training"]
    assert t["kernels"].startswith("liger: ")


def test_static_cache_answers_like_the_dynamic_cache(trainable_llama: Path, capsys: pytest.CaptureFixture) -> None:
    """generation.cache=static on CUDA answers greedy requests through the compiled static-cache decoder
    (serve/static_decode.py): the same answer as the dynamic cache."""
    answers = []
    for cache in ("dynamic", "static"):
        assert main(["ask", "What is code 3?", "--no-rag", f"model.path={trainable_llama}", "--json",
                     f"generation.cache={cache}", "generation.max_new_tokens=24", "generation.engine=transformers",
                     "generation.repetition_penalty=1.1"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1]
