"""The one prompt format: messages (+ retrieved context) -> chat template.

Training on retrieval-built prompts (`ragtune.train.rag`) and answering with retrieval (`ask --index`,
chat, the server, eval) all go through `rag_messages`, so a model fine-tuned with sources sees exactly
the layout it will be served with (tests/train/test_rag.py checks the rendered text byte for byte).
"""

from __future__ import annotations

from typing import Any, Sequence

# The layout rag_messages and format_sources produce; bump it when their output changes, so run cards
# of adapters trained on retrieval-built prompts (ragtune.train.rag) say which layout they learned.
RAG_PROMPT_FORMAT = 1

DEFAULT_RAG_SYSTEM = (
    "Answer the question using only the numbered sources below. Cite the sources you use as [n]. "
    "If the sources do not contain the answer, say that you could not find it in the documents."
)


def format_sources(sources: Sequence[dict[str, Any]]) -> str:
    """Numbered passages: `[n] title > heading (page p)` then the text."""
    blocks = []
    for i, s in enumerate(sources, 1):
        label = s.get("title") or s.get("source") or "document"
        heading = s.get("heading") or ""
        if heading.startswith(label):  # heading paths usually start with the document title
            label = heading
        elif heading:
            label += f" > {heading}"
        if s.get("page"):
            label += f" (page {s['page']})"
        blocks.append(f"[{s.get('n', i)}] {label}\n{str(s.get('text', '')).strip()}")
    return "\n\n".join(blocks)


def rag_messages(
    messages: Sequence[dict[str, str]],
    sources: Sequence[dict[str, Any]],
    system_prompt: str = "",
    question_first: bool = False,
) -> list[dict[str, str]]:
    """Prepend an instruction + numbered sources as the system turn (merged with any given one); with
    `question_first` (rag.question_first) the last user turn is also written above the sources."""
    msgs = [dict(m) for m in messages]
    instruction = system_prompt or DEFAULT_RAG_SYSTEM
    users = [m.get("content") for m in msgs if m.get("role") == "user"]
    if question_first and users and isinstance(users[-1], str):
        instruction += f"\n\nQuestion: {users[-1]}"
    context = f"{instruction}\n\nSources:\n{format_sources(sources)}"
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{context}"
    else:
        msgs.insert(0, {"role": "system", "content": context})
    return msgs


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
           chat_template: str | None = None) -> str:
    """The prompt text for `messages`, through the model's (or the run card's) chat template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model has no chat template; use an instruct/chat model or train one with a template "
            "(the run card of an adapter carries the template it was trained with)"
        )
    from ragtune.chat_roles import fit_roles

    template = chat_template or getattr(tokenizer, "chat_template", None)
    msgs = fit_roles(messages, template if isinstance(template, str) else None)  # Gemma: no system turn
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def last_user_turns(messages: Sequence[dict[str, str]], n: int = 3) -> str:
    """Retrieval query for follow-ups: the last few user turns, newest last."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return "\n".join(users[-n:])
