"""The Generator on engine llama.cpp: greedy answers equal transformers' (near-ties excepted, as in
tests/export), streaming, adapters, and a server deployment on llama.cpp.

Uses tests/conftest.py's tiny SmolLM2-tokenizer Llama (llama.cpp's converter accepts its tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.export.conftest import NEEDS_LLAMA_CPP, make_adapter

pytestmark = NEEDS_LLAMA_CPP
MARGIN = 0.05  # logits; as in tests/export: only a step whose top-2 gap is below this may flip
PROMPTS = ["What is the capital of France?", "How many remote days do I get?"]
MAX_NEW = 12


def user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def cpp_home(converter_home: Path) -> Any:
    """Module fixtures export the GGUFs into the session's converter home (tests get their own home)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    yield converter_home
    mp.undo()


@pytest.fixture(scope="module")
def smol_adapter(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_smol, tmp_path_factory.mktemp("cpp-adapters") / "tiny-lora")


@pytest.fixture(scope="module")
def cfg(tiny_smol: Path) -> Any:
    from ragtune.config import load_config

    # f16: the file whose greedy ids are transformers' (auto picks bf16 on CPUs with AVX512_BF16)
    return load_config(None, [f"model.path={tiny_smol}", "generation.threads=1", "generation.gguf_type=f16"])


@pytest.fixture(scope="module")
def gens(cfg: Any, smol_adapter: Path, cpp_home: Path) -> dict[str, Any]:
    from ragtune.serve.generator import Generator

    out = {e: Generator(cfg, engine=e).load(adapters={"ft": str(smol_adapter)}) for e in ("transformers", "llama.cpp")}
    assert out["llama.cpp"].engine == "llama.cpp" and out["llama.cpp"].model is None
    assert out["transformers"].engine == "transformers"
    return out


def _ids(gen: Any, q: str, adapter: str | None) -> list[int]:
    job = gen.prepare(user(q), adapter=adapter, max_new_tokens=MAX_NEW, temperature=0.0)
    ids: list[int] = []
    gen._run(job, ids.append, None)
    return ids


def _gap(tgen: Any, q: str, adapter: str | None, prefix: list[int]) -> float:
    """transformers' top-2 logit gap at the step after `prefix`."""
    import torch

    job = tgen.prepare(user(q), adapter=adapter, max_new_tokens=MAX_NEW, temperature=0.0)
    ids = torch.tensor([job.input_ids + prefix])
    with tgen._adapter_ctx(adapter), torch.inference_mode():
        top = tgen.model(input_ids=ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def test_greedy_answers_equal_transformers_while_margins_are_clear(gens: dict[str, Any]) -> None:
    tgen, cgen = gens["transformers"], gens["llama.cpp"]
    equal = 0
    cases = [(q, a) for q in PROMPTS for a in (None, "ft")]
    for q, adapter in cases:
        t = tgen.answer(user(q), adapter=adapter, max_new_tokens=MAX_NEW, temperature=0.0)
        c = cgen.answer(user(q), adapter=adapter, max_new_tokens=MAX_NEW, temperature=0.0)
        assert (c.mode, c.adapter, c.prompt, c.prompt_tokens) == (t.mode, t.adapter, t.prompt, t.prompt_tokens)
        assert c.completion_tokens > 0 and {"ttft_s", "decode_s", "total_s"} <= set(c.timings)
        if c.text == t.text:
            assert (c.completion_tokens, c.finish_reason) == (t.completion_tokens, t.finish_reason)
            equal += 1
            continue
        ti, ci = _ids(tgen, q, adapter), _ids(cgen, q, adapter)
        same = next(i for i, (a, b) in enumerate(zip(ti, ci)) if a != b)
        gap = _gap(tgen, q, adapter, ti[:same])
        assert gap < MARGIN, (q, adapter, same, gap, ti, ci)  # only a near-tie may flip
    assert equal >= len(cases) - 1, f"only {equal} of {len(cases)} answers compared in full"


def test_stream_deltas_join_to_the_answer(gens: dict[str, Any]) -> None:
    cgen = gens["llama.cpp"]
    want = cgen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0)
    s = cgen.stream(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0)
    deltas = list(s)
    assert "".join(deltas) == s.answer.text == want.text
    assert s.answer.completion_tokens == want.completion_tokens


