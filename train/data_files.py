"""Reading data files: lines as UTF-8, text in any named encoding, tables, JSON errors a person can fix.

    from ragtune.train.data_files import read_lines, decode_text, json_hint

    read_lines(Path("train.jsonl"))         # [(1, b'{"messages": ...}'), ...]: BOMs dropped, UTF-16 re-encoded
    decode_text(path, data, "cp949")        # text, or a UsageError naming the line of the first bad byte
    json_hint(raw, exc)                     # " (curly quotes ... ; near: '...')": what a hand edit got wrong
    _read_table(Path("faq.csv"))            # (columns, rows) of .csv .tsv .json .jsonl .parquet (convert)
    _refuse_existing([out], "name another file")   # outputs are replaced only with --force
    refuse_file_as_folder(Path("out/dir"), "--out-dir")   # a file where the output folder belongs

Nothing here imports torch; .parquet needs pyarrow.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ragtune.errors import UsageError
from ragtune.text import UTF16_BOMS, detect_encoding


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


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")  # what convert reads and check does not

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


def _exists(p: Path) -> bool:
    """Whether writing P would replace something: 'new/../x' names x though 'new' is not there yet
    (the writer creates it), so the path is resolved first."""
    return p.exists() or p.resolve().exists()


def refuse_file_as_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies under one (`what`: the flag naming it)."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        inside = "" if blocker == folder else f" lies under '{blocker}', which"
        raise UsageError(f"{what} '{folder}'{inside} is a file, not a folder; name a folder for the output")


def _refuse_existing(paths: list[Path], other: str) -> None:
    """Refuse outputs that are there already (the fix: --force, or OTHER)."""
    existing = [t for t in paths if _exists(t)]
    if existing:
        were = "already exists" if len(existing) == 1 else "already exist"
        raise UsageError(f"{' and '.join(repr(str(t)) for t in existing)} {were}; pass --force to replace, or {other}")


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
