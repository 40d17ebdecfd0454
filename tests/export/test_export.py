"""`ragtune export gguf`: llama.cpp answers like transformers, the template travels, files are recorded."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from ragtune.errors import RagtuneError, UsageError
from ragtune.export.build import export_gguf
from ragtune.export.header import gguf_metadata
from ragtune.export.ollama import modelfile_text, parse_modelfile, render_ollama_template
from ragtune.export.parity import CHECK_PROMPTS, describe_check
from ragtune.export.pin import LLAMA_CPP_PYTHON_VERSION, SDIST_NAME, SDIST_SHA256, converter_dir
from ragtune.export.quantize import quantize
from ragtune.export.source import adapter_hash
from tests.export.conftest import NEEDS_LLAMA_CPP

MARGIN = 0.05  # logits; the tiny model's f16 rounding error is far below this


@NEEDS_LLAMA_CPP
def test_f16_export_answers_like_transformers(tiny_f16: dict[str, Any]) -> None:
    check = tiny_f16["result"].check
    assert check is not None and check["ok"], describe_check(check)
    assert check["prompt_ids_equal"]
    assert check["diverged"] == 0
    # most prompts must be compared in full; a near-tie is allowed but reported with its gap
    assert check["equal"] >= len(check["prompts"]) - 1, describe_check(check)
    for row in check["prompts"]:
        assert row["transformers_ids"], row
        if row["verdict"] == "near-tie":
            assert row["gap_at_divergence"] < MARGIN


@NEEDS_LLAMA_CPP
def test_greedy_ids_equal_while_margins_are_clear(tiny_smol: Path, tiny_f16: dict[str, Any]) -> None:
    """Independently of the export's own check: llama.cpp's greedy ids equal transformers'; the only
    divergence allowed is at a step whose top-2 logit margin is below MARGIN (a near-tie)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.serve.llamacpp import LlamaCppEngine

    tok = AutoTokenizer.from_pretrained(str(tiny_smol))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_smol), dtype=torch.float32).eval()
    eng = LlamaCppEngine(tiny_f16["path"], n_threads=1).load()
    compared = 0
    for q in ("Tell me a joke.", "What is 7 times 6?", "Name a fruit.", "Where is Paris?"):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert eng.tokenize(prompt) == ids
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf = out.sequences[0, len(ids):].tolist()
        margins = [float(lg[0].topk(2).values[0] - lg[0].topk(2).values[1]) for lg in out.logits]
        got = eng.generate(prompt_text=prompt, max_new_tokens=16, temperature=0.0, stop_ids=[tok.eos_token_id])
        assert got["prompt_tokens"] == len(ids)
        same = next((i for i, (a, b) in enumerate(zip(got["ids"], hf)) if a != b), None)
        if same is None:
            assert got["ids"] == hf, (q, got["ids"], hf)
            compared += len(hf)
        else:  # only a near-tie may flip; the two sequences are not comparable after it
            assert margins[same] < MARGIN, (q, same, margins[same], got["ids"], hf)
            compared += same
    eng.close()
    assert compared >= 40, f"only {compared} tokens compared before a near-tie"


