"""Chat JSONL: check (every problem, with its line number), clean, convert and split.

    ragtune data check train.jsonl [--model DIR] [--max-length 1024] [--json] [--write-clean OUT [--force]]
    ragtune data convert faq.csv --question-col question --answer-col answer [--system TEXT] [--out F] [--force]
    ragtune data split train.jsonl --eval-fraction 0.1 --seed 42 [--out-dir DIR] [--force] [--skip-invalid]

No command replaces a file that is there already unless --force, and none writes over its input.

The format is OpenAI fine-tuning JSONL: one {"messages": [{"role", "content"}, ...]} per line,
roles system/user/assistant; assistant messages may carry "weight": 0 or 1 (0 = not trained).
Structural checks need no model; with a tokenizer and chat template the token checks run too
(answers truncated away by max_length, records whose assistant mask is empty) and the stats
report token counts. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ragtune.errors import CheckFailed, UsageError
from ragtune.text import UTF16_BOMS, detect_encoding

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
RECORD_KEYS = ("messages", "sources")  # sources: the documents an answer is grounded in (train/rag.py)
MESSAGE_KEYS = ("role", "content", "weight")

# kind -> heading, in the order reports list them
KINDS: dict[str, str] = {
    "not_utf8": "not valid UTF-8",
    "invalid_json": "not valid JSON",
    "not_jsonl": "not JSON Lines",
    "not_object": "record is not a JSON object",
    "other_format": "another tool's record format",
    "messages_missing": "'messages' missing",
    "messages_not_list": "'messages' is not a list",
    "messages_empty": "'messages' is empty",
    "message_not_object": "message is not an object",
    "role_missing": "'role' missing",
    "role_not_string": "'role' is not a string",
    "content_missing": "'content' missing",
    "content_not_string": "'content' is not a string",
    "unknown_role": "unknown role",
    "unknown_key": "unknown key",
    "bad_weight": "'weight' is not 0 or 1",
    "empty_content": "empty or whitespace-only content",
    "no_assistant": "no assistant message",
    "role_order": "roles out of order",
    "template_error": "chat template cannot render the record",
    "answer_truncated": "assistant answer truncated away by max_length",
    "empty_assistant_mask": "assistant mask is empty (nothing to train on)",
}


@dataclass
class Problem:
    line: int
    kind: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "message": self.message}


@dataclass
class Record:
    line: int
    messages: list[dict[str, Any]]
    raw: str
    enc: Any = None  # template.Encoded, set by the token checks


@dataclass
class CheckReport:
    path: str
    lines: int = 0  # non-blank lines
    records: list[Record] = field(default_factory=list)  # valid records
    problems: list[Problem] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # line -> raw text of invalid records
    stats: dict[str, Any] = field(default_factory=dict)
    # valid records that ask the same question with different answers: [[line, line, ...], ...]
    conflicts: list[list[int]] = field(default_factory=list)
    # exact repeats of an earlier record: [[first line, repeat, ...], ...]; kept unless dedupe
    duplicates: list[list[int]] = field(default_factory=list)
    deduped: int = 0  # repeats dropped (dedupe=True)
    tool_lines: list[int] = field(default_factory=list)  # records that use tools or function calling (skipped)

    @property
    def ok(self) -> bool:
        return not self.problems and self.lines > 0

    def by_kind(self) -> dict[str, list[Problem]]:
        out: dict[str, list[Problem]] = {}
        for kind in KINDS:
            items = [p for p in self.problems if p.kind == kind]
            if items:
                out[kind] = items
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "ok": self.ok,
            "lines": self.lines,
            "valid_records": len(self.records),
            "invalid_records": len(self.rejected),
            "problems": {k: [p.as_dict() for p in v] for k, v in self.by_kind().items()},
            "conflicting_answers": self.conflicts,
            "duplicates": self.duplicates,
            "deduplicated": self.deduped,
            "tool_records": self.tool_lines,
            "stats": self.stats,
        }

    def conflict_note(self) -> str:
        """What to say about questions asked with different answers ("" when there are none)."""
        if not self.conflicts:
            return ""
        shown = "; ".join("lines " + ", ".join(map(str, c)) for c in self.conflicts[:5])
        more = f"; and {len(self.conflicts) - 5} more (--json lists all)" if len(self.conflicts) > 5 else ""
        return (f"{len(self.conflicts)} question{'s are' if len(self.conflicts) > 1 else ' is'} asked with different "
                f"answers in {self.path} ({shown}{more}): the model learns a mix of them; keep one answer per "
                "question unless the answers are meant as paraphrases")

    def duplicate_note(self) -> str:
        """What to say about exact repeats ("" when there are none)."""
        if not self.duplicates:
            return ""
        n = sum(len(g) - 1 for g in self.duplicates)
        shown = "; ".join("lines " + ", ".join(map(str, g)) for g in self.duplicates[:5])
        more = f"; and {len(self.duplicates) - 5} more (--json lists all)" if len(self.duplicates) > 5 else ""
        what = (f"dropped ({n} record{'s' if n > 1 else ''}, data.dedupe)" if self.deduped else
                "kept (repeats weigh a record more; set data.dedupe=true to drop them)")
        return f"{n} record{'s repeat' if n > 1 else ' repeats'} an earlier one exactly in {self.path} ({shown}{more}): {what}"

    def tool_note(self) -> str:
        """One line on the records that use tools ("" when there are none)."""
        if not self.tool_lines:
            return ""
        n = len(self.tool_lines)
        lines = ", ".join(map(str, self.tool_lines[:10])) + (", ..." if n > 10 else "")
        return (f"{self.path}: {n} record{'s use' if n > 1 else ' uses'} tools or function calling (lines {lines}), "
                "which ragtune does not train yet: skipped")

    def format(self, limit: int = 20) -> str:
        """Human report: problems grouped by kind, each with its line number, then stats."""
        out = [
            f"{self.path}: {self.lines} records, {len(self.records)} valid, "
            f"{len(self.rejected)} invalid ({len(self.problems)} problems)"
        ]
        if not self.lines:
            out.append("the file holds no records (it is empty, or every line is blank)")
        for kind, items in self.by_kind().items():
            out.append(f"{KINDS[kind]} ({len(items)}):")
            for p in items[:limit]:
                out.append(f"  line {p.line}: {p.message}")
            if len(items) > limit:
                out.append(f"  ... and {len(items) - limit} more (--json lists all)")
        if self.tool_lines:
            out.append(f"note: {self.tool_note()}")
        if self.duplicates:
            out.append(f"note: {self.duplicate_note()}")
        if self.conflicts:
            out.append(f"note: {self.conflict_note()}")
        s = self.stats
        if s:
            out.append(f"stats: {s.get('records', 0)} valid records, {s.get('turns', 0)} turns "
                       f"({s.get('assistant_turns', 0)} assistant)")
            if s.get("tokens"):
                t = s["tokens"]
                out.append(
                    f"  tokens per record: min {t['min']} / median {t['median']} / p95 {t['p95']} / max {t['max']}; "
                    f"tokens per epoch {s['tokens_per_epoch']} ({s['trained_tokens_per_epoch']} trained); "
                    f"{s['over_max_length']} records exceed max_length {s['max_length']}"
                )
                if s.get("cut_lines"):
                    lines = ", ".join(map(str, s["cut_lines"][:10])) + (", ..." if len(s["cut_lines"]) > 10 else "")
                    out.append(f"note: the answers of {len(s['cut_lines'])} record(s) are cut at max_length (lines "
                               f"{lines}): their ends and stop tokens are not trained; raise data.max_length "
                               "(--max-length) or shorten them")
            elif s.get("tokens_note"):
                out.append(f"  {s['tokens_note']}")
        return "\n".join(out)


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


def read_lines(path: Path, encoding: str = "auto") -> list[tuple[int, bytes]]:
    """The file's lines as UTF-8 bytes, numbered from 1: a UTF-8 BOM dropped; UTF-16 with its BOM (as
    Windows tools save "Unicode" text) or a named `encoding` re-encoded. Undecodable UTF-8 stays as
    bytes, for the check to report line by line."""
    if not path.is_file():
        raise UsageError(f"data file '{path}' " + ("is not a file" if path.exists() else "does not exist"))
    data = path.read_bytes()
    if encoding != "auto" or data.startswith(UTF16_BOMS):
        data = decode_text(path, data, encoding).encode("utf-8")
    elif data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return [(n, line) for n, line in enumerate(data.split(b"\n"), 1)]


def decode_text(path: Path, data: bytes, encoding: str = "auto") -> str:
    """Text of a file: UTF-8 (BOM or not), UTF-16 with a BOM, or the encoding named; a clear error
    with the line of the first undecodable byte otherwise."""
    if encoding == "auto":
        encoding = "utf-16" if data.startswith(UTF16_BOMS) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except LookupError:
        raise UsageError(f"--encoding {encoding!r}: no such text encoding (try utf-8, cp949, cp1252, utf-16)") from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        name = "UTF-8" if encoding == "utf-8-sig" else encoding
        guess = detect_encoding(data) if encoding == "utf-8-sig" else None
        hint = (f"it reads as {guess}: --encoding {guess}" if guess else
                "e.g. --encoding cp949 (Korean Windows/Excel) or --encoding cp1252 (Western Windows/Excel)")
        raise UsageError(
            f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not {name} text; save the file as UTF-8 "
            f"(Excel: 'CSV UTF-8'), or name its encoding ({hint})"
        ) from None


def check_file(
    path: str | Path,
    tokenizer: Any = None,
    chat_template: str | None = None,
    max_length: int = 1024,
    tokenize: Callable[..., Any] | None = None,
    dedupe: bool = False,
    lines: list[tuple[int, bytes]] | None = None,
) -> CheckReport:
    """Check every line; with a tokenizer also the token-level problems and token stats.

    Exact repeats are noted and kept (users upsample on purpose), or dropped with `dedupe`; records
    that use tools are noted and left out. `lines` is the file as read_lines(path) already read it,
    for a caller that goes on to use those same lines."""
    p = Path(path)
    if p.suffix.lower() in TABLE_SUFFIXES and p.is_file():
        raise UsageError(
            f"'{p}' is a {p.suffix.lower()[1:].upper()} file, not chat JSONL: write chat records from it with "
            f"'ragtune data convert {p}' (naming --question-col and --answer-col for a question/answer table)")
    report = CheckReport(path=str(p))
    seen: dict[str, int] = {}
    if lines is None:
        lines = read_lines(p)
    first = next((line.strip() for _, line in lines if line.strip()), b"")
    opens_alone = first in (b"[", b"{")  # plainly not one record per line: try the whole file first
    whole = _whole_file_values(lines) if opens_alone else None
    items: list[tuple[int, str, Any]] = []
    if whole is None:
        items = list(_line_items(lines, report))
        if report.problems and not opens_alone:
            whole = _whole_file_values(lines)
    if whole is not None:  # a JSON array, or records pretty-printed over several lines
        shape = "one JSON array" if whole[0] == "array" else "JSON spread over several lines"
        report.problems = [Problem(1, "not_jsonl", (
            f"the file is {shape} ({len(whole[1])} records), not JSON Lines (one record per line); "
            f"'ragtune data check {p} --write-clean OUT.jsonl' writes the valid ones one per line"))]
        report.rejected.clear()
        report.lines = len(whole[1])
        items = [(n, json.dumps(obj, ensure_ascii=False), obj) for n, obj in whole[1]]
    repeats: dict[int, list[int]] = {}  # first line -> [first line, repeats...]
    for n, raw, obj in items:
        if uses_tools(obj):
            report.tool_lines.append(n)
            continue
        probs = record_problems(obj)
        if probs:
            report.problems.extend(Problem(n, k, m) for k, m in probs)
            report.rejected[n] = raw
            continue
        key = json.dumps(obj, sort_keys=True, ensure_ascii=False)  # the whole record: its sources too
        if key in seen:
            repeats.setdefault(seen[key], [seen[key]]).append(n)
            if dedupe:
                report.deduped += 1
                continue
        else:
            seen[key] = n
        report.records.append(Record(n, obj["messages"], raw))
    report.duplicates = list(repeats.values())
    report.conflicts = _conflicting_answers(report.records)
    _token_checks(report, tokenizer, chat_template, max_length, tokenize)
    return report


def _conflicting_answers(records: list[Record]) -> list[list[int]]:
    """Lines of records that ask the same question (case and spacing folded) with different final answers."""
    groups: dict[str, dict[str, int]] = {}
    for r in records:
        answer = fold(r.messages[-1].get("content", ""))
        groups.setdefault(record_prompt(r), {}).setdefault(answer, r.line)
    return [sorted(answers.values()) for answers in groups.values() if len(answers) > 1]


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")  # what convert reads and check does not


def _line_items(lines: list[tuple[int, bytes]], report: CheckReport) -> Iterator[tuple[int, str, Any]]:
    """(line number, text, parsed value) of each JSON line; undecodable and invalid lines are reported."""
    for n, raw_bytes in lines:
        if not raw_bytes.strip():
            continue
        report.lines += 1
        try:
            raw = raw_bytes.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            report.problems.append(Problem(n, "not_utf8", f"byte {exc.start}: {exc.reason}; save the file as UTF-8"))
            report.rejected[n] = raw_bytes.decode("utf-8", errors="replace")
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.problems.append(Problem(n, "invalid_json", f"{exc.msg} at column {exc.colno}{json_hint(raw, exc)}"))
            report.rejected[n] = raw
            continue
        except RecursionError:
            report.problems.append(Problem(n, "invalid_json", TOO_DEEP))
            report.rejected[n] = raw
            continue
        yield n, raw, obj


# json.loads gives up (RecursionError) past about a thousand levels of [ and {
TOO_DEEP = ("nested too deeply: more levels of [ and { than the JSON reader follows (a record needs a few); "
            "the line is damaged, or not a record")


def json_hint(raw: str, exc: json.JSONDecodeError) -> str:
    """What a hand-edited line most likely got wrong, and the text near the error."""
    at = exc.pos
    before = raw[:at].rstrip()
    hint = ""
    if any(q in raw for q in "\u201c\u201d\u201e"):
        hint = "curly quotes (\u201c \u201d) where JSON needs straight double quotes (\")"
    elif (at < len(raw) and raw[at] == "'") or raw.lstrip().startswith("{'"):
        hint = "single quotes: JSON keys and strings need double quotes (a Python dict? write records with json.dumps)"
    elif at < len(raw) and raw[at] in "]}" and before.endswith(","):
        hint = f"a comma before '{raw[at]}': JSON allows no trailing comma"
    elif exc.msg.startswith("Invalid control character"):
        hint = "a tab or line break inside a string: write it as \\t or \\n"
    elif exc.msg.startswith("Extra data") and raw[at:].lstrip().startswith("{"):
        hint = "two records on one line: put each on its own line"
    elif exc.msg.startswith(("Expecting property name", "Expecting value")) and raw.strip() in ("{", "[", "}", "]", "},"):
        hint = "a record spread over several lines: JSON Lines needs one whole record per line"
    near = raw[max(0, at - 20):at + 20].replace("\t", " ")
    return f" ({hint}; near: {near!r})" if hint else f" (near: {near!r})"


def _whole_file_values(lines: list[tuple[int, bytes]]) -> tuple[str, list[tuple[int, Any]]] | None:
    """The records of a file that is one JSON array or holds values spread over several lines (each with
    the line it starts on), or None when the file is not such a file (or is proper JSON Lines)."""
    try:
        text = b"\n".join(line for _, line in lines).decode("utf-8")
    except UnicodeDecodeError:
        return None
    body = text.strip()
    if not body or (body[0] != "[" and "\n" not in body):
        return None
    dec = json.JSONDecoder()
    spaces = re.compile(r"\s*")
    skip = lambda pos: spaces.match(text, pos).end()  # noqa: E731
    counted = [0, 1]  # position, line: counted on from the last value (files can be large)

    def line_of(pos: int) -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    out: list[tuple[int, Any]] = []
    pos = skip(0)
    try:
        if text[pos] == "[":
            pos = skip(pos + 1)
            while text[pos] != "]":
                obj, end = dec.raw_decode(text, pos)
                out.append((line_of(pos), obj))
                pos = skip(end)
                if text[pos] == ",":
                    pos = skip(pos + 1)
            return ("array", out) if not text[pos + 1:].strip() else None
        multiline = False
        while pos < len(text):
            obj, end = dec.raw_decode(text, pos)
            multiline |= "\n" in text[pos:end]
            out.append((line_of(pos), obj))
            pos = skip(end)
    except (ValueError, IndexError, RecursionError):
        return None
    return ("lines", out) if multiline else None


def _turn_stats(recs: list[Record]) -> dict[str, int]:
    return {"records": len(recs), "turns": sum(len(r.messages) for r in recs),
            "assistant_turns": sum(1 for r in recs for m in r.messages if m["role"] == "assistant")}


def _token_checks(report: CheckReport, tokenizer: Any, chat_template: str | None, max_length: int,
                  tokenize: Callable[..., Any] | None) -> None:
    recs = report.records
    stats: dict[str, Any] = {**_turn_stats(recs), "max_length": max_length}
    report.stats = stats
    if tokenizer is None:
        stats["tokens_note"] = "token checks skipped: no model (pass --model DIR or run 'ragtune models prepare')"
        return
    if tokenize is None:
        from ragtune.train.template import tokenize_conversation as tokenize
    lengths: list[int] = []
    trained = 0
    over = 0
    cut: list[int] = []
    keep: list[Record] = []
    for r in recs:
        try:
            enc = tokenize(tokenizer, r.messages, chat_template)
        except UsageError as exc:
            report.problems.append(Problem(r.line, "template_error", str(exc)))
            report.rejected[r.line] = r.raw
            continue
        n = len(enc.input_ids)
        mask = enc.mask
        if not any(mask):
            report.problems.append(Problem(r.line, "empty_assistant_mask",
                                           "no token of the assistant answer is trained (empty answer or weight 0 everywhere)"))
            report.rejected[r.line] = r.raw
            continue
        if n > max_length:
            over += 1
            if not any(mask[:max_length]):
                first = mask.index(1)
                report.problems.append(Problem(
                    r.line, "answer_truncated",
                    f"{n} tokens; the first assistant token is at {first}, past max_length {max_length}: "
                    "shorten the prompt or raise data.max_length"))
                report.rejected[r.line] = r.raw
                continue
        if n > max_length and len(mask) - mask[::-1].index(1) > max_length:
            cut.append(r.line)  # kept, but the answer's end (and its stop token) falls past max_length
        r.enc = enc
        lengths.append(n)
        trained += sum(mask[:max_length])
        keep.append(r)
    report.records = keep
    stats["cut_lines"] = cut
    stats.update(_turn_stats(keep))
    if lengths:
        s = sorted(lengths)
        stats["tokens"] = {
            "min": s[0],
            "median": int(statistics.median(s)),
            "p95": s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))],
            "max": s[-1],
        }
    stats["tokens_per_epoch"] = sum(min(n, max_length) for n in lengths)
    stats["trained_tokens_per_epoch"] = trained
    stats["over_max_length"] = over


def _exists(p: Path) -> bool:
    """Whether writing P would replace something: 'new/../x' names x though 'new' is not there yet
    (the writer creates it), so the path is resolved first."""
    return p.exists() or p.resolve().exists()


def _refuse_existing(paths: list[Path], other: str) -> None:
    """Refuse outputs that are there already (the fix: --force, or OTHER)."""
    existing = [t for t in paths if _exists(t)]
    if existing:
        were = "already exists" if len(existing) == 1 else "already exist"
        raise UsageError(f"{' and '.join(repr(str(t)) for t in existing)} {were}; pass --force to replace, or {other}")


def clean_targets(path: str | Path, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Where `--write-clean OUT` writes for the checked file PATH: (OUT, OUT's stem + .rejected.jsonl).

    Refused before anything is checked: a target that is PATH itself (the check would rewrite its own
    input), a folder, or an existing file unless `force`."""
    src, out = Path(path), Path(out)
    quarantine = out.with_name(out.stem + ".rejected.jsonl")
    for target, what in ((out, "--write-clean"), (quarantine, "its rejected-lines file")):
        if target.resolve() == src.resolve():
            raise UsageError(f"{what} '{target}' is the file being checked ('{src}'); write to another file, "
                             "look the result over, then replace the original yourself")
        if target.resolve().is_dir():
            raise UsageError(f"{what} '{target}' is a folder; name a file, such as '{target / 'clean.jsonl'}'")
    if not force:
        _refuse_existing([out, quarantine], "name another --write-clean file")
    return out, quarantine


