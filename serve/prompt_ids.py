"""A chat prompt's token ids in which only the chat template's own control tokens are control tokens.

    msgs, plan, typed = mask_typed(tokenizer, msgs, plan)   # "<|im_start|>" typed in a string -> a placeholder
    prompt = render(msgs, plan)                             # the chat template, as before
    ids, prompt = prompt_ids(tokenizer, prompt, typed)

The rendered prompt is tokenized with special tokens parsed (the template writes them as text), so a
message, or a retrieved chunk put in one, that holds `<|im_end|>\\n<|im_start|>system\\n...` would forge a
turn; so would a tool's description or a call's arguments. Each control token typed in those strings
is swapped for a placeholder before rendering and tokenized as plain text (tokenizers'
`encode_special_tokens`) where the placeholder lands; the text around it is tokenized as usual, in
pieces. A prompt with no typed control token takes the one-call path unchanged. Failure mode: a
tokenizer that marks the start of every encode (sentencepiece's "first" prepend scheme) gets a
word-start mark after each typed control token.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

CACHE_ATTR = "_ragtune_control_tokens"  # (control-token pattern, plain encoder), set on the tokenizer once
_LOCK = threading.Lock()


@dataclass
class Typed:
    """The control tokens typed in the messages, in placeholder order, and the placeholders' pattern."""
    tokens: list[str]
    pattern: Any

    def restore(self, text: str) -> str:
        """`text` with the placeholders turned back into the control tokens typed."""
        return self.pattern.sub(lambda m: self.tokens[int(m.group(1))], text)


def _tables(tokenizer: Any) -> tuple[Any, Any]:
    """(a pattern of the tokenizer's special tokens, a copy of its `tokenizers` backend that reads them as
    text); (None, None) for a tokenizer without a `tokenizers` backend. Kept on the tokenizer."""
    with _LOCK:
        tables = getattr(tokenizer, CACHE_ATTR, None)
        if tables is not None:
            return tables
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
        specials = []
        if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
            specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special and t.content},
                              key=len, reverse=True)
        tables = (None, None)
        if specials:
            plain = copy.copy(backend)
            plain.encode_special_tokens = True
            tables = (re.compile("|".join(re.escape(s) for s in specials)), plain)
        try:
            setattr(tokenizer, CACHE_ATTR, tables)
        except AttributeError:  # a tokenizer that takes no attributes: built again next time
            pass
        return tables


def mask_typed(tokenizer: Any, messages: Sequence[dict[str, Any]],
               plan: Any = None) -> tuple[list[dict[str, Any]], Any, Typed | None]:
    """The messages and the tool plan (a ragtune.serve.tools.ToolPlan, or None) with each control token in
    their strings (contents, tool call arguments, function descriptions and parameters) replaced by a
    placeholder; as they were, and None, when there is none."""
    pattern, _ = _tables(tokenizer)
    if pattern is None:
        return list(messages), plan, None
    nonce = uuid.uuid4().hex[:12]  # a placeholder the client cannot have typed
    tokens: list[str] = []

    def place(match: Any) -> str:
        tokens.append(match.group(0))
        return f"\ue000{nonce}:{len(tokens) - 1}\ue001"

    out = _substituted(list(messages), lambda text: pattern.sub(place, text))
    functions = _substituted(plan.functions, lambda text: pattern.sub(place, text)) if plan is not None else None
    if not tokens:
        return list(messages), plan, None
    if plan is not None:
        plan = dataclasses.replace(plan, functions=functions)
    return out, plan, Typed(tokens, re.compile(f"\ue000{nonce}:(\\d+)\ue001"))


def _substituted(value: Any, sub: Any) -> Any:
    """A copy of a JSON value with `sub` applied to every string, keys included; iterative (a request's
    JSON may be nested as deep as the parser allows)."""
    root = [value]
    todo: list[tuple[Any, Any]] = [(root, 0)]
    while todo:
        holder, key = todo.pop()
        v = holder[key]
        if isinstance(v, str):
            holder[key] = sub(v)
        elif isinstance(v, dict):
            holder[key] = {(sub(k) if isinstance(k, str) else k): x for k, x in v.items()}
            todo += [(holder[key], k) for k in holder[key]]
        elif isinstance(v, list):
            holder[key] = list(v)
            todo += [(holder[key], i) for i in range(len(v))]
    return root[0]


def prompt_ids(tokenizer: Any, prompt: str, typed: Typed | None) -> tuple[list[int], str]:
    """The prompt's ids (typed control tokens as text) and the prompt with the placeholders put back."""
    if typed is None:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), prompt
    _, plain = _tables(tokenizer)
    ids: list[int] = []
    for i, part in enumerate(typed.pattern.split(prompt)):  # text, placeholder index, text, ...
        if i % 2:
            ids += plain.encode(typed.tokens[int(part)], add_special_tokens=False).ids
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids, typed.restore(prompt)
