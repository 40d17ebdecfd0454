"""Check a chat JSONL file: every problem with its line number; with a tokenizer, the token checks too.

    from ragtune.train.data_check import check_file, write_clean

    rep = check_file("train.jsonl", tokenizer=None, chat_template=None, max_length=1024, dedupe=False)
    rep.records                         # the valid records (ragtune.train.records.Record)
    write_clean(rep, "clean.jsonl")     # valid records, and clean.rejected.jsonl with each rejected line's reasons

    ragtune data check train.jsonl [--model DIR] [--max-length 1024] [--json] [--write-clean OUT [--force]]

Structural checks need no model (ragtune.train.records); with a tokenizer and chat template the token
checks run too (answers truncated away by max_length, records whose assistant mask is empty) and the
stats report token counts. A file that is one JSON array, or records spread over several lines, is
reported as such. Nothing here imports torch.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ragtune.errors import UsageError
from ragtune.train.data_files import (TABLE_SUFFIXES, TOO_DEEP, _refuse_existing, _whole_file_values, json_hint,
                                      read_lines, refuse_file_as_folder)
from ragtune.train.data_report import KINDS, CheckReport, Problem
from ragtune.train.records import Record, fold, record_problems, record_prompt, uses_tools


def check_file(
    path: str | Path,
    tokenizer: Any = None,
    chat_template: str | None = None,
    max_length: int = 1024,
    tokenize: Callable[..., Any] | None = None,
    dedupe: bool = False,
) -> CheckReport:
    """Check every line; with a tokenizer also the token-level problems and token stats.

    Exact repeats are noted and kept (users upsample on purpose), or dropped with `dedupe`; records
    that use tools are noted and left out."""
    p = Path(path)
    if p.suffix.lower() in TABLE_SUFFIXES and p.is_file():
        raise UsageError(
            f"'{p}' is a {p.suffix.lower()[1:].upper()} file, not chat JSONL: write chat records from it with "
            f"'ragtune data convert {p}' (naming --question-col and --answer-col for a question/answer table)")
    report = CheckReport(path=str(p))
    seen: dict[str, int] = {}
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
        typed = _typed_control_tokens(tokenizer, r.messages)
        if typed:
            report.problems.append(Problem(r.line, "control_token", typed))
            report.rejected[r.line] = r.raw
            continue
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


def _typed_control_tokens(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """Why a record that types one of the model's control tokens (`<|im_end|>`) in a content cannot be
    trained on ("" when none does): serving reads a typed control token as text (serve/prompt_ids.py),
    while the rendered training text would read it as a turn marker, so the two would differ."""
    from ragtune.serve.prompt_ids import mask_typed

    try:
        _, _, typed = mask_typed(tokenizer, list(messages))
    except (TypeError, AttributeError):  # a tokenizer without a `tokenizers` backend has no such table
        return ""
    if typed is None:
        return ""
    for i, m in enumerate(messages, 1):
        found = [t for t in dict.fromkeys(typed.tokens) if isinstance(m.get("content"), str) and t in m["content"]]
        if found:
            return (f"message {i} ({m.get('role')}) holds {', '.join(repr(t) for t in found)}, a control token of the "
                    "model: serving reads it as plain text, training would read it as a turn marker; remove it "
                    "or write it another way")
    return ""


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
    refuse_file_as_folder(out.parent, "--write-clean's folder")
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
