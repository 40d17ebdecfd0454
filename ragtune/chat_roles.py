"""Turns as a chat template takes them. Gemma's templates (1, 2 and 3) raise "System role not supported",
and a few templates drop a system turn without a word; for those the system turn is folded into the first
user turn ("SYSTEM\n\nUSER"), as those models' own guides do. Training, serving, every engine and the
export checks render through `fit_roles`, so a system prompt, a RAG instruction with its sources, or a
trained system prompt reaches such a model the same way everywhere.

    msgs = fit_roles(messages, template)        # unchanged where the template renders a system turn
    takes_system(template)                      # the verdict, cached per template text

`template_environment()` is transformers' chat-template environment rebuilt with jinja2 alone (so the
llama.cpp engine renders without importing transformers).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

_PROBE = "ragtune-system-probe-7f3c"


def template_environment() -> Any:
    """transformers' chat-template environment (utils/chat_template_utils.py), rebuilt with jinja2 alone."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-only-loss markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


@lru_cache(maxsize=32)
def takes_system(template: str | None) -> bool:
    """Whether `template` renders a system turn's text, both as a prompt and in a trained conversation: False
    where it raises (Gemma) or drops it (Mistral v0.3's writes it into the last message only when that is
    the user's, so a training record, which ends with the answer, would lose it)."""
    if not template:
        return True  # no template: nothing renders, and the caller says so
    import jinja2

    compiled = template_environment().from_string(template)
    system, user = {"role": "system", "content": _PROBE}, {"role": "user", "content": "u"}
    try:
        for msgs, gen in (([system, user], True), ([system, user, {"role": "assistant", "content": "a"}], False)):
            text = compiled.render(messages=msgs, add_generation_prompt=gen, bos_token="", eos_token="", tools=None,
                                   documents=None)
            if _PROBE not in text:
                return False
    except jinja2.exceptions.TemplateError:
        return False
    except Exception:  # noqa: BLE001 - a template that fails for other reasons fails where it is rendered for real
        return True
    return True


def fit_roles(messages: Sequence[dict[str, Any]], template: str | None) -> list[dict[str, Any]]:
    """`messages` with their system turns folded into the first user turn after them, where `template`
    takes no system turn; otherwise a copy as given."""
    msgs = [dict(m) for m in messages]
    if not isinstance(template, str):  # none, or a tokenizer's dict of named templates: rendered as given
        return msgs
    if not any(m.get("role") == "system" for m in msgs) or takes_system(template):
        return msgs
    system = "\n\n".join(str(m.get("content") or "") for m in msgs if m.get("role") == "system")
    rest = [m for m in msgs if m.get("role") != "system"]
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m.get('content') or ''}"
            return rest
    return [{"role": "user", "content": system}] + rest
