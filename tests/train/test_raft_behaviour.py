"""The behaviour retrieval-aware training exists for: a model trained on retrieval-built prompts answers from
a source it never saw in training when serving retrieves that source (the fact is only in the document).

The path is the product's: documents -> `ragtune index sync` -> `data.rag` prompts (ragtune.train.rag,
through `rag_messages`: the gold source beside a retrieved distractor) -> `run_train` (TRL SFTTrainer + LoRA)
-> `Generator` answering with the sources it retrieves.

The task is sized for a tiny random model, which cannot learn to read English in a test: each account has a
document holding its code (three code words, one from each of three word sets, at a varying position among
filler words) and a notes document without it; the question names the account, the answer is its code.
Both documents are retrieved for the question, in either order. No code can be recalled from memory: the
asked accounts were never in a training record and their codes are combinations no record has, so the only
way to answer is to copy from the prompt.

What it takes (measured while writing this test): a 2-layer, 128-wide, 8-head model over a word-level
vocabulary, LoRA r=64 on every linear layer, lr 3e-3, batches of 32: the loss sits near 3 (some code word,
not the document's) for a while, then falls to ~0.1 as the copy forms. With the final norm scaled x10 that
took ~170 steps (400 were run); scaled x20 (bolder logits from the start) ~140, and 300 steps are run.
64 wide, 4 heads, batches of 16, fewer steps or a decaying learning rate left it on the plateau or copying
only some of the code's three words; so did lr 4e-3 to 1e-2, a x40 norm, LoRA r=16 or 32, LoRA on the
attention layers only and 96 wide, within 200 steps; with 200 training records the model learnt their
codes by heart (loss 0.2) and copied none. Runs with the same seeds used to differ: the code and notes
documents of an account often tie in BM25, and ties came back in the order of the chunk ids, which hash
the folder's absolute path (a new tmp_path each run), so the training prompts' source order changed.
Ties now rank by source name (retrieval/search.py `_canonical`) and a run is reproducible: 7 of the 8
unseen accounts answered exactly, the same adapter byte for byte across runs and PYTHONHASHSEEDs. Before
that, over several runs: at 300 steps 8, 8, 7 and 6 (four data/training seeds), at 250 steps 8, 8 and 7,
at 200 steps 7, 8, 8 and 5. The test asks for 4, half (a guess matches a code one time in 8000; trained
without data.rag, 0 of 8), which leaves room for another CPU's float rounding, and none from the controls.
About 1 minute on a shared 2-core CPU (load average 4).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ragtune.cli import main
from ragtune.config import load_config
from tests.tinymodels import CHAT_TEMPLATE, SPECIALS
from tests.train.conftest import chat, write_jsonl

SYSTEM = "Copy the code from the sources ."
CODE_SLOTS = [[f"{s}{i}" for i in range(20)] for s in ("ka", "kb", "kc")]
FILLER = ("red blue green tall short old new big small fast slow warm cold dark light soft hard wide long "
          "thin").split()
TRAIN_RECORDS = 400
HELD_OUT = 8  # accounts indexed but never in a training record
MIN_EXACT = 4  # of the HELD_OUT accounts, answered with exactly their code


def _doc(rng: random.Random, name: str, code: list[str]) -> str:
    before = rng.sample(FILLER, rng.randint(0, 3))
    after = rng.sample(FILLER, rng.randint(0, 2))
    return " ".join([*before, "The", name, "code", ":", *code, ".", *after]) + "\n"


def _notes(rng: random.Random, name: str) -> str:
    """The distractor retrieved beside the gold source: the same account, no code."""
    return " ".join(["Notes", "on", name, ":", *rng.sample(FILLER, rng.randint(2, 5)), "."]) + "\n"


def _question(name: str) -> str:
    return f"What does {name} use ?"


def _words(texts: list[str]) -> list[str]:
    return [w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)]  # what the Whitespace pre-tokenizer splits


def build_word_llama(out: Path, words: list[str], hidden: int = 128, seed: int = 0) -> Path:
    """A tiny random 2-layer Llama over a word-level vocabulary (one token per word: short prompts, one token
    per code word), with tiny_llama's chat template. Its words are the ones the test's documents, questions,
    instruction and chat template use (the test checks that no training prompt has an unknown token)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:3]})
    tok.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random tied embeddings (std 0.02) bound the logits to ~+-1: see trainable_llama;
        model.model.norm.weight.mul_(20)  # x20 forms the copy sooner than x10 (module docstring)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.mark.slow
