"""Held-out questions for `ragtune eval`, from JSONL in either of two shapes.

    qs = load_questions("examples/policies/questions.jsonl")

One JSON object per line (blank lines are skipped):

* `{"question": str, "answer": str, "sources"?: [path, ...], "answerable"?: bool, "id"?: str, ...}`
* chat: `{"messages": [{"role", "content"}, ...], "sources"?, "answerable"?, "id"?}` -- the last
  assistant turn is the reference answer and the last user turn before it the question; earlier
  turns (a system prompt, a conversation so far) are kept as `history`.

An unanswerable question (`"answerable": false`) may leave the answer out; the reference then
is the not-found message the eval is run with. Any other keys (e.g. `"changed_in_v2": true`,
`"old_answer": "..."`) are kept in `meta` and used to group results in the report. Every problem
in the file is collected and raised once as a UsageError naming the file, line and key (the first
20 of them, then how many more).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError

KNOWN_KEYS = ("id", "question", "answer", "messages", "sources", "answerable")
ROLES = ("system", "user", "assistant")
MAX_LISTED = 20  # problems named in the message; a wrong file (a log, a CSV) has one a line
FORMAT_HINT = (
    'each line must be {"question": "...", "answer": "...", "sources": ["doc.md"], "answerable": true} '
    'or a chat record {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'
)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str  # reference; "" for an unanswerable question given without one
    sources: tuple[str, ...] = ()  # gold source paths, relative to the documents' root
    answerable: bool = True
    history: tuple[dict[str, str], ...] = ()  # turns before the question (chat input)
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    def messages(self) -> list[dict[str, str]]:
        """The conversation to answer: history, then the question as the user turn."""
        return [dict(m) for m in self.history] + [{"role": "user", "content": self.question}]

    def reference(self, not_found_message: str = "") -> str:
        """The answer to score against (the not-found message for an unanswerable question
        given without an answer)."""
        return self.answer if self.answer or self.answerable else not_found_message


def load_questions(path: str | Path) -> list[Question]:
    """Parse and validate the whole file; raise one UsageError listing every problem."""
    p = Path(path)
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.jsonl"))[:3]
        raise UsageError(f"questions file '{p}' is a folder; pass the JSONL file itself"
                         + (f", e.g. --questions {p / found[0]}" if found else ""))
    if not p.exists():  # a pipe (`--questions <(jq -c ... q.json)`, /dev/stdin) is read like a file
        raise UsageError(
            f"questions file '{p}' not found; pass --questions FILE.jsonl "
            "(for the demo: examples/policies/questions.jsonl)"
        )
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not UTF-8 text ({exc}); save the file as UTF-8") from exc
    _refuse_one_json_value(p, text)
    problems: list[str] = []
    questions: list[Question] = []
    seen_ids: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            rec = json.loads(raw, parse_constant=_no_constant)
        except ValueError as exc:
            problems.append(f"{where}: not valid JSON ({exc.args[0] if exc.args else exc})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}; {FORMAT_HINT}")
            continue
        q = _parse(rec, where, lineno, problems)
        if q is None:
            continue
        if q.id in seen_ids:
            problems.append(f"{where}: key 'id': '{q.id}' already used on line {seen_ids[q.id]}; ids must be unique")
            continue
        seen_ids[q.id] = lineno
        questions.append(q)
    if not questions and not problems:
        problems.append(f"{p}: no questions (the file is empty); {FORMAT_HINT}")
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                          if len(problems) > MAX_LISTED else [])
        raise UsageError(f"{len(problems)} problem(s) in questions file {p}:\n  " + "\n  ".join(listed))
    return questions


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: Python reads them, but they would make report.json unreadable elsewhere."""
    raise ValueError(f"{name} is not JSON (write null or a number)")