@NEEDS_LLAMA_CPP
def test_chat_template_and_card_travel_with_the_file(tiny_smol: Path, tiny_f16: dict[str, Any]) -> None:
    import gguf

    from ragtune.modeling import chat_template_of, file_sha256, model_hash

    path = tiny_f16["path"]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.chat_template"].contents() == chat_template_of(tiny_smol)
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16
    # ragtune's fast header reader agrees with the gguf package on every scalar and string
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert gguf_metadata(path) == fields
    card = json.loads(path.with_name(path.name + ".json").read_text())
    assert card["sha256"] == file_sha256(path)
    assert card["type"] == "f16" and card["kind"] == "gguf"
    assert card["source"] == {"kind": "model", "path": str(tiny_smol), "hash": model_hash(tiny_smol)}
    assert card["converter"]["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION
    assert card["converter"]["sdist_sha256"] == SDIST_SHA256
    assert card["check"]["ok"] is True


@NEEDS_LLAMA_CPP
def test_modelfile_matches_the_chat_template(tiny_smol: Path, tiny_f16: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    path = tiny_f16["path"]
    mf = path.parent / "Modelfile"
    parsed = parse_modelfile(mf.read_text())
    assert (mf.parent / parsed["FROM"]).resolve() == path.resolve()
    assert "ADAPTER" not in parsed
    assert ("stop", "<|im_end|>") in parsed["PARAMETER"]
    tok = AutoTokenizer.from_pretrained(str(tiny_smol))
    for conv in ([{"role": "user", "content": "Where is the office?"}],
                 [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Bonjour\nami"}, {"role": "user", "content": "Merci"}]):
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert render_ollama_template(parsed["TEMPLATE"], conv, parsed.get("SYSTEM")) == want


@NEEDS_LLAMA_CPP
def test_lora_export_changes_output_as_the_merged_model_does(tiny_smol: Path, tiny_adapter: Path,
                                                             tiny_f16: dict[str, Any], llama_home: Path,
                                                             tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.serve.llamacpp import LlamaCppEngine

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    out = tmp_path / "out" / "tiny-lora.gguf"
    res = export_gguf(adapter, out, lora=True, base_gguf=tiny_f16["path"], margin=MARGIN, threads=1)
    assert res.check is not None and res.check["ok"], describe_check(res.check)
    assert res.entry["kind"] == "gguf-lora"
    meta = gguf_metadata(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    parsed = parse_modelfile((out.parent / "Modelfile").read_text())
    assert (out.parent / parsed["FROM"]).resolve() == tiny_f16["path"].resolve()
    assert (out.parent / parsed["ADAPTER"]).resolve() == out.resolve()

    tok = AutoTokenizer.from_pretrained(str(tiny_smol))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_smol), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    eng = LlamaCppEngine(tiny_f16["path"], lora={"ft": out}, n_threads=1).load()
    changed = compared = 0
    for q in CHECK_PROMPTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            g = merged.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        want = g.sequences[0, len(ids):].tolist()
        margins = [float(lg[0].topk(2).values[0] - lg[0].topk(2).values[1]) for lg in g.logits]
        with_lora = eng.generate(prompt_ids=ids, max_new_tokens=12, adapter="ft", stop_ids=[tok.eos_token_id])["ids"]
        without = eng.generate(prompt_ids=ids, max_new_tokens=12, adapter=None, stop_ids=[tok.eos_token_id])["ids"]
        changed += with_lora != without
        first = next((i for i, (a, b) in enumerate(zip(with_lora, want)) if a != b), None)
        if first is None:
            assert with_lora == want, q
            compared += len(want)
        else:  # only a near-tie may flip
            assert margins[first] < MARGIN, (q, first, margins[first], with_lora, want)
            compared += first
    eng.close()
    assert changed >= 1, "the adapter did not change any answer"
    assert compared >= 24, f"only {compared} tokens compared before a near-tie"
    card = json.loads((adapter / "ragtune.json").read_text())
    assert card["exports"][-1]["sha256"] == res.sha256 and card["exports"][-1]["kind"] == "gguf-lora"


@NEEDS_LLAMA_CPP
def test_adapter_source_is_merged_on_the_fly_and_recorded(tiny_adapter: Path, llama_home: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    out = tmp_path / "merged-q8.gguf"
    rc = main(["export", "gguf", str(adapter), "--out", str(out), "--type", "q8_0", "--margin", str(MARGIN),
               "--threads", "1", "--json"])
    assert rc == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    card = json.loads((adapter / "ragtune.json").read_text())
    entries = card["exports"]
    assert [e["kind"] for e in entries] == ["gguf"], entries  # the temporary merge is not left in the card
    e = entries[0]
    assert e["path"] == str(out) and e["type"] == "q8_0" and e["sha256"] == printed["sha256"]
    assert e["source"]["kind"] == "adapter" and e["source"]["hash"] == adapter_hash(adapter, card)
    assert e["check"]["ok"] is True and "f16 intermediate" in e["check"]["checked_file"]
    assert gguf_metadata(out, ["general.file_type"])["general.file_type"] == 7  # MOSTLY_Q8_0
    from ragtune.serve.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(out, n_threads=1).load()
    assert eng.generate(prompt_text="<|im_start|>user\nHi<|im_end|>\n", max_new_tokens=3)["completion_tokens"] >= 1
    eng.close()


@NEEDS_LLAMA_CPP
def test_q4_k_m_quantizes_to_a_loadable_file(tiny_f16: dict[str, Any], tmp_path: Path) -> None:
    from ragtune.serve.llamacpp import LlamaCppEngine

    out = quantize(tiny_f16["path"], tmp_path / "tiny-q4.gguf", "q4_k_m", threads=1)
    assert gguf_metadata(out, ["general.file_type"])["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert out.stat().st_size < tiny_f16["path"].stat().st_size
    eng = LlamaCppEngine(out, n_threads=1).load()
    assert len(eng.generate(prompt_text="<|im_start|>user\nHi<|im_end|>\n", max_new_tokens=4)["ids"]) >= 1
    eng.close()


@NEEDS_LLAMA_CPP
def test_bf16_keeps_the_size_and_loads(tiny_f16: dict[str, Any], tmp_path: Path) -> None:
    from ragtune.serve.llamacpp import LlamaCppEngine

    out = quantize(tiny_f16["path"], tmp_path / "tiny-bf16.gguf", "bf16", threads=1)
    assert gguf_metadata(out, ["general.file_type"])["general.file_type"] == 32  # MOSTLY_BF16
    assert abs(out.stat().st_size - tiny_f16["path"].stat().st_size) < 0.05 * tiny_f16["path"].stat().st_size
    eng = LlamaCppEngine(out, n_threads=1).load()
    assert len(eng.generate(prompt_text="<|im_start|>user\nHi<|im_end|>\n", max_new_tokens=4)["ids"]) >= 1
    eng.close()


# --- errors ---------------------------------------------------------------------------------------


def test_missing_sdist_says_how_to_fix(ragtune_home: Path) -> None:
    with pytest.raises(UsageError) as exc:
        converter_dir()
    msg = str(exc.value)
    assert SDIST_NAME in msg and "ragtune export setup" in msg and str(ragtune_home) in msg


def test_wrong_sdist_is_refused(ragtune_home: Path) -> None:
    p = ragtune_home / "llama.cpp" / SDIST_NAME
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not the pinned sdist")
    with pytest.raises(UsageError, match="sha256"):
        converter_dir()


def test_bad_type_is_a_usage_error(tiny_smol: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "x.gguf"), "--type", "q5_x"]) == 2
    assert "invalid choice: 'q5_x'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="is not one of f16, bf16, q8_0, q4_k_m"):
        export_gguf(tiny_smol, tmp_path / "x.gguf", "q5_x")
    out = ["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "x.gguf")]
    for extra, said in [(["--margin", "-1"], "--margin -1.0: give a number of 0 or more"),
                        (["--margin", "nan"], "--margin nan"), (["--threads", "-3"], "--threads -3"),
                        (["--base-gguf", "/nope.gguf"], "it goes with --lora"),
                        (["--no-check", "--margin", "2"], "--margin sets the check that --no-check skips")]:
        assert main([*out, *extra]) == 2, extra
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_non_model_source_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    assert main(["export", "gguf", str(tmp_path / "notes"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and "adapter folder" in err
    assert main(["export", "gguf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_without_chat_template_is_a_usage_error(tiny_smol: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # was a raw ValueError traceback from transformers' apply_chat_template in the parity check
    bare = shutil.copytree(tiny_smol, tmp_path / "base-model")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["export", "gguf", str(bare), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"'{bare}' has no chat template" in err and "copy the chat_template.jinja" in err
    assert "Traceback" not in err and not (tmp_path / "x.gguf").exists()


def test_missing_llama_cpp_names_the_install_line(tiny_smol: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(RagtuneError, match=r"pip install 'ragtune\[llamacpp\]'"):
        export_gguf(tiny_smol, tmp_path / "x.gguf")


def test_lora_needs_an_adapter(tiny_smol: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--lora needs an adapter folder"):
        export_gguf(tiny_smol, tmp_path / "x.gguf", lora=True)


def test_setup_sh_pins_the_same_sdist() -> None:
    root = Path(__file__).resolve().parents[2]
    sh = (root / "scripts" / "setup.sh").read_text()
    assert f"LLAMA_CPP_PYTHON_VERSION={LLAMA_CPP_PYTHON_VERSION}" in sh
    assert f"LLAMA_CPP_SDIST_SHA256={SDIST_SHA256}" in sh
    assert f'llamacpp = ["llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]' in (root / "pyproject.toml").read_text()


def test_modelfile_template_is_derived_and_checked(tiny_smol: Path) -> None:
    """Without llama.cpp: the Ollama TEMPLATE renders every probe exactly like the Jinja template,
    SmolLM2's default system prompt becomes SYSTEM, and a template that is not role-wrapped gets none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_smol))

    def render(msgs: list[dict[str, str]], gen: bool, tpl: str | None = None) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=tpl)

    text, verified = modelfile_text("./m.gguf", render, tok.all_special_tokens, [tok.eos_token], "./a.gguf")
    parsed = parse_modelfile(text)
    assert verified and parsed["FROM"] == "./m.gguf" and parsed["ADAPTER"] == "./a.gguf"
    assert parsed["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    assert {v for k, v in parsed["PARAMETER"] if k == "stop"} == {"<|im_end|>", "<|im_start|>"}
    conv = [{"role": "user", "content": "a {{ b }} c"}, {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"}]
    assert render_ollama_template(parsed["TEMPLATE"], conv, parsed["SYSTEM"]) == render(conv, True)

    odd = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }};{% endfor %}"
    text, verified = modelfile_text("./m.gguf", lambda m, g: render(m, g, odd), [], ["<|im_end|>"])
    assert not verified and "TEMPLATE" not in parse_modelfile(text)
    assert "No TEMPLATE" in text


def test_modelfile_path_keeps_existing_modelfiles_unless_forced(tmp_path: Path) -> None:
    """A Modelfile there already (hand-written, or another export's) is never replaced without --force;
    with --force only the one that names this GGUF is; an explicit --modelfile follows --force."""
    from ragtune.export.ollama import modelfile_path

    out = tmp_path / "x.gguf"
    default, own = tmp_path / "Modelfile", tmp_path / "x.Modelfile"
    assert modelfile_path(out, None) == default
    default.write_text("FROM ./x.gguf\nPARAMETER temperature 0.2\n")  # the user's own, naming this very file
    assert modelfile_path(out, None) == own
    assert modelfile_path(out, None, force=True) == default
    default.write_text("FROM ./y.gguf\n")  # another export's
    assert modelfile_path(out, None, force=True) == own
    own.write_text("FROM ./x.gguf\n")
    with pytest.raises(UsageError, match=r"'.*Modelfile' and '.*x\.Modelfile' already exist and are kept; pass --force"):
        modelfile_path(out, None)
    assert modelfile_path(out, None, force=True) == own
    mine = tmp_path / "ollama" / "mine.Modelfile"
    mine.parent.mkdir()
    assert modelfile_path(out, mine) == mine
    mine.write_text("FROM ./x.gguf\n")
    with pytest.raises(UsageError, match="--modelfile '.*mine.Modelfile' already exists; pass --force"):
        modelfile_path(out, mine)
    assert modelfile_path(out, mine, force=True) == mine
    with pytest.raises(UsageError, match="is a folder"):
        modelfile_path(out, mine.parent, force=True)


def test_existing_modelfile_is_refused_before_the_export(tiny_smol: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "Modelfile.custom"
    mine.write_text("FROM ./x.gguf\n")
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", str(tiny_smol), "--out", str(out), "--modelfile", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--modelfile '{mine}' already exists; pass --force" in err and "Traceback" not in err
    assert mine.read_text() == "FROM ./x.gguf\n" and not out.exists()
    (tmp_path / "Modelfile").write_text("FROM ./y.gguf\n")
    (tmp_path / "x.Modelfile").write_text("FROM ./x.gguf\n")
    assert main(["export", "gguf", str(tiny_smol), "--out", str(out)]) == 2
    assert "already exist and are kept" in capsys.readouterr().err and not out.exists()


@NEEDS_LLAMA_CPP
def test_exports_into_one_folder_keep_a_hand_written_modelfile(tiny_smol: Path, llama_home: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    hand = tmp_path / "Modelfile"
    hand.write_text("FROM ./x.gguf\nPARAMETER temperature 0.1\n")
    common = ["--no-check", "--threads", "1"]
    assert main(["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "x.gguf"), *common]) == 0
    out = capsys.readouterr().out
    assert f"-f {tmp_path / 'x.Modelfile'}" in out and f"kept the existing {hand}" in out
    assert main(["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "y.gguf"), *common]) == 0
    assert hand.read_text() == "FROM ./x.gguf\nPARAMETER temperature 0.1\n"
    assert parse_modelfile((tmp_path / "x.Modelfile").read_text())["FROM"] == "./x.gguf"
    assert parse_modelfile((tmp_path / "y.Modelfile").read_text())["FROM"] == "./y.gguf"
    # --force replaces the GGUF and the Modelfiles that name it; y's is left alone
    y_before = (tmp_path / "y.Modelfile").read_text()
    assert main(["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "x.gguf"), "--force", *common]) == 0
    assert parse_modelfile(hand.read_text())["FROM"] == "./x.gguf" and "temperature" not in hand.read_text()
    assert (tmp_path / "y.Modelfile").read_text() == y_before


@NEEDS_LLAMA_CPP
def test_export_cache_makes_the_files_the_engine_then_loads_without_converting(
        tiny_adapter: Path, llama_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.export import build
    from ragtune.export.source import classify_source
    from ragtune.serve.llamacpp import ensure_gguf

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    assert main(["export", "cache", str(adapter), "--json"]) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    lora = Path(printed[0]["gguf"])
    assert printed[0]["source"] == str(adapter) and lora.is_file() and lora.name == "lora-f16.gguf"
    assert lora.is_relative_to(llama_home / "gguf")

    def no_export(*a: Any, **k: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr(build, "export_gguf", no_export)  # what the engine loads is there already
    base = classify_source(adapter).base_dir
    assert ensure_gguf(base, adapter_dir=adapter) == lora
    assert ensure_gguf(base).is_file()  # the base's f16 file, which the LoRA file sits on
    assert main(["export", "cache", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def _gguf_header(kv: dict[str, str]) -> bytes:
    """A GGUF v3 header with string metadata and no tensors (what gguf_metadata reads)."""
    import struct

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    body = b"".join(s(k) + struct.pack("<I", 8) + s(v) for k, v in kv.items())
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + body


def test_a_damaged_gguf_header_is_an_error_that_names_the_file(tmp_path: Path) -> None:
    # were ValueError (cannot mmap an empty file) and struct.error tracebacks
    whole = _gguf_header({"general.architecture": "llama", "tokenizer.chat_template": "{{ x }}"})
    f = tmp_path / "m.gguf"
    f.write_bytes(whole)
    assert gguf_metadata(f) == {"general.architecture": "llama", "tokenizer.chat_template": "{{ x }}"}
    for data, said in [(b"", r"is not a GGUF file \(it is empty or shorter than a GGUF header\)"),
                       (whole[:-5], "is truncated or damaged: its GGUF header does not read"),
                       (b"PK\x03\x04" + whole[4:], r"is not a GGUF file \(bad magic\)")]:
        f.write_bytes(data)
        with pytest.raises(RagtuneError, match=said):
            gguf_metadata(f)


def test_base_gguf_is_checked_before_the_conversion(tiny_adapter: Path, ragtune_home: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # an empty or cut-short --base-gguf was a traceback after the adapter's conversion; a missing one was said
    # only after it. ragtune_home holds no converter: each is refused before the converter is looked for.
    good = _gguf_header({"general.architecture": "llama", "tokenizer.chat_template": "{{ x }}"})
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "cut.gguf").write_bytes(good[:-5])
    out = tmp_path / "lora.gguf"
    for base, said in [("empty.gguf", "is not a GGUF file"), ("cut.gguf", "is truncated or damaged"),
                       ("missing.gguf", "does not exist")]:
        rc = main(["export", "gguf", str(tiny_adapter), "--out", str(out), "--lora", "--base-gguf",
                   str(tmp_path / base)])
        err = capsys.readouterr().err
        assert rc == 2 and f"--base-gguf '{tmp_path / base}'" in err and said in err, err
        assert "leave --base-gguf out" in err and "Traceback" not in err and "converter" not in err
    assert not out.exists()


def test_out_under_a_file_or_a_folder_is_refused_before_the_export(tiny_smol: Path, ragtune_home: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # --out notes.txt/x.gguf was "File exists: '.../notes.txt'" (exit 1); --out DIR --force failed after converting
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "models.gguf").mkdir()
    for out, said in [(tmp_path / "notes.txt" / "x.gguf", f"'{tmp_path / 'notes.txt'}' is a file, so no folder"),
                      (tmp_path / "notes.txt" / "sub" / "x.gguf", "is a file, so no folder can be made under it"),
                      (tmp_path / "models.gguf", "is a folder; name the file to write")]:
        assert main(["export", "gguf", str(tiny_smol), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert said in err and "converter" not in err, err
    # the same for --modelfile (was "File exists" with exit 1 after the conversion)
    assert main(["export", "gguf", str(tiny_smol), "--out", str(tmp_path / "x.gguf"), "--modelfile",
                 str(tmp_path / "notes.txt" / "Modelfile")]) == 2
    err = capsys.readouterr().err
    assert f"--modelfile '{tmp_path / 'notes.txt' / 'Modelfile'}': '{tmp_path / 'notes.txt'}' is a file" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not any((tmp_path / "models.gguf").iterdir())


@NEEDS_LLAMA_CPP
def test_lora_export_never_names_another_models_f16_file_as_its_base(tiny_smol: Path, smol_tokenizer_dir: Path,
                                                                    tiny_f16: dict[str, Any], llama_home: Path,
                                                                    tmp_path: Path) -> None:
    # the base GGUF linked beside OUT is named after the base's folder; one already there was taken as the base
    # unchecked, so an adapter of another model in a folder of the same name got a Modelfile over the wrong base
    from tests.export.conftest import make_adapter
    from tests.tinymodels import build_tiny_smol

    other = build_tiny_smol(tmp_path / "elsewhere" / tiny_smol.name, smol_tokenizer_dir, seed=7)
    adapter = make_adapter(other, tmp_path / "adapter")
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    theirs = out.with_name(f"{tiny_smol.name}-f16.gguf")
    shutil.copyfile(tiny_f16["path"], theirs)  # tiny_smol's f16 export, left by an earlier export into this folder
    with pytest.raises(UsageError, match=f"'{theirs}' is already there but is not the f16 export of '{other}'"):
        export_gguf(adapter, out, lora=True, check=False, threads=1)
    assert not out.exists() and not (out.parent / "Modelfile").exists()
    theirs.unlink()  # the right one, made and linked by the export itself, is reused on the next export
    res = export_gguf(adapter, out, lora=True, check=False, threads=1)
    assert res.entry["base_gguf"] == str(theirs)
    assert export_gguf(adapter, out, lora=True, check=False, threads=1, force=True).entry["base_gguf"] == str(theirs)


def test_a_lora_out_that_is_its_base_gguf_is_refused(tiny_adapter: Path, tiny_smol: Path, ragtune_home: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --out named like the base's f16 file (or the --base-gguf itself): the LoRA replaced the base it was
    # linked over, and the Modelfile's FROM and ADAPTER both named the LoRA file
    for out, extra, said in [(tmp_path / f"{tiny_smol.name}-f16.gguf", [], "its base's f16 export is linked there"),
                             (tmp_path / "base.gguf", ["--base-gguf", str(tmp_path / "base.gguf")], "(--base-gguf)")]:
        assert main(["export", "gguf", str(tiny_adapter), "--lora", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out '{out}' is the base GGUF the LoRA file is used over" in err and said in err, err
        assert f"--out {out.with_name(out.stem + '-lora.gguf')}" in err and "converter" not in err
    assert not any(tmp_path.glob("*.gguf"))


def test_a_converter_folder_missing_a_script_is_unpacked_again(real_sdist: Path, ragtune_home: Path) -> None:
    # a converter folder with its stamp but without convert_hf_to_gguf.py was used as it was: every export then
    # failed in the converter subprocess, blamed on the model's architecture
    (ragtune_home / "llama.cpp").mkdir(parents=True)
    os.symlink(real_sdist, ragtune_home / "llama.cpp" / SDIST_NAME)
    conv = converter_dir()
    (conv / "convert_hf_to_gguf.py").unlink()
    assert converter_dir() == conv and (conv / "convert_hf_to_gguf.py").is_file()


@NEEDS_LLAMA_CPP
def test_a_cached_gguf_cut_short_is_made_again(tiny_smol: Path, llama_home: Path) -> None:
    # a cached file cut short since it was written (a full disk, a copy stopped midway) was reused as it was:
    # every load failed with "export it again", and the cache kept handing back the same file
    from ragtune.export.cache import cached_gguf

    path = cached_gguf(tiny_smol, type="q8_0")
    size = path.stat().st_size
    os.truncate(path, size // 2)
    assert cached_gguf(tiny_smol, type="q8_0") == path and path.stat().st_size == size
    card = path.with_name(path.name + ".json")
    card.write_text("[]")  # a card of another shape is no valid entry either (was an AttributeError)
    assert cached_gguf(tiny_smol, type="q8_0") == path and json.loads(card.read_text())["size_bytes"] == size


@pytest.mark.parametrize("info", ["[]", '{"merged_from": []}', '{"merged_from": {"adapter": 3}}', "not json"])
def test_a_merged_models_damaged_info_file_leaves_the_export_unrecorded(tmp_path: Path, info: str) -> None:
    # a ragtune-model.json holding a JSON list was an AttributeError after the export had been written
    from ragtune.export.build import _record
    from ragtune.export.source import Source

    (tmp_path / "ragtune-model.json").write_text(info)
    _record(Source(kind="model", path=tmp_path, hash="x"), {"path": str(tmp_path / "m.gguf")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ragtune-model.json"]
