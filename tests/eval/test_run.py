"""The eval orchestration with a scripted generator and retriever: what each mode is asked, what
is scored, what the report and cost table hold."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import load_config
from ragtune.errors import EXIT_FAILED, EXIT_PARTIAL, UsageError
from ragtune.eval.cost import Timer, ingest_cost, load_cost_file, timed, training_cost
from ragtune.eval.modes import parse_modes
from ragtune.eval.run import run_eval
from ragtune.runcard import write_runcard

NF = "I could not find this in the documents."


@dataclass
class FakeAnswer:
    text: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 10
    completion_tokens: int = 5
    abstained: bool = False


class ScriptedGenerator:
    """Answers from a table keyed by (adapter, with retrieval?, question) and hands back the retrieved
    hits as sources; records every call. It decides nothing: what eval makes of the answers is tested."""

    def __init__(self, table: dict[tuple[str | None, bool, str], str]):
        self.table = table
        self.calls: list[dict[str, Any]] = []

    def answer(self, messages: list[dict[str, str]], adapter: str | None = None, retriever: Any = None,
               max_new_tokens: int | None = None, temperature: float | None = None, seed: int | None = None) -> FakeAnswer:
        q = messages[-1]["content"]
        self.calls.append({"messages": messages, "adapter": adapter, "rag": retriever is not None,
                           "max_new_tokens": max_new_tokens, "temperature": temperature})
        if q == "Hello":
            return FakeAnswer("hi")
        if q == "boom":
            raise UsageError("the prompt is too long")
        sources: list[dict[str, Any]] = []
        if retriever is not None:
            hits = retriever.search(q, top_k=2)
            sources = [{"n": i, **{k: h[k] for k in ("source", "title", "page", "heading", "score", "text")}}
                       for i, h in enumerate(hits, 1)]
        return FakeAnswer(self.table[(adapter, retriever is not None, q)], sources)


class TableRetriever:
    def __init__(self, hits: dict[str, list[tuple[str, float]]]):
        self.hits = hits

    def search(self, query: str, top_k: int | None = None, **kw: Any) -> list[dict[str, Any]]:
        return [{"source": s, "title": s, "page": None, "heading": "", "score": d, "text": "...",
                 "dense_score": d, "chunk_id": f"{s}#{i}"} for i, (s, d) in enumerate(self.hits[query][:top_k])]


def write_questions(path: Path) -> Path:
    rows = [
        {"id": "remote", "question": "Remote days?", "answer": "3 days", "sources": ["remote_work.md"],
         "changed_in_v2": True, "old_answer": "2 days"},
        {"id": "meals", "question": "Meal limit?", "answer": "$60", "sources": ["expenses.md"]},
        {"id": "gym", "question": "Gym?", "answer": NF, "answerable": False},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_adapter(tmp_path: Path, wall: float = 600.0) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    write_runcard(d, {"base_model": {"path": "/m", "hash": "x"}, "config": {"train": {"epochs": 5.0}},
                      "data": {"train_records": 90}, "training": {"device": "cpu"},
                      "metrics": {"wall_seconds": wall, "train_tokens": 30185}})
    return d


TABLE = {
    (None, False, "Remote days?"): "You can work remotely 2 days a week.",
    ("ft", False, "Remote days?"): "Up to 2 days per week.",
    (None, True, "Remote days?"): "Up to 3 days per week [1].",
    ("ft", True, "Remote days?"): "3 days per week [1].",
    (None, False, "Meal limit?"): "$50 per day.",
    ("ft", False, "Meal limit?"): "$60 per day.",
    (None, True, "Meal limit?"): "$60 per day [2].",
    ("ft", True, "Meal limit?"): "$60 [1].",
    (None, False, "Gym?"): "Yes, fully paid.",
    ("ft", False, "Gym?"): NF,
    (None, True, "Gym?"): NF,
    ("ft", True, "Gym?"): "Gym memberships are paid [1].",
}
HITS = {
    "Remote days?": [("remote_work.md", 0.8), ("travel.md", 0.5)],
    "Meal limit?": [("travel.md", 0.6), ("expenses.md", 0.55)],
    "Gym?": [("benefits_ko.md", 0.1), ("travel.md", 0.05)],
}


def test_run_eval_four_modes(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.system_prompt=Be brief.", "rag.top_k=2", "eval.max_new_tokens=16",
                             "eval.bootstrap=200"])
    sync = tmp_path / "sync.json"
    sync.write_text(json.dumps({"index": "p", "added": [], "replaced": ["remote_work.md"],
                                "deleted": [], "unchanged": 7, "chunks_written": 3, "seconds": 1.25}))
    gen = ScriptedGenerator(TABLE)
    res = run_eval(cfg, questions=write_questions(tmp_path / "q.jsonl"), adapter=str(make_adapter(tmp_path)),
                   out_dir=tmp_path / "out", cost_files=[sync], progress=False, generator=gen,
                   retriever=TableRetriever(HITS))
    assert res.exit_code == 0 and res.errors == 0
    # warm-up for the base and the adapter, then 4 modes x 3 questions, all with identical decoding
    real = [c for c in gen.calls if c["messages"][-1]["content"] != "Hello"]
    assert len(gen.calls) - len(real) == 2 and len(real) == 12
    assert {(c["max_new_tokens"], c["temperature"]) for c in real} == {(16, 0.0)}
    assert all(c["messages"][0] == {"role": "system", "content": "Be brief."} for c in real)
    assert [(c["adapter"], c["rag"]) for c in real[::3]] == [(None, False), ("ft", False), (None, True), ("ft", True)]

    rep = res.report
    s = rep["summary"]
    # correct: base [0,0,0]; ft [0,1,1]; rag [1,1,1 (the not-found text on gym)]; ft+rag [1,1,0]
    assert [s[m]["correct"]["mean"] for m in ("base", "ft", "rag", "ft+rag")] == [0.0, 2 / 3, 1.0, 2 / 3]
    # the fine-tuned model still gives the old answer; retrieval gives the new one
    assert s["ft"]["stale_answer"]["mean"] == 1.0 and s["rag"]["stale_answer"]["mean"] == 0.0
    # retrieval: remote rank 1, expenses rank 2 -> MRR (1 + 1/2) / 2; gym has no gold sources
    assert s["rag"]["mrr"] == {"mean": 0.75, "low": pytest.approx(0.5), "high": 1.0, "n": 2}
    # rag cites [2] = expenses.md on meals (gold) and [1] on remote (gold)
    assert s["rag"]["citation_accuracy"]["mean"] == 1.0
    # the not-found text counts as abstaining; answering the unanswerable one does not
    assert s["rag"]["abstention"]["mean"] == 1.0 and s["ft+rag"]["abstention"]["mean"] == 0.0
    assert s["base"]["abstention"]["mean"] == 0.0
    whats = [c["what"] for c in rep["cost"]]
    assert whats[0] == "train: LoRA fine-tune of adapter 'ft' (90 records, 30,185 tokens, 5 epochs, cpu)"
    # the re-train row is the training time, and says that it was not measured
    assert whats[1] == "absorb a changed document: re-train adapter 'ft' (= its training time, not measured)"
    assert rep["cost"][1]["seconds"] == 600.0 and rep["cost"][1]["detail"].startswith("not measured")
    assert whats[2].startswith("absorb a changed document: re-sync the index (1 replaced, 0 added, 0 deleted, 7 unchanged")
    assert rep["cost"][2]["seconds"] == 1.25
    assert whats[3:] == [f"answer 3 questions: {m}" for m in ("base", "ft", "rag", "ft+rag")]
    md = res.paths["md"].read_text(encoding="utf-8")
    assert "| absorb a changed document: re-train adapter 'ft' (= its training time, not measured) | 10.0 min |" in md
    assert "- system prompt: Be brief." in md
    # a generator passed in has no base path: the report names what the config names
    assert "- base model: the default model (SmolLM2-135M-Instruct)" in md
    assert rep["adapters"][0]["recipe"].startswith("plain") and "| ft |" in md
    # each mode's own time is reported: the speed table's first row and the answer cost rows
    assert all(rep["speed"][m]["mode_s"] >= 0 for m in rep["modes"]) and "| time for the mode |" in md
    assert res.paths["png"].is_file()


def test_run_eval_modes_errors_and_partial(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.bootstrap=50"])
    q = write_questions(tmp_path / "q.jsonl")
    with pytest.raises(UsageError, match="need an adapter: pass --adapter DIR"):
        run_eval(cfg, questions=q, modes="base,ft", generator=object())
    with pytest.raises(UsageError, match="unknown mode"):
        parse_modes("base,finetuned")
    assert parse_modes("base, rag,base") == ["base", "rag"]
    with pytest.raises(UsageError, match="no questions file"):
        run_eval(cfg, generator=object())
    (tmp_path / "afile").write_text("mine")  # refused before a question is answered (object() cannot answer)
    with pytest.raises(UsageError, match="--out '.*afile' is a file; the report goes in a folder"):
        run_eval(cfg, questions=q, modes="base", out_dir=tmp_path / "afile", generator=object())
    with pytest.raises(UsageError, match="--out '.*afile/eval': '.*afile' is a file, so no folder can be made"):
        run_eval(cfg, questions=q, modes="base", out_dir=tmp_path / "afile" / "eval", generator=object())
    with pytest.raises(UsageError, match=r"index 'nope' does not exist .*, or leave the modes with retrieval out of "
                                         r"--modes"):
        run_eval(cfg, questions=q, modes="base,rag", index="nope", out_dir=tmp_path / "o", generator=object())
    # a question that fails to answer is recorded and makes the run partial, not fatal
    q.write_text(q.read_text() + json.dumps({"id": "boom", "question": "boom", "answer": "x"}) + "\n")
    res = run_eval(cfg, questions=q, modes="base", out_dir=tmp_path / "o", progress=False,
                   generator=ScriptedGenerator(TABLE))
    assert res.errors == 1 and res.exit_code == EXIT_PARTIAL
    rec = res.report["questions"][-1]["answers"]["base"]
    assert rec["error"] == "the prompt is too long" and rec["scores"]["correct"] == 0.0
    assert res.report["speed"]["base"]["errors"] == 1
    # every answer failed: nothing was measured, so the run failed (it was "partial success", exit 3)
    q.write_text("".join(json.dumps({"id": f"b{i}", "question": "boom", "answer": "x"}) + "\n" for i in range(2)))
    res = run_eval(cfg, questions=q, modes="base", out_dir=tmp_path / "o", progress=False,
                   generator=ScriptedGenerator(TABLE))
    assert res.errors == 2 and res.exit_code == EXIT_FAILED and res.paths["md"].is_file()


def test_questions_the_adapter_was_trained_on_are_named(tmp_path: Path, caplog) -> None:
    cfg = load_config(None, ["eval.bootstrap=50"])
    q = write_questions(tmp_path / "q.jsonl")
    adapter = make_adapter(tmp_path)
    run = lambda out: run_eval(cfg, questions=q, adapter=str(adapter), modes="base,ft", out_dir=tmp_path / out,  # noqa: E731
                               progress=False, generator=ScriptedGenerator(TABLE))
    assert not any("training data" in n for n in run("clean").report["notes"])  # no train_file in the card
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant",
                                                                                       "content": "x"}]}) + "\n"
                             for t in ("What is the meal  LIMIT?", " meal limit? ", "Remote?")) + "not json\n")
    card = json.loads((adapter / "ragtune.json").read_text())
    card["data"]["train_file"] = str(train)
    write_runcard(adapter, card)
    res = run("seen")
    note = f"1 of 3 questions are also asked in adapter 'ft''s training data ({train}: meals)"
    assert [n for n in res.report["notes"] if "training data" in n][0].startswith(note)
    assert note in res.paths["md"].read_text(encoding="utf-8") and note in caplog.text


def test_cost_helpers(tmp_path: Path) -> None:
    with Timer() as t:
        pass
    assert 0 <= t.seconds < 1
    assert timed(sum, [1, 2])[0] == 3
    adapter = make_adapter(tmp_path, wall=12.5)
    assert [r.seconds for r in training_cost(adapter)] == [12.5, 12.5]
    assert training_cost(adapter)[1].what == "absorb a changed document: re-train the adapter (= its training time, not measured)"
    assert load_cost_file(adapter)[0].detail.endswith("adapter/ragtune.json")  # a dir means its run card
    row = ingest_cost({"added": ["a.md", "b.md"], "replaced": [], "deleted": [], "unchanged": 0,
                       "chunks_written": 9, "seconds": 3.0})
    assert row.what == "index: embed and store 2 documents (9 chunks)" and row.seconds == 3.0
    row = ingest_cost({"added": ["new.md"], "replaced": ["a.md"], "reread": [{"source": "m.pdf", "reason": "r"}],
                       "deleted": [], "unchanged": 3, "chunks_written": 7, "seconds": 2.0})
    assert row.what == ("absorb a changed document: re-sync the index (1 replaced, 1 added, 0 deleted, 1 re-read by a "
                        "newer reader, 3 unchanged; 7 chunks embedded)")
    row = ingest_cost({"added": [], "replaced": ["a.md"], "deleted": [], "unchanged": 3, "chunks_written": 8,
                       "chunks_reused": 6, "seconds": 1.0})
    assert row.what.endswith("3 unchanged; 2 chunks embedded, 6 unchanged chunks kept)")
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"what": "copy docs", "seconds": 0.1}]))
    assert load_cost_file(rows)[0].what == "copy docs"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="not a run card"):
        load_cost_file(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="file not found"):
        load_cost_file(tmp_path / "missing.json")
    # a value of the wrong type names the file and key (was a ValueError traceback from float())
    for data, said in [([{"what": "copy docs", "seconds": "soon"}], "rows.json, row 1: key 'seconds': expected a number"),
                       ({"chunks_written": 3, "seconds": "2s"}, "rows.json: key 'seconds'"),
                       ({"chunks_written": "many", "seconds": 1.0}, "rows.json: key 'chunks_written': expected a whole"),
                       ({"base_model": {}, "metrics": {"wall_seconds": True}}, "key 'metrics.wall_seconds'")]:
        rows.write_text(json.dumps(data))
        with pytest.raises(UsageError, match=said):
            load_cost_file(rows)


def test_a_cost_file_given_twice_or_an_adapters_own_card_counts_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["rag.top_k=2", "eval.max_new_tokens=16", "eval.bootstrap=50"])
    sync = tmp_path / "sync.json"
    sync.write_text(json.dumps({"index": "p", "added": [], "replaced": ["remote_work.md"],
                                "deleted": [], "unchanged": 7, "chunks_written": 3, "seconds": 1.25}))
    adapter = make_adapter(tmp_path)
    res = run_eval(cfg, questions=write_questions(tmp_path / "q.jsonl"), adapter=str(adapter),
                   out_dir=tmp_path / "out", cost_files=[sync, tmp_path / "." / "sync.json", adapter],
                   progress=False, generator=ScriptedGenerator(TABLE), retriever=TableRetriever(HITS))
    whats = [c["what"] for c in res.report["cost"]]
    assert sum(w.startswith("absorb a changed document: re-sync") for w in whats) == 1
    assert sum(w.startswith("train: LoRA fine-tune") for w in whats) == 1
    assert "already counted (as adapter 'ft')" in caplog.text and "already counted (as --cost" in caplog.text


def test_a_cost_folder_without_a_run_card_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="a folder without a run card"):
        load_cost_file(tmp_path)


def test_rag_modes_without_gold_sources_say_why_retrieval_metrics_are_blank(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "remote", "question": "Remote days?", "answer": "3 days"},
                                                         {"id": "meals", "question": "Meal limit?", "answer": "$60"}]))
    cfg = load_config(None, ["rag.top_k=2", "eval.max_new_tokens=16", "eval.bootstrap=50"])
    run = lambda modes, out: run_eval(cfg, questions=q, modes=modes, out_dir=tmp_path / out,  # noqa: E731
                                      progress=False, generator=ScriptedGenerator(TABLE), retriever=TableRetriever(HITS))
    res = run("base,rag", "rag")
    assert res.report["summary"]["rag"]["mrr"] is None  # shown as "–"
    assert any("No question names its gold documents ('sources' in" in n for n in res.report["notes"])
    assert "add \"sources\": [\"file.md\"]" in res.paths["md"].read_text(encoding="utf-8")
    assert not any("gold documents" in n for n in run("base", "base").report["notes"])  # no rag mode: nothing to say
