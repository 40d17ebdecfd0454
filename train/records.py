"""Chat records: the format, its structural checks, and what a record asks.

    from ragtune.train.records import record_problems, uses_tools, detect_format, prompt_key

    record_problems({"messages": [{"role": "user", "content": "Hi"}]})   # [("no_assistant", "no assistant ...")]
    uses_tools(obj)                     # tools or function calling: noted by the check and left out
    detect_format({"prompt": "Q", "completion": "A"})                    # "prompt-completion" (convert reads it)
    prompt_key(messages)                # its turns before the final answer, case and spacing folded
    shared_system_prompt(records)       # the system message all records open with, else None

The format is OpenAI fine-tuning JSONL: one {"messages": [{"role", "content"}, ...]} per line, roles
system/user/assistant; assistant messages may carry "weight": 0 or 1 (0 = not trained). The file
check that reports these problems line by line is `ragtune.train.data_check.check_file`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
RECORD_KEYS = ("messages", "sources")  # sources: the documents an answer is grounded in (train/rag.py)
MESSAGE_KEYS = ("role", "content", "weight")


@dataclass
class Record:
    line: int
    messages: list[dict[str, Any]]
    raw: str
    enc: Any = None  # template.Encoded, set by the token checks


def _message_problems(i: int, m: Any) -> list[tuple[str, str]]:
    where = f"message {i + 1}"
    if not isinstance(m, dict):
        return [("message_not_object", f"{where} is {type(m).__name__}, expected an object with role and content")]
    probs: list[tuple[str, str]] = []
    extra = [k for k in m if k not in MESSAGE_KEYS]
    if extra:
        probs.append(("unknown_key", f"{where} has unknown key(s) {', '.join(map(repr, extra))}; "
                                     f"allowed: {', '.join(MESSAGE_KEYS)}"))
    role = m.get("role")
    if "role" not in m:
        probs.append(("role_missing", f"{where} has no 'role'; use one of {', '.join(ROLES)}"))
    elif not isinstance(role, str):
        probs.append(("role_not_string", f"{where} 'role' is {role!r}, expected a string"))
    elif role not in ROLES:
        probs.append(("unknown_role", f"{where} role {role!r}; allowed: {', '.join(ROLES)}"))
    content = m.get("content")
    if "content" not in m:
        probs.append(("content_missing", f"{where} has no 'content'"))
    elif not isinstance(content, str):
        probs.append(("content_not_string", f"{where} 'content' is {type(content).__name__}, expected a string"))
    elif not content.strip():
        probs.append(("empty_content", f"{where} ({role}) content is empty or whitespace only"))
    if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool) or role != "assistant"):
        probs.append(("bad_weight", f"{where} 'weight' is {m['weight']!r}; only assistant messages take weight 0 or 1"))
    return probs


TOOL_ROLES = ("tool", "function")
TOOL_MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id", "name")
TOOL_RECORD_KEYS = ("tools", "functions", "parallel_tool_calls")


def uses_tools(obj: Any) -> bool:
    """An OpenAI fine-tuning record with tools or function calling (tool role, tool_calls, tools, name...)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return False
    if any(k in obj for k in TOOL_RECORD_KEYS):
        return True
    return any(isinstance(m, dict) and (m.get("role") in TOOL_ROLES or any(k in m for k in TOOL_MESSAGE_KEYS))
               for m in obj["messages"])


def record_problems(obj: Any) -> list[tuple[str, str]]:
    """Structural problems of one parsed record, as (kind, message)."""
    if not isinstance(obj, dict):
        return [("not_object", f"expected an object {{\"messages\": [...]}}, got {type(obj).__name__}")]
    fmt = detect_format(obj)
    if fmt and "messages" not in obj:
        return [("other_format", f"{FORMATS[fmt][0]} format {FORMATS[fmt][1]}, not chat {{\"messages\": [...]}}: "
                                 "'ragtune data convert FILE' writes the file as chat JSONL")]
    probs: list[tuple[str, str]] = []
    extra = [k for k in obj if k not in RECORD_KEYS]
    if extra:
        probs.append(("unknown_key", f"record has unknown key(s) {', '.join(map(repr, extra))}; allowed: "
                                     f"{', '.join(RECORD_KEYS)}"))
    if "messages" not in obj:
        probs.append(("messages_missing", "no 'messages' key; expected {\"messages\": [{\"role\": ..., \"content\": ...}]}"))
        return probs
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        probs.append(("messages_not_list", f"'messages' is {type(msgs).__name__}, expected a list"))
        return probs
    if not msgs:
        probs.append(("messages_empty", "'messages' is an empty list"))
        return probs
    for i, m in enumerate(msgs):
        probs.extend(_message_problems(i, m))
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    if "assistant" not in roles:
        probs.append(("no_assistant", "no assistant message: nothing to train on"))
    late_system = [i + 1 for i, r in enumerate(roles) if r == "system" and i > 0]
    if late_system:
        probs.append(("role_order", f"system message at position {', '.join(map(str, late_system))}; "
                                    "a system message may only come first"))
    if roles and roles[-1] in ROLES and roles[-1] != "assistant" and "assistant" in roles:
        probs.append(("role_order", f"the conversation ends with a {roles[-1]} turn; it must end with an assistant turn"))
    return probs


# Other tools' record shapes that convert turns into chat records (named in check's hints too)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
FORMATS = {  # name, shape
    "sharegpt": ("ShareGPT", '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}'),
    "alpaca": ("Alpaca", '{"instruction": ..., "input"?: ..., "output": ...}'),
    "prompt-completion": ("prompt/completion", '{"prompt": ..., "completion": ...}'),
}


def detect_format(row: Any) -> str:
    """The other tool's format a record is in ("" when none is recognised)."""
    if not isinstance(row, dict):
        return ""
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return "prompt-completion"
    return ""


def shared_system_prompt(records: list[Record]) -> str | None:
    """The system message every record opens with, when all carry the same one; else None."""
    prompts = {r.messages[0]["content"] if r.messages and r.messages[0].get("role") == "system" else None
               for r in records}
    if len(prompts) != 1:
        return None
    return next(iter(prompts))


def fold(text: Any) -> str:
    """Text with case and spacing folded, for telling whether two questions or answers are the same."""
    return " ".join(str(text).casefold().split())


def prompt_key(messages: Any) -> str:
    """What a record asks: its turns before the final assistant answer, case and spacing folded."""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return fold(json.dumps(messages, ensure_ascii=False, sort_keys=True))


def record_prompt(record: Record) -> str:
    return prompt_key(record.messages)
