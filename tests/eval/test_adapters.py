"""Several adapters in one eval: NAME=DIR parsing, the modes they give, their training recipes, and a
real run on a tiny model with two LoRA adapters (every mode's rows, abstention by the generator)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.errors import UsageError
from ragtune.eval.modes import parse_adapters, parse_modes, training_recipe
from ragtune.eval.run import run_eval
from tests.eval.test_run import NF, TableRetriever, make_adapter

RAG_BLOCK = {"index": "policies", "index_identity": "abc", "index_generation": 3, "top_k": 3, "distractors": 2,
             "withheld": 0.2, "cite": True, "prompt_format": 1}


def test_adapter_specs_and_modes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert parse_adapters(str(a)) == {"ft": str(a)}  # a bare DIR is named ft
    assert parse_adapters([f"plain={a}", f"rag-trained={b}"]) == {"plain": str(a), "rag-trained": str(b)}
    with pytest.raises(UsageError, match="two adapters are named 'ft'.*--adapter plain=DIR1"):
        parse_adapters([str(a), str(b)])
    with pytest.raises(UsageError, match="the name 'rag' must be letters"):
        parse_adapters([f"rag={a}"])  # a name that is already a mode
    for bad in ("", "a b"):  # NAME=DIR with a bad name is said as such, not as a missing folder "ft==DIR"
        with pytest.raises(UsageError, match=f"--adapter {bad}={a}: the name '{bad}' must be letters"):
            parse_adapters([f"{bad}={a}"])
    odd = tmp_path / "x=y"  # a folder whose own name holds "=" is still a bare DIR
    odd.mkdir()
    assert parse_adapters([str(odd)]) == {"ft": str(odd)}
    with pytest.raises(UsageError, match="'.*missing' is not a folder"):
        parse_adapters([f"x={tmp_path / 'missing'}"])
    names = ["plain", "rag-trained"]
    # ft / ft+rag stand for every adapter's modes
    assert parse_modes("base,ft,rag,ft+rag", names) == [
        "base", "plain", "rag-trained", "rag", "plain+rag", "rag-trained+rag"]
    assert parse_modes("rag-trained+rag,base", names) == ["rag-trained+rag", "base"]
    assert parse_modes("base,ft,rag,ft+rag", ["ft"]) == ["base", "ft", "rag", "ft+rag"]
    with pytest.raises(UsageError, match="unknown mode.*other.*choose from base,rag,ft,ft\\+rag,plain,plain\\+rag"):
        parse_modes("base,other", ["plain"])
    with pytest.raises(UsageError, match="need an adapter"):
        parse_modes("base,ft", [])


def test_a_restored_adapter_is_found_by_its_name(ragtune_home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 'ragtune bundle restore' says "use a restored adapter by name"; ask took the name, eval said "not a folder"
    restored = ragtune_home / "adapters" / "policies"
    restored.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_adapters(["policies"]) == {"ft": str(restored)}
    assert parse_adapters(["plain=policies"]) == {"plain": str(restored)}
    (tmp_path / "policies").mkdir()  # a folder of that name here is the one meant
    assert parse_adapters(["policies"]) == {"ft": "policies"}
    with pytest.raises(UsageError, match="'other' is not a folder; .*or the name of one 'ragtune bundle restore' put"):
        parse_adapters(["plain=other"])


def test_a_whole_model_or_a_bare_run_card_as_adapter_is_named_before_loading(tiny_llama: Path, tmp_path: Path) -> None:
    # a whole model was "has no ragtune.json; it was not written by 'ragtune train'"; a folder with a run card
    # but no adapter files was refused only after the base model had loaded
    cfg = load_config(None, [f"model.path={tiny_llama}", "eval.engine=transformers"])
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Q?", "answer": "A"}) + "\n", encoding="utf-8")
    card_only = tmp_path / "card-only"
    card_only.mkdir()
    shutil.copyfile(make_adapter(tmp_path) / "ragtune.json", card_only / "ragtune.json")
    for spec, said in [(f"m={tiny_llama}", f"adapter 'm' at '{tiny_llama}' has no adapter_config.json: it holds a "
                                            "whole model (config.json and weights), which is given as model.path="),
                       (str(card_only), f"adapter 'ft' at '{card_only}' has no adapter_config.json")]:
        with pytest.raises(UsageError) as err:
            run_eval(cfg, questions=q, adapter=[spec], modes="base,ft" if "=" not in spec else "base,m",
                     out_dir=tmp_path / "out", progress=False)
        assert said in str(err.value)
    assert not (tmp_path / "out").exists()


def test_training_recipe_from_the_run_card() -> None:
    assert training_recipe({}).startswith("plain: trained on the records as written")
    assert training_recipe({"rag": None}).startswith("plain")
    assert training_recipe({"rag": RAG_BLOCK}) == (
        "trained with retrieval (sources in its prompts: index 'policies', generation 3, top_k 3, 2 distractor(s), "
        "gold withheld from 20% of records, target cites [n], prompt format 1)")
    assert training_recipe({"rag": {"index": "x"}}) == "trained with retrieval (sources in its prompts: index 'x')"


# --- a real run: tiny Llama, two LoRA adapters ------------------------------------------------------


def _lora(base: Path, out: Path, seed: int, rag: dict[str, Any] | None) -> Path:
    """A LoRA with random non-zero B (so it changes the answers), with the run card ragtune checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.modeling import chat_template_of
    from tests.tinymodels import write_adapter_card

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    extra = {"rag": rag} if rag else {}
    write_adapter_card(out, base, chat_template_of(base) or "", config={"train": {"epochs": 1.0}},
                       data={"train_records": 3}, metrics={"wall_seconds": 1.5}, training={"device": "cpu"}, **extra)
    return out