def _refuse_one_json_value(p: Path, text: str) -> None:
    """A .json file (one array, or one object over several lines) is not JSON Lines: say so and how to
    convert it, rather than call each of its lines invalid JSON."""
    stripped = text.strip()
    if not stripped.startswith(("[", "{")) or (stripped.startswith("{") and "\n" not in stripped):
        return  # not JSON at all, or one JSON Lines record
    try:
        value = json.loads(stripped)
    except ValueError:
        return  # JSON Lines (several values), or broken: the line-by-line problems say where
    record = isinstance(value, dict) and bool({"question", "messages"} & value.keys())  # one record, indented
    lists = [k for k, v in value.items() if isinstance(v, list)] if isinstance(value, dict) and not record else []
    what = "one JSON array" if isinstance(value, list) else "one JSON object over several lines"
    select = ".[]" if isinstance(value, list) else f".{lists[0]}[]" if len(lists) == 1 else "."
    target = p.with_suffix(".jsonl") if p.suffix != ".jsonl" else p.with_name(f"{p.stem}-lines.jsonl")
    fix = f"jq -c '{select}' {p} > {target}"
    raise UsageError(f"questions file {p} is {what}, not JSON Lines: write one question object a line "
                     f"(e.g. {fix}); {FORMAT_HINT}")


def _parse(rec: dict[str, Any], where: str, lineno: int, problems: list[str]) -> Question | None:
    start = len(problems)
    answerable = rec.get("answerable", True)
    if not isinstance(answerable, bool):
        problems.append(f"{where}: key 'answerable': expected true or false, got {answerable!r}")
        answerable = True
    sources = rec.get("sources", [])
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not all(isinstance(s, str) and s.strip() for s in sources):
        problems.append(f"{where}: key 'sources': expected a list of source paths (strings), got {sources!r}")
        sources = []
    old = rec.get("old_answer")
    if old is not None and not (isinstance(old, str) and old.strip()):  # else "gives the old answer" skips it unsaid
        problems.append(f"{where}: key 'old_answer': expected the answer the documents used to give (a non-empty "
                        f"string), got {old!r}")
    qid = rec.get("id", f"q{lineno}")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip():
        problems.append(f"{where}: key 'id': expected a non-empty string, got {qid!r}")
    history: list[dict[str, str]] = []
    if "messages" in rec:
        if "question" in rec or "answer" in rec:
            problems.append(f"{where}: give either 'messages' or 'question'/'answer', not both")
            return None
        question, answer, history = _from_messages(rec["messages"], where, problems)
    else:
        question, answer = rec.get("question"), rec.get("answer", "" if not answerable else None)
        if "question" not in rec:
            problems.append(f"{where}: missing key 'question'; {FORMAT_HINT}")
        elif not isinstance(question, str) or not question.strip():
            problems.append(f"{where}: key 'question': expected a non-empty string, got {question!r}")
        if answer is None:
            problems.append(
                f"{where}: missing key 'answer' (the reference answer); leave it out only with \"answerable\": false"
            )
        elif not isinstance(answer, str) or (answerable and not answer.strip()):
            problems.append(f"{where}: key 'answer': expected a non-empty string, got {answer!r}")
    if len(problems) > start:
        return None
    meta = {k: v for k, v in rec.items() if k not in KNOWN_KEYS}
    return Question(
        id=str(qid).strip(),
        question=str(question).strip(),
        answer=str(answer or "").strip(),
        sources=tuple(s.strip() for s in sources),
        answerable=answerable,
        history=tuple(history),
        meta=meta,
        line=lineno,
    )


def _from_messages(messages: Any, where: str, problems: list[str]) -> tuple[str, str, list[dict[str, str]]]:
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where}: key 'messages': expected a non-empty list of {{\"role\", \"content\"}} turns")
        return "", "", []
    ok = True
    for i, m in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: key '{key}': expected an object with 'role' and 'content', got {m!r}")
            ok = False
        elif m.get("role") not in ROLES:
            problems.append(f"{where}: key '{key}.role': expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
            ok = False
        elif not isinstance(m.get("content"), str):
            problems.append(f"{where}: key '{key}.content': expected a string, got {m.get('content')!r}")
            ok = False
    if not ok:
        return "", "", []
    last_a = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_a < 0:
        problems.append(f"{where}: key 'messages': no assistant turn; the last assistant turn is the reference answer")
        return "", "", []
    last_u = max((i for i, m in enumerate(messages[:last_a]) if m["role"] == "user"), default=-1)
    if last_u < 0:
        problems.append(f"{where}: key 'messages': no user turn before the last assistant turn (the question)")
        return "", "", []
    question, answer = messages[last_u]["content"], messages[last_a]["content"]
    if not question.strip():
        problems.append(f"{where}: key 'messages[{last_u}].content': the question is empty")
    if not answer.strip():
        problems.append(f"{where}: key 'messages[{last_a}].content': the reference answer is empty")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:last_u]]
    return question, answer, history
