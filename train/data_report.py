"""The check report: every problem with its line number, grouped by kind, and the stats.

    from ragtune.train.data_report import KINDS, CheckReport, Problem

    rep = check_file("train.jsonl")     # ragtune.train.data_check: a CheckReport
    rep.ok                              # no problems and at least one valid record
    print(rep.format())                 # problems grouped by kind (KINDS order), notes, token stats
    rep.as_dict()                       # the --json form
    rep.conflict_note(), rep.duplicate_note(), rep.tool_note()   # one line each, "" when nothing to say
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ragtune.train.records import Record

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
    "control_token": "a content types one of the model's control tokens",
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
        return not self.problems and bool(self.records)  # a file of skipped records (tools) trains nothing

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
        elif not self.records and not self.problems:
            out.append("no record is left to train on: every one is skipped (see the note below)")
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
