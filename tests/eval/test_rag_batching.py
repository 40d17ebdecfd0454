"""eval.concurrency on the llama.cpp engine: the answers of a mode with sources are decoded together,
like those of a mode without, instead of queueing behind retrieval or their long prompts.

Real stack: tests/conftest.py's tiny SmolLM2-tokenizer Llama (its f16 GGUF), the tiny embedder, an
index of the example policies (v1), and `run_eval` with its thread pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ragtune.cli import main
from tests.export.conftest import NEEDS_LLAMA_CPP

pytestmark = NEEDS_LLAMA_CPP
EX = Path(__file__).resolve().parents[2] / "examples" / "policies"
SLOTS = 3
MAX_NEW = 16  # eval.max_new_tokens; the warm-up answer asks for 2


class _Batches:
    """Wraps the engine's decode: how many sequences got a token from each llama.cpp call, per mode.

    The first call of a mode's first answer waits (in the scheduler's thread) until SLOTS requests are
    in the scheduler, so that the tiny model cannot finish an answer before the next question's retrieval
    is done: what is measured is then how the scheduler batches them, not which thread won a race."""

    def __init__(self, engine: Any):
        self.engine, self.real = engine, engine.decode
        self.mode = ""
        self.seen: dict[str, list[int]] = {}
        self.gated: set[str] = set()

    def __call__(self, items: Any) -> Any:
        sched = self.engine.scheduler
        if self.mode not in self.gated and any(s.req.budget == MAX_NEW for s in sched._running):
            self.gated.add(self.mode)
            deadline = time.monotonic() + 60
            while sched.active + sched.waiting < SLOTS:
                assert time.monotonic() < deadline, f"{self.mode}: {SLOTS} questions never reached the engine"
                time.sleep(0.01)
        self.seen.setdefault(self.mode, []).append(sum(1 for it in items if it[3]))
        return self.real(items)


def test_rag_mode_answers_are_decoded_together(tiny_smol: Path, tiny_embedder: Path, converter_home: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ragtune.config import load_config
    from ragtune.eval.run import run_eval
    from ragtune.serve.generator import Generator

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))  # the session's GGUF cache: tiny_smol exported once
    overrides = [f"model.path={tiny_smol}", "model.device=cpu", f"embedder.path={tiny_embedder}",
                 "embedder.device=cpu", "index.name=rag-batching", "chunk.size=16", "chunk.overlap=0",
                 "rag.top_k=2", "rag.min_score=-1.0",
                 "generation.threads=1", f"serve.max_batch={SLOTS}", f"eval.concurrency={SLOTS}",
                 f"eval.max_new_tokens={MAX_NEW}", "eval.bootstrap=50"]
    assert main(["index", "add", str(EX / "docs_v1"), "--json", *overrides]) == 0
    capsys.readouterr()
    qs = [json.loads(line) for line in (EX / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in qs[:2 * SLOTS]), encoding="utf-8")

    cfg = load_config(None, overrides)
    gen = Generator(cfg, engine="llama.cpp").load()
    batches = _Batches(gen.engine_impl)
    monkeypatch.setattr(gen.engine_impl, "decode", batches)
    reports = {}
    for mode in ("base", "rag"):
        batches.mode = mode
        res = run_eval(cfg, questions=qfile, modes=mode, out_dir=tmp_path / mode, progress=False, generator=gen)
        assert res.exit_code == 0 and res.errors == 0
        reports[mode] = res.report
    gen.engine_impl.close()

    rag, base = reports["rag"]["speed"]["rag"], reports["base"]["speed"]["base"]
    # two sources in every prompt; short ones, so that SLOTS prompts fit the tiny model's 512 cells at once
    assert rag["prompt_tokens_mean"] > base["prompt_tokens_mean"] + 50, (rag, base)
    assert not any(q["answers"]["rag"]["abstained"] for q in reports["rag"]["questions"])
    # the rag answers shared llama.cpp calls as the base answers did: every slot got a token from one
    # call, for the length of a whole answer (had they queued, each call would serve one answer)
    for mode in ("base", "rag"):
        seen = batches.seen[mode]
        assert max(seen) == SLOTS, (mode, seen)
        assert seen.count(SLOTS) >= MAX_NEW - 1, (mode, seen)


class _Jitter:
    """A retriever that takes a random 0-40 ms per search: thread timing that would decide which answers
    share a batch if the questions reached the engine as their threads finished retrieving."""

    def __init__(self, inner: Any, seed: int):
        import random

        self.inner, self.rng = inner, random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def search(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.rng.uniform(0.0, 0.04))
        return self.inner.search(*args, **kwargs)


def test_batched_eval_gives_the_same_batches_and_answers_on_every_run(
        tiny_smol: Path, tiny_embedder: Path, converter_home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ragtune.config import load_config
    from ragtune.eval.run import run_eval
    from ragtune.serve.answer import open_retriever
    from ragtune.serve.generator import Generator

    monkeypatch.setenv("RAGTUNE_HOME", str(converter_home))
    overrides = [f"model.path={tiny_smol}", "model.device=cpu", f"embedder.path={tiny_embedder}",
                 "embedder.device=cpu", "index.name=rag-batching-order", "chunk.size=16", "chunk.overlap=0",
                 "rag.top_k=2", "rag.min_score=-1.0", "generation.threads=1", f"serve.max_batch={SLOTS}",
                 f"eval.concurrency={SLOTS}", f"eval.max_new_tokens={MAX_NEW}", "eval.bootstrap=50"]
    assert main(["index", "add", str(EX / "docs_v1"), "--json", *overrides]) == 0
    capsys.readouterr()
    qs = [json.loads(line) for line in (EX / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in qs[:3 * SLOTS + 1]), encoding="utf-8")
    cfg = load_config(None, overrides)

    runs = []
    for seed in (1, 2):  # a fresh engine each run, as a re-run of `ragtune eval` has
        gen = Generator(cfg, engine="llama.cpp").load()
        steps: list[tuple[tuple[int, int], ...]] = []
        real = gen.engine_impl.decode

        def decode(items: Any, real: Any = real, steps: list = steps) -> Any:
            steps.append(tuple((it[0], len(it[1])) for it in items))  # (slot, tokens fed) of every sequence
            return real(items)

        monkeypatch.setattr(gen.engine_impl, "decode", decode)
        retriever = _Jitter(open_retriever(cfg, "rag-batching-order"), seed)
        try:
            res = run_eval(cfg, questions=qfile, modes="rag", out_dir=tmp_path / f"run{seed}", progress=False,
                           generator=gen, retriever=retriever)
        finally:
            retriever.inner.close()
            gen.engine_impl.close()
        assert res.exit_code == 0 and res.errors == 0
        runs.append((steps, [q["answers"]["rag"]["answer"] for q in res.report["questions"]]))
    (steps1, answers1), (steps2, answers2) = runs
    # every step decoded the same sequences in the same slots with the same number of tokens: the
    # batches did not depend on which question's retrieval finished first
    assert steps1 == steps2
    assert max(len(s) for s in steps1) == SLOTS
    assert answers1 == answers2
    assert "queued together sorted by prompt" in res.report["meta"]["decoding"]
