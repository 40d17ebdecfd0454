"""`ragtune eval` end to end as a user runs it: tiny model + LoRA adapter, tiny embedder, a real
index of the example policies re-synced from v1 to v2, the four modes, the report files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ragtune.cli import main

EX = Path(__file__).resolve().parents[2] / "examples" / "policies"
SYSTEM = "You are the Northwind Robotics policy assistant. Answer in one short sentence."
KEEP = ("remote-days-1", "meals", "annual-leave", "gym")  # changed, unchanged, Korean, unanswerable


def tiny_adapter(base: Path, out: Path, steps: int = 15) -> Path:
    """A LoRA nudged towards v1's remote-work answer, with a run card like `ragtune train` writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tinymodels import write_adapter_card

    t0 = time.time()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many remote days?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok("Up to 2 days per week.<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    labels = torch.tensor([[-100] * len(p_ids) + a_ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out), safe_serialization=True)
    write_adapter_card(out, base, tok.chat_template, config={"train": {"max_steps": steps}},
                       data={"train_records": 1}, metrics={"wall_seconds": round(time.time() - t0, 2)},
                       training={"device": "cpu"})
    return out


@pytest.mark.slow
def test_eval_end_to_end(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is fastest
    overrides = [f"model.path={tiny_llama}", "model.device=cpu", f"embedder.path={tiny_embedder}",
                 "embedder.device=cpu", "rag.top_k=3", "rag.min_score=-1.0", "eval.max_new_tokens=6",
                 "eval.bootstrap=100", f"eval.system_prompt={SYSTEM}",
                 "eval.engine=transformers"]  # llama.cpp's converter rejects the tiny model's own tokenizer
    adapter = tiny_adapter(tiny_llama, tmp_path / "adapter")

    # index v1, then the policies change: re-sync the same folder with v2 and keep the measured result
    docs = tmp_path / "docs"
    shutil.copytree(EX / "docs_v1", docs)
    assert main(["index", "add", str(docs), "--index", "policies", "--json", *overrides]) == 0
    added = json.loads(capsys.readouterr().out)
    assert len(added["added"]) == 8
    for f in (EX / "docs_v2").iterdir():
        shutil.copyfile(f, docs / f.name)
    assert main(["index", "sync", str(docs), "--index", "policies", "--json", *overrides]) == 0
    sync_out = capsys.readouterr().out
    sync = json.loads(sync_out)
    assert sorted(sync["replaced"]) == ["expenses.md", "leave_ko.md", "remote_work.md", "security.md"]
    (tmp_path / "add.json").write_text(json.dumps(added))
    (tmp_path / "sync.json").write_text(sync_out)

    qs = [json.loads(line) for line in (EX / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in qs if q["id"] in KEEP),
                     encoding="utf-8")
    out = tmp_path / "report"
    rc = main(["eval", "--questions", str(qfile), "--adapter", str(adapter), "--index", "policies",
               "--out", str(out), "--cost", str(tmp_path / "add.json"), "--cost", str(tmp_path / "sync.json"),
               "--no-progress", *overrides, "eval.concurrency=1"])  # one at a time: the reference below
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ft+rag" in printed and f"report: {out / 'report.md'}" in printed

    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["modes"] == ["base", "ft", "rag", "ft+rag"] and rep["n_questions"] == len(KEEP)
    for mode in rep["modes"]:
        assert rep["summary"][mode]["correct"]["n"] == len(KEEP)
        assert rep["speed"][mode]["latency_p50_s"] > 0 and rep["speed"][mode]["errors"] == 0
    # retrieval metrics exist only where there was retrieval, over the answerable questions
    assert rep["summary"]["base"]["recall_at_k"] is None
    assert rep["summary"]["rag"]["recall_at_k"]["n"] == len(KEEP) - 1
    # retrieved sources cost prompt tokens
    assert rep["speed"]["rag"]["prompt_tokens_mean"] > rep["speed"]["base"]["prompt_tokens_mean"] + 50
    # the base model ignores the adapter: base and ft differ only where the adapter changed the answer
    answers = {m: [q["answers"][m]["answer"] for q in rep["questions"]] for m in rep["modes"]}
    assert answers["base"] != answers["ft"]
    whats = [c["what"] for c in rep["cost"]]
    assert whats[0].startswith("train: LoRA fine-tune of adapter 'ft' (1 records, 15 steps, cpu)")
    assert "absorb a changed document: re-train adapter 'ft' (= its training time, not measured)" in whats
    assert any(w.startswith("index: embed and store 8 documents") for w in whats)
    assert any(w.startswith("absorb a changed document: re-sync the index (4 replaced, 0 added, 0 deleted, 4 unchanged")
               for w in whats)
    assert rep["meta"]["engine"] == "transformers (cpu)" and rep["meta"]["base model"] == str(tiny_llama)
    md = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Quality", "## Best mode per metric", "## Speed", "## Cost (measured on this machine)",
                    "## Questions by `changed_in_v2`", "## Where the modes disagree"):
        assert heading in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    # the default eval.concurrency (8): the questions of a mode queued at once (the transformers engine
    # batches them) give the same answers, the same retrieved sources and scores, in question order
    out2 = tmp_path / "report-concurrent"
    rc = main(["eval", "--questions", str(qfile), "--adapter", str(adapter), "--index", "policies",
               "--out", str(out2), "--no-progress", *overrides])
    assert rc == 0, capsys.readouterr().out
    rep2 = json.loads((out2 / "report.json").read_text(encoding="utf-8"))
    assert [q["id"] for q in rep2["questions"]] == [q["id"] for q in rep["questions"]]
    for q1, q2 in zip(rep["questions"], rep2["questions"]):
        for mode in rep["modes"]:
            a1, a2 = q1["answers"][mode], q2["answers"][mode]
            assert a2["answer"] == a1["answer"], (q1["id"], mode)
            assert [s["source"] for s in a2["sources"]] == [s["source"] for s in a1["sources"]]
            assert a2["scores"] == a1["scores"], (q1["id"], mode)
    assert "queued together sorted by prompt" in rep2["meta"]["decoding"]
    assert main(["eval", "--questions", str(qfile), "--out", str(tmp_path / "r3"), *overrides,
                 "eval.concurrency=0"]) == 2
    assert "key 'eval.concurrency': must be at least 1, got 0" in capsys.readouterr().err
