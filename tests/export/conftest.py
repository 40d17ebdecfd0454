"""Export fixtures: a LoRA adapter with its run card over tiny_smol, and the mark for llama.cpp tests.

tiny_smol (a tiny random Llama with SmolLM2's tokenizer), smol_tokenizer_dir, the pinned converter sdist
(real_sdist, converter_home, llama_home) and the checked f16 export (tiny_f16) are tests/conftest.py's,
shared with tests/serve, tests/eval and tests/test_eval_remote.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# tests of the llama.cpp engine fail, not skip, when the extra the set-up installs is missing
NEEDS_LLAMA_CPP = pytest.mark.usefixtures("llama_cpp_installed")


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Any:
    from tests.tinymodels import torch_threads

    with torch_threads(1):
        yield


def make_adapter(base: Path, out: Path, seed: int = 1, scale: float = 0.3) -> Path:
    """A LoRA (r8, attention + MLP) with random non-zero B, saved with the run card ragtune checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.modeling import chat_template_of
    from tests.tinymodels import write_adapter_card

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(out))
    tpl = chat_template_of(base) or ""
    (out / "chat_template.jinja").write_text(tpl, encoding="utf-8")
    write_adapter_card(out, base, tpl, config={"test": True}, data={}, metrics={}, exports=[])
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_smol, tmp_path_factory.mktemp("adapters") / "tiny-lora")
