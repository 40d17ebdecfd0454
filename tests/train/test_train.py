"""`ragtune train` / `ragtune merge` through the CLI on tiny models: memorise, resume, merge, refuse."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from ragtune.cli import main
from tests.conftest import free_port
from tests.train.conftest import QA, chat, write_jsonl

# 20 pairs, batch 10, 100 epochs = 200 optimizer steps: ~10 s on one core, memorises every answer
MEMORIZE = ["train.epochs=100", "train.learning_rate=0.01", "train.batch_size=10", "train.lora.dropout=0.0",
            "train.save_steps=100000", "train.logging_steps=10", "train.lr_scheduler=cosine"]
QUICK = ["train.max_steps=2", "train.batch_size=4", "train.save_steps=100000"]


def metric_rows(out: Path, having: str = "") -> list[dict]:
    """The rows of an output folder's metrics.jsonl (only those with the key `having`, if given)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not having or having in r]


def _greedy(model, tok, messages, template=None) -> str:
    import torch

    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def memorized(trainable_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train once through the CLI on the 20 pairs; several tests read the result."""
    root = tmp_path_factory.mktemp("memorize")
    data = write_jsonl(root / "qa.jsonl", [chat(q, a) for q, a in QA])
    out = root / "adapter"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGTUNE_HOME", str(root / "home"))
        rc = main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={data}",
                   f"train.output_dir={out}", "data.eval_fraction=0.0", f"serve.api_key={SECRET}", *MEMORIZE])
    assert rc == 0
    return {"out": out, "data": data, "base": trainable_llama, "root": root}


SECRET = "sk-serve-key-that-must-not-travel"


def test_tiny_model_memorizes_20_answers(memorized: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = memorized["out"]
    card = json.loads((out / "ragtune.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(card["base_model"]["path"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    got = [_greedy(model, tok, [{"role": "user", "content": q}], card["chat_template"]["template"]) for q, _ in QA]
    assert got == [a for _, a in QA]


def test_output_folder_and_run_card(memorized: dict) -> None:
    from ragtune.modeling import file_sha256, model_hash, text_sha256

    out, base = memorized["out"], memorized["base"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "ragtune.json", "metrics.jsonl", "loss.png",
                 "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles beside the adapter
    assert Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]) == base.resolve()
    assert SECRET not in (out / "ragtune.json").read_text()  # the config's keys stay with the config
    card = json.loads((out / "ragtune.json").read_text())
    assert card["config"]["serve"]["api_key"] == "(redacted)" and card["config"]["store"]["api_key"] == ""
    assert card["base_model"] == {"path": str(base.resolve()), "hash": model_hash(base)}
    tpl = (base / "chat_template.jinja").read_text()
    assert card["chat_template"] == {"template": tpl, "hash": text_sha256(tpl)}
    assert card["config"]["train"]["epochs"] == 100.0
    d = card["data"]
    assert d["train_sha256"] == file_sha256(memorized["data"]) and d["train_records"] == 20
    assert d["eval_records"] == 0 and d["skipped_records"] == 0
    m = card["metrics"]
    assert m["steps"] == 200 and m["train_loss"] < 0.05 and m["tokens_per_second"] > 0
    assert m["train_tokens"] > 0 and m["wall_seconds"] > 0 and m["eval_loss"] is None
    assert card["exports"] == [] or card["exports"][0]["kind"] == "merged"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["pad_token"] != tok_cfg["eos_token"]
    steps = [r["step"] for r in metric_rows(out)]
    assert steps[0] == 1 and steps[-1] == 200


def test_merged_model_equals_base_plus_adapter(memorized: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged_dir = memorized["out"], tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "chat_template.jinja").is_file()
    assert not list(merged_dir.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True).eval()
    mtok = AutoTokenizer.from_pretrained(str(merged_dir), local_files_only=True)  # template comes with it
    atok = AutoTokenizer.from_pretrained(str(out))
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(memorized["base"])), str(out)).eval()
    for q, a in QA:
        msgs = [{"role": "user", "content": q}]
        assert _greedy(merged, mtok, msgs) == _greedy(adapter, atok, msgs) == a
    ids = mtok(mtok.apply_chat_template([{"role": "user", "content": QA[0][0]}], tokenize=False,
                                        add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        diff = (merged(**ids).logits - adapter(**ids).logits).abs().max().item()
    assert diff < 1e-3
    card = json.loads((out / "ragtune.json").read_text())
    assert card["exports"][-1]["kind"] == "merged" and card["exports"][-1]["path"] == str(merged_dir.resolve())
    assert main(["merge", str(out), "--out", str(merged_dir)]) == 2  # not empty, no --force
    # --force replaces the folder it names, so never one that is or holds an input, or the working folder
    keep = out.parent / "notes.txt"
    keep.write_text("mine")
    for bad, said in [(out.parent, "holds the adapter"), (out, "is the adapter"),
                      (memorized["base"], "is the base model"), (Path.cwd(), "is or holds the current folder")]:
        assert main(["merge", str(out), "--out", str(bad), "--force"]) == 2, bad
        assert said in capsys.readouterr().err
    assert keep.read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "phi3"])
def test_other_architectures_train_multi_turn_and_merge(arch: str, tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tinymodels import build_tiny_causal_lm
    from tests.train.test_template import QWEN3_LIKE

    base = build_tiny_causal_lm(arch, tmp_path / arch, tiny_llama, QWEN3_LIKE if arch == "qwen3" else None)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}, {"role": "user", "content": "Again?"},
                          {"role": "assistant", "content": a}]} for q, a in QA]
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    out, merged_dir = tmp_path / "run", tmp_path / "merged"
    assert main(["-q", "data", "check", str(data), "--model", str(base)]) == 0
    assert main(["-q", "train", f"model.path={base}", f"data.train_file={data}", f"train.output_dir={out}",
                 "train.learning_rate=0.01", "train.threads=1", *QUICK]) == 0
    card = json.loads((out / "ragtune.json").read_text())
    assert card["training"]["compact_lm_head"] and card["metrics"]["steps"] == 2
    assert main(["-q", "merge", str(out), "--out", str(merged_dir)]) == 0
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tok(tok.apply_chat_template(rows[0]["messages"][:2], tokenize=False, add_generation_prompt=True),
              return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()(**ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()(**ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter learned something
    assert (merged - adapted).abs().max() < 1e-3


def test_interrupted_run_resumes_from_its_step(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, caplog, capsys) -> None:
    from transformers import TrainerCallback

    from ragtune.train import recipe

    out = tmp_path / "run"
    args = ["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}", f"train.output_dir={out}",
            "train.max_steps=8", "train.save_steps=2", "train.batch_size=4", "train.save_total_limit=0"]

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 5:  # checkpoint-4 was saved at the end of step 4
                raise KeyboardInterrupt

    real = recipe.make_callbacks
    monkeypatch.setattr(recipe, "make_callbacks", lambda *a: real(*a) + [Interrupt()])
    assert main(args) == 130
    assert f"stopped at step 5; {out / 'checkpoints' / 'checkpoint-4'} is kept" in caplog.text
    assert "--resume" in caplog.text
    assert not (out / "adapter_config.json").exists()  # no half-written adapter
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(recipe, "make_callbacks", real)
    assert main(args) == 2  # refuses to silently start over
    # the restored optimizer, scheduler and data order belong to these settings and this data
    assert main(args + ["--resume", "train.learning_rate=0.001", "train.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 4 in the checkpoints, 2 now" in err and "train.learning_rate: 0.0002" in err
    changed = write_jsonl(tmp_path / "changed.jsonl", [chat(q, a + "!") for q, a in QA])
    assert main([*args[:3], f"data.train_file={changed}", *args[4:], "--resume"]) == 2
    assert "data.train_file: sha256:" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    card = json.loads((out / "ragtune.json").read_text())
    assert card["metrics"]["resumed_from_step"] == 4 and card["metrics"]["steps"] == 8
    rows = metric_rows(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))  # steps 1-4 from the first run, 5-8 from the resumed one
    assert rows[4]["time"] > rows[3]["time"]
    assert main(args + ["--resume", "train.max_steps=10"]) == 0  # a finished run can be extended too
    assert json.loads((out / "ragtune.json").read_text())["metrics"]["steps"] == 10


def test_a_base_model_too_big_for_memory_is_refused_before_loading(trainable_llama: Path, qa_file: Path,
                                                                   tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    from ragtune import modeling
    from ragtune.modeling import count_parameters

    need = count_parameters(trainable_llama) * 4  # float32 on the CPU
    args = ["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
            f"train.output_dir={tmp_path / 'run'}", *QUICK]
    monkeypatch.setattr(modeling, "_available_memory", lambda device: need - 1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not enough memory to train: the model's 0.00B parameters take 0.0 GB in float32" in err
    assert "use model.dtype=bfloat16 (0.0 GB) or a smaller model.path" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # CPU processes each hold a copy
    monkeypatch.setattr(modeling, "_available_memory", lambda device: 2 * need - 1)
    assert main(args) == 2 and "in 2 processes" in capsys.readouterr().err
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(modeling, "_available_memory", lambda device: int(need * 1.1))  # tight: a warning
    assert main(args) == 0
    assert "training may run out of memory" in caplog.text
    monkeypatch.setattr(modeling, "_available_memory", lambda device: need // 3)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 2
    assert "not enough memory to merge: the model's 0.00B parameters take 0.0 GB in float32" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_out_of_memory_says_which_settings_to_lower(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch
    from transformers import TrainerCallback

    from ragtune.train import recipe

    class OutOfMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    real = recipe.make_callbacks
    monkeypatch.setattr(recipe, "make_callbacks", lambda *a: real(*a) + [OutOfMemory()])
    out = tmp_path / "oom"
    assert main(["train", f"model.path={trainable_llama}", f"data.train_file={qa_file}", f"train.output_dir={out}",
                 "train.max_steps=8", "train.save_steps=2", "train.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory at train.batch_size=4, data.max_length=1024: lower train.batch_size" in err
    assert "train.qlora=true; continue from the last checkpoint with --resume" in err
    assert "Traceback" not in err


def test_template_without_markers_trains_with_eval(no_marker_llama: Path, tmp_path: Path, caplog) -> None:
    rows = [chat(q, a) for q, a in QA] + ['{"messages": "broken"}']
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "run"
    base = ["-q", "train", f"model.path={no_marker_llama}", f"data.train_file={data}", f"train.output_dir={out}",
            "data.eval_fraction=0.2", "train.eval_steps=1", "train.logging_steps=5", *QUICK]
    assert main(base) == 1  # invalid data stops training
    assert not out.exists()
    caplog.set_level(logging.INFO, logger="ragtune.train")
    assert main(base + ["--skip-invalid"]) == 0
    card = json.loads((out / "ragtune.json").read_text())
    assert card["chat_template"]["template"] == (no_marker_llama / "chat_template.jinja").read_text()
    assert card["data"]["skipped_records"] == 1 and card["data"]["eval_records"] == 4
    assert card["data"]["train_records"] == 16 and card["metrics"]["eval_loss"] > 0
    rows = metric_rows(out)
    assert any("eval_loss" in r for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the last step's loss is logged (logging_steps 5)
    # off a terminal, progress lines carry each step's own losses (never a stale earlier one)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert said == [f"step {r['step']}/2 " + " ".join(f"{k} {r[k]:.4f}" for k in ("loss", "eval_loss") if k in r)
                    for r in rows if "loss" in r or "eval_loss" in r]
    assert len(said) == 4  # loss and eval loss at steps 1 and 2
    assert "data: 16 training records (" in caplog.text and "), 4 eval records, 1 invalid skipped" in caplog.text
    assert "training 2 steps (train.max_steps, 4 records per step); LoRA trains 0." in caplog.text


def test_eval_file_questions_also_in_training_are_named(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                                        caplog) -> None:
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat("What is code 99?", "Code 99 means zero."),
                                                  chat(QA[3][0].upper(), "another answer")])
    out = tmp_path / "run"
    assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                 f"data.eval_file={evals}", f"train.output_dir={out}", *QUICK]) == 0
    assert f"1 of 2 eval records ask a question the training data also asks ({evals} line 2)" in caplog.text
    card = json.loads((out / "ragtune.json").read_text())
    assert card["data"]["eval_records"] == 2 and card["data"]["eval_file"] == str(evals)
    assert card["metrics"]["eval_loss"] > 0


def test_compact_loss_equals_the_full_loss_or_stands_aside(trainable_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ragtune.train.compact_loss import install_compact_loss

    model = AutoModelForCausalLM.from_pretrained(str(trainable_llama))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = labels[1, 7:] = -100
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=labels).loss)
        assert install_compact_loss(model)
        compact = float(model(input_ids=ids, ragtune_labels=labels).loss) / int((labels[:, 1:] != -100).sum())
    assert compact == pytest.approx(full, rel=1e-5)

    # a head the compact path would not reproduce (scaled logits, as some architectures have)
    scaled = AutoModelForCausalLM.from_pretrained(str(trainable_llama))
    plain = scaled.forward

    def scaled_forward(*a, **kw):  # noqa: ANN002, ANN003
        labels = kw.pop("labels", None)
        out = plain(*a, **kw)
        logits = out.logits * 4
        if labels is not None:
            out.loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        out.logits = logits
        return out

    scaled.forward = scaled_forward
    assert not install_compact_loss(scaled)
    assert scaled.forward is scaled_forward


def test_dry_run_plans_and_times_without_training_or_writing(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "run"
    args = ["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}", f"train.output_dir={out}",
            "train.batch_size=4", "train.epochs=2", "data.eval_fraction=0.2"]
    assert main(args + ["--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["train_records"] == 16 and plan["eval_records"] == 4
    assert plan["steps"] == 8 and plan["epochs"] == 2 and plan["records_per_step"] == 4  # 16 / 4 x 2 epochs
    assert 0 < plan["trainable_parameters"] < plan["total_parameters"]
    assert plan["estimated_train_seconds"] > 0 and plan["tokens_per_epoch"] > plan["trained_tokens_per_epoch"] > 0
    assert not out.exists()  # nothing written, not even the Trainer's output folder
    assert main(args + ["--dry-run"]) == 0
    assert "dry run: nothing trained" in capsys.readouterr().out
    # a real run, then a dry run with --overwrite: it reports, and deletes nothing
    assert main(args + ["train.max_steps=2", "train.save_steps=1"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(args + ["--dry-run"]) == 2  # would be refused: the folder holds a run
    assert main(args + ["--dry-run", "--overwrite"]) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_same_command_same_adapter(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                     f"train.output_dir={out}", "data.eval_fraction=0.2", "train.learning_rate=0.01", *QUICK,
                     *extra]) == 0
        return load_file(str(out / "adapter_model.safetensors"))

    a, b, c = run("a"), run("b"), run("c", "train.seed=7")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # reproducible on the CPU
    assert any(not a[k].equal(c[k]) for k in a)  # the seed matters (initialisation, split, order)


def test_bf16_autocast_on_the_cpu_where_it_is_native(monkeypatch, caplog) -> None:
    import torch

    from ragtune.config import load_config
    from ragtune.train import device

    def decide(mode: str, native: bool, n_params: int = 135_000_000, dtype=torch.float32) -> bool:
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        return device.bf16_autocast(load_config(None, [f"train.mixed_precision={mode}"]), "cpu", dtype, n_params)

    assert decide("auto", native=True) is True
    assert decide("auto", native=False) is False  # emulated bf16 is slower than float32
    assert decide("auto", native=True, n_params=100_000) is False  # tiny models gain nothing
    assert decide("auto", native=True, dtype=torch.bfloat16) is False  # bf16 weights: nothing to autocast
    assert decide("no", native=True) is False
    assert decide("bf16", native=False) is True and "emulated and likely slower" in caplog.text
    assert device.bf16_autocast(load_config(None, []), "mps", torch.float32, 135_000_000) is False


def test_bf16_autocast_trains_like_float32(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    cards = {}
    for mode in ("bf16", "no"):
        out = tmp_path / mode
        assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                     f"train.output_dir={out}", "data.eval_fraction=0.2", f"train.mixed_precision={mode}",
                     "train.learning_rate=0.01", *QUICK]) == 0
        cards[mode] = json.loads((out / "ragtune.json").read_text())
    assert cards["bf16"]["training"]["dtype"] == "float32 weights, bfloat16 autocast"
    assert cards["no"]["training"]["dtype"] == "float32"
    bf16, fp32 = (cards[m]["metrics"]["eval_loss"] for m in ("bf16", "no"))
    assert bf16 == pytest.approx(fp32, rel=0.02) and bf16 != fp32  # bf16 rounding, not another computation


def test_packing_probe_accepts_bf16_rounding_and_refuses_a_leak(trainable_llama: Path) -> None:
    """bf16 (the CUDA default) rounds packed and separate rows differently; that is not a leak. An
    attention that ignores the packed boundaries (here: a forward that drops position_ids) is one."""
    import torch
    from transformers import AutoModelForCausalLM

    from ragtune.train.device import packing_supported

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(str(trainable_llama), dtype=dtype)
        assert packing_supported(model, 0), dtype
    leaky = AutoModelForCausalLM.from_pretrained(str(trainable_llama))
    forward = leaky.forward
    leaky.forward = lambda input_ids=None, **kw: forward(input_ids=input_ids, use_cache=False)
    assert not packing_supported(leaky, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the CUDA default, here on CPU
def test_packing_trains_when_attention_honours_boundaries(trainable_llama: Path, qa_file: Path, tmp_path: Path,
                                                          dtype: str) -> None:
    out = tmp_path / "packed"
    assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                 f"train.output_dir={out}", "train.packing=true", f"model.dtype={dtype}", "train.max_steps=4",
                 "train.batch_size=4", "train.learning_rate=0.005", "train.save_steps=100000"]) == 0
    t = json.loads((out / "ragtune.json").read_text())["training"]
    assert t["packing"] is True and t["dtype"] == dtype
    losses = [r["loss"] for r in metric_rows(out, "loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05


def test_gradient_checkpointing_trains_the_same_steps(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    """Checkpointing (on by default for QLoRA and bases over 1B on CUDA) recomputes activations in
    the backward pass; the LoRA weights must get the same gradients as without it."""
    losses = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        assert main(["-q", "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
                     f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=4", "train.learning_rate=0.005",
                     "train.lora.dropout=0.0", "train.save_steps=100000", f"train.gradient_checkpointing={mode}"]) == 0
        assert json.loads((out / "ragtune.json").read_text())["training"]["gradient_checkpointing"] is (mode == "on")
        rows = metric_rows(out, "loss")
        losses[mode] = [r["loss"] for r in rows]
    assert len(losses["on"]) == 4 and losses["on"][-1] < losses["on"][0] - 0.05
    assert losses["on"] == pytest.approx(losses["off"], abs=1e-4)


def test_refusals(trainable_llama: Path, qa_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    common = ["train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
              f"train.output_dir={tmp_path / 'x'}", *QUICK]
    assert main(common + ["train.qlora=true"]) == 2
    assert "train.qlora=true needs a CUDA GPU" in capsys.readouterr().err
    with monkeypatch.context() as mp:
        mp.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --config_file fsdp.yaml sets
        assert main(common + ["train.qlora=true"]) == 2
        assert "multi-gpu-ddp.yaml" in capsys.readouterr().err
    assert main(common + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", f"model.path={trainable_llama}"]) == 2
    assert "data.train_file" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_data_parallel_run_writes_one_adapter(trainable_llama: Path, qa_file: Path, tmp_path: Path) -> None:
    """The multi-process path (what `accelerate launch` runs on several GPUs) on CPU: torchrun with
    gloo. Every rank trains and saves; rank 0 writes the folder and the others wait for it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    ragtune = Path(sys.executable).with_name("ragtune")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           str(ragtune), "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}",
           f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=2", "train.save_steps=2",
           "train.logging_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1  # one report, from rank 0
    card = json.loads((out / "ragtune.json").read_text())
    m = card["metrics"]
    assert m["steps"] == 4
    rows = metric_rows(out, "loss")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["epoch"] == pytest.approx(0.8)  # 2 ranks x batch 2 x 4 steps = 16 of 20 records
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / ".ddp.saving").exists()