QUESTIONS = [
    {"id": "remote", "question": "How many remote days?", "answer": "3 days", "sources": ["remote_work.md"]},
    {"id": "gym", "question": "Is the gym paid?", "answerable": False},
]
HITS = {"How many remote days?": [("remote_work.md", 0.8), ("travel.md", 0.4)],
        "Is the gym paid?": [("travel.md", 0.1), ("benefits_ko.md", 0.05)]}


@pytest.mark.slow
def test_two_adapters_on_a_tiny_model_write_every_mode(tmp_path: Path, tiny_llama: Path) -> None:
    from tests.tinymodels import torch_threads

    plain = _lora(tiny_llama, tmp_path / "plain", 1, None)
    raft = _lora(tiny_llama, tmp_path / "raft", 2, RAG_BLOCK)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS), encoding="utf-8")
    # no model.path: the base is the one the adapters were trained on, and the report names it
    cfg = load_config(None, ["model.device=cpu", "rag.top_k=2", "rag.min_score=0.3", "eval.max_new_tokens=4",
                             "eval.bootstrap=50"])
    with torch_threads(1):
        res = run_eval(cfg, questions=q, adapter=[f"plain={plain}", f"raft={raft}"], out_dir=tmp_path / "out",
                       progress=False, retriever=TableRetriever(HITS), engine="transformers")
    rep = res.report
    modes = ["base", "plain", "raft", "rag", "plain+rag", "raft+rag"]
    assert rep["modes"] == modes and res.errors == 0
    for qrow in rep["questions"]:
        assert sorted(qrow["answers"]) == sorted(modes)
    for m in modes:
        assert rep["summary"][m]["correct"]["n"] == 2 and rep["speed"][m]["mode_s"] > 0
    answers = {m: rep["questions"][0]["answers"][m]["answer"] for m in modes}
    # each adapter is its own model: its answers differ from the base's and from the other adapter's
    assert answers["plain"] != answers["base"] and answers["raft"] != answers["plain"]
    # the unanswerable question's best dense score 0.1 is below rag.min_score: the generator abstains
    # in every rag mode (with the not-found message), and no mode without retrieval can
    gym = rep["questions"][1]["answers"]
    for m in ("rag", "plain+rag", "raft+rag"):
        assert gym[m]["abstained"] and gym[m]["answer"] == NF and gym[m]["scores"]["abstention"] == 1.0
        assert gym[m]["scores"]["mrr"] is None  # no gold sources for an unanswerable question
    for m in ("base", "plain", "raft"):
        assert not gym[m]["abstained"] and gym[m]["completion_tokens"] > 0
    # the answerable one retrieved its gold source first
    assert rep["questions"][0]["answers"]["rag"]["scores"]["mrr"] == 1.0
    # the report: the loaded base, each adapter's recipe, one training row per adapter, every pair compared
    assert rep["meta"]["base model"] == str(tiny_llama) and rep["meta"]["engine"] == "transformers (cpu)"
    assert [(a["name"], a["recipe"].split(" ")[0]) for a in rep["adapters"]] == [("plain", "plain:"), ("raft", "trained")]
    whats = [c["what"] for c in rep["cost"]]
    assert whats[0].startswith("train: LoRA fine-tune of adapter 'plain' (3 records")
    assert whats[2].startswith("train: LoRA fine-tune of adapter 'raft' on retrieval-built prompts")
    pairs = {(d["a"], d["b"]) for d in rep["diffs"] if d["metric"] == "correct"}
    assert len(pairs) == len(modes) * (len(modes) - 1) // 2
    md = res.paths["md"].read_text(encoding="utf-8")
    assert "## Adapters" in md and "| raft |" in md and "trained with retrieval" in md


def test_a_scripted_run_with_two_adapters(tmp_path: Path) -> None:
    from tests.eval.test_run import TABLE, ScriptedGenerator, write_questions

    a = make_adapter(tmp_path)
    b = tmp_path / "b"
    b.mkdir()
    card = json.loads((a / "ragtune.json").read_text())
    (b / "ragtune.json").write_text(json.dumps({**card, "rag": RAG_BLOCK}))
    table = dict(TABLE)
    for (ad, rag, q), text in TABLE.items():
        if ad == "ft":
            table[("raft", rag, q)] = text
    table[(None, True, "Gym?")] = table[("ft", True, "Gym?")] = table[("raft", True, "Gym?")] = NF
    table[("raft", False, "Gym?")] = NF
    gen = ScriptedGenerator(table)
    cfg = load_config(None, ["eval.bootstrap=50"])
    res = run_eval(cfg, questions=write_questions(tmp_path / "q.jsonl"), adapter={"ft": str(a), "raft": str(b)},
                   modes="ft+rag,base", out_dir=tmp_path / "out", progress=False, generator=gen,
                   retriever=TableRetriever({"Remote days?": [("remote_work.md", 0.8)],
                                             "Meal limit?": [("expenses.md", 0.6)], "Gym?": [("x.md", 0.1)]}))
    assert res.report["modes"] == ["ft+rag", "raft+rag", "base"]
    real = [c for c in gen.calls if c["messages"][-1]["content"] != "Hello"]
    assert [(c["adapter"], c["rag"]) for c in real[::3]] == [("ft", True), ("raft", True), (None, False)]
    assert [c["adapter"] for c in gen.calls[:3]] == [None, "ft", "raft"]  # one warm-up per model
    assert "trained with retrieval" in res.report["meta"]["adapters"]
