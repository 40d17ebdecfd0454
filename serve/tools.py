"""Tool calls: OpenAI's `tools` / `tool_choice` checked, put in the prompt, constrained, parsed back.

    plan = plan_tools(tools, tool_choice, parallel_tool_calls)  # None without tools; ToolError (a 400) if malformed
    prompt, rendering = render_with_tools(tokenizer, messages, plan, template)   # "template" or "generic"
    grammar = plan.grammar()                  # required / a named function: calls only; None for auto and none
    calls, content = parse_calls(text, plan)  # OpenAI tool_calls (id, type, function{name, arguments})
    calls, content = parse_calls(text, plan, cut=True)  # the answer hit max_tokens: a call it ends inside too

Rendering. A chat template that takes `tools` and writes calls as `<tool_call>{json}</tool_call>`
(the Hermes / Qwen convention) renders them itself (`apply_chat_template(tools=...)`: "template").
Any other model gets the generic tool prompt ("generic"): the function list as JSON in the system
turn, calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call,
earlier calls rendered the same way in their assistant turn, and `tool` results as a user turn
`<tool_response name=".." id="..">RESULT</tool_response>` (every template knows user turns).

Guarantees. With `tool_choice` "required" or a named function the answer is decoded under a grammar
of calls only: a known name (the named one) and arguments that validate against its `parameters`
schema, one call or, with `parallel_tool_calls`, up to MAX_PARALLEL. "auto" is best effort: the
answer is parsed, and calls that are not valid JSON of a known function stay text. "none" renders
no function list and parses nothing. An answer cut off by max_tokens inside a call (any choice) gives
that call with its arguments as far as they got once its name is written (a named function's at once),
as OpenAI's API does; the route says finish_reason "length". Under a forced choice no markup is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from ragtune.serve.constrained import COMPACT, UnsupportedSchema, check_grammar, schema_grammar

MAX_PARALLEL = 8
MAX_TOOLS = 128
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" would let a final newline through
CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
GENERIC_PROMPT = (
    "You can call these functions (JSON schemas of their arguments):\n{functions}\n"
    "To call a function, answer with <tool_call>{{\"name\": NAME, \"arguments\": {{...}}}}</tool_call>, "
    "one block per call and nothing else. A function's result comes back in <tool_response> tags."
    "{rule}"
)


class ToolError(UnsupportedSchema):
    """A malformed `tools` / `tool_choice` / tool turn (the server answers 400 naming `param`)."""


@dataclass
class ToolPlan:
    functions: list[dict[str, Any]]  # {"name", "description", "parameters"}
    choice: str  # auto | none | required | function
    name: str | None = None  # the named function (choice "function")
    parallel: bool = True

    @property
    def openai_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": f} for f in self.functions]

    def grammar(self) -> str | None:
        """Calls only, for required / a named function; None otherwise."""
        if self.choice not in ("required", "function"):
            return None
        fns = [f for f in self.functions if self.choice == "required" or f["name"] == self.name]
        rules = []
        for i, f in enumerate(fns):
            args, defs = nest_schema(f["parameters"], "#/properties/arguments")
            call = {"x-guidance": COMPACT, "type": "object", "additionalProperties": False,
                    "required": ["name", "arguments"],
                    "properties": {"name": {"const": f["name"]}, "arguments": args}, **defs}
            rules.append(f"f{i}: %json {json.dumps(call)}")
        reps = f"{{1,{MAX_PARALLEL}}}" if self.parallel else ""
        lark = (f"start: call{reps}\ncall: \"<tool_call>\" ({' | '.join(f'f{i}' for i in range(len(fns)))}) "
                "\"</tool_call>\"\n" + "\n".join(rules) + "\n")
        from ragtune.serve.constrained import _llguidance

        return check_grammar(_llguidance().LLMatcher.grammar_from_lark(lark), "tools")


def nest_schema(schema: dict[str, Any], at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`schema` made to sit at JSON pointer `at` inside another one: its `$defs`/`definitions` are
    handed back to be put at the new root (where "#/$defs/X" looks), and its other local references
    ("#", "#/properties/...") are rebased under `at`."""
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}

    def rebase(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rebase(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) \
                    and not ref.startswith(("#/$defs/", "#/definitions/")):
                out["$ref"] = at + ref[1:]
            return out
        if isinstance(node, list):
            return [rebase(v) for v in node]
        return node

    return rebase(body), rebase(defs)


def plan_tools(tools: Any, tool_choice: Any = None, parallel: Any = None) -> ToolPlan | None:
    """Check OpenAI's tool fields; None when there are no tools (a tool_choice without tools is an error)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools; send the functions in `tools`", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} {{\"type\": \"function\", \"function\": "
                        "{...}}", "tools")
    functions: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\"?, "
                            "\"parameters\"?}}}", where)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
        if any(f["name"] == name for f in functions):
            raise ToolError(f"{where}.function.name '{name}' is used twice", f"{where}.function.name")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        schema_grammar(params, f"{where}.function.parameters")  # an unenforceable schema is named now
        functions.append({"name": name, "description": desc, "parameters": params})
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    plan = ToolPlan(functions, "auto", parallel=parallel is not False)
    if tool_choice in (None, "auto", "none", "required"):
        plan.choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if not any(f["name"] == name for f in functions):
            known = ", ".join(f["name"] for f in functions)
            raise ToolError(f"tool_choice names function '{name}', which is not in tools ({known})",
                            "tool_choice.function.name")
        plan.choice, plan.name = "function", name
    else:
        raise ToolError("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                        "\"function\": {\"name\": NAME}}", "tool_choice")
    return plan


def check_tool_turn(m: dict[str, Any], i: int) -> dict[str, Any]:
    """The tool fields of request message `i` (assistant tool_calls, tool results) in the template's shape."""
    out: dict[str, Any] = {}
    if m.get("role") == "tool":
        cid = m.get("tool_call_id")
        if not isinstance(cid, str) or not cid:
            raise ToolError(f"messages[{i}]: a tool message needs tool_call_id (the id of the call it answers)",
                            f"messages.{i}.tool_call_id")
        out["tool_call_id"] = cid
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    calls = m.get("tool_calls")
    if calls is not None and m.get("role") == "assistant":
        if not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls")
        shaped = []
        for j, c in enumerate(calls):
            where = f"messages.{i}.tool_calls.{j}"
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ToolError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                "\"arguments\"}}}", where)
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except RecursionError as exc:
                    raise ToolError(f"{where}.function.arguments is nested too deeply to parse",
                                    f"{where}.function.arguments") from exc
                except ValueError as exc:
                    raise ToolError(f"{where}.function.arguments is not JSON ({exc})", f"{where}.function.arguments") \
                        from exc
            shaped.append({"id": str(c.get("id") or ""), "type": "function",
                           "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = shaped
    return out


def template_supports_tools(template: str | None) -> bool:
    """A template that renders `tools` and writes calls in the <tool_call> wrapper parse_calls reads."""
    return bool(template) and re.search(r"\btools\b", template) is not None and "<tool_call>" in template


def render_with_tools(tokenizer: Any, messages: Sequence[dict[str, Any]], plan: ToolPlan | None,
                      template: str | None = None) -> tuple[str, str]:
    """The prompt and how the tools got into it: "template" (the model's own) or "generic"."""
    tpl = template or getattr(tokenizer, "chat_template", None)
    msgs = [dict(m) for m in messages]
    tools = plan.openai_tools if plan is not None and plan.choice != "none" else None
    if template_supports_tools(tpl):
        for m in msgs:
            if m.get("role") == "assistant" and m.get("tool_calls") and m.get("content") is None:
                m["content"] = ""
        from ragtune.chat_roles import fit_roles

        return tokenizer.apply_chat_template(fit_roles(msgs, tpl), tokenize=False, add_generation_prompt=True,
                                             chat_template=template, tools=tools), "template"
    from ragtune.chat import render

    return render(tokenizer, generic_messages(msgs, plan if tools else None), chat_template=template), "generic"


def generic_messages(messages: Sequence[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, str]]:
    """Plain role/content turns: the function list in the system turn, calls and results as text."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content += "".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]},
                                                         ensure_ascii=False) + "</tool_call>" for c in m["tool_calls"])
        elif role == "tool":
            name = m.get("name") or ""
            block = f"<tool_response name=\"{name}\" id=\"{m.get('tool_call_id', '')}\">\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response"):
                out[-1]["content"] += "\n" + block  # results of parallel calls: one turn
                continue
            role, content = "user", block
        out.append({"role": role, "content": content})
    if plan is not None:
        rule = {"required": "\nYou must call at least one function.",
                "function": f"\nYou must call the function {plan.name}.",
                "auto": "\nCall a function when it helps; otherwise answer in plain text."}[plan.choice]
        if not plan.parallel:
            rule += " Call at most one function."
        fns = json.dumps(plan.functions, ensure_ascii=False)
        text = GENERIC_PROMPT.format(functions=fns, rule=rule)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse_calls(text: str, plan: ToolPlan | None, cut: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """OpenAI tool_calls found in `text` and the content left around them (None when only calls).

    `cut`: the answer was cut off by max_tokens (finish_reason "length"). A call it ends inside comes back
    as a call with its arguments as far as they got, as OpenAI's API does; under a forced tool_choice the
    text is all call markup (the grammar), so none of it is ever content."""
    if plan is None or plan.choice == "none":
        return [], text
    known = {f["name"] for f in plan.functions}
    calls: list[dict[str, Any]] = []
    rest, last = [], 0
    for m in CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except (ValueError, RecursionError):
            continue
        if not isinstance(obj, dict) or obj.get("name") not in known:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(args, dict):
            continue
        calls.append(_call(obj["name"], json.dumps(args, ensure_ascii=False)))
        rest.append(text[last:m.start()])
        last = m.end()
        if not plan.parallel:
            break
    tail = text[last:]
    if cut and (plan.parallel or not calls):
        start = tail.rfind("<tool_call>")
        if start < 0:  # cut inside the opening tag itself: the tag's beginning the tail ends with
            from ragtune.serve.stops import held_back

            opened = held_back(tail, ["<tool_call>"])
            start = len(tail) - opened if opened else -1
        call = cut_call(tail[start:], plan) if start >= 0 and "</tool_call>" not in tail[start:] else None
        if call is not None:
            calls.append(call)
            tail = tail[:start]
    forced_cut = cut and plan.choice in ("required", "function")
    if forced_cut:
        tail = ""  # a call cut before its name is known (or a "<tool_" start): markup, never content
    if not calls:
        return [], None if forced_cut else text
    rest.append(tail)
    content = "".join(rest).strip()
    return calls, content or None


PARTIAL_RE = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,'  # a call cut after its name
                        r'\s*"(?:arguments|parameters)"\s*:\s*(.*)\Z', re.DOTALL)


def cut_call(partial: str, plan: ToolPlan) -> dict[str, Any] | None:
    """The call in `partial`, a `<tool_call>` block cut off by max_tokens: its name once that is written
    whole (a named tool_choice's name from the start), its arguments as far as they got ("" before they
    start; the complete JSON when only the closing tag was cut). None when the name is not known yet."""
    known = {f["name"] for f in plan.functions} if plan.choice != "function" else {plan.name}
    body = partial.rstrip()
    closed = next((body[:-k] for k in range(len("</tool_call>"), 0, -1) if body.endswith("</tool_call>"[:k])), body)
    try:
        whole = json.loads(closed[len("<tool_call>"):])
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict) and whole.get("name") in known:
        args = whole.get("arguments", whole.get("parameters", {}))
        if isinstance(args, dict):
            return _call(whole["name"], json.dumps(args, ensure_ascii=False))
    m = PARTIAL_RE.match(body)
    try:
        name = json.loads('"' + m.group(1) + '"') if m else None
    except ValueError:
        name = None
    if m and name in known:
        return _call(name, m.group(2))
    if plan.choice == "function":
        return _call(plan.name or "", "")
    return None


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}
