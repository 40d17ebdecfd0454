"""Assistant-only loss for any chat template, by rendering prefixes.

TRL's `assistant_only_loss` needs `{% generation %}` markers, which most shipped templates lack
(SmolLM2's included), and TRL only patches a fixed list of known templates. ragtune instead
renders the conversation prefix by prefix with the model's own template:

    P_i = render(messages[:i], add_generation_prompt=True)   # prompt up to assistant turn i
    A_i = render(messages[:i+1])                              # ... plus that assistant turn

The characters A_i[len(P_i):] (trailing whitespace dropped) are the assistant's answer *and* its
end-of-turn token, so the model learns to stop; everything else is context.

Some templates render an earlier turn differently once a later turn exists, so A_i is not a
prefix of the whole conversation: Qwen3 gives only the last answer an empty <think></think>
block, Mistral's newer templates move the system prompt into the last user turn, Phi-3's ends only
the whole conversation with its eos token. For such a turn the answer is located in the whole
rendering instead: its content, searched after the previous turns, followed by the end-of-turn text
that follows it both in A_i and there. A template that rewrites the
content itself is refused with the fix. The template is used unchanged, so the one saved with
the adapter is exactly the one serving renders prompts with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ragtune.errors import UsageError


@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 = trained (assistant answer + its end-of-turn token)


def template_of(tokenizer: Any, override: str | None = None) -> str:
    tpl = override or getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    if not tpl:
        raise UsageError(
            "the base model has no chat template; use an instruct/chat model, or give one with "
            "train.chat_template=FILE.jinja"
        )
    return tpl


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str, gen: bool) -> str:
    from jinja2 import TemplateError

    from ragtune.chat_roles import fit_roles

    msgs = fit_roles([{"role": m["role"], "content": m["content"]} for m in messages], template)
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)
    except (TemplateError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise UsageError(f"the chat template cannot render this conversation: {exc}") from exc


def spans(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans to train on."""
    full = _render(tokenizer, messages, template, gen=False)
    out: list[tuple[int, int]] = []
    cursor = 0  # where the next turn can start in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            if m["role"] == "user":  # system prompts may be moved (to the last user turn, say)
                found = full.find(m["content"].strip(), cursor)
                cursor = found + len(m["content"].strip()) if found >= 0 else cursor
            continue
        prompt = _render(tokenizer, messages[:i], template, gen=True) if i else _render_empty(tokenizer, template)
        upto = _render(tokenizer, messages[: i + 1], template, gen=False)
        if upto.startswith(prompt) and full.startswith(upto):
            start, end = len(prompt), len(upto.rstrip())
        else:
            start, end = _locate(full, upto, m["content"], cursor)
        cursor = max(cursor, end)
        if end > start and m.get("weight", 1) != 0:
            out.append((start, end))
    return full, out


def _locate(full: str, upto: str, content: str, cursor: int) -> tuple[int, int]:
    """Span of an assistant turn in `full` when the template renders it differently there than in `upto`.

    The answer is its content, found after the previous turns, and as much of the end-of-turn text that
    follows it in `upto` as follows it in `full` too: Phi-3's template ends a conversation with the eos
    token, so an earlier answer ends "<|end|>\n<|endoftext|>" in `upto` but "<|end|>\n<|user|>" in `full`."""
    text = content.strip()
    at = upto.rfind(text) if text else -1
    if at >= 0:
        tail = upto[at + len(text):].rstrip()  # the end-of-turn text after the answer
        found = full.find(text, cursor)
        while found >= 0:
            end = found + len(text)
            ending = tail[:_common_prefix(tail, full[end:])].rstrip()
            if ending or not tail:
                return found, end + len(ending)
            found = full.find(text, found + 1)
    raise UsageError(
        "the chat template is not prefix-preserving (an assistant turn renders differently once a later "
        "turn exists) and changes the answer's text, so ragtune cannot tell which tokens are the answer; "
        "give a template that renders earlier answers as they are with train.chat_template=FILE.jinja"
    )


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b` made of whole pieces: tags such as <|end|> and
    the text between them ("<|endoftext|>" and "<|user|>" share nothing, not "<|")."""
    import re

    n = 0
    for x, y in zip(re.findall(r"<[^<>]*>|[^<]+|<", a), re.findall(r"<[^<>]*>|[^<]+|<", b)):
        if x != y:
            break
        n += len(x)
    return n


def _render_empty(tokenizer: Any, template: str) -> str:
    try:
        return _render(tokenizer, [], template, gen=True)
    except UsageError:
        return ""


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str | None = None) -> Encoded:
    """Token ids of the rendered conversation and the assistant mask (answer + end-of-turn token)."""
    template = template_of(tokenizer, template)
    text, trained = spans(tokenizer, messages, template)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        j = 0
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:  # zero-width tokens belong to nothing
                continue
            while j < len(trained) and trained[j][1] <= start:
                j += 1
            if j < len(trained) and trained[j][0] < end:  # overlaps: " Paris" after "[/INST]" is the answer's
                mask[t] = 1
        return Encoded(ids, mask)
    # slow tokenizers have no offsets: tokenize the pieces separately
    ids, mask, pos = [], [], 0
    for s, e in trained + [(len(text), len(text))]:
        for piece, bit in ((text[pos:s], 0), (text[s:e], 1)):
            if piece:
                toks = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                ids += toks
                mask += [bit] * len(toks)
        pos = e
    return Encoded(ids, mask)


def last_trained_is_stop_token(tokenizer: Any, template: str) -> bool:
    """Does the trained span of an assistant turn end on a special (end-of-turn) token?"""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = tokenize_conversation(tokenizer, msgs, template)
    trained = [i for i, b in zip(enc.input_ids, enc.mask) if b]
    if not trained:
        return False
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return trained[-1] in special
