"""Assistant masks by prefix rendering: same answer tokens with or without {% generation %} markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.errors import UsageError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "서울은?"},
    {"role": "assistant", "content": "한국의 수도."},
]


def _trained_text(tok, enc) -> str:
    return tok.decode([t for t, m in zip(enc.input_ids, enc.mask) if m])


def test_mask_covers_answers_and_end_of_turn(tiny_llama: Path, no_marker_llama: Path) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.template import last_trained_is_stop_token, tokenize_conversation

    with_markers = load_tokenizer(tiny_llama)
    without = load_tokenizer(no_marker_llama)
    assert "{% generation %}" in with_markers.chat_template
    assert "generation %}" not in without.chat_template
    a = tokenize_conversation(with_markers, CONV)
    b = tokenize_conversation(without, CONV)
    assert a.input_ids == b.input_ids and a.mask == b.mask
    assert _trained_text(without, b) == "Paris.<|im_end|>한국의 수도.<|im_end|>"
    # the rendered ids are the template's own tokenisation, and the mask agrees with the
    # {% generation %} markers that transformers reads (which exclude the newline after <|im_end|>)
    ref = with_markers.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(ref["input_ids"]) == a.input_ids
    assert list(ref["assistant_masks"]) == a.mask
    assert last_trained_is_stop_token(without, without.chat_template)


def test_weight_zero_turn_is_not_trained(no_marker_llama: Path) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.template import tokenize_conversation

    tok = load_tokenizer(no_marker_llama)
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 0
    assert _trained_text(tok, tokenize_conversation(tok, conv)) == "한국의 수도.<|im_end|>"


def test_non_prefix_preserving_template_is_refused(no_marker_llama: Path) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.template import tokenize_conversation

    tok = load_tokenizer(no_marker_llama)
    # renders earlier assistant turns differently once a later turn exists (like "thinking" templates)
    bad = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n[old]<|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(UsageError, match="not prefix-preserving"):
        tokenize_conversation(tok, CONV, bad)


# Qwen3's logic: only an answer after the last user turn that is the last message gets the (empty)
# <think> block, so an earlier answer renders differently once a later turn exists
QWEN3_LIKE = (
    "{% set ns = namespace(last_query=0) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_query and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral's newer logic: the system prompt goes into the last user turn
MISTRAL_LIKE = (
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "<s>{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.index0 == ns.last_user and system %}{{ system }}\n\n{% endif %}"
    "{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template, chars, expected", [
    (QWEN3_LIKE, "Paris.<|im_end|><think>\n\n</think>\n\n한국의 수도.<|im_end|>",
     "Paris.<|im_end|><think>\n\n</think>\n\n한국의 수도.<|im_end|>"),
    # the first answer is found by its text, the last by prefixes (with the space before it); the
    # tokens trained are the same kind: " Paris" overlaps the answer, so it is trained whole
    (MISTRAL_LIKE, "Paris.<|im_end|> 한국의 수도.<|im_end|>", " Paris.<|im_end|> 한국의 수도.<|im_end|>"),
])
def test_turns_rendered_differently_later_are_found_in_the_whole_conversation(
        no_marker_llama: Path, template: str, chars: str, expected: str) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.template import spans, tokenize_conversation

    tok = load_tokenizer(no_marker_llama)
    full, found = spans(tok, CONV, template)
    assert full == tok.apply_chat_template(CONV, tokenize=False, chat_template=template)
    assert "".join(full[s:e] for s, e in found) == chars
    enc = tokenize_conversation(tok, CONV, template)
    assert tok.decode(enc.input_ids) == full
    assert _trained_text(tok, enc) == expected
    # a user turn that quotes the answer before it is given does not take the answer's place
    quoted = [dict(m) for m in CONV]
    quoted[1]["content"] = "Is it Paris.<|im_end|>? What is the capital of France?"
    assert _trained_text(tok, tokenize_conversation(tok, quoted, template)) == expected


def test_model_without_template_is_refused(no_marker_llama: Path) -> None:
    from ragtune.modeling import load_tokenizer
    from ragtune.train.template import template_of

    tok = load_tokenizer(no_marker_llama)
    tok.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        template_of(tok)


# Phi-3's logic: the whole conversation (not each turn) ends with the eos token when no generation prompt
# follows, so an earlier answer ends "<|im_end|>\n<|endoftext|>" alone but "<|im_end|>\n<|im_start|>" later
PHI3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
)


def test_template_that_ends_the_conversation_with_eos_trains_every_answer(
        no_marker_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each answer of a multi-turn record is trained with its own end-of-turn token; before, a Phi-3-style
    template's records were refused as 'not prefix-preserving', or, when two answers were equal, the earlier
    one was located at the later one's place and only the last was trained."""
    import json
    import shutil

    from ragtune.cli import main
    from ragtune.modeling import load_tokenizer
    from tests.train.conftest import write_jsonl

    model = tmp_path / "phi3-like"
    shutil.copytree(no_marker_llama, model)
    (model / "chat_template.jinja").write_text(PHI3_LIKE)
    tok = load_tokenizer(model)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for first, second in [("Code 1 means bread.", "Yes, bread."), ("Code 1 means bread.", "Code 1 means bread.")]:
        rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is code 1?"},
                              {"role": "assistant", "content": first}, {"role": "user", "content": "Again?"},
                              {"role": "assistant", "content": second}]}]
        data = write_jsonl(tmp_path / "multi.jsonl", rows)
        assert main(["data", "check", str(data), "--model", str(model), "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]
        assert stats["trained_tokens_per_epoch"] == n(first + "<|im_end|>") + n(second + "<|im_end|>\n<|endoftext|>")
    from ragtune.train.template import tokenize_conversation

    enc = tokenize_conversation(tok, CONV, PHI3_LIKE)
    assert _trained_text(tok, enc) == "Paris.<|im_end|>한국의 수도.<|im_end|>\n<|endoftext|>"
