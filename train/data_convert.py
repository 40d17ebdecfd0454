"""Convert a question/answer table, or another tool's records, to chat JSONL.

    ragtune data convert faq.csv --question-col question --answer-col answer [--system TEXT] [--out F] [--force]

    from ragtune.train.data_convert import convert

    out, written, skipped = convert("faq.csv", "question", "answer", system="", out=None)   # faq.chat.jsonl
    convert("sharegpt.json")            # ShareGPT, Alpaca or prompt/completion records: found, no columns named

Reads .csv .tsv .json .jsonl .parquet (ragtune.train.data_files); writes UTF-8 with non-ASCII kept,
atomically. An existing output is replaced only with `force`, and never when it is the input; rows
that cannot be converted are skipped and each is named in `skipped`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragtune.errors import UsageError
from ragtune.train.data_files import _exists, _read_table, refuse_file_as_folder
from ragtune.train.records import FORMATS, SHAREGPT_ROLES, detect_format


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
    refuse_file_as_folder(dest.parent, "--out's folder")
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
