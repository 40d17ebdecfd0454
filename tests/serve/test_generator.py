"""Generator: trained answers through adapters, base identity, streaming, RAG prompt, abstention."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from ragtune.errors import UsageError
from ragtune.runcard import RunCardMismatch
from ragtune.serve.generator import EngineUnavailable, Generator
from tests.serve.conftest import QA, QA_OTHER, FakeRetriever

SOURCE_KEYS = {"n", "source", "title", "page", "heading", "score", "text"}


def user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_adapter_gives_trained_answers_and_switches_without_reloading_base(loaded_gen: Generator) -> None:
    base_module = loaded_gen.model.get_base_model()
    for (q, a), (_, b) in zip(QA, QA_OTHER):
        got = loaded_gen.answer(user(q), adapter="policies", max_new_tokens=16)
        assert got.text == a and got.finish_reason == "stop" and got.mode == "ft"
        assert loaded_gen.answer(user(q), adapter="other", max_new_tokens=16).text == b
    assert loaded_gen.model.get_base_model() is base_module
    # an adapter can also be named by its directory
    assert loaded_gen.answer(user(QA[0][0]), adapter=str(loaded_gen.adapters["policies"].path)).text == QA[0][1]


def test_base_answer_is_identical_with_or_without_adapters(loaded_gen: Generator, tiny_cfg_factory) -> None:
    plain = Generator(tiny_cfg_factory()).load(adapters={})
    assert not plain.adapters
    for q in (QA[0][0], "Tell me about the office."):
        for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
            a = plain.answer(user(q), max_new_tokens=12, **kw)
            b = loaded_gen.answer(user(q), adapter=None, max_new_tokens=12, **kw)
            assert a.text == b.text and a.completion_tokens == b.completion_tokens
            assert b.mode == "base"
    assert plain.answer(user(QA[0][0]), max_new_tokens=12).text != QA[0][1]


def test_stream_deltas_concatenate_to_the_answer(loaded_gen: Generator) -> None:
    s = loaded_gen.stream(user(QA[1][0]), adapter="policies", max_new_tokens=16)
    deltas = list(s)
    assert len(deltas) > 1 and "".join(deltas) == QA[1][1] == s.answer.text
    assert s.answer.completion_tokens >= len(deltas)
    t = s.answer.timings
    assert t["ttft_s"] > 0 and t["total_s"] >= t["ttft_s"] and t["prefill_s"] > 0
    sampled = loaded_gen.stream(user("office"), max_new_tokens=10, temperature=1.0, seed=3)
    assert "".join(sampled) == loaded_gen.answer(user("office"), max_new_tokens=10, temperature=1.0, seed=3).text


def test_length_limit_and_closing_a_stream_frees_the_model(loaded_gen: Generator) -> None:
    got = loaded_gen.answer(user("office"), max_new_tokens=5)
    assert got.completion_tokens == 5 and got.finish_reason == "length"
    s = loaded_gen.stream(user("office"), max_new_tokens=400)
    next(s)
    s.close()
    done = threading.Event()
    threading.Thread(target=lambda: (loaded_gen.answer(user("x"), max_new_tokens=2), done.set()), daemon=True).start()
    assert done.wait(30)


def test_rag_prompt_has_numbered_sources_and_answers_return_them(loaded_gen: Generator) -> None:
    r = FakeRetriever()
    convo = [{"role": "user", "content": "remote work policy?"}, {"role": "assistant", "content": "Which part?"},
             {"role": "user", "content": "the number of days"}]
    s = loaded_gen.stream(convo, adapter="policies", retriever=r, max_new_tokens=8)
    assert [x["n"] for x in s.sources] == [1, 2] and all(set(x) == SOURCE_KEYS for x in s.sources)
    assert s.mode == "ft+rag"
    "".join(s)
    ans = s.answer
    assert ans.sources == s.sources and ans.sources[1]["page"] == 2 and ans.best_score == pytest.approx(0.82)
    # a source's score is the relevance a reader can judge (the dense cosine), not the fused rank score
    assert [x["score"] for x in ans.sources] == [pytest.approx(0.82), pytest.approx(0.41)]
    assert "[1] Remote work > Remote > Days (page" not in ans.prompt  # page only when there is one
    assert "[1] Remote work > Remote > Days\nEmployees may work remotely" in ans.prompt
    assert "[2] Expenses > Deadlines (page 2)" in ans.prompt and "Cite the sources" in ans.prompt
    assert r.queries == ["remote work policy?\nthe number of days"]  # follow-ups search with recent turns
    assert loaded_gen.answer(user("q"), retriever=r, max_new_tokens=2).mode == "rag"
    json.dumps(ans.to_dict())


@pytest.mark.parametrize("hits", [
    [],
    [{"source": "a.md", "title": "A", "heading": "", "page": None, "score": 0.9, "dense_score": 0.1, "chunk_id": "x", "text": "t"}],
    [{"source": "a.md", "title": "A", "heading": "", "page": None, "score": 0.9, "dense_score": 0.9,
      "rerank_score": 0.05, "chunk_id": "x", "text": "t"}],
])
def test_abstains_when_nothing_relevant_is_found(tiny_cfg_factory, tiny_adapter: Path, hits) -> None:
    cfg = tiny_cfg_factory("rag.min_score=0.3", "rag.not_found_message=Not in the documents.")
    gen = Generator(cfg).load(adapters={"policies": str(tiny_adapter)})
    ans = gen.answer(user(QA[0][0]), adapter="policies", retriever=FakeRetriever(hits))
    assert ans.abstained and ans.text == "Not in the documents." and ans.sources == []
    assert ans.completion_tokens == 0 and ans.mode == "ft+rag"
    s = gen.stream(user(QA[0][0]), retriever=FakeRetriever(hits))
    assert list(s) == ["Not in the documents."] and s.answer.abstained
    s = gen.stream(user(QA[0][0]), retriever=FakeRetriever(hits))
    assert _adrain(s) == ["Not in the documents."] and s.answer.abstained  # the server's way, once


def test_refuses_adapter_with_other_base_or_damaged_template(tiny_cfg_factory, tiny_adapter: Path, tmp_path: Path) -> None:
    gen = Generator(tiny_cfg_factory()).load(adapters={})
    wrong_base = tmp_path / "wrong-base"
    shutil.copytree(tiny_adapter, wrong_base)
    card = json.loads((wrong_base / "ragtune.json").read_text())
    card["base_model"]["hash"] = "0" * 64
    (wrong_base / "ragtune.json").write_text(json.dumps(card))
    with pytest.raises(RunCardMismatch, match="base model"):
        gen.add_adapter("x", wrong_base)
    wrong_tpl = tmp_path / "wrong-template"
    shutil.copytree(tiny_adapter, wrong_tpl)
    card = json.loads((wrong_tpl / "ragtune.json").read_text())
    card["chat_template"]["template"] += "{{ 'edited' }}"
    (wrong_tpl / "ragtune.json").write_text(json.dumps(card))
    with pytest.raises(RunCardMismatch, match="chat template"):
        gen.add_adapter("y", wrong_tpl)
    no_card = tmp_path / "no-card"
    shutil.copytree(tiny_adapter, no_card)
    (no_card / "ragtune.json").unlink()
    with pytest.raises(UsageError, match="ragtune.json"):
        gen.add_adapter("z", no_card)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(UsageError, match="has no adapter_model.safetensors \\(ragtune never loads pickle"):
        gen.add_adapter("p", pickled)
    assert not gen.adapters
    with pytest.raises(UsageError, match="not loaded"):
        gen.answer(user("q"), adapter="nope")


def test_engine_llama_cpp_without_the_package_is_a_clear_usage_error(tiny_cfg_factory, monkeypatch) -> None:
    import ragtune.serve.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "llama_cpp_available", lambda: False)
    with pytest.raises(EngineUnavailable, match=r"pip install 'ragtune\[llamacpp\]'"):
        Generator(tiny_cfg_factory("generation.engine=llama.cpp"))
    assert EngineUnavailable("llama.cpp").exit_code == 2
    assert Generator(tiny_cfg_factory("generation.engine=auto")).engine == "transformers"  # auto falls back
    assert Generator(tiny_cfg_factory()).engine == "transformers"  # the default stays transformers


def test_prompt_longer_than_context_is_a_usage_error(loaded_gen: Generator) -> None:
    with pytest.raises(UsageError, match="context"):
        loaded_gen.answer(user("word " * 3000), max_new_tokens=2)


def test_fast_lora_matches_peft_and_restores_its_forwards(loaded_gen: Generator, tiny_cfg_factory, tiny_adapter: Path, other_adapter: Path) -> None:
    import torch

    slow = Generator(tiny_cfg_factory("generation.fast_lora=false")).load(
        adapters={"policies": str(tiny_adapter), "other": str(other_adapter)})
    assert slow._fast is None and loaded_gen._fast is not None and loaded_gen._fast.supports("other")
    keys = set(loaded_gen.model.state_dict())
    for adapter in (None, "policies", "other"):
        for q in (QA[0][0], "Tell me about the office."):
            kw = dict(adapter=adapter, max_new_tokens=10, temperature=1.0, seed=5)
            assert loaded_gen.answer(user(q), **kw).text == slow.answer(user(q), **kw).text
    # the same logits, up to float rounding (the scale is folded into B)
    ids = torch.tensor([loaded_gen.tokenizer("remote days", add_special_tokens=False)["input_ids"]])
    with loaded_gen._fast.active("policies"), torch.inference_mode():
        fast_logits = loaded_gen.model(input_ids=ids).logits
    slow.model.set_adapter("policies")
    with torch.inference_mode():
        slow_logits = slow.model(input_ids=ids).logits
    assert torch.allclose(fast_logits, slow_logits, atol=1e-5)
    assert set(loaded_gen.model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in loaded_gen._fast.layers)


def test_decoder_never_splits_a_multibyte_character(loaded_gen: Generator) -> None:
    from ragtune.serve.stops import _Decoder

    text = "서울은 한국의 수도입니다. Three days per week — 재택근무 OK."
    ids = loaded_gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = _Decoder(loaded_gen.tokenizer)
    deltas = [dec.add(i) for i in ids] + [dec.finish()]
    assert "".join(deltas) == loaded_gen.tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_static_cache_is_asked_for_on_cuda_only(tiny_cfg_factory, loaded_gen: Generator, monkeypatch) -> None:
    gen = Generator(tiny_cfg_factory("generation.cache=static"))
    gen.tokenizer, gen._eos = loaded_gen.tokenizer, loaded_gen._eos
    job = loaded_gen.prepare(user("q"), max_new_tokens=4)
    assert gen._generation_kwargs(job)["generation_config"].cache_implementation is None  # cpu
    gen.device = "cuda"
    assert gen._generation_kwargs(job)["generation_config"].cache_implementation == "static"
    g = gen._generation_kwargs(loaded_gen.prepare(user("q"), max_new_tokens=4, temperature=0.7))["generation_config"]
    assert g.do_sample and g.temperature == 0.7


@pytest.mark.parametrize("stop, expected", [(["days"], "Three "), ([" per w", "x"], "Three days"),
                                            (["nowhere"], QA[0][1]), (["T"], "")])
def test_stop_strings_cut_the_answer_in_both_paths(loaded_gen: Generator, stop, expected) -> None:
    a = loaded_gen.answer(user(QA[0][0]), adapter="policies", max_new_tokens=16, stop=stop)
    s = loaded_gen.stream(user(QA[0][0]), adapter="policies", max_new_tokens=16, stop=stop)
    assert a.text == "".join(s) == s.answer.text == expected
    assert a.finish_reason == s.answer.finish_reason == "stop"


def _adrain(stream: Any) -> list[str]:
    import asyncio

    async def go() -> list[str]:
        return [d async for d in stream]

    return asyncio.run(go())


@pytest.mark.parametrize("stop", [None, ["days"], ["T"]])
def test_a_stream_read_on_an_event_loop_gives_the_same_text_and_answer(loaded_gen: Generator, stop) -> None:
    """`async for` (the server's way: token ids posted to the loop, no thread hop per token) gives the
    sync iteration's text, stop strings and finish reason included."""
    kw = dict(adapter="policies", max_new_tokens=16, stop=stop)
    sync = loaded_gen.stream(user(QA[0][0]), **kw)
    want = "".join(sync)
    s = loaded_gen.stream(user(QA[0][0]), **kw)
    deltas = _adrain(s)
    assert "".join(deltas) == want == s.answer.text
    assert s.answer.finish_reason == sync.answer.finish_reason
    assert s.answer.completion_tokens == sync.answer.completion_tokens
    assert all(deltas)  # no empty chunks


def test_closing_a_stream_on_an_event_loop_frees_the_model(loaded_gen: Generator) -> None:
    import asyncio

    s = loaded_gen.stream(user("office"), max_new_tokens=400)  # the tiny model runs all 400 tokens

    def after_close() -> None:  # while the loop still runs: its closing would stop the worker too
        loaded_gen.answer(user("x"), max_new_tokens=2)  # waits for the model
        for t in threading.enumerate():
            if t.name == "ragtune-generate":
                t.join(30)

    async def go() -> tuple[str, int]:
        d = await anext(s)
        await s.aclose()
        await asyncio.wait_for(asyncio.to_thread(after_close), 60)
        return d, s._aq.qsize()

    first, posted_after = asyncio.run(go())
    assert first and posted_after < 50  # the worker stopped at the flag, not after its 400 tokens


def test_held_back_keeps_possible_stop_prefixes() -> None:
    from ragtune.serve.generator import cut_at_stop, held_back

    assert held_back("abc ST", ["STOP"]) == 2 and held_back("abc", ["STOP"]) == 0 and held_back("x", []) == 0
    assert cut_at_stop("one STOP two", ["STOP", "one"]) == ("", True)
    assert cut_at_stop("one two", ["three"]) == ("one two", False)


def test_fast_lora_steps_aside_for_modules_to_save(tiny_llama: Path, tmp_path: Path, tiny_cfg_factory) -> None:
    """An adapter that also trains whole modules switches them only through peft: no lean path then."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.modeling import chat_template_of
    from tests.tinymodels import write_adapter_card

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.mul_(0).add_(torch.randn_like(p))
    out = tmp_path / "mts"
    peft_model.save_pretrained(str(out), safe_serialization=True)
    tpl = chat_template_of(tiny_llama)
    write_adapter_card(out, tiny_llama, tpl)
    plain = Generator(tiny_cfg_factory()).load(adapters={})
    gen = Generator(tiny_cfg_factory()).load(adapters={"mts": str(out)})
    assert gen._fast is not None and not gen._fast.supports(None) and "ModulesToSaveWrapper" in gen._fast.blocked
    kw = dict(max_new_tokens=8, temperature=1.0, seed=3)
    assert gen.answer(user("office"), **kw).text == plain.answer(user("office"), **kw).text
    assert gen.answer(user("office"), adapter="mts", **kw).text != plain.answer(user("office"), **kw).text


def test_held_back_equals_the_plain_definition_and_is_linear() -> None:
    """KMP held_back against the definition (longest proper stop prefix the text ends with) on random
    texts over a small alphabet, where overlaps are common; and a 256-char stop on a long text is fast."""
    import random

    from ragtune.serve.generator import held_back

    def plain(text: str, stops: list[str]) -> int:
        return max([n for x in stops for n in range(1, len(x)) if text.endswith(x[:n])] or [0])

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 3))]
        assert held_back(text, stops) == plain(text, stops), (text, stops)
    stop = "a" * 255 + "b"
    assert held_back("a" * 100_000, [stop]) == 255  # one pass over the last 255 characters


def test_an_adapter_whose_weights_do_not_fit_the_base_is_one_line(tiny_llama: Path, tiny_adapter: Path,
                                                                    tmp_path: Path) -> None:
    """Weights of another shape than the base (files of two runs mixed) get peft's "size mismatch"
    RuntimeError, hundreds of lines; it is said in one line naming both folders."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ragtune.config import load_config
    from ragtune.errors import UsageError
    from ragtune.serve.generator import Generator

    mixed = Path(shutil.copytree(tiny_adapter, tmp_path / "mixed"))
    weights = load_file(str(mixed / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] // 2) if ".lora_A." in k else v for k, v in weights.items()},
              str(mixed / "adapter_model.safetensors"))
    gen = Generator(load_config(None, [f"model.path={tiny_llama}", "generation.engine=transformers"]))
    with pytest.raises(UsageError) as err:
        gen.load(base=tiny_llama, adapters={"policies": mixed})
    msg = str(err.value)
    assert "does not fit the base model" in msg and "size mismatch" in msg and len(msg) < 800, msg


def test_an_adapter_config_that_does_not_match_its_weights_is_refused(tiny_adapter: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from ragtune.errors import UsageError
    from ragtune.modeling import check_adapter_dir

    edited = Path(shutil.copytree(tiny_adapter, tmp_path / "edited"))
    cfg = json.loads((edited / "adapter_config.json").read_text())
    cfg["r"] = cfg["r"] * 2
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=f"adapter_config.json says r={cfg['r']} but .*lora_A.* has shape"):
        check_adapter_dir(edited)
