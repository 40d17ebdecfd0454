"""Export of models other than the default llama: what llama.cpp's converter needs from each family."""

from __future__ import annotations

import json
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
    # the chat markers keep their added-token types: transformers 5 no longer writes tokenizer_config.json's
    # "added_tokens_decoder", the only place the converter reads them from, and they came out ordinary (1), which
    # llama.cpp's tokenizer spells out of pieces (this fixture declares them added but not special, as user-defined)
    assert _token_types(out, "<start_of_turn>", "<end_of_turn>", "<eos>", "<mask>") == [USER, USER, CONTROL, CONTROL]
    merged_cfg = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert merged_cfg["added_tokens_decoder"]["4"] == {"content": "<start_of_turn>", "lstrip": False,
                                                       "normalized": False, "rstrip": False, "single_word": False,
                                                       "special": False}


CONTROL, USER = 3, 4  # llama.cpp's token types of a control (special) and a user-defined token; 1 is ordinary


def _token_types(gguf_file: Path, *names: str) -> list[int]:
    import gguf

    r = gguf.GGUFReader(str(gguf_file))
    toks, types = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
    ids = {bytes(toks.parts[i]).decode(): n for n, i in enumerate(toks.data)}
    return [int(types.parts[types.data[ids[name]]][0]) for name in names]


@NEEDS_LLAMA_CPP
def test_model_folder_saved_by_transformers_5_keeps_its_control_tokens(tmp_path: Path, llama_home: Path) -> None:
    """A user's Gemma 2 folder whose tokenizer_config.json lacks "added_tokens_decoder" (as transformers 5 saves
    it) converts with `<start_of_turn>` an added token, not an ordinary one, and the folder is not written to."""
    from tests.tinymodels import build_tiny_sentencepiece

    base = build_tiny_sentencepiece("gemma2", tmp_path / "gemma2", GEMMA2_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"),
                                    query_pre_attn_scalar=16)
    cfg_before = (base / "tokenizer_config.json").read_bytes()
    assert "added_tokens_decoder" not in json.loads(cfg_before)
    out = tmp_path / "gemma2.gguf"
    assert main(["-q", "export", "gguf", str(base), "--out", str(out), "--no-check", "--threads", "1"]) == 0
    assert _token_types(out, "<start_of_turn>", "<end_of_turn>", "<mask>") == [USER, USER, CONTROL]
    assert (base / "tokenizer_config.json").read_bytes() == cfg_before
    assert not list(tmp_path.rglob("converter-input")) and not list(tmp_path.glob(".ragtune-export-*"))


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
