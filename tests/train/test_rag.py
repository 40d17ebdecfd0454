"""Training on retrieval-built prompts (train/rag.py): the gold-finding rule, served-prompt parity, the run card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import load_config
from ragtune.errors import UsageError
from ragtune.train.rag import cite, find_gold, match_score
from tests.train.conftest import chat, write_jsonl

HITS = [
    {"source": "travel.md", "text": "Book flights through Atlas at least 14 days ahead.", "chunk_id": "a"},
    {"source": "hr/remote_work.md", "text": "You may work remotely up to 2 days per week.", "chunk_id": "b"},
    {"source": "hr/remote_work.md", "text": "Core hours are 10:00 to 15:00.", "chunk_id": "c"},
    {"source": "leave_ko.md", "text": "연차는 1년 이상 근무한 직원에게 15일이 주어집니다.", "chunk_id": "d"},
]


def test_gold_given_by_the_record_s_sources_is_its_best_matching_chunk() -> None:
    assert find_gold("Up to 2 days per week.", HITS, ["remote_work.md"]) == (1, "sources")
    # a named document wins over a better-matching chunk elsewhere; within it, the best match
    assert find_gold("Core hours start at 10:00.", HITS, ["hr/remote_work.md"]) == (2, "sources")
    assert find_gold("Up to 2 days per week.", HITS, ["security.md"]) == (None, "its sources were not retrieved")


def test_gold_found_by_matching_the_answer_needs_its_numbers() -> None:
    assert find_gold("You can work remotely up to 2 days per week.", HITS) == (1, "match")
    assert find_gold("연차는 15일입니다.", HITS) == (3, "match")  # Hangul syllable pairs, not whole words
    # the words match but the number does not: not grounded in that chunk
    assert match_score("You can work remotely up to 3 days per week.", HITS[1]["text"]) == 0.0
    assert find_gold("You can work remotely up to 3 days per week.", HITS) == (None, "no retrieved chunk holds the answer")
    assert find_gold("I could not find this in the documents.", HITS)[0] is None


def test_cite_puts_the_number_before_the_closing_punctuation() -> None:
    assert cite("Up to 3 days per week.", 2) == "Up to 3 days per week [2]."
    assert cite("Yes", 1) == "Yes [1]"


DOCS = {
    "remote.md": "# Remote Work\n\n## How often\n\nYou may work remotely up to 2 days per week.\n",
    "expenses.md": "# Expenses\n\n## Deadline\n\nFile expense claims within 30 days of the purchase.\n",
    "badges.md": "# Security\n\n## Badges\n\nWear your badge visibly at all times inside the building.\n",
}
SYS = "You are the policy assistant."


def _index(tmp_path: Path, embedder: Path, name: str = "pol", docs: dict[str, str] = DOCS) -> tuple[Path, list[str]]:
    root = tmp_path / "docs"
    root.mkdir(exist_ok=True)
    for f, text in docs.items():
        (root / f).write_text(text, encoding="utf-8")
    emb = [f"embedder.path={embedder}", "embedder.device=cpu", f"index.name={name}"]
    assert main(["-q", "index", "sync", str(root), "--index", name, "--no-progress", *emb]) == 0
    return root, emb


def _data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [
        chat("How many days per week can I work remotely?", "You can work remotely up to 2 days per week.", SYS),
        {**chat("When must I file my expenses?", "Within 30 days of the purchase.", SYS), "sources": ["expenses.md"]},
        chat("Who approves the budget?", "I could not find this in the documents.", SYS),
    ])


@pytest.mark.parametrize("question_first", [False, True])
def test_training_prompts_equal_the_served_prompts_byte_for_byte(tmp_path: Path, tiny_llama: Path,
                                                                  tiny_embedder: Path, question_first: bool) -> None:
    from ragtune.serve.answer import open_retriever
    from ragtune.serve.generator import Generator
    from ragtune.train.recipe import prepare
    from ragtune.train.template import spans

    _, emb = _index(tmp_path, tiny_embedder)
    data = _data(tmp_path)
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.train_file={data}", "data.rag.index=pol",
                             "rag.top_k=2", "rag.min_score=-1", f"rag.question_first={question_first}", *emb])
    prep = prepare(cfg)
    assert prep.rag.block()["gold_found"] == 2 and prep.rag.missing == [3]
    assert prep.rag.block().get("question_first", False) is question_first  # recorded only when set
    assert prep.rag.gold[2]["how"] == "sources" and prep.rag.gold[1]["how"] == "match"
    gen = Generator(cfg).load()
    retriever = open_retriever(cfg, "pol")
    try:
        for rec in prep.train_records:
            question = [m for m in rec.messages if m["role"] != "assistant"]
            served = gen.prepare([{"role": "system", "content": SYS}, question[-1]], retriever=retriever)
            text, _ = spans(prep.tokenizer, rec.messages, prep.template)
            assert text.startswith(served.prompt), (text, served.prompt)
            answer = rec.messages[-1]["content"]
            assert text[len(served.prompt):].startswith(answer)
            assert len(served.sources) == 2 and "Sources:\n[1] " in served.prompt
            assert (f"Question: {question[-1]['content']}\n\nSources:\n" in served.prompt) is question_first
    finally:
        retriever.close()


def test_run_card_records_the_retrieval_and_resume_refuses_a_changed_index(
        tmp_path: Path, trainable_llama: Path, tiny_embedder: Path, caplog) -> None:
    from ragtune.runcard import read_runcard
    from ragtune.train.recipe import run_train

    root, emb = _index(tmp_path, tiny_embedder)
    data = _data(tmp_path)
    out = tmp_path / "run"
    over = [f"model.path={trainable_llama}", f"data.train_file={data}", "data.rag.index=pol", "data.rag.top_k=3",
            "data.rag.distractors=1", "data.rag.cite=true", "rag.min_score=-1", f"train.output_dir={out}",
            "train.max_steps=2", "train.save_steps=1", "train.batch_size=2", *emb]
    adapter = run_train(load_config(None, over))
    card = read_runcard(adapter)
    rag = card["rag"]
    assert (rag["index"], rag["top_k"], rag["distractors"], rag["withheld"], rag["cite"]) == ("pol", 3, 1, 0.0, True)
    assert rag["index_identity"].startswith("sha256:") and rag["prompt_format"] == 1 and rag["records"] == 3
    rows = [json.loads(x) for x in (adapter / "rag_prompts.jsonl").read_text(encoding="utf-8").splitlines()[1:]]
    first = rows[0]["messages"]
    assert first[-1]["content"] == f"You can work remotely up to 2 days per week [{rows[0]['gold']['n']}]."
    assert first[0]["content"].count("\n[") == 2  # the gold source and one distractor

    # serving it without an index: one warning, however many answers
    import logging

    from ragtune.serve.generator import Generator

    gen = Generator(load_config(None, [f"model.path={trainable_llama}", *emb])).load(adapters={"rag-t": str(adapter)})
    with caplog.at_level(logging.WARNING, logger="ragtune.serve.generator"):
        for _ in range(2):
            gen.answer([{"role": "user", "content": "How many remote days?"}], adapter="rag-t", max_new_tokens=2)
    assert sum("trained with sources retrieved from index 'pol'" in r.getMessage() for r in caplog.records) == 1

    # the index changes (one document's answer): --resume must not continue on other sources
    (root / "remote.md").write_text(DOCS["remote.md"].replace("2 days", "3 days"), encoding="utf-8")
    assert main(["-q", "index", "sync", str(root), "--index", "pol", "--no-progress", *emb]) == 0
    more = [x for x in over if not x.startswith("train.max_steps")] + ["train.max_steps=3"]
    with pytest.raises(UsageError, match="data.rag.index_identity"):
        run_train(load_config(None, more), resume=True)
    # the prompts' layout, instruction, source count or the search that chose the sources changes: none may
    # continue either (they were not compared)
    for setting, was in (("rag.question_first=true", "false"), ("rag.system_prompt=Answer from the sources.", '""'),
                         ("search.mode=dense", '"hybrid"'), ("search.dedupe=false", "true")):
        with pytest.raises(UsageError, match=setting.split("=")[0] + f": {was} in the checkpoints"):
            run_train(load_config(None, more + [setting]), resume=True)
    with pytest.raises(UsageError) as refused:  # data.rag.top_k=3 decides the sources here, not rag.top_k
        run_train(load_config(None, more + ["rag.top_k=5"]), resume=True)
    assert "rag.top_k" not in str(refused.value)


def test_data_check_rag_reports_gold_lengths_and_truncation(tmp_path: Path, tiny_llama: Path, tiny_embedder: Path,
                                                            capsys) -> None:
    _, emb = _index(tmp_path, tiny_embedder)
    capsys.readouterr()
    data = _data(tmp_path)
    common = ["data", "check", str(data), "--model", str(tiny_llama), "--rag", "pol", "rag.top_k=2", *emb]
    assert main(["-q", *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rag, plain = report["rag"], report["stats"]["tokens"]
    assert (rag["records"], rag["gold_found"], rag["gold_given"], rag["gold_missing_lines"]) == (3, 2, 1, [3])
    assert rag["tokens"]["min"] > 2 * plain["max"] and rag["over_max_length"] == 0 and rag["answer_truncated_lines"] == []
    # a max_length the sources fill: the answers are cut away, named by line, and the check fails
    assert main(["-q", *common, "--max-length", str(plain["max"] + 10)]) == 1
    out = capsys.readouterr().out
    assert "gold source found for 2 of 3 records" in out and "answers truncated away by their sources" in out
    assert "lines 1, 2, 3" in out


def test_describe_recipe_names_the_retrieval_settings() -> None:
    from ragtune.runcard import describe_recipe

    assert describe_recipe({}) == "trained on question -> answer (no sources in the prompt)"
    card = {"rag": {"index": "pol", "top_k": 3, "distractors": 1, "withheld": 0.2, "cite": True, "prompt_format": 1}}
    assert describe_recipe(card) == ("trained on retrieved sources: index 'pol', 1 distractor(s) beside the gold source "
                                     "(top_k 3), gold withheld for 20%, cites [n], prompt format 1")
    card["rag"]["withheld_answer"] = "not_found"
    assert "gold withheld for 20% (answered with the not-found message), cites" in describe_recipe(card)
    card["rag"]["question_first"] = True
    assert describe_recipe(card).endswith("cites [n], question above the sources, prompt format 1")


def test_an_adapter_served_in_another_source_layout_than_it_learned_is_warned_once(
        caplog: pytest.LogCaptureFixture) -> None:
    from ragtune.serve.generator import warn_rag_layout_differs

    card = {"rag": {"index": "pol", "question_first": True, "prompt_format": 1}}
    warn_rag_layout_differs(card, "qf", True)
    warn_rag_layout_differs({"rag": {"index": "pol"}}, "plainlayout", False)
    warn_rag_layout_differs({}, "notrag", True)
    assert "question_first" not in caplog.text
    warn_rag_layout_differs(card, "qf", False)
    warn_rag_layout_differs(card, "qf", False)
    assert caplog.text.count("adapter 'qf' was trained with rag.question_first=true but is served with "
                             "rag.question_first=false; set rag.question_first=true") == 1


@pytest.mark.parametrize("target", ["keep", "not_found"])
def test_withheld_records_lose_every_chunk_holding_their_answer_and_take_the_chosen_target(
        tmp_path: Path, tiny_embedder: Path, target: str) -> None:
    from ragtune.train.data import Record
    from ragtune.train.rag import build_rag

    _, emb = _index(tmp_path, tiny_embedder)
    qa = [("How many days per week can I work remotely?", "You can work remotely up to 2 days per week."),
          ("When must I file my expenses?", "Within 30 days of the purchase."),
          ("Must I wear my badge?", "Wear your badge visibly at all times inside the building.")]
    records = [Record(line=i, messages=chat(q, a, SYS)["messages"], raw="") for i, (q, a) in enumerate(qa, 1)]
    over = ["data.rag.index=pol", "rag.top_k=3", "rag.min_score=-1", "data.rag.withheld=0.34",
            f"data.rag.withheld_answer={target}", "rag.not_found_message=Not in the documents.", *emb]
    built = build_rag(load_config(None, over), records)
    withheld = [line for line, g in built.gold.items() if g.get("withheld")]
    assert len(withheld) == 1 and built.block()["withheld_records"] == 1  # round(0.34 x 3 found)
    for rec in built.records:
        prompt, answer = rec.messages[0]["content"], rec.messages[-1]["content"]  # the sources are in the system turn
        original = qa[rec.line - 1][1]
        if rec.line in withheld:
            assert original.rstrip(".").split()[-1] not in prompt  # its chunk is left out
            assert answer == (original if target == "keep" else "Not in the documents.")
        else:
            assert answer == original and "Sources:\n[1] " in prompt
    # seeded: the same record is withheld again; the default target leaves the settings (and old caches) unchanged
    assert [g.get("withheld") for g in build_rag(load_config(None, over), records).gold.values()] == \
        [g.get("withheld") for g in built.gold.values()]
    assert ("withheld_answer" in built.settings) == (target == "not_found")


def test_not_found_target_needs_a_not_found_message(tmp_path: Path, tiny_embedder: Path) -> None:
    from ragtune.train.rag import resolve_settings

    cfg = load_config(None, ["data.rag.index=pol", "data.rag.withheld=0.2", "data.rag.withheld_answer=not_found",
                             "rag.not_found_message="])
    with pytest.raises(UsageError, match="withheld_answer=not_found trains on rag.not_found_message, which is empty"):
        resolve_settings(cfg)
    with pytest.raises(Exception, match="data.rag.withheld_answer"):
        load_config(None, ["data.rag.withheld_answer=abstain"])


def test_shuffled_order_moves_the_gold_among_the_same_sources_and_is_seeded(tmp_path: Path, tiny_embedder: Path) -> None:
    import re

    from ragtune.runcard import describe_recipe
    from ragtune.train.data import Record
    from ragtune.train.rag import build_rag

    _, emb = _index(tmp_path, tiny_embedder)
    qa = [("How many days per week can I work remotely?", "You can work remotely up to 2 days per week."),
          ("When must I file my expenses?", "Within 30 days of the purchase."),
          ("Must I wear my badge?", "Wear your badge visibly at all times inside the building.")] * 3
    records = [Record(line=i, messages=chat(q, a, SYS)["messages"], raw="") for i, (q, a) in enumerate(qa, 1)]
    base = ["data.rag.index=pol", "rag.top_k=3", "rag.min_score=-1", *emb]

    def sources(built) -> dict[int, list[str]]:
        blocks = {r.line: re.split(r"\n\n(?=\[\d\] )", r.messages[0]["content"].split("Sources:\n", 1)[1])
                  for r in built.records}
        return {line: [re.sub(r"^\[\d\] ", "", x) for x in bs] for line, bs in blocks.items()}

    plain = build_rag(load_config(None, base), records)
    mixed = build_rag(load_config(None, [*base, "data.rag.order=shuffled"]), records)
    a, b = sources(plain), sources(mixed)
    assert all(len(a[line]) == 3 and sorted(a[line]) == sorted(b[line]) for line in a)  # the same sources
    assert any(a[line] != b[line] for line in a)  # in another order
    assert len({g["n"] for g in mixed.gold.values()}) > 1  # the gold is not always in one place
    for line, g in mixed.gold.items():  # the recorded number is where the gold chunk now stands
        assert b[line][g["n"] - 1] == a[line][plain.gold[line]["n"] - 1]
    assert sources(build_rag(load_config(None, [*base, "data.rag.order=shuffled"]), records)) == b  # seeded
    assert "order" not in plain.settings and mixed.block()["order"] == "shuffled"
    assert describe_recipe({"rag": mixed.block()}).endswith(", sources shuffled, prompt format 1")
    with pytest.raises(Exception, match="data.rag.order"):
        load_config(None, ["data.rag.order=random"])