def test_an_adapter_switches_the_output_like_transformers(gens: dict[str, Any]) -> None:
    for gen in gens.values():
        base = gen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0).text
        ft = gen.answer(user(PROMPTS[0]), adapter="ft", max_new_tokens=MAX_NEW, temperature=0.0).text
        assert ft != base, gen.engine
        assert gen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0).text == base  # switched back


def test_server_answers_from_a_llama_cpp_deployment(tiny_smol: Path, gens: dict[str, Any], cpp_home: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from ragtune.config import load_config
    from ragtune.serve.server import create_app

    monkeypatch.setenv("RAGTUNE_HOME", str(cpp_home))  # the GGUF exported by `gens` is reused
    f = tmp_path / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_smol}\ngeneration:\n  threads: 1\n"
                 "serve:\n  deployments:\n    - {name: cpp, engine: llama.cpp}\n")
    with TestClient(create_app(load_config(f))) as client:
        assert client.get("/health").json()["deployments"] == ["cpp"]
        r = client.post("/v1/chat/completions", json={"model": "cpp", "messages": user(PROMPTS[0]),
                                                       "max_tokens": MAX_NEW, "temperature": 0})
    assert r.status_code == 200, r.text
    want = gens["llama.cpp"].answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0).text
    assert r.json()["choices"][0]["message"]["content"] == want


def test_auto_picks_llama_cpp_on_the_cpu(cfg: Any) -> None:
    from ragtune.serve.generator import check_engine

    assert check_engine("auto", "cpu") == "llama.cpp"
    assert check_engine("transformers", "cpu") == "transformers"
    assert check_engine("auto", "cuda") == "transformers"


