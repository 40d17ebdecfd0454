"""Templates without a system role (Gemma 1-3): the system turn goes into the first user turn, the same
way in training, in serving (transformers and the light tokenizer llama.cpp uses) and in RAG prompts."""

from __future__ import annotations

import json
from pathlib import Path

from ragtune.chat import rag_messages, render
from ragtune.chat_roles import fit_roles, takes_system
from ragtune.cli import main
from tests.tinymodels import GEMMA2_TEMPLATE

DROPS_SYSTEM = "{% for m in messages %}{% if m['role'] != 'system' %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
# Mistral v0.3's: the system text goes into the last message only if that is the user's (a prompt, not a record)
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)


def test_fit_roles_folds_the_system_turn_only_where_the_template_takes_none(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(tiny_llama)).chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]
    assert takes_system(own) and fit_roles(msgs, own) == msgs
    for template in (GEMMA2_TEMPLATE, DROPS_SYSTEM, MISTRAL_V03):  # refused; dropped; dropped from records
        assert not takes_system(template)
        assert fit_roles(msgs, template) == [{"role": "user", "content": "Be brief.\n\nHi?"}, *msgs[2:]]
    assert fit_roles([{"role": "system", "content": "S"}], GEMMA2_TEMPLATE) == [{"role": "user", "content": "S"}]


def test_a_model_without_a_system_role_trains_serves_and_reads_sources(tiny_llama: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """Before: `data check` and `train` refused every record with a system turn ('System role not supported'),
    `ask --adapter` refused every adapter of such a model (its probe has a system turn) and RAG, whose sources
    travel in a system turn, could not render at all."""
    from transformers import AutoTokenizer

    from ragtune.serve.light_tokenizer import LightTokenizer
    from ragtune.train.template import spans
    from tests.tinymodels import build_tiny_causal_lm

    base = build_tiny_causal_lm("gemma2", tmp_path / "gemma2", tiny_llama, template=GEMMA2_TEMPLATE)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You answer policy questions."}, {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": f"Answer {i}."}]}) + "\n" for i in range(8)))
    assert main(["-q", "data", "check", str(data), "--model", str(base)]) == 0, capsys.readouterr().err
    out = tmp_path / "adapter"
    assert main(["-q", "train", f"model.path={base}", f"data.train_file={data}", f"train.output_dir={out}",
                 "train.max_steps=1", "train.batch_size=4", "train.threads=1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["-q", "ask", "Question 1?", "--adapter", str(out), "--no-rag", "--engine", "transformers",
                 "--max-new-tokens", "3"]) == 0, capsys.readouterr().err

    tok = AutoTokenizer.from_pretrained(str(base))
    msgs = rag_messages([{"role": "user", "content": "Question 1?"}], [{"title": "Policy", "text": "The fact."}])
    served = render(tok, msgs)
    assert "<start_of_turn>user\nAnswer the question using only the numbered sources below." in served
    assert "[1] Policy\nThe fact.\n\nQuestion 1?<end_of_turn>\n<start_of_turn>model\n" in served
    trained, _ = spans(tok, msgs + [{"role": "assistant", "content": "Answer 1."}], GEMMA2_TEMPLATE)
    assert trained.startswith(served)  # the training prompt is the served one, byte for byte
    assert LightTokenizer(base).apply_chat_template(msgs, add_generation_prompt=True) == served


def test_a_dict_of_named_templates_or_none_renders_the_turns_as_given() -> None:
    # tokenizers may hold {"default": ..., "tool_use": ...}: not hashable, so it used to raise a TypeError
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert fit_roles(msgs, {"default": GEMMA2_TEMPLATE}) == msgs and fit_roles(msgs, None) == msgs
