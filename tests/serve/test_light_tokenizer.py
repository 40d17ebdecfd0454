"""The chat tokenizer without transformers (serve/light_tokenizer.py) against transformers' own.

SmolLM2's tokenizer files (tests/conftest.py's smol_tokenizer_dir, read out of the bundled GGUF) are the
default chat model's tokenizer; tiny_smol is a random Llama that carries them, exported to GGUF for the
llama.cpp engine. The end-to-end test runs `ragtune ask --engine llama.cpp` in fresh processes: the
first one records the check, the next one must answer with the same token ids as transformers'
tokenizer gives and without importing torch or transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ragtune.serve import light_tokenizer as lt
from tests.export.conftest import NEEDS_LLAMA_CPP

REPO = Path(__file__).resolve().parents[2]
EXTRA = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 안녕하세요"},
     {"role": "user", "content": "ÄÖÜ ß — “quotes” ‘single’ … \u00a0nbsp\r\nCRLF"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "   leading and trailing   "}],
]


def _hf(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def test_default_model_tokenizer_passes_the_check(smol_tokenizer_dir: Path) -> None:
    res = lt.check(_hf(smol_tokenizer_dir), smol_tokenizer_dir)
    assert res["passed"], res.get("reason")


@pytest.mark.parametrize("messages", EXTRA)
def test_rendering_ids_and_text_equal_transformers(smol_tokenizer_dir: Path, messages: list[dict[str, str]]) -> None:
    hf, light = _hf(smol_tokenizer_dir), lt.LightTokenizer(smol_tokenizer_dir)
    for gen in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert light.apply_chat_template(messages, add_generation_prompt=gen) == want
    ids = hf(want, add_special_tokens=False)["input_ids"]
    assert light(want, add_special_tokens=False)["input_ids"] == ids
    assert light.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (light.eos_token_id, light.pad_token_id, light.bos_token_id) == (hf.eos_token_id, hf.pad_token_id,
                                                                            hf.bos_token_id)


def test_training_templates_with_generation_markers_render_as_transformers(smol_tokenizer_dir: Path) -> None:
    """Run cards carry templates with {% generation %} markers (assistant-only loss); they render alike."""
    hf, light = _hf(smol_tokenizer_dir), lt.LightTokenizer(smol_tokenizer_dir)
    tpl = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
           "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
           "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}{{ eos_token | tojson }}")
    msgs = EXTRA[0]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=tpl)
    assert light.apply_chat_template(msgs, add_generation_prompt=True, chat_template=tpl) == want
    bad = "{{ raise_exception('no system turns here') }}"
    with pytest.raises(Exception, match="no system turns here"):
        light.apply_chat_template(msgs, chat_template=bad)


def test_a_different_tokenizer_fails_the_check_with_the_reason(smol_tokenizer_dir: Path, tiny_llama: Path) -> None:
    """The check compares real outputs: another model's transformers tokenizer is caught."""
    res = lt.check(_hf(tiny_llama), smol_tokenizer_dir)
    assert not res["passed"] and res["reason"].startswith("differs in ")


