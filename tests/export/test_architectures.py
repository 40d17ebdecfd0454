"""Export of models other than the default llama: what llama.cpp's converter needs from each family."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.cli import main
from tests.export.conftest import NEEDS_LLAMA_CPP, make_adapter
from tests.tinymodels import GEMMA2_TEMPLATE


@NEEDS_LLAMA_CPP
def test_sentencepiece_model_adapter_merges_and_exports(tmp_path: Path, llama_home: Path) -> None:
    """A Gemma 2 adapter (a vocabulary llama.cpp reads from tokenizer.model only) merges with the base's
    tokenizer.model and converts; before, the merged folder had tokenizer.json only and the converter failed
    with 'File not found: .../merged/tokenizer.model'."""
    from tests.tinymodels import build_tiny_sentencepiece

    base = build_tiny_sentencepiece("gemma2", tmp_path / "gemma2", GEMMA2_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"),
                                    query_pre_attn_scalar=16)
    adapter = make_adapter(base, tmp_path / "adapter")
    assert main(["-q", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    # the check would compare prompt ids: this tiny vocabulary's merges tie where llama.cpp and transformers
    # break ties differently, which real Gemma vocabularies do not
    out = tmp_path / "gemma2.gguf"
    assert main(["-q", "export", "gguf", str(adapter), "--out", str(out), "--no-check", "--threads", "1"]) == 0
    from ragtune.export.header import gguf_metadata

    meta = gguf_metadata(out, ["general.architecture", "tokenizer.ggml.model"])
    assert meta == {"general.architecture": "gemma2", "tokenizer.ggml.model": "llama"}


@NEEDS_LLAMA_CPP
def test_architecture_the_converter_lacks_is_refused_before_the_merge(tiny_llama: Path, tmp_path: Path,
                                                                      llama_home: Path, capsys) -> None:
    """An OPT adapter is refused at once, naming OPTForCausalLM and what to use instead; before, it was merged
    first and then failed in the converter with its log and an exit code of 1."""
    from tests.tinymodels import build_tiny_causal_lm

    base = build_tiny_causal_lm("opt", tmp_path / "opt", tiny_llama)
    adapter = make_adapter(base, tmp_path / "adapter")
    for source in (adapter, base):
        assert main(["export", "gguf", str(source), "--out", str(tmp_path / "opt.gguf"), "--no-check"]) == 2
        err = capsys.readouterr().err
        assert "has the architecture OPTForCausalLM" in err and "cannot convert to GGUF" in err, err
        assert "LlamaForCausalLM" in err and "generation.engine=transformers" in err
        assert "hf-to-gguf" not in err  # the converter never ran
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".ragtune-export-*"))