def write_clean(report: CheckReport, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write the valid records to OUT and each rejected line with its reasons to OUT.rejected.jsonl
    (refused as `clean_targets` says)."""
    from ragtune.io import atomic_write_jsonl, atomic_write_text

    out, quarantine = clean_targets(report.path, out, force)
    atomic_write_text(out, "".join(json.dumps({"messages": r.messages}, ensure_ascii=False) + "\n"
                                   for r in report.records))
    reasons: dict[int, list[str]] = {}
    for p in report.problems:
        reasons.setdefault(p.line, []).append(f"{KINDS[p.kind]}: {p.message}")
    rows = [{"line": n, "reasons": reasons.get(n, []), "text": text} for n, text in sorted(report.rejected.items())]
    atomic_write_jsonl(quarantine, rows)
    return out, quarantine


# --- convert / split ------------------------------------------------------------------------


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r})


def _read_table(path: Path, encoding: str = "auto") -> tuple[list[str], list[dict[str, Any]]]:
    import csv

    suffix = path.suffix.lower()
    if suffix == ".parquet":  # as the Hugging Face hub serves datasets
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several kinds for a damaged file
            raise UsageError(f"{path}: not a readable Parquet file ({exc})") from exc
        return _columns(rows), rows
    if suffix == ".json":  # a JSON array of objects (alpaca_data.json and most hub exports)
        try:
            rows = json.loads(decode_text(path, path.read_bytes(), encoding))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}; .json input "
                             "must be one array of objects (name JSON Lines files .jsonl)") from None
        except RecursionError:
            raise UsageError(f"{path}: {TOO_DEEP}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UsageError(f"{path}: expected a JSON array of objects (name JSON Lines files .jsonl)")
        return _columns(rows), rows
    if suffix == ".jsonl":
        rows = []
        for n, line in read_lines(path, encoding):
            if not line.strip():
                continue
            try:
                raw = line.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}: line {n}: byte 0x{line[exc.start]:02x} is not UTF-8 text; save the file as "
                                 "UTF-8, or name its encoding (e.g. --encoding cp949 or --encoding cp1252)") from None
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}: line {n}: invalid JSON: {exc.msg} at column {exc.colno}"
                                 f"{json_hint(raw, exc)}; each line must be one JSON object") from None
            except RecursionError:
                raise UsageError(f"{path}: line {n}: {TOO_DEEP}") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{path}: line {n}: expected a JSON object with the question and answer columns")
            rows.append(obj)
        return _columns(rows), rows
    if suffix not in (".csv", ".tsv"):
        raise UsageError(f"'{path}': convert reads .csv, .tsv, .jsonl, .json or .parquet files")
    text = decode_text(path, path.read_bytes(), encoding)
    # the csv module refuses fields over 128 KiB by default; the text is in memory already, so a long
    # answer is no risk: allow any size (the largest the C long takes)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as exc:
        raise UsageError(f"{path}: line {reader.line_num}: not readable as {suffix[1:].upper()} ({exc}); check the "
                         "quoting on that line, or convert from .jsonl") from None


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


def _format_messages(fmt: str, row: dict[str, Any], system: str) -> tuple[list[dict[str, str]], str]:
    """One record of a recognised format as chat messages, or ([], why it was skipped)."""
    if fmt == "sharegpt":
        msgs = []
        for j, turn in enumerate(row["conversations"], 1):
            if not isinstance(turn, dict):
                return [], f"turn {j} is not an object"
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                return [], f"turn {j} is from {turn.get('from')!r}, which has no chat role (allowed: human, gpt, system)"
            msgs.append({"role": role, "content": str(turn.get("value") or "").strip()})
        sys_text = str(row.get("system") or system).strip()
        if sys_text and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": sys_text})
        return msgs, ""
    if fmt == "alpaca":
        q = "\n\n".join(str(row.get(k) or "").strip() for k in ("instruction", "input") if str(row.get(k) or "").strip())
        pairs = [("user", q), ("assistant", str(row.get("output") or "").strip())]
        sys_text = str(row.get("system") or system).strip()
    else:
        pairs = [("user", row["prompt"].strip()), ("assistant", row["completion"].strip())]
        sys_text = system
    if not pairs[0][1] or not pairs[1][1]:
        return [], f"empty {'question' if not pairs[0][1] else 'answer'}"
    return ([{"role": "system", "content": sys_text}] if sys_text else []) + [
        {"role": r, "content": c} for r, c in pairs], ""


def _absent_columns(row: dict[Any, Any], cols: list[str], absent: list[str], table: bool) -> str:
    """Why a row lacks a named column: a CSV/TSV row with fewer fields than the header, or a record without the key."""
    names = " and ".join(map(repr, absent))
    if not table:
        return f"no {names} key"
    n = sum(1 for k, v in row.items() if k is not None and v is not None)
    return (f"{n} column{'' if n == 1 else 's'} where the header has {len(cols)}: no {names} on this row (a line "
            "break inside an unquoted field, or a missing separator? quote the field)")


def _convert_dest(src: Path, out: str | Path | None) -> tuple[Path, str]:
    """Where convert writes (--out, else FILE.chat.jsonl beside FILE) and how to name it in a message;
    refused when it is the input or a folder."""
    dest = Path(out) if out else src.with_name(src.stem + ".chat.jsonl")
    what = f"--out '{dest}'" if out else f"the output '{dest}' (FILE.chat.jsonl, the default)"
    if dest.resolve() == src.resolve():
        raise UsageError(f"--out '{dest}' is the input file; name another file for the chat JSONL")
    if dest.resolve().is_dir():
        raise UsageError(f"{what} is a folder; name a file, such as '{dest / (src.stem + '.jsonl')}'")
    return dest, what


def convert(path: str | Path, question_col: str = "", answer_col: str = "", system: str = "",
            out: str | Path | None = None, encoding: str = "auto", force: bool = False) -> tuple[Path, int, list[str]]:
    """Question/answer table, or ShareGPT / Alpaca / prompt-completion records -> chat JSONL (UTF-8,
    non-ASCII kept). Returns (out, written, skipped notes). An existing output is replaced only with
    `force`, and never when it is the input."""
    from ragtune.io import atomic_write_jsonl

    src = Path(path)
    if not src.is_file():
        raise UsageError(f"input file '{src}' " + ("is not a file" if src.exists() else "does not exist"))
    dest, what = _convert_dest(src, out)
    cols, rows = _read_table(src, encoding)
    fmt = ""
    if not (question_col or answer_col):
        fmt = detect_format(rows[0]) if rows else ""
        if rows and "messages" in rows[0]:
            if src.suffix.lower() == ".jsonl":
                raise UsageError(f"{src} already holds chat records {{\"messages\": [...]}}; check it with "
                                 f"'ragtune data check {src}'")
            fmt = "messages"  # chat records in a JSON array or Parquet: written out as JSON Lines
        if not fmt:
            raise UsageError(
                f"{src}: name the columns with --question-col and --answer-col (columns are: "
                f"{', '.join(cols) or '(none)'}); without them convert reads "
                + "; ".join(f"{name} records {shape}" for name, shape in FORMATS.values()))
    elif not (question_col and answer_col):
        raise UsageError("give both --question-col and --answer-col (or neither, for ShareGPT, Alpaca or "
                         "prompt/completion records)")
    missing = [c for c in (question_col, answer_col) if c and c not in cols]
    if missing:
        raise UsageError(f"{src}: no column {', '.join(map(repr, missing))}; columns are: {', '.join(cols) or '(none)'}")
    if _exists(dest) and not force:
        raise UsageError(f"{what} already exists; pass --force to replace it, or name another file with --out")
    records, skipped = [], []
    table = src.suffix.lower() in (".csv", ".tsv")
    first_data_line = 2 if table else 1
    for i, row in enumerate(rows):
        where = f"{'record' if src.suffix.lower() == '.json' else 'row'} {i + first_data_line}"
        if row.get(None):  # csv.DictReader keeps fields beyond the header's under None
            skipped.append(f"{where}: {len(cols) + len(row[None])} fields, the header has "
                           f"{len(cols)} (a comma or tab inside an unquoted field? quote it)")
            continue
        if fmt == "messages":
            msgs = row.get("messages")
            if not isinstance(msgs, list):
                skipped.append(f"{where}: no 'messages' list")
                continue
            # Parquet gives every message every key any message has, as None where it had none
            records.append({"messages": [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                                         for m in msgs]})
            continue
        if fmt:
            if detect_format(row) != fmt:
                skipped.append(f"{where}: not a {FORMATS[fmt][0]} record like the first")
                continue
            msgs, why = _format_messages(fmt, row, system)
            if not msgs:
                skipped.append(f"{where}: {why}")
                continue
            records.append({"messages": msgs})
            continue
        absent = [c for c in (question_col, answer_col) if c not in row or (table and row[c] is None)]
        if absent:
            skipped.append(f"{where}: {_absent_columns(row, cols, absent, table)}")
            continue
        q, a = row.get(question_col), row.get(answer_col)
        q = "" if q is None else str(q).strip()
        a = "" if a is None else str(a).strip()
        if not q or not a:
            skipped.append(f"{where}: empty {'question' if not q else 'answer'}")
            continue
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"messages": msgs})
    if records:  # no records is no result: nothing written, an existing file left as it was
        atomic_write_jsonl(dest, records)
    return dest, len(records), skipped


def split(path: str | Path, eval_fraction: float, seed: int = 42, out_dir: str | Path | None = None,
          force: bool = False, skip_invalid: bool = False) -> tuple[Path, Path, int, int, int]:
    """Deterministic train/eval split of the file's records (same file + fraction + seed = same split).

    The file is checked as `train` checks it (structure only): invalid records stop the split unless
    `skip_invalid`, which leaves them out. Existing outputs are replaced only with `force`.
    Returns (train file, eval file, train records, eval records, invalid records left out)."""
    from ragtune.io import atomic_write_text

    src = Path(path)
    if not 0 < eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    d = Path(out_dir) if out_dir else src.parent
    tr, ev = d / f"{src.stem}.train.jsonl", d / f"{src.stem}.eval.jsonl"
    if not force:
        _refuse_existing([tr, ev], "--out-dir DIR to write elsewhere")
    raw = read_lines(src)  # read once: the lines checked are the lines split
    rep = check_file(src, lines=raw)
    rep.stats = {}  # no token checks here: the report lists the problems only
    whole = any(p.kind == "not_jsonl" for p in rep.problems)  # records are not lines: nothing to skip
    valid = len(rep.records) + len(rep.tool_lines)
    if rep.problems and (not skip_invalid or whole or not valid):
        fix = "" if whole or not valid else f", or pass --skip-invalid to split the {valid} valid records"
        raise CheckFailed(f"{src} has problems; nothing was split:\n{rep.format()}\nfix the lines above (or write the "
                          f"valid records with 'ragtune data check {src} --write-clean CLEAN.jsonl' and split that)"
                          + fix)
    lines = [ln.decode("utf-8") for n, ln in raw if ln.strip() and n not in rep.rejected]
    if len(lines) < 2:
        raise UsageError(f"'{src}' holds {len(lines)} {'valid ' if rep.rejected else ''}record(s); a split needs at least 2")
    train_lines, eval_lines = split_items(lines, eval_fraction, seed, key=_line_prompt)
    atomic_write_text(tr, "".join(ln.rstrip("\r") + "\n" for ln in train_lines))
    atomic_write_text(ev, "".join(ln.rstrip("\r") + "\n" for ln in eval_lines))
    return tr, ev, len(train_lines), len(eval_lines), len(rep.rejected)


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


def _line_prompt(line: str) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return line
    return prompt_key(obj.get("messages")) if isinstance(obj, dict) else line


def record_prompt(record: Record) -> str:
    return prompt_key(record.messages)


def split_items(items: list[Any], eval_fraction: float, seed: int,
                key: Callable[[Any], Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Hold out about round(n * fraction) items (at least 1 when n > 1) chosen by a seeded shuffle; order kept.

    Items with the same `key` (records asking the same question) stay on one side, so the held-out
    part never contains a question the model was trained on.
    """
    n = len(items)
    k = int(round(n * eval_fraction))
    k = min(max(k, 1), n - 1) if n > 1 else 0
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault(key(x) if key else i, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # all singletons: the same draw as shuffling the indexes
    held: set[int] = set()
    for g in order:
        if len(held) >= k:
            break
        if len(held) + len(g) < n:  # keep something to train on
            held.update(g)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