def test_rag_trained_model_answers_from_a_source_it_never_saw(tmp_path: Path, tiny_embedder: Path) -> None:
    from ragtune.runcard import read_runcard
    from ragtune.serve.answer import open_retriever
    from ragtune.serve.generator import Generator
    from ragtune.train.recipe import run_train
    from tests.tinymodels import torch_threads

    rng = random.Random(0)
    names = [f"acct{i}" for i in range(TRAIN_RECORDS + HELD_OUT)]
    codes: list[list[str]] = []
    while len(codes) < len(names):
        code = [rng.choice(slot) for slot in CODE_SLOTS]
        if code not in codes:  # every account's code is its own: a held-out one is in no training record
            codes.append(code)
    docs = {f"{n}.md": _doc(rng, n, c) for n, c in zip(names, codes)}
    docs.update({f"{n}-notes.md": _notes(rng, n) for n in names})
    root = tmp_path / "docs"
    root.mkdir()
    for f, text in docs.items():
        (root / f).write_text(text, encoding="utf-8")
    template_words = "system user assistant Sources : [ 1 ] [ 2 ]"
    vocab = sorted(set(_words([SYSTEM, template_words, *docs, *docs.values(), *map(_question, names)])))
    model_dir = build_word_llama(tmp_path / "word-llama", vocab)

    # lexical search: the question's account name finds its two documents (the tiny embedder's dense scores are noise)
    common = [f"model.path={model_dir}", f"embedder.path={tiny_embedder}", "embedder.device=cpu", "index.name=accts",
              "search.mode=sparse", "rag.top_k=2", "rag.min_score=-1", f"rag.system_prompt={SYSTEM}",
              "generation.max_new_tokens=6"]
    assert main(["-q", "index", "sync", str(root), "--index", "accts", "--no-progress", *common]) == 0
    data = write_jsonl(tmp_path / "train.jsonl", [{**chat(_question(n), " ".join(c)), "sources": [f"{n}.md"]}
                                                  for n, c in zip(names[:TRAIN_RECORDS], codes[:TRAIN_RECORDS])])
    train = [f"data.train_file={data}", "data.rag.index=accts", "data.rag.distractors=1", "data.max_length=96",
             f"train.output_dir={tmp_path / 'run'}", "train.max_steps=300", "train.batch_size=32",
             "train.learning_rate=3e-3", "train.lr_scheduler=constant", "train.warmup_ratio=0.1",
             "train.lora.r=64", "train.lora.alpha=64", "train.lora.dropout=0", "train.save_steps=100000",
             "train.logging_steps=10", "train.threads=1", "train.group_by_length=false"]
    adapter = run_train(load_config(None, [*common, *train]))

    rag = read_runcard(adapter)["rag"]
    assert (rag["records"], rag["gold_found"], rag["distractors"], rag["top_k"]) == (TRAIN_RECORDS, TRAIN_RECORDS, 1, 2)
    prompts = (adapter / "rag_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(x) for x in prompts.splitlines()[1:]]
    assert {r["gold"]["n"] for r in rows} == {1, 2}  # the gold source came first for some records, second for others
    first = json.loads(prompts.splitlines()[1])["messages"]
    assert "Sources:\n[1] " in first[0]["content"] and "\n\n[2] " in first[0]["content"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.unk_token_id not in tok.apply_chat_template(first, tokenize=True, return_dict=True)["input_ids"]
    for n, c in zip(names[TRAIN_RECORDS:], codes[TRAIN_RECORDS:]):
        for fact in (n, " ".join(c)):  # the fact is only in the document
            assert not re.search(rf"(?<!\w){fact}(?!\w)", prompts), fact
    losses = [round(r["loss"], 3) for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]

    cfg = load_config(None, common)
    gen = Generator(cfg).load(adapters={"raft": str(adapter)})
    retriever = open_retriever(cfg, "accts")
    exact, seen = 0, []
    try:
        with torch_threads(1):
            for n, c in zip(names[TRAIN_RECORDS:], codes[TRAIN_RECORDS:]):
                ask = [{"role": "user", "content": _question(n)}]
                ans = gen.answer(ask, adapter="raft", retriever=retriever)
                base = gen.answer(ask, retriever=retriever)
                bare = gen.answer(ask, adapter="raft")
                seen.append(f"{n} code {' '.join(c)!r}: trained+sources {ans.text!r}, base+sources {base.text!r}, "
                            f"trained alone {bare.text!r}")
                assert {s["source"] for s in ans.sources} == {f"{n}.md", f"{n}-notes.md"}, seen[-1]
                exact += ans.text.split() == c  # read from the retrieved document
                assert " ".join(c) not in base.text, seen[-1]  # not something the base model says anyway
                assert " ".join(c) not in bare.text, seen[-1]  # nor what the adapter recalls without the document
    finally:
        retriever.close()
    assert exact >= MIN_EXACT, "\n".join([f"{exact} of {HELD_OUT} exact; loss every 10 steps {losses}", *seen])
