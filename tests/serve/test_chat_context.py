"""`ragtune chat` past the model's context: the oldest exchanges leave, a question too long alone is refused.

A conversation whose prompt plus max_new_tokens outgrew the context used to get shorter and shorter
answers, then "the prompt is N tokens but the model's context is C" on every further question until
/reset. Now the oldest questions and answers are dropped (a note each time) and the chat goes on.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from ragtune.serve.chat_repl import ChatSession
from tests.serve.conftest import FakeRetriever

ROOM = 48  # generation.max_new_tokens of these tests
NOTE = re.compile(r"\(the conversation outgrew the model's (\d+)-token context with (\d+) kept for the answer: "
                  r"its (?:oldest question and answer are|(\d+) oldest questions and their answers are) no longer "
                  r"sent; /reset starts over\)")


@pytest.fixture(scope="module")
def tf_gen(tiny_llama: Path) -> Any:
    """tiny_llama (context 1024) on transformers, answering at most ROOM tokens."""
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    cfg = load_config(None, [f"model.path={tiny_llama}", f"generation.max_new_tokens={ROOM}", "rag.top_k=2"])
    return Generator(cfg).load(adapters={})


def question(i: int, words: int = 40) -> str:
    return f"question {i}: " + " ".join(f"remote{i} work days" for _ in range(words // 3))


def tokens(gen: Any, messages: list[dict[str, str]], retriever: Any = None) -> int:
    """The prompt's size as the generator renders it (chat template, sources)."""
    from ragtune.errors import PromptTooLong

    try:
        return len(gen.prepare(messages, retriever=retriever).input_ids)
    except PromptTooLong as exc:
        return exc.prompt_tokens


def converse(s: ChatSession, questions: list[str]) -> list[dict[str, Any]]:
    """Ask each question; per turn, the history before and after it, the notes said and the answer."""
    turns = []
    for q in questions:
        before, said, s.last_answer = list(s.history), len(s.out.getvalue()), None
        s.loop(io.StringIO(q + "\n"))
        turns.append({"before": before, "after": list(s.history), "notes": NOTE.findall(s.out.getvalue()[said:]),
                      "answer": s.last_answer})
    return turns


def check_dropped_oldest_and_fewest(s: ChatSession, turns: list[dict[str, Any]], questions: list[str],
                                    retriever: Any = None, after_drop: int | None = None) -> int:
    """Every turn answered with the whole ROOM free, sending the latest exchanges only: those it dropped were
    the oldest and left the history, one more kept would not have fitted (in `after_drop` tokens, where given: the
    llama.cpp engine drops down to half the context), and a note says how many went. Returns the number of
    turns that dropped some."""
    gen, ctx, drops = s.gen, s.gen.context_length, 0
    system = [{"role": "system", "content": s.system}] if s.system else []
    for t, q in zip(turns, questions):
        ans, before, after = t["answer"], t["before"], t["after"]
        assert ans is not None and ans.prompt_tokens + ROOM <= ctx and q in ans.prompt
        assert after[-2:] == [{"role": "user", "content": q}, {"role": "assistant", "content": ans.text}]
        kept = after[:-2]
        assert before[len(before) - len(kept):] == kept  # the oldest went first, and left the history
        assert all(m["content"] in ans.prompt for m in kept)
        gone = before[:len(before) - len(kept)]
        assert not any(m["content"] in ans.prompt for m in gone if m["role"] == "user")
        if gone:
            drops += 1
            n = len(gone) // 2
            assert t["notes"] == [(str(ctx), str(ROOM), "" if n == 1 else str(n))]
            one_more = system + gone[-2:] + kept + [{"role": "user", "content": q}]
            bound = ctx - ROOM if after_drop is None else after_drop
            assert tokens(gen, one_more, retriever) > bound  # no exchange dropped that would have fitted
            assert after_drop is None or ans.prompt_tokens <= after_drop
        else:
            assert t["notes"] == []
    return drops


def test_an_outgrown_conversation_drops_its_oldest_exchanges_and_keeps_answering(tf_gen: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tf_gen, out=out, err=err)
    questions = [question(i) for i in range(10)]
    turns = converse(s, questions)
    assert not err.getvalue(), err.getvalue()
    assert check_dropped_oldest_and_fewest(s, turns, questions) >= 3


def test_a_long_question_drops_several_exchanges_at_once_with_one_note(tf_gen: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tf_gen, system="You answer about the remote work policy.", out=out, err=err)
    converse(s, [f"short question {i}?" for i in range(5)])
    system, words = [{"role": "system", "content": s.system}], 3

    def size(kept: int) -> int:
        return tokens(tf_gen, system + s.history[len(s.history) - 2 * kept:]
                      + [{"role": "user", "content": question(9, words)}]) + ROOM

    while size(3) <= tf_gen.context_length:  # the last 3 exchanges cannot stay with it, the last 2 can
        words += 3
    assert size(2) <= tf_gen.context_length
    long = question(9, words)
    turns = converse(s, [long])
    assert not err.getvalue(), err.getvalue()
    assert check_dropped_oldest_and_fewest(s, turns, [long]) == 1
    assert turns[0]["notes"][0][2] == "3" and s.history == turns[0]["after"] and len(s.history) == 6
    assert s.system in turns[0]["answer"].prompt  # the system prompt is never dropped