@pytest.mark.slow
def test_fsdp_config_trains_resumes_and_writes_the_whole_adapter(trainable_llama: Path, qa_file: Path,
                                                                   tmp_path: Path) -> None:
    """The shipped FSDP config through `accelerate launch`, on two CPU processes (tests/train/cpu_fsdp.py).
    Its checkpoints are sharded (SHARDED_STATE_DICT), for which Trainer.save_model writes nothing:
    the adapter must still hold every LoRA weight, unsharded, and equal what a resumed run continues."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "fsdp"
    port = free_port()

    def launch(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs/accelerate/fsdp.yaml"), "--mixed_precision", "no", "--num_processes", "2",
               "--main_process_port", str(port), str(root / "tests/train/cpu_fsdp.py"),
               "train", f"model.path={trainable_llama}", f"data.train_file={qa_file}", f"train.output_dir={out}",
               "train.batch_size=2", "train.save_steps=2", "train.logging_steps=1", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})

    proc = launch("train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1
    # FSDP really ran: its checkpoints hold sharded model and optimizer states
    assert (out / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert len(shapes) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in each of 2 blocks
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (16, 128)  # not a shard
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (64, 16)

    proc = launch("train.max_steps=6", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "ragtune.json").read_text())["metrics"]
    assert (m["steps"], m["resumed_from_step"]) == (6, 4)
    rows = metric_rows(out, "loss")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_busy_cores_count_other_processes_but_not_this_one() -> None:
    """train.threads=0 sizes torch's threads by the cores other processes use right now (the load
    average trails a minute behind and counts ragtune's own data check and model load)."""
    import subprocess
    import sys
    import threading

    from ragtune.train.device import other_busy_cores

    before = other_busy_cores(window=1.0)
    stop = threading.Event()

    def spin() -> None:  # this process's own work must not count
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        own = other_busy_cores(window=1.0)
    finally:
        stop.set()
        t.join()
    assert own < before + 0.5
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        other = other_busy_cores(window=1.0)
    finally:
        child.kill()
        child.wait()
    assert other >= 0.6  # a busy process next door is seen