def test_auto_without_a_gpu_device_picks_llama_cpp_without_importing_torch() -> None:
    """`engine: auto`, `device: auto` on a machine with no GPU device node answers through llama.cpp
    without importing torch (~2 s cold) to learn "cpu"; with one, torch decides as before."""
    import subprocess
    import sys

    code = ("import sys; from ragtune.modeling import accelerator_possible; "
            "from ragtune.serve.generator import check_engine; "
            "print(check_engine('auto', 'auto'), accelerator_possible(), 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    engine, possible, torch_loaded = p.stdout.split()
    if possible == "False":
        assert (engine, torch_loaded) == ("llama.cpp", "False")
    else:
        from ragtune.modeling import pick_device

        assert engine == ("llama.cpp" if pick_device("auto") == "cpu" else "transformers")


@pytest.mark.parametrize("platform, dev, possible", [
    ("linux", ["null", "tty0", "shm"], False),
    ("linux", ["null", "nvidia0", "nvidiactl"], True),
    ("linux", ["null", "nvhost-ctrl-gpu"], True),
    ("linux", ["null", "kfd", "dri"], True),
    ("linux", ["null", "dxg"], True),
    ("linux", OSError(13, "Permission denied"), True),
    ("darwin", ["null"], True),
    ("win32", ["null"], True),
])
def test_accelerator_possible_reads_the_device_nodes(platform: str, dev: Any, possible: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import sys

    from ragtune.modeling import accelerator_possible

    def listdir(path: str) -> list[str]:
        assert path == "/dev"
        if isinstance(dev, OSError):
            raise dev
        return dev

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(os, "listdir", listdir)
    assert accelerator_possible() is possible


def test_eval_engine_answers_every_mode_with_llama_cpp(cfg: Any, gens: dict[str, Any], cpp_home: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    from dataclasses import replace

    from ragtune.eval.run import run_eval
    from ragtune.serve.generator import Generator

    monkeypatch.setenv("RAGTUNE_HOME", str(cpp_home))
    calls: list[int] = []
    real = Generator._run_llama_cpp
    monkeypatch.setattr(Generator, "_run_llama_cpp", lambda self, *a: calls.append(1) or real(self, *a))
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question": x, "answer": "Paris"}) + "\n" for x in PROMPTS))
    # generation.gguf_type auto (the default) answers eval from f16 even where serving would pick bf16
    monkeypatch.setattr("ragtune.serve.llamacpp.native_bf16", lambda: True)
    cfg = replace(cfg, generation=replace(cfg.generation, gguf_type="auto"))
    res = run_eval(cfg, questions=q, modes="base", out_dir=tmp_path / "ev", progress=False, engine="llama.cpp")
    assert res.exit_code == 0 and res.errors == 0 and res.paths["json"].is_file()
    assert len(calls) >= len(PROMPTS)  # every answer (and the warm-up) ran on llama.cpp
    assert json.loads(res.paths["json"].read_text())["meta"]["engine"] == "llama.cpp (f16 GGUF)"


def test_gguf_type_picks_the_quantized_base(tiny_smol: Path, cpp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    monkeypatch.setenv("RAGTUNE_HOME", str(cpp_home))
    cfg = load_config(None, [f"model.path={tiny_smol}", "generation.threads=1", "generation.gguf_type=q8_0"])
    gen = Generator(cfg, engine="llama.cpp").load(adapters={})
    assert Path(gen.engine_impl.gguf_path).name == "model-q8_0.gguf"
    ans = gen.answer(user(PROMPTS[0]), max_new_tokens=4, temperature=0.0)
    assert ans.completion_tokens > 0


@pytest.mark.parametrize("native", [True, False])
def test_auto_gguf_type_is_bf16_only_where_llama_cpp_multiplies_bf16(native: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.serve import llamacpp

    lc = llamacpp.import_llama_cpp()
    info = b"CPU : AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = " + (b"1" if native else b"0") + b" | "
    monkeypatch.setattr(lc, "llama_print_system_info", lambda: info)
    assert llamacpp.native_bf16() is native
    assert llamacpp.resolve_gguf_type("auto") == ("bf16" if native else "f16")
    assert llamacpp.resolve_gguf_type("auto", for_eval=True) == "f16"  # transformers' greedy ids
    assert llamacpp.resolve_gguf_type("q8_0") == "q8_0"


def test_a_bf16_base_answers_with_an_adapter(tiny_smol: Path, smol_adapter: Path, cpp_home: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    monkeypatch.setenv("RAGTUNE_HOME", str(cpp_home))
    cfg = load_config(None, [f"model.path={tiny_smol}", "generation.threads=1", "generation.gguf_type=bf16"])
    gen = Generator(cfg, engine="llama.cpp").load(adapters={"ft": str(smol_adapter)})
    assert Path(gen.engine_impl.gguf_path).name == "model-bf16.gguf"
    base = gen.answer(user(PROMPTS[0]), max_new_tokens=6, temperature=0.0)
    tuned = gen.answer(user(PROMPTS[0]), max_new_tokens=6, temperature=0.0, adapter="ft")
    assert base.completion_tokens > 0 and tuned.completion_tokens > 0


def test_stop_strings_end_the_answer_like_transformers(gens: dict[str, Any]) -> None:
    tgen, cgen = gens["transformers"], gens["llama.cpp"]
    full = tgen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0)
    if cgen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0).text != full.text:
        pytest.skip("a near-tie on this prompt (checked by the equality test)")
    words = full.text.split()
    assert len(words) >= 2, full.text
    stop = [words[1][:3]]
    t = tgen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0, stop=stop)
    c = cgen.answer(user(PROMPTS[0]), max_new_tokens=MAX_NEW, temperature=0.0, stop=stop)
    assert (c.text, c.finish_reason) == (t.text, "stop") and stop[0] not in c.text
    assert c.completion_tokens < full.completion_tokens or full.finish_reason == "stop"
