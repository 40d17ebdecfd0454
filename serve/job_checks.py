"""A fine-tuning job's files checked as `ragtune data check` checks them (with the base model's
tokenizer and chat template), the result said for an API client: OpenAI's error object whose message
is the CLI's report (every bad line, what is wrong, the fix), or notes for a file that passes.

    notes: list[str] = []
    error = check_job_files(job, job_dir, tok, template, cfg.data, notes)
    # error: {"code": "invalid_training_file", "param": "training_file", "message": ...} or None
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.serve.job_store import PRIVATE


def check_job_files(job: dict[str, Any], job_dir: Path, tok: Any, template: str, dcfg: Any,
                    notes: list[str]) -> dict[str, Any] | None:
    """The error object of the first file with problems (None when both are fine); `notes` gets the
    data check's notes on files that pass. `dcfg` is the server config's data section; `tok` and
    `template` the base model's tokenizer and the chat template the job trains with."""
    from ragtune.train.data import check_file

    for param, local, what in (("training_file", "training.jsonl", "training"),
                               ("validation_file", "validation.jsonl", "validation")):
        fid = job.get(param)
        if not fid or (param == "validation_file" and fid == job["training_file"]):
            continue  # the same file is checked once (its note is an event of its own)
        filename = job[PRIVATE]["filenames"].get(param) or local
        label = f"{filename} ({fid})"
        code = f"invalid_{param}"
        try:
            rep = check_file(job_dir / local, tok, template, dcfg.max_length, dedupe=dcfg.dedupe)
        except RagtuneError as exc:  # not text, a table instead of JSONL, ...
            return {"code": code, "param": param, "message": _for_api(str(exc).replace(str(job_dir / local),
                                                                                        label))}
        rep.path = label
        fix = (f"fix the lines above and upload the file again (check it first with 'ragtune data check "
               f"{filename}'; 'ragtune data check {filename} --write-clean OUT.jsonl' writes the valid records)")
        if not rep.records:
            return {"code": code, "param": param,
                    "message": f"no valid {what} records in {label}; nothing was trained:\n{rep.format()}\n{fix}"}
        if not rep.ok and not dcfg.skip_invalid:
            return {"code": code, "param": param,
                    "message": f"the {what} data has problems; nothing was trained:\n{rep.format()}\n{fix}"
                               + (", or set data.skip_invalid: true in the server's config to train on the "
                                  f"{len(rep.records)} valid records" if what == "training" else "")}
        notes += _notes(rep, label, dcfg.max_length)
    return None


def _for_api(message: str) -> str:
    """A data-file error as an API client can act on it: no CLI flag to name an encoding (the server reads UTF-8)."""
    fixed, n = re.subn(r", or name its encoding \(.*\)$", " and upload it again", message, flags=re.S)
    return fixed if n else message


def _notes(rep: Any, label: str, max_length: int) -> list[str]:
    """The notes `ragtune data check` prints under a file that passes, said for an API user."""
    out = [n.replace(" (--json lists all)", "") for n in (rep.tool_note(), rep.duplicate_note(), rep.conflict_note())
           if n]
    cut = (rep.stats or {}).get("cut_lines") or []
    if cut:
        lines = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        out.append(f"{label}: the answers of {len(cut)} record(s) are cut at data.max_length {max_length} tokens "
                   f"(lines {lines}): their ends and stop tokens are not trained; shorten them, or raise "
                   "data.max_length in the server's config")
    if rep.rejected:
        bad = sorted(rep.rejected)
        out.append(f"{label}: {len(bad)} invalid record(s) left out (data.skip_invalid: true): lines "
                   + ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
    return out