def test_a_failed_or_stale_check_is_not_used(tiny_smol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lt.load_checked(tiny_smol, "abc")[1:] == ("no check of the jinja2 + tokenizers chat tokenizer for this "
                                                     "model yet", True)
    rec = {"format_version": lt.FORMAT_VERSION, "model_hash": "abc", "versions": lt._versions(), "passed": False,
           "reason": "differs in token ids of conversation 2"}
    lt.check_path("abc").parent.mkdir(parents=True)
    lt.check_path("abc").write_text(json.dumps(rec))
    tok, why, again = lt.load_checked(tiny_smol, "abc")
    assert tok is None and "token ids of conversation 2" in why and again is False
    lt.check_path("abc").write_text(json.dumps({**rec, "passed": True, "versions": {"tokenizers": "0.0.1"}}))
    assert lt.load_checked(tiny_smol, "abc")[0] is None and lt.load_checked(tiny_smol, "abc")[2] is True
    lt.check_path("abc").write_text(json.dumps({**rec, "passed": True}))
    assert isinstance(lt.load_checked(tiny_smol, "abc")[0], lt.LightTokenizer)
    monkeypatch.setenv("RAGTUNE_LIGHT_TOKENIZER", "0")
    assert lt.load_checked(tiny_smol, "abc") == (None, "RAGTUNE_LIGHT_TOKENIZER=0", False)


PROBE = r"""
import json, sys
from ragtune.config import load_config
from ragtune.serve.generator import Generator
cfg = load_config(None, [f"model.path={sys.argv[1]}", "generation.threads=1", "serve.max_batch=1"])
gen = Generator(cfg, engine="llama.cpp").load()
out = []
for q in ("What is the capital of France?", "연차 휴가는 며칠인가요?"):
    job = gen.prepare([{"role": "user", "content": q}], max_new_tokens=12, temperature=0.0)
    ids = []
    gen._run(job, ids.append, None)
    out.append({"prompt": job.prompt, "prompt_ids": job.input_ids, "ids": ids,
                "text": gen.tokenizer.decode(ids, skip_special_tokens=True)})
print(json.dumps({"answers": out, "tokenizer": type(gen.tokenizer).__name__,
                  "modules": sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules)}))
"""

ASK = r"""
import json, sys
from ragtune.cli import main
rc = main(["-q", "ask", "What is the capital of France?", "--engine", "llama.cpp", "--no-rag", "--json",
           "--max-new-tokens", "12", f"model.path={sys.argv[1]}", "generation.threads=1"])
sys.stdout.flush()
print(json.dumps({"rc": rc, "modules": sorted(m for m in ("torch", "transformers") if m in sys.modules)}),
      file=sys.stderr)
"""


def _py(code: str, model: Path, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "RAGTUNE_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=e,
                          timeout=600, cwd=REPO)


@NEEDS_LLAMA_CPP
def test_llama_cpp_ask_runs_without_torch_and_gives_todays_ids(tiny_smol: Path, llama_home: Path, converter_home: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.export.cache import cached_gguf

    with monkeypatch.context() as mp:  # the session's f16 GGUF of tiny_smol (exported once for every llama.cpp test)
        mp.setenv("RAGTUNE_HOME", str(converter_home))
        gguf = cached_gguf(tiny_smol)
    (llama_home / "gguf").mkdir()
    (llama_home / "gguf" / gguf.parent.name).symlink_to(gguf.parent, target_is_directory=True)
    today = _py(PROBE, tiny_smol, llama_home, RAGTUNE_LIGHT_TOKENIZER="0")
    assert today.returncode == 0, today.stderr[-2000:]
    want = json.loads(today.stdout.strip().splitlines()[-1])
    assert "transformers" in want["modules"] and want["tokenizer"] != "LightTokenizer"
    assert not lt.check_path(_hash(tiny_smol)).exists()  # switched off: nothing checked or recorded
    first = _py(PROBE, tiny_smol, llama_home)  # transformers' tokenizer once more, and the check recorded
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["answers"] == want["answers"]
    assert json.loads(lt.check_path(_hash(tiny_smol)).read_text())["passed"] is True
    light = _py(PROBE, tiny_smol, llama_home)
    assert light.returncode == 0, light.stderr[-2000:]
    got = json.loads(light.stdout.strip().splitlines()[-1])
    assert got["tokenizer"] == "LightTokenizer" and got["modules"] == []
    assert got["answers"] == want["answers"]  # rendered prompt, prompt ids, answer ids and text
    assert any(a["ids"] for a in got["answers"])
    cli = _py(ASK, tiny_smol, llama_home)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stderr.strip().splitlines()[-1]) == {"rc": 0, "modules": []}
    assert json.loads(cli.stdout)["completion_tokens"] >= 1


def _hash(model: Path) -> str:
    from ragtune.modeling import model_hash

    return model_hash(model)