def test_a_question_too_long_alone_is_refused_with_the_sizes_and_the_next_one_answers(tf_gen: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tf_gen, out=out, err=err)
    converse(s, [question(0), question(1)])
    kept = list(s.history)
    s.loop(io.StringIO("word " * 1500 + "\n"))
    n = int(re.search(r"makes a prompt of (\d+) tokens", err.getvalue()).group(1))
    assert n >= tf_gen.context_length
    assert err.getvalue() == (f"error: this question makes a prompt of {n} tokens and its answer may take {ROOM} more, "
                              "but the model's context is 1024 tokens; ask a shorter question or use a model with a "
                              "longer context\n")
    assert s.history == kept and "outgrew" not in out.getvalue()  # nothing dropped for a question that cannot fit
    converse(s, [question(2)])
    assert s.last_answer is not None and question(2) in s.last_answer.prompt and question(1) in s.last_answer.prompt


def test_a_question_that_leaves_too_little_room_for_the_answer_names_max_new_tokens(tf_gen: Any) -> None:
    """A prompt just under the context used to get an answer cut at the few tokens left (and a note that
    pointed at --max-new-tokens, as if a larger value would help)."""
    err = io.StringIO()
    s = ChatSession(tf_gen, out=io.StringIO(), err=err)
    words = 30
    while tokens(tf_gen, [{"role": "user", "content": question(0, words)}]) + ROOM // 2 < tf_gen.context_length:
        words += 3
    q = question(0, words)
    n = tokens(tf_gen, [{"role": "user", "content": q}])
    assert n < tf_gen.context_length < n + ROOM
    s.loop(io.StringIO(q + "\n"))
    assert f"allow a shorter answer (--max-new-tokens {tf_gen.context_length - n} or less)" in err.getvalue()
    assert s.history == [] and s.last_answer is None


def test_with_retrieval_the_sources_count_and_each_query_is_searched_once(tf_gen: Any) -> None:
    long_text = " ".join(["Employees may work remotely up to three days per week with approval."] * 8)
    r = FakeRetriever()
    for h in r.hits:
        h["text"] = long_text
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(tf_gen, retriever=r, out=out, err=err)
    questions = [question(i, 30) for i in range(7)]
    turns = converse(s, questions)
    assert not err.getvalue(), err.getvalue()
    assert len(r.queries) == len(questions)  # one search per question, however many sizes were tried
    assert check_dropped_oldest_and_fewest(s, turns, questions, FakeRetriever(r.hits)) >= 2
    assert all("[1] Remote work" in t["answer"].prompt for t in turns)
    kept = list(s.history)
    alone = tokens(tf_gen, [{"role": "user", "content": question(9, 30)}])
    assert alone + ROOM < tf_gen.context_length  # fits alone, but not with its sources:
    for h in r.hits:
        h["text"] = long_text * 10
    s.loop(io.StringIO(question(9, 30) + "\n"))
    assert "tokens with its sources and its answer may take" in err.getvalue()
    assert "retrieve fewer sources (rag.top_k, now 2)" in err.getvalue() and s.history == kept


class _Remote:
    """A generator without a context of its own to check (an OpenAI-compatible server answers)."""

    def __init__(self, gen: Any) -> None:
        self.gen, self.calls = gen, 0

    def stream(self, messages: Any, adapter: Any = None, retriever: Any = None) -> Any:
        from ragtune.errors import PromptTooLong

        self.calls += 1
        if self.calls > 1:
            raise PromptTooLong("the server says the prompt is too long")
        return self.gen.stream(messages)


def test_a_remote_engine_keeps_its_own_limit_and_the_reset_hint(tf_gen: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(_Remote(tf_gen), out=out, err=err)
    s.loop(io.StringIO("hello\nagain\n"))
    assert len(s.history) == 2
    assert err.getvalue() == "error: the server says the prompt is too long; /reset starts a new conversation\n"


@pytest.fixture(scope="module")
def cpp_gen(tiny_smol: Path, converter_home: Path, request: pytest.FixtureRequest) -> Any:
    """tiny_smol (context 512) on llama.cpp, exported into the session's converter home."""
    from ragtune.config import load_config
    from ragtune.serve.generator import Generator

    request.getfixturevalue("llama_cpp_installed")
    cfg = load_config(None, [f"model.path={tiny_smol}", "generation.threads=1", "generation.gguf_type=f16",
                             f"generation.max_new_tokens={ROOM}"])
    mp = pytest.MonkeyPatch()
    mp.setenv("RAGTUNE_HOME", str(converter_home))
    try:
        return Generator(cfg, engine="llama.cpp").load(adapters={})
    finally:
        mp.undo()


def test_llama_cpp_drops_the_oldest_exchanges_past_its_n_ctx(cpp_gen: Any) -> None:
    assert cpp_gen.engine_impl is not None and cpp_gen.context_length == cpp_gen.engine_impl.n_ctx == 512
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(cpp_gen, out=out, err=err)
    questions = [question(i, 24) for i in range(8)]
    turns = converse(s, questions)
    assert not err.getvalue(), err.getvalue()
    # llama.cpp drops down to half the context (its prompt cache survives the turns after), not just under it
    half = (512 - ROOM) // 2
    drops = check_dropped_oldest_and_fewest(s, turns, questions, after_drop=half)
    assert s.after_drop() == half
    fewest = ChatSession(cpp_gen, out=io.StringIO(), err=io.StringIO())
    fewest.after_drop = lambda: None  # the same conversation dropping only the fewest, as on transformers
    every = check_dropped_oldest_and_fewest(fewest, converse(fewest, questions), questions)
    assert 1 <= drops < every, (drops, every)  # fewer drops: fewer turns that prefill the whole conversation
    s.loop(io.StringIO("word " * 600 + "\n"))
    assert "error: this question makes a prompt of" in err.getvalue()
    assert "but the model's context is 512 tokens" in err.getvalue()
    converse(s, [question(9, 24)])
    assert s.last_answer is not None and question(9, 24) in s.last_answer.prompt
